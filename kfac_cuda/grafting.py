"""Step-size grafting and damping relative to the spectrum (two SOAP/Shampoo practices).

Grafting (Agarwal et al. 2020, "Disentangling adaptive gradient methods from learning rates";
used by Shampoo and SOAP): the preconditioner gives each layer's step its direction, a simple
optimizer its size. Each layer's preconditioned gradient U is rescaled to the norm of the
grafted optimizer's step a computed from the layer's raw gradient V:

    U <- U * ||a|| / ||U||,   a = V ("sgd")   or   a = m^ / (sqrt(v^) + eps) ("adam"),

with Adam's moments m <- b1 m + (1 - b1) V, v <- b2 v + (1 - b2) V^2 and bias corrections
m^ = m / (1 - b1^t), v^ = v / (1 - b2^t), kept per layer (t counts the layer's grafted steps).
The Adam moments are part of the step's transaction: :meth:`Grafting.propose` computes the
new moments without storing them, :meth:`Grafting.commit` stores them once the step is accepted.

Relative damping: ``damping_mode="relative"`` uses lambda_l = damping * mean eigenvalue of
layer l's (undamped) curvature block, so that one damping value fits layers whose curvature
differs by orders of magnitude (as Adam's eps does not, and Shampoo's relative epsilon does).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from . import options
from .adam_moments import adam_step, check_moment_state

GRAFTING = ("adam", "sgd")
DAMPING_MODES = ("absolute", "relative")


def mean_eigenvalue(curvature) -> float:
    """Mean eigenvalue (trace / dimension) of a layer's undamped curvature block."""
    natural = curvature.natural_damping()
    if natural is not None:
        return float(natural)
    eig_g, eig_a = curvature.kronecker_eigenvalues()  # K-FAC: mean of l_G l_A^T = mean(l_G) mean(l_A)
    return float(eig_g.mean() * eig_a.mean())


def relative_damping(damping: float, curvature) -> float:
    """lambda_l = damping * mean eigenvalue of the block (``damping`` where the block is zero)."""
    mean = mean_eigenvalue(curvature)
    return damping * mean if mean > 0 else damping


class Grafting:
    """Per-layer grafted step sizes; ``kind`` is "adam" or "sgd"."""

    def __init__(self, kind: str, *, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.kind = options.choice("grafting", kind, GRAFTING)
        self.betas = options.betas("grafting_betas", betas)
        self.eps = options.real("grafting_eps", eps, low=0.0, low_open=True)
        self.moments: Dict[str, dict] = {}  # layer -> {"step": int, "m": tensor, "v": tensor}

    def propose(self, results: Dict[str, Tuple[torch.Tensor, torch.Tensor]], grads: Dict[str, torch.Tensor]):
        """(rescaled results, pending moments): every (U, <U, V>) scaled by ||a|| / ||U||."""
        scaled, pending = {}, {}
        for n, (U, dot) in results.items():
            V = grads[n].to(U.dtype)
            if self.kind == "adam":
                a, pending[n] = adam_step(self.moments.get(n), V, self.betas, self.eps)
            else:
                a = V
            norm_u = torch.linalg.vector_norm(U)
            c = torch.where(norm_u > 0, torch.linalg.vector_norm(a) / norm_u.clamp_min(torch.finfo(U.dtype).tiny),
                            torch.zeros_like(norm_u))
            scaled[n] = (U * c, dot * c)
        return scaled, pending

    def commit(self, pending: Dict[str, dict]) -> None:
        self.moments.update(pending)

    # --- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"kind": self.kind, "moments": {n: dict(s) for n, s in self.moments.items()}}

    def prepare_load(self, state, shapes: Dict[str, Tuple[int, int]]):
        """Validate a :meth:`state_dict` against the layers' gradient shapes; return its loader."""
        check_moment_state(state, self.kind, "grafting", shapes)
        moments = {n: dict(s) for n, s in state["moments"].items()}

        def load() -> None:
            self.moments = moments

        return load


def make_grafting(kind: Optional[str], **kwargs) -> Optional[Grafting]:
    return None if kind is None else Grafting(kind, **kwargs)
