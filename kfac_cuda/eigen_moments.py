"""Adam's first and second moments in each layer's Kronecker eigenbasis (SOAP-style).

SOAP (Vyas et al. 2024, "SOAP: Improving and Stabilizing Shampoo using Adam", arXiv 2409.11321;
reference code github.com/nikhilvyas/SOAP and heavyball's ``scale_by_soap``) runs Adam in the
eigenbasis of Shampoo's factors. ``eigenbasis_moments="adam"`` does the same in the eigenbasis
that our curvature keeps -- K-FAC/EKFAC: Q_G, Q_A of G and A; TKFAC/TEKFAC: Q_Psi, Q_Phi -- and
uses Adam's moments there in place of the curvature's eigenvalues or scales. Per layer, with
V its (d_out, d_in + bias) gradient and t the number of its steps with moments:

    G' = Q_G^T V Q_A                                     (the gradient in the eigenbasis)
    m <- b1 m + (1 - b1) G',    v <- b2 v + (1 - b2) G' * G'       (m = v = 0 before t = 1)
    U  = Q_G [ (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) ] Q_A^T,    <U, V> as usual.

m is kept in the current basis, which is the same as SOAP's first moment kept in the original
space and rotated each step (m = Q_G^T M Q_A exactly); v is kept in the current basis as SOAP
keeps it. With Q_G = Q_A = I this is torch.optim.Adam's step direction (lr = 1, no weight decay).

Basis refresh (a step whose eigendecomposition replaced Q_G, Q_A by Q_G', Q_A'): before the
moments take the step's gradient, the first moment is carried into the new basis exactly,
m <- Q_G'^T (Q_G m Q_A^T) Q_A' (SOAP re-projects its first moment the same way); the second
moment is kept coordinate by coordinate, v_ij staying with the i-th output and j-th input
eigenvector in torch.linalg.eigh's ascending eigenvalue order (SOAP keeps exp_avg_sq with its
eigenvectors sorted by estimated eigenvalue; heavyball keeps it unpermuted). The bias-correction
count t is not reset. A refresh that fails keeps the old basis and leaves the moments as they are.

What each block does under the option: Linear, Conv2d, attention projections, Conv1D: both
sides' bases. A side kept diagonal or identity (wide layers, an embedding's vocabulary side, a
tied head's diagonal vocabulary side) has the identity as its basis, so Adam runs coordinate-wise
on that side. LayerNorm/RMSNorm (a diagonal block) have the identity on both sides: their step
is plain Adam on their gradient, as SOAP treats 1-D parameters. A tied embedding/head runs the
moments in the basis of its two partial traces; each of its two uses keeps the same moments
(transposed). A layer without a basis yet keeps its raw gradient, as without the option.

The curvature supplies only the basis: the eigenvalues, EKFAC/TEKFAC's scales (not estimated
under the option, so EKFAC's step equals K-FAC's and TEKFAC's equals TKFAC's) and the damping
do not enter the step. Options that act on them are refused (:func:`check_compatible`). The
step's size is Adam's, so the Preconditioner is meant to be followed by plain SGD (no momentum:
m already is one), as SOAP's update is lr * U. Unlike SOAP the first step is not skipped (our
first basis comes from the factors before the step's gradient is rotated into it), and the step
of refresh t uses the basis refreshed at step t, with the step's batch in the factors.

The moments are part of the step's transaction: :meth:`EigenbasisMoments.propose` computes the
new moments without storing them, :meth:`EigenbasisMoments.commit` stores them once the step is
accepted. Every rank computes every layer's moments (the gradients are averaged first), so the
state is replicated and never split over ranks.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch

from . import options
from .adam_moments import adam_step, check_moment_state

MOMENTS = ("adam",)
Basis = Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]  # (output side, input side); None = identity


def into_basis(X: torch.Tensor, basis: Basis) -> torch.Tensor:
    """Q_G^T X Q_A (a side given as None is the identity)."""
    QG, QA = basis
    if QG is not None:
        X = QG.t() @ X
    return X if QA is None else X @ QA


def out_of_basis(X: torch.Tensor, basis: Basis) -> torch.Tensor:
    """Q_G X Q_A^T (a side given as None is the identity)."""
    QG, QA = basis
    if QG is not None:
        X = QG @ X
    return X if QA is None else X @ QA.t()


def same_basis(a: Basis, b: Basis) -> bool:
    """Whether two bases are the same tensors (a curvature replaces its bases, never edits them)."""
    return all(x is y for x, y in zip(a, b))


def check_compatible(*, exponent: float, grafting, damping_mode: str, damping_style: str, kl_clip) -> None:
    """Refuse options that have no meaning when the step is Adam's in the eigenbasis."""
    if exponent != 1.0:
        raise ValueError("exponent acts on the curvature's eigenvalues, which eigenbasis_moments does not use "
                         "(its step divides by sqrt(v), Adam's power 1/2): pass exponent=1.0")
    if grafting is not None:
        raise ValueError("grafting gives the curvature's direction the norm of Adam's step; with eigenbasis_moments "
                         "the step already is Adam's (in the eigenbasis): pass grafting=None")
    if damping_mode != "absolute":
        raise ValueError("damping_mode='relative' sets the damping of the eigenvalues, which eigenbasis_moments "
                         "does not use: pass damping_mode='absolute'")
    if damping_style != "eigen":
        raise ValueError("damping_style='factored' damps the factors' eigenvalues, which eigenbasis_moments does not "
                         "use: pass damping_style='eigen'")
    if kl_clip is not None:
        raise ValueError("kl_clip estimates the step's KL as lr^2 <U, V>, true for U = F^-1 V only; with "
                         "eigenbasis_moments the step is Adam's: pass kl_clip=None")


class EigenbasisMoments:
    """Per-layer Adam moments in the layers' Kronecker eigenbases; ``kind`` is "adam"."""

    def __init__(self, kind: str, *, betas: Tuple[float, float] = (0.9, 0.95), eps: float = 1e-8):
        self.kind = options.choice("eigenbasis_moments", kind, MOMENTS)
        self.betas = options.betas("moment_betas", betas)
        self.eps = options.real("moment_eps", eps, low=0.0, low_open=True)
        self.moments: Dict[str, dict] = {}  # layer -> {"step": int, "m": tensor, "v": tensor}, in its current basis

    @staticmethod
    def bases(layers, names: Sequence[str]) -> Dict[str, Basis]:
        """The current basis of each named layer (to tell, after the curvature's update, which changed)."""
        return {n: layers[n][1].eigenbasis() for n in names}

    def _step(self, name: str, V: torch.Tensor, basis: Basis, before: Basis) -> Tuple[torch.Tensor, dict]:
        G = into_basis(V, basis)
        old = self.moments.get(name)
        carried = None if old is None or same_basis(basis, before) else into_basis(out_of_basis(old["m"], before), basis)
        direction, state = adam_step(old, G, self.betas, self.eps, first_moment=carried)
        return out_of_basis(direction, basis), state

    def propose(self, layers, names: Sequence[str], grads: Dict[str, torch.Tensor], before: Dict[str, Basis]):
        """(results, pending moments): (U, <U, V>) of every named layer that has a basis, and the
        moments the step would store (:meth:`commit` them once the step is accepted)."""
        results, pending = {}, {}
        for n in names:
            curvature = layers[n][1]
            if not curvature.has_basis:
                continue
            V = grads[n].to(curvature.dtype)
            U, pending[n] = self._step(n, V, curvature.eigenbasis(), before.get(n, (None, None)))
            results[n] = (U, (U * V).sum())
        return results, pending

    @staticmethod
    def finite(pending: Dict[str, dict]) -> Dict[str, torch.Tensor]:
        """Per layer, a 0-dim bool tensor: whether its pending m and v are finite (no host sync;
        a v that overflows gives a finite, zero U, so U alone does not tell)."""
        return {n: torch.isfinite(s["m"]).all() & torch.isfinite(s["v"]).all() for n, s in pending.items()}

    def commit(self, pending: Dict[str, dict]) -> None:
        self.moments.update(pending)

    # --- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"kind": self.kind, "moments": {n: {"step": s["step"], "m": s["m"].clone(), "v": s["v"].clone()}
                                               for n, s in self.moments.items()}}

    def prepare_load(self, state, layers):
        """Validate a :meth:`state_dict` against the layers (names, shapes, finite, v >= 0, step >= 1)
        and return its loader (tensors converted to each layer's curvature dtype and device)."""
        check_moment_state(state, self.kind, "eigenbasis_moments",
                           {n: tuple(layers[n][1].grad_shape) for n in state["moments"] if n in layers})
        moments = {}
        for n, s in state["moments"].items():
            like = layers[n][1]
            device = next((t.device for t in like.buffers.values() if isinstance(t, torch.Tensor)), s["m"].device)
            moments[n] = {"step": s["step"], **{k: s[k].to(device=device, dtype=like.dtype).clone() for k in ("m", "v")}}

        def load() -> None:
            self.moments = moments

        return load


def make_moments(kind: Optional[str], **kwargs) -> Optional[EigenbasisMoments]:
    return None if kind is None else EigenbasisMoments(kind, **kwargs)
