"""Layer adapters: which modules are preconditioned, and how their inputs and output
gradients become the rows the curvature is built from.

Conventions (used by every method and checked by the tests):
- A layer's gradient is the matrix V = [dW | db] of shape (d_out, d_in + bias): the weight
  flattened to (d_out, d_in) (for Conv2d d_in = C_in*kh*kw, ordered as ``weight.reshape(d_out, -1)``;
  for transformers' ``Conv1D``, whose weight is stored (d_in, d_out), its transpose) with the bias,
  when present and trainable, as the last column (homogeneous coordinate). A frozen bias
  (``requires_grad=False``) is left out: the weight alone is preconditioned.
- vec() stacks the columns of V (column-major, ``V.t().reshape(-1)``), so the Kronecker
  block of a layer is ``kron(A, G)``: A acts on the input side, G on the output side.
- Activations arrive as (n, T, d_in) and output gradients as (n, T, d_out): n examples with T
  positions each (T = 1 for a plain linear layer; T = the other leading dims flattened for
  sequences, with the examples on ``batch_dim``; T = output pixels for Conv2d, with the im2col
  patches as activations).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from .ops import conv_patches


class LayerAdapter:
    """Base adapter: a supported module, its parameters and its row extraction.

    Args:
        name: the module's name in the model.
        module: the module.
        batch_dim: the dim of a 3-D or larger input that holds the examples (0, or 1 for
            sequence-first layouts); 2-D inputs always have their examples on dim 0.
    """

    module: nn.Module

    def __init__(self, name: str, module: nn.Module, batch_dim: int = 0):
        self.name = name
        self.module = module
        self.batch_dim = batch_dim
        bias = getattr(module, "bias", None)
        self.has_bias = bias is not None and bias.requires_grad

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
        """The parameters this layer preconditions (a frozen bias is not one of them)."""
        return [self.module.weight] + ([self.module.bias] if self.has_bias else [])

    # --- gradients ----------------------------------------------------------------
    def weight_grad_matrix(self) -> torch.Tensor:
        """dW as (d_out, d_in)."""
        return self.module.weight.grad.reshape(self.d_out, -1)

    def set_weight_grad(self, U: torch.Tensor) -> None:
        """Write a (d_out, d_in) matrix into the weight's ``.grad``."""
        self.module.weight.grad.copy_(U.reshape(self.module.weight.shape))

    def grad_matrix(self) -> torch.Tensor:
        """V = [dW | db], shape (d_out, d_in + bias)."""
        w = self.weight_grad_matrix()
        if not self.has_bias:
            return w
        return torch.cat([w, self.module.bias.grad.reshape(-1, 1)], dim=1)

    def set_grad_matrix(self, U: torch.Tensor) -> None:
        """Write a (d_out, d_in + bias) matrix back into the parameters' ``.grad``."""
        self.set_weight_grad(U[:, : self.d_in])
        if self.has_bias:
            self.module.bias.grad.copy_(U[:, self.d_in])

    # --- rows ---------------------------------------------------------------------
    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """Layer input -> (n, T, d_in) activation rows."""
        raise NotImplementedError

    def output_grads(self, g: torch.Tensor) -> torch.Tensor:
        """Gradient w.r.t. the layer output -> (n, T, d_out) rows."""
        raise NotImplementedError

    def batch_size(self, x: torch.Tensor) -> int:
        """Number of examples in a layer input."""
        if x.dim() <= 1:
            return 1
        return x.shape[self.batch_dim] if x.dim() > 2 else x.shape[0]


class LinearAdapter(LayerAdapter):
    """nn.Linear, with any number of leading dims (batch x sequence x features)."""

    def _rows(self, t: torch.Tensor) -> torch.Tensor:
        if t.dim() > 2 and self.batch_dim:
            t = t.movedim(self.batch_dim, 0)
        return t.reshape(t.shape[0] if t.dim() > 1 else 1, -1, t.shape[-1])

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        return self._rows(x)

    def output_grads(self, g: torch.Tensor) -> torch.Tensor:
        return self._rows(g)


class TransposedLinearAdapter(LinearAdapter):
    """transformers' ``Conv1D`` (GPT-2): y = x @ W + b with W stored as (d_in, d_out)."""

    @property
    def d_out(self) -> int:
        return self.module.weight.shape[1]

    @property
    def d_in(self) -> int:
        return self.module.weight.shape[0]

    def weight_grad_matrix(self) -> torch.Tensor:
        return self.module.weight.grad.t()

    def set_weight_grad(self, U: torch.Tensor) -> None:
        self.module.weight.grad.copy_(U.t())


def _same_padding(module: nn.Conv2d) -> Optional[Tuple[int, int]]:
    """The explicit padding equal to ``padding='same'``, or None where 'same' pads asymmetrically
    (an odd total dilation * (kernel - 1) along some dim, e.g. an even kernel)."""
    totals = [d * (k - 1) for k, d in zip(module.kernel_size, module.dilation)]
    if any(t % 2 for t in totals):
        return None
    return tuple(t // 2 for t in totals)


class Conv2dAdapter(LayerAdapter):
    """nn.Conv2d with groups == 1 and zero padding; positions are output pixels (KFC)."""

    @property
    def padding(self) -> Tuple[int, int]:
        """Explicit (symmetric) padding; ``padding='same'``/``'valid'`` resolved."""
        p = self.module.padding
        if p == "valid":
            return (0, 0)
        if p == "same":
            return _same_padding(self.module)
        return p

    @property
    def geometry(self) -> Tuple[Tuple[int, int], ...]:
        m = self.module
        return m.kernel_size, m.stride, self.padding, m.dilation

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(0)
        return conv_patches(x, *self.geometry)

    def output_grads(self, g: torch.Tensor) -> torch.Tensor:
        if g.dim() == 3:
            g = g.unsqueeze(0)
        return g.flatten(2).transpose(1, 2)

    def batch_size(self, x: torch.Tensor) -> int:
        return x.shape[0] if x.dim() == 4 else 1


def is_transposed_linear(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (any module class named Conv1D with a 2-D weight (d_in, nf) and
    ``nf`` outputs), as in GPT-2."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2
            and weight.shape[1] == getattr(module, "nf", None))


def adapter_for(name: str, module: nn.Module, batch_dim: int = 0) -> Tuple[Optional[LayerAdapter], Optional[str]]:
    """Return (adapter, None) for a supported module, (None, reason) for a module with
    parameters of its own that cannot be preconditioned, (None, None) for the rest."""
    own = [p for p in module.parameters(recurse=False) if p.requires_grad]
    if isinstance(module, nn.MultiheadAttention):
        return None, ("nn.MultiheadAttention keeps its input projections as raw parameters and calls "
                      "out_proj functionally (write attention with nn.Linear to precondition it)")
    if isinstance(module, nn.Linear):
        return LinearAdapter(name, module, batch_dim), None
    if is_transposed_linear(module):
        return TransposedLinearAdapter(name, module, batch_dim), None
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return None, f"Conv2d with groups={module.groups} is not supported"
        if module.padding_mode != "zeros":
            return None, f"Conv2d with padding_mode={module.padding_mode!r} is not supported (zero padding only)"
        if module.padding == "same" and _same_padding(module) is None:
            return None, ("Conv2d with padding='same' pads asymmetrically here (odd dilation*(kernel-1), e.g. an "
                          "even kernel), which is not supported (use an odd kernel or explicit padding)")
        return Conv2dAdapter(name, module, batch_dim), None
    if own:
        return None, f"{type(module).__name__} is not a supported layer type"
    return None, None
