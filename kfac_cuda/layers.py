"""Layer adapters: which modules are preconditioned, and how their inputs and output
gradients become the rows the curvature is built from.

Conventions (used by every method and checked by the tests):
- A layer's gradient is the matrix V = [dW | db] of shape (d_out, d_in + bias): the weight
  flattened to (d_out, d_in) (for Conv2d d_in = C_in*kh*kw, ordered as ``weight.reshape(d_out, -1)``)
  with the bias, when present, as the last column (homogeneous coordinate).
- vec() stacks the columns of V (column-major, ``V.t().reshape(-1)``), so the Kronecker
  block of a layer is ``kron(A, G)``: A acts on the input side, G on the output side.
- Activations arrive as (n, T, d_in) and output gradients as (n, T, d_out): n examples with T
  positions each (T = 1 for a plain linear layer; T = extra leading dims flattened for
  sequences; T = output pixels for Conv2d, with the im2col patches as activations).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from .ops import conv_patches


@dataclass
class Captured:
    """One layer's captured forward inputs and output gradients for the current step."""

    inputs: List[torch.Tensor]
    grads: List[torch.Tensor]


class LayerAdapter:
    """Base adapter: a supported module, its parameters and its row extraction."""

    module: nn.Module

    def __init__(self, name: str, module: nn.Module):
        self.name = name
        self.module = module
        self.has_bias = getattr(module, "bias", None) is not None

    # --- shapes -------------------------------------------------------------------
    @property
    def d_out(self) -> int:
        return self.module.weight.shape[0]

    @property
    def d_in(self) -> int:
        """Input features of the weight matrix, without the bias column."""
        return self.module.weight[0].numel()

    @property
    def parameters(self) -> List[nn.Parameter]:
        return [self.module.weight] + ([self.module.bias] if self.has_bias else [])

    # --- gradients ----------------------------------------------------------------
    def grad_matrix(self) -> torch.Tensor:
        """V = [dW | db], shape (d_out, d_in + bias)."""
        w = self.module.weight.grad.reshape(self.d_out, -1)
        if not self.has_bias:
            return w
        return torch.cat([w, self.module.bias.grad.reshape(-1, 1)], dim=1)

    def set_grad_matrix(self, U: torch.Tensor) -> None:
        """Write a (d_out, d_in + bias) matrix back into the parameters' ``.grad``."""
        weight = self.module.weight
        weight.grad.copy_(U[:, : self.d_in].reshape(weight.shape))
        if self.has_bias:
            self.module.bias.grad.copy_(U[:, self.d_in])

    # --- rows ---------------------------------------------------------------------
    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """Layer input -> (n, T, d_in) activation rows."""
        raise NotImplementedError

    def output_grads(self, g: torch.Tensor) -> torch.Tensor:
        """Gradient w.r.t. the layer output -> (n, T, d_out) rows."""
        raise NotImplementedError

    @staticmethod
    def batch_size(x: torch.Tensor) -> int:
        return x.shape[0] if x.dim() > 1 else 1


class LinearAdapter(LayerAdapter):
    """nn.Linear, with any number of leading dims (batch x sequence x features)."""

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(self.batch_size(x), -1, x.shape[-1])

    def output_grads(self, g: torch.Tensor) -> torch.Tensor:
        return g.reshape(self.batch_size(g), -1, g.shape[-1])


class Conv2dAdapter(LayerAdapter):
    """nn.Conv2d with groups == 1 and zero padding; positions are output pixels (KFC)."""

    @property
    def geometry(self) -> Tuple[Tuple[int, int], ...]:
        m = self.module
        return m.kernel_size, m.stride, m.padding, m.dilation

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(0)
        return conv_patches(x, *self.geometry)

    def output_grads(self, g: torch.Tensor) -> torch.Tensor:
        if g.dim() == 3:
            g = g.unsqueeze(0)
        return g.flatten(2).transpose(1, 2)


def adapter_for(name: str, module: nn.Module) -> Tuple[Optional[LayerAdapter], Optional[str]]:
    """Return (adapter, None) for a supported module, (None, reason) for a module with
    parameters of its own that cannot be preconditioned, (None, None) for the rest."""
    own = [p for p in module.parameters(recurse=False) if p.requires_grad]
    if isinstance(module, nn.MultiheadAttention):
        return None, ("nn.MultiheadAttention keeps its input projections as raw parameters and calls "
                      "out_proj functionally (write attention with nn.Linear to precondition it)")
    if isinstance(module, nn.Linear):
        return LinearAdapter(name, module), None
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return None, f"Conv2d with groups={module.groups} is not supported"
        if isinstance(module.padding, str) or module.padding_mode != "zeros":
            return None, "Conv2d with string padding or non-zero padding_mode is not supported"
        return Conv2dAdapter(name, module), None
    if own:
        return None, f"{type(module).__name__} is not a supported layer type"
    return None, None
