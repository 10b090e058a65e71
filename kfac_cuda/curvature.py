"""Per-layer curvature state of each method and its preconditioned gradient.

Notation (see layers.py for the vec / bias-column conventions): V = [dW | db] is the
(d_out, d_in + bias) gradient, abar the input row with the homogeneous 1, g the per-example
gradient w.r.t. the layer output, dW_i = sum_t g_it abar_it^T the per-example gradient.

K-FAC    A = E[abar abar^T], G = E[g g^T] (batch.py for weight sharing); A = Q_A diag(l_A) Q_A^T,
         G = Q_G diag(l_G) Q_G^T. "eigen" damping inverts A (x) G + lambda I exactly:
         U = Q_G [(Q_G^T V Q_A) / (l_G l_A^T + lambda)] Q_A^T.  "factored" damping (Martens & Grosse
         2015) inverts (A + pi sqrt(lambda) I) (x) (G + sqrt(lambda)/pi I), pi = sqrt((tr A/dim A)/(tr G/dim G)).
EKFAC    the K-FAC eigenbasis with scales S = E_i[(Q_G^T dW_i Q_A)^2] (George et al. 2018):
         U = Q_G [(Q_G^T V Q_A) / (S + lambda)] Q_A^T.
TKFAC    (Gao et al. 2021) P = E[|g|^2 abar abar^T], R = E[|abar|^2 g g^T], delta = E[|abar|^2 |g|^2]
         (rows pooled as in batch.py); Phi = P/delta, Psi = R/delta, so tr(delta Phi (x) Psi) = delta
         = tr F. Damped factors Phi^ = sqrt(delta) Phi + sqrt(lambda) I, Psi^ likewise; U = Psi^-1 V Phi^-1.
TEKFAC   the eigenbasis of Phi, Psi with scales Theta = E_i[(Q_Psi^T dW_i Q_Phi)^2] (no delta):
         U = Q_Psi [(Q_Psi^T V Q_Phi) / (Theta + lambda)] Q_Phi^T.
All factors and scales are exponential moving averages X <- beta X + (1 - beta) X_batch; the
first update of a factor takes the batch value, and after every basis refresh the scales are
re-estimated in the new basis (see ScaleMixin.update_scales), never carried over from the old one.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch

from .batch import LayerBatch
from .exponent import powered
from .layers import LayerAdapter
from .ops import accumulate_scale, precondition

Eig = Tuple[torch.Tensor, torch.Tensor]


class KFACCurvature:
    """K-FAC: factors A (input side) and G (output side) and their eigenbases."""

    factor_names = ("A", "G")
    exponent = 1.0  # the step is (F^ + damping I)^(-exponent) V (see exponent.py)

    def __init__(self, adapter: LayerAdapter, dtype: torch.dtype, device: torch.device, damping_style: str = "eigen"):
        self.adapter = adapter
        self.damping_style = damping_style
        self.dtype = dtype  # of the factors, bases and scales (float32, or float64 for float64 models)
        d_a = adapter.d_in + int(adapter.has_bias)
        self.dim = d_a * adapter.d_out
        self.grad_shape = (adapter.d_out, d_a)  # the (d_out, d_in + bias) gradient matrix it preconditions
        self.buffers: Dict[str, Optional[torch.Tensor]] = {
            "A": torch.zeros(d_a, d_a, dtype=dtype, device=device),
            "G": torch.zeros(adapter.d_out, adapter.d_out, dtype=dtype, device=device),
            "QA": None, "eA": None, "QG": None, "eG": None,
        }
        self.factors_initialized = False
        self.eigh_failures = 0

    # --- accumulation --------------------------------------------------------------------
    def _factor_beta(self, decay: float) -> float:
        return decay if self.factors_initialized else 0.0

    def update_factors(self, batch: LayerBatch, decay: float) -> None:
        beta = self._factor_beta(decay)
        batch.accumulate_input_factor(self.buffers["A"], beta, (1 - beta) * batch.a_norm)
        batch.accumulate_output_factor(self.buffers["G"], beta, (1 - beta) / batch.n)
        self.factors_initialized = True

    def zero_synced_factors(self) -> None:
        """Zeros in place of the factors that ranks average: this rank's share when its batch
        did not use the layer while another rank's did (see kfac_cuda.estimation)."""
        for t in self.synced_factors():
            t.zero_()
        self.factors_initialized = True

    def synced_factors(self) -> List[torch.Tensor]:
        """Tensors that ranks average after a factor update."""
        return [self.buffers[k] for k in self.factor_names]

    # --- eigenbases ----------------------------------------------------------------------
    def basis_sources(self) -> List[torch.Tensor]:
        """Matrices to decompose, input side first."""
        return [self.buffers[k] for k in self.factor_names]

    @property
    def has_basis(self) -> bool:
        return self.buffers["QA"] is not None

    def set_bases(self, input_eig: Eig, output_eig: Eig) -> None:
        self.buffers["eA"], self.buffers["QA"] = input_eig
        self.buffers["eG"], self.buffers["QG"] = output_eig

    def eigenbasis(self) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(Q_G, Q_A): the output- and input-side eigenbases (None where a side's basis is the
        identity: a diagonal or identity side of a wide layer, an embedding's vocabulary side)."""
        return self.buffers["QG"], self.buffers["QA"]

    def kronecker_eigenvalues(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(output side, input side) eigenvalues whose outer product is the undamped
        Kronecker approximation's spectrum in the current basis."""
        return self.buffers["eG"], self.buffers["eA"]

    # --- preconditioning -------------------------------------------------------------------
    def _rotate(self, V: torch.Tensor, backend: str, **scaling) -> Tuple[torch.Tensor, torch.Tensor]:
        """(U, <U, V>) with U = Q_G [(Q_G^T V Q_A) / denominator] Q_A^T in the current bases
        (``scaling``: ``damping`` with ``scale`` or ``eig_g``/``eig_a``, as ``ops.precondition``)."""
        return precondition(V, self.buffers["QG"], self.buffers["QA"], backend=backend,
                            **powered(self.exponent, **scaling))

    def natural_damping(self) -> Optional[float]:
        """Mean eigenvalue of the layer's curvature block, for adaptive conv damping
        (None where the method has no such damping)."""
        return None

    def precondition(self, V: torch.Tensor, damping: float, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
        b = self.buffers
        if self.damping_style == "factored":
            mean_a, mean_g = b["eA"].mean().item(), b["eG"].mean().item()
            pi = math.sqrt(mean_a / mean_g) if mean_a > 0 and mean_g > 0 else 1.0
            root = math.sqrt(damping)
            return self._rotate(V, backend, damping=0.0, eig_g=b["eG"] + root / pi, eig_a=b["eA"] + pi * root)
        return self._rotate(V, backend, damping=damping, eig_g=b["eG"], eig_a=b["eA"])

    # --- transactions ------------------------------------------------------------------------
    #: buffers that are only ever replaced (set_bases), never updated in place: a snapshot shares them
    replaced_buffers = ("QA", "eA", "QG", "eG", "delta_ref")

    def snapshot(self) -> dict:
        """The state as it is now, for :meth:`restore` (buffers updated in place are cloned)."""
        return {"buffers": {k: v if v is None or k in self.replaced_buffers else v.clone()
                            for k, v in self.buffers.items()},
                "factors_initialized": self.factors_initialized}

    def restore(self, snapshot: dict) -> None:
        """Put back the state of :meth:`snapshot` (the eigh failure count is kept)."""
        self.buffers = dict(snapshot["buffers"])
        self.factors_initialized = snapshot["factors_initialized"]

    def finite(self) -> torch.Tensor:
        """A 0-dim bool tensor: whether every buffer is finite (no host sync)."""
        flags = [torch.isfinite(v).all() for v in self.buffers.values() if v is not None]
        return torch.stack(flags).all() if flags else torch.tensor(True)

    # --- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"buffers": {k: (None if v is None else v.clone()) for k, v in self.buffers.items()},
                "factors_initialized": self.factors_initialized, "eigh_failures": self.eigh_failures}

    def buffer_shapes(self) -> Dict[str, Tuple[int, ...]]:
        """The shape of every buffer (what a checkpoint must hold)."""
        d_a, d_g = self.buffers["A"].shape[0], self.buffers["G"].shape[0]
        shapes = {"A": (d_a, d_a), "G": (d_g, d_g), "QA": (d_a, d_a), "eA": (d_a,), "QG": (d_g, d_g),
                  "eG": (d_g,), "delta": (), "delta_ref": (), "S": (d_g, d_a)}
        return {k: shapes[k] for k in self.buffers}

    def load_state_dict(self, state: dict) -> None:
        """Load a state validated by :func:`kfac_cuda.checkpoint.check_curvature_state`
        (floating-point buffers are converted to this layer's device and dtype)."""
        like = self.buffers["A"]
        for k, v in state["buffers"].items():
            self.buffers[k] = None if v is None else v.to(device=like.device, dtype=like.dtype).clone()
        self.factors_initialized = state["factors_initialized"]
        self.eigh_failures = state["eigh_failures"]


class ScaleMixin:
    """Eigenvalue-corrected scales in the current basis (EKFAC, TEKFAC)."""

    buffers: Dict[str, Optional[torch.Tensor]]

    def init_scales(self) -> None:
        self.buffers["S"] = None

    def update_scales(self, batch: LayerBatch, decay: float, fresh: bool, restart: str = "kronecker") -> None:
        """S <- decay S + (1 - decay) S_batch. Right after a basis refresh the old S belongs to
        the old basis: it is replaced by the Kronecker-structured scales of the new basis
        (``restart="kronecker"``: l_G l_A^T, the EMA factors' own estimate of the same
        quantity) before the EMA step, or dropped (``restart="batch"``: S <- S_batch)."""
        beta = self._restart_scales(decay, fresh, restart)
        self._accumulate_scales(batch, beta, (1 - beta) / batch.n)

    def _accumulate_scales(self, batch: LayerBatch, beta: float, alpha: float) -> None:
        """S <- beta S + alpha sum_i (Q_G^T dW_i Q_A)^2 over the batch's examples."""
        b = self.buffers
        for i, (g, a) in enumerate(batch.scale_rows()):  # one call per sequence length in the batch
            accumulate_scale(b["S"], g, a, b["QG"], b["QA"], bias=batch.bias, beta=beta if i == 0 else 1.0,
                             alpha=alpha, backend=batch.backend)

    def _restart_scales(self, decay: float, fresh: bool, restart: str) -> float:
        """Allocate S if there is none and restart it after a basis refresh (see
        :meth:`update_scales`); return the EMA weight of S for this step's batch."""
        b = self.buffers
        if b["S"] is None:
            b["S"] = torch.zeros(b["eG"].shape[0], b["eA"].shape[0], dtype=b["eA"].dtype, device=b["eA"].device)
            fresh = True
        if fresh and restart == "kronecker":
            torch.outer(*self.kronecker_eigenvalues(), out=b["S"])
            return decay
        return 0.0 if fresh else decay

    def zero_synced_scales(self) -> None:
        """Zeros in place of S (allocated if absent): see zero_synced_factors."""
        self._restart_scales(0.0, True, "batch")
        self.buffers["S"].zero_()

    def synced_scales(self) -> List[torch.Tensor]:
        return [self.buffers["S"]]

    def natural_damping(self) -> Optional[float]:
        return self.buffers["S"].mean().item()

    def precondition(self, V: torch.Tensor, damping: float, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
        return self._rotate(V, backend, damping=damping, scale=self.buffers["S"])


class EKFACCurvature(ScaleMixin, KFACCurvature):
    def __init__(self, adapter: LayerAdapter, dtype: torch.dtype, device: torch.device, **_):
        super().__init__(adapter, dtype, device)
        self.init_scales()


class TKFACCurvature(KFACCurvature):
    """Trace-restricted factors: A holds P = E[|g|^2 abar abar^T], G holds R = E[|abar|^2 g g^T],
    plus delta = E[|abar|^2 |g|^2]; Phi = P / delta, Psi = R / delta."""

    factor_names = ("A", "G", "delta")

    def __init__(self, adapter: LayerAdapter, dtype: torch.dtype, device: torch.device, **_):
        super().__init__(adapter, dtype, device)
        self.buffers["delta"] = torch.zeros((), dtype=dtype, device=device)
        self.buffers["delta_ref"] = None  # delta when the bases were last refreshed

    def update_factors(self, batch: LayerBatch, decay: float) -> None:
        beta = self._factor_beta(decay)
        scale = (1 - beta) / batch.n
        g_sq, a_sq = batch.g_row_sq_norms(), batch.a_row_sq_norms()
        batch.accumulate_input_factor(self.buffers["A"], beta, scale, weights=g_sq)
        batch.accumulate_output_factor(self.buffers["G"], beta, scale, weights=a_sq)
        self.buffers["delta"].mul_(beta).add_((a_sq * g_sq).sum(), alpha=scale)
        self.factors_initialized = True

    def basis_sources(self) -> List[torch.Tensor]:
        return [self.buffers["A"], self.buffers["G"]]

    def set_bases(self, input_eig: Eig, output_eig: Eig) -> None:
        """Store the eigen-decompositions of Phi and Psi (eigenvalues divided by delta)."""
        delta = self.buffers["delta"].clamp_min(torch.finfo(self.buffers["delta"].dtype).tiny)
        super().set_bases((input_eig[0] / delta, input_eig[1]), (output_eig[0] / delta, output_eig[1]))
        self.buffers["delta_ref"] = delta.clone()

    def kronecker_eigenvalues(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """delta (Lambda_Phi (x) Lambda_Psi), split as sqrt(delta) on each side."""
        root_delta = self.buffers["delta_ref"].sqrt()
        return root_delta * self.buffers["eG"], root_delta * self.buffers["eA"]

    def natural_damping(self) -> Optional[float]:
        return self.buffers["delta_ref"].item() / self.dim

    def precondition(self, V: torch.Tensor, damping: float, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
        b = self.buffers
        root_delta, root_damp = b["delta_ref"].sqrt(), math.sqrt(damping)
        return self._rotate(V, backend, damping=0.0, eig_g=root_delta * b["eG"] + root_damp,
                            eig_a=root_delta * b["eA"] + root_damp)


class TEKFACCurvature(ScaleMixin, TKFACCurvature):
    def __init__(self, adapter: LayerAdapter, dtype: torch.dtype, device: torch.device, **_):
        super().__init__(adapter, dtype, device)
        self.init_scales()


CURVATURES = {"kfac": KFACCurvature, "ekfac": EKFACCurvature, "tkfac": TKFACCurvature, "tekfac": TEKFACCurvature}
