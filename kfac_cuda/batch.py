"""One layer's captured batch, turned into the row statistics each method accumulates.

Weight sharing (T > 1 positions per example; Eschenhagen et al. 2023, arXiv 2311.00636):
- ``expand`` treats every (example, position) as a row:
  A = 1/(n T) sum_{i,t} abar_it abar_it^T,  G = 1/n sum_{i,t} g_it g_it^T   (KFC for Conv2d);
- ``reduce`` first forms abar_i = mean_t abar_it and g_i = sum_t g_it, then
  A = 1/n sum_i abar_i abar_i^T,  G = 1/n sum_i g_i g_i^T.
With T = 1 both are the plain K-FAC factors. The output gradients g are per-example:
with a mean-reduced loss the captured gradients were already multiplied by the batch size.
"""
from __future__ import annotations

from functools import cached_property
from typing import Optional

import torch
import torch.nn.functional as F

from .layers import Conv2dAdapter, LayerAdapter
from .ops import accumulate_conv_factor, accumulate_factor

SHARING = ("expand", "reduce")


class LayerBatch:
    """Activations and per-example output gradients of one layer for one step."""

    def __init__(self, adapter: LayerAdapter, x: torch.Tensor, g: torch.Tensor, *, sharing: str,
                 backend: str, dtype: torch.dtype):
        self.adapter = adapter
        self.dtype = dtype  # the curvature's dtype (float32, or float64 for float64 models)
        self.x = x
        self.g = adapter.output_grads(g)  # (n, T, d_out)
        self.n, self.T = self.g.shape[0], self.g.shape[1]
        self.sharing = sharing
        self.backend = backend
        self.bias = adapter.has_bias

    @cached_property
    def a(self) -> torch.Tensor:
        """(n, T, d_in) activation rows (im2col patches for Conv2d)."""
        return self.adapter.activations(self.x)

    @property
    def _conv_kernel_path(self) -> bool:
        """Expanded Conv2d rows straight from the input on CUDA (the kernel needs no im2col
        buffer); elsewhere the reference would unfold anyway, so the patches are built once
        and shared with the scale update."""
        return (isinstance(self.adapter, Conv2dAdapter) and self.sharing == "expand" and self.x.dim() == 4
                and self.x.is_cuda)

    # --- rows as seen by the factors -------------------------------------------------
    def a_rows(self) -> torch.Tensor:
        return self.a.reshape(-1, self.a.shape[-1]) if self.sharing == "expand" else self.a.mean(1)

    def g_rows(self) -> torch.Tensor:
        return self.g.reshape(-1, self.g.shape[-1]) if self.sharing == "expand" else self.g.sum(1)

    @property
    def a_norm(self) -> float:
        """Row normaliser of the input-side factor: 1/(n T) for expand, 1/n for reduce."""
        return 1.0 / (self.n * self.T) if self.sharing == "expand" else 1.0 / self.n

    def g_row_sq_norms(self) -> torch.Tensor:
        """|g_r|^2 per factor row."""
        return self.g_rows().to(self.dtype).square().sum(-1)

    def a_row_sq_norms(self) -> torch.Tensor:
        """|abar_r|^2 per factor row (the homogeneous 1 included); for expanded Conv2d rows
        computed as a convolution of x^2 with a ones kernel, without patches."""
        dtype = self.dtype
        if self._conv_kernel_path:
            m = self.adapter.module
            ones = torch.ones(1, *m.weight.shape[1:], dtype=dtype, device=self.x.device)
            sq = F.conv2d(self.x.to(dtype).square(), ones, stride=m.stride, padding=m.padding, dilation=m.dilation)
            sq = sq.reshape(-1)
        else:
            sq = self.a_rows().to(dtype).square().sum(-1)
        return sq + 1.0 if self.bias else sq

    # --- factor accumulation ---------------------------------------------------------
    def accumulate_input_factor(self, A: torch.Tensor, beta: float, scale: float,
                                weights: Optional[torch.Tensor] = None) -> None:
        """A <- beta A + scale * sum_r w_r abar_r abar_r^T over the input-side rows."""
        if self._conv_kernel_path:
            m = self.adapter.module
            w = None if weights is None else weights.reshape(self.n, -1)
            accumulate_conv_factor(A, self.x, kernel_size=m.kernel_size, stride=m.stride, padding=m.padding,
                                   dilation=m.dilation, bias=self.bias, weights=w, beta=beta, alpha=scale,
                                   backend=self.backend)
        else:
            accumulate_factor(A, self.a_rows(), bias=self.bias, weights=weights, beta=beta, alpha=scale,
                              backend=self.backend)

    def accumulate_output_factor(self, G: torch.Tensor, beta: float, scale: float,
                                 weights: Optional[torch.Tensor] = None) -> None:
        """G <- beta G + scale * sum_r w_r g_r g_r^T over the output-side rows."""
        accumulate_factor(G, self.g_rows(), bias=False, weights=weights, beta=beta, alpha=scale,
                          backend=self.backend)

    # --- per-example gradients for the eigenvalue-corrected scales ------------------
    def scale_rows(self):
        """(g, a) shaped for ``accumulate_scale``: 2-D without weight sharing, else 3-D so
        that positions are summed per example before squaring."""
        if self.T == 1:
            return self.g[:, 0], self.a[:, 0]
        return self.g, self.a
