"""nn.LayerNorm and RMSNorm-style scale(-and-shift) layers: the exact diagonal of the Fisher.

The per-example gradient of a normalisation layer's affine parameters is
    d gamma_i = sum_t g_it * xhat_it,   d beta_i = sum_t g_it
(xhat the normalised input, g the gradient w.r.t. the layer output), so the diagonal of the
per-example (empirical or MC) Fisher block, D = E_i[V_i * V_i] with V_i = [d gamma_i | d beta_i],
is computed exactly, and the step is U = V / (D + damping). This is kfac-jax's
``ScaleAndShiftDiagonal`` block (Botev & Martens, kfac-jax, ``kfac_jax/_src/curvature_blocks``):
a scale-and-shift layer's curvature kept as its diagonal. The block is the same for every
method (the K-FAC family's Kronecker structure has nothing to factor in a vector of scales);
it is the exact diagonal of the dense Fisher (tested).

The gradient matrix V is (d, 1 + bias): the scale as one column, the shift as the bias column.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from ..layers import LinearAdapter
from .rows import example_blocks


def is_rms_norm(module: nn.Module) -> bool:
    """torch.nn.RMSNorm, or an RMSNorm-style module (class name ending in 'RMSNorm', a 1-D
    ``weight`` and ``eps`` or ``variance_epsilon``), e.g. transformers' LlamaRMSNorm."""
    if isinstance(module, getattr(nn, "RMSNorm", ())):
        return True
    weight = getattr(module, "weight", None)
    return (type(module).__name__.endswith("RMSNorm") and isinstance(weight, torch.Tensor) and weight.dim() == 1
            and (hasattr(module, "eps") or hasattr(module, "variance_epsilon")))


def norm_reason(module: nn.Module) -> Optional[str]:
    """Why a LayerNorm / RMSNorm cannot be preconditioned, or None."""
    weight = getattr(module, "weight", None)
    if weight is None:
        return None if getattr(module, "bias", None) is None else "a norm layer with a shift but no scale"
    if weight.dim() != 1:
        return f"{type(module).__name__} over a {weight.dim()}-D normalized_shape is not supported (1-D only)"
    return None


class NormAdapter(LinearAdapter):
    """LayerNorm (scale and shift) or RMSNorm (scale): rows are the normalised inputs xhat."""

    def __init__(self, name: str, module: nn.Module, *args):
        super().__init__(name, module, *args)
        self.rms = is_rms_norm(module)

    @property
    def full_factor_side(self) -> int:
        return 0  # no full factor: diagonal curvature

    def _eps(self, x: torch.Tensor) -> float:
        eps = getattr(self.module, "eps", getattr(self.module, "variance_epsilon", None))
        return torch.finfo(x.dtype).eps if eps is None else float(eps)

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """xhat (n, T, d), computed in float32 (float64 for float64 inputs)."""
        x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        if self.rms:
            xhat = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self._eps(x))
        else:
            mean = x.mean(-1, keepdim=True)
            xhat = (x - mean) * torch.rsqrt((x - mean).square().mean(-1, keepdim=True) + self._eps(x))
        return self._rows(xhat)


class DiagonalCurvature:
    """The exact Fisher diagonal D = E_i[V_i * V_i] of a scale(-and-shift) layer, EMA-averaged;
    U = V / (D + damping). No eigenbasis (``basis_sources()`` is empty); ``update_scales`` is a
    no-op, since D already is the second moment of the per-example gradients."""

    factor_names = ("D",)
    exponent = 1.0  # U = V / (D + damping)^exponent (see kfac_cuda/exponent.py)
    basis_sides = ()

    def __init__(self, adapter: NormAdapter, dtype: torch.dtype, device: torch.device, **_):
        self.adapter = adapter
        self.dtype = dtype
        self.dim = adapter.d_out * (1 + int(adapter.has_bias))
        self.grad_shape = (adapter.d_out, 1 + int(adapter.has_bias))
        self.buffers = {"D": torch.zeros(adapter.d_out, 1 + int(adapter.has_bias), dtype=dtype, device=device)}
        self.factors_initialized = False
        self.ready = False
        self.eigh_failures = 0

    def per_example_sq_sum(self, batch) -> torch.Tensor:
        """sum_i V_i * V_i over the batch's examples, shape (d, 1 + bias)."""
        total = torch.zeros_like(self.buffers["D"])
        for g, xhat in example_blocks(batch):
            g = g.to(self.dtype)
            columns = [(g * xhat.to(self.dtype)).sum(1)] + ([g.sum(1)] if self.adapter.has_bias else [])
            total += torch.stack(columns, dim=-1).square().sum(0)
        return total

    def update_factors(self, batch, decay: float) -> None:
        beta = decay if self.factors_initialized else 0.0
        D = self.buffers["D"]
        D.mul_(beta).add_(self.per_example_sq_sum(batch), alpha=(1 - beta) / batch.n)
        self.factors_initialized = True

    def synced_factors(self) -> List[torch.Tensor]:
        return [self.buffers["D"]]

    def basis_sources(self) -> List[torch.Tensor]:
        return []

    def set_bases(self) -> None:
        self.ready = True

    @property
    def has_basis(self) -> bool:
        return self.ready

    def eigenbasis(self) -> Tuple[None, None]:
        """A diagonal block's eigenbasis is the identity on both sides."""
        return None, None

    def update_scales(self, batch, decay: float, fresh: bool, restart: str = "kronecker") -> None:
        """D is refreshed with the factors; nothing else to re-estimate."""

    def synced_scales(self) -> List[torch.Tensor]:
        return []

    def natural_damping(self) -> Optional[float]:
        return self.buffers["D"].mean().item()

    def precondition(self, V: torch.Tensor, damping: float, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
        V = V.to(self.dtype)
        U = V / (self.buffers["D"] + damping).pow(self.exponent)
        return U, (U * V).sum()

    def zero_synced_factors(self) -> None:
        """Zeros in place of D (a rank whose batch did not use the layer; see curvature.py)."""
        self.buffers["D"].zero_()
        self.factors_initialized = True

    def zero_synced_scales(self) -> None:
        """No scales."""

    # --- transactions and checkpoints ---------------------------------------------------------
    basis_keys = ()

    def snapshot(self) -> dict:
        return {"D": self.buffers["D"].clone(), "factors_initialized": self.factors_initialized, "ready": self.ready}

    def restore(self, snapshot: dict) -> None:
        self.buffers["D"] = snapshot["D"]
        self.factors_initialized, self.ready = snapshot["factors_initialized"], snapshot["ready"]

    def finite(self) -> torch.Tensor:
        return torch.isfinite(self.buffers["D"]).all()

    def buffer_shapes(self) -> dict:
        return {"D": tuple(self.buffers["D"].shape)}

    def state_dict(self) -> dict:
        return {"buffers": {k: v.clone() for k, v in self.buffers.items()},
                "factors_initialized": self.factors_initialized, "ready": self.ready,
                "eigh_failures": self.eigh_failures}

    def load_state_dict(self, state: dict) -> None:
        """Load a state validated by :func:`kfac_cuda.checkpoint.check_curvature_state`."""
        self.buffers["D"] = state["buffers"]["D"].to(device=self.buffers["D"].device, dtype=self.dtype).clone()
        self.factors_initialized = state["factors_initialized"]
        self.ready = bool(state.get("ready", state["factors_initialized"]))
        self.eigh_failures = state["eigh_failures"]
