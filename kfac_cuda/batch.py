"""One layer's captured batch, turned into the row statistics each method accumulates.

Weight sharing (T > 1 positions per example; Eschenhagen et al. 2023, arXiv 2311.00636):
- ``expand`` treats every (example, position) as a row:
  A = 1/(n T) sum_{i,t} abar_it abar_it^T,  G = 1/n sum_{i,t} g_it g_it^T   (KFC for Conv2d);
- ``reduce`` first forms abar_i = mean_t abar_it and g_i = sum_t g_it, then
  A = 1/n sum_i abar_i abar_i^T,  G = 1/n sum_i g_i g_i^T.
With T = 1 both are the plain K-FAC factors. The output gradients g are per-example: the
capture multiplied them by the number of examples when the loss is a mean.

A step's batch may come from several forward passes (gradient accumulation: k micro-batches,
one ``step()``) and a layer may be called several times in one forward pass, with different
shapes (two sequence lengths, two image sizes). The calls of one forward pass are the same
examples: their positions are concatenated (an example's gradient sums over all of them);
the forward passes are different examples: their rows are pooled. n is the number of
examples of the whole step, and 1/(n T) above is 1 over the number of expanded rows.
With ``per_token`` every position is an example of its own (a loss over tokens).
"""
from __future__ import annotations

from functools import cached_property
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .layers import Conv2dAdapter, LayerAdapter
from .ops import accumulate_conv_factor, accumulate_factor

SHARING = ("expand", "reduce")
Call = Tuple[torch.Tensor, torch.Tensor]  # (layer input, per-example output gradient) of one call


class LayerBatch:
    """Activations and per-example output gradients of one layer for one step.

    Args:
        adapter: the layer.
        forwards: per forward pass that reached this step's backward, the layer's calls in it.
        examples: the number of examples (tokens, with ``per_token``) of the whole step.
        sharing: "expand" or "reduce".
        backend: for the hot ops.
        dtype: the curvature's dtype (float32, or float64 for float64 models).
        per_token: every position is an example (the loss is a sum/mean over tokens).
    """

    def __init__(self, adapter: LayerAdapter, forwards: Sequence[Sequence[Call]], *, examples: int, sharing: str,
                 backend: str, dtype: torch.dtype, per_token: bool = False):
        self.adapter = adapter
        self.dtype = dtype
        self.forwards = [list(calls) for calls in forwards]
        self.n = examples
        self.sharing = sharing
        self.backend = backend
        self.per_token = per_token
        self.bias = adapter.has_bias
        for calls in self.forwards:  # checked before any curvature changes
            sizes = [adapter.output_grads(g).shape[0] for _, g in calls]
            if len(set(sizes)) > 1:
                raise ValueError(f"kfac_cuda: layer {adapter.name!r} was called on different numbers of examples "
                                 f"in one forward pass ({sizes}); pass it in skip_modules")

    def tensors(self) -> List[torch.Tensor]:
        """Every captured input and output gradient (for the finiteness check)."""
        return [t for calls in self.forwards for call in calls for t in call]

    @cached_property
    def blocks(self) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Per forward pass, (g (n_f, T_f, d_out), a (n_f, T_f, d_in)): the calls' positions concatenated."""
        out = []
        for calls in self.forwards:
            gs = [self.adapter.output_grads(g) for _, g in calls]
            g = torch.cat(gs, dim=1) if len(gs) > 1 else gs[0]
            a = [self.adapter.activations(x) for x, _ in calls]
            a = torch.cat(a, dim=1) if len(a) > 1 else a[0]
            if self.per_token:
                g, a = g.reshape(-1, 1, g.shape[-1]), a.reshape(-1, 1, a.shape[-1])
            out.append((g, a))
        return out

    @property
    def _conv_kernel_path(self) -> bool:
        """Expanded Conv2d rows straight from the input on CUDA (the kernel needs no im2col
        buffer); elsewhere the reference would unfold anyway, so the patches are built once
        and shared with the scale update."""
        if not (isinstance(self.adapter, Conv2dAdapter) and self.sharing == "expand" and not self.per_token
                and len(self.forwards) == 1 and len(self.forwards[0]) == 1):
            return False
        x = self.forwards[0][0][0]
        return x.dim() == 4 and x.is_cuda

    @property
    def _x(self) -> torch.Tensor:
        """The single Conv2d input of the kernel path."""
        return self.forwards[0][0][0]

    # --- rows as seen by the factors -------------------------------------------------
    def a_rows(self) -> torch.Tensor:
        rows = [a.reshape(-1, a.shape[-1]) if self.sharing == "expand" else a.mean(1) for _, a in self.blocks]
        return torch.cat(rows) if len(rows) > 1 else rows[0]

    def g_rows(self) -> torch.Tensor:
        rows = [g.reshape(-1, g.shape[-1]) if self.sharing == "expand" else g.sum(1) for g, _ in self.blocks]
        return torch.cat(rows) if len(rows) > 1 else rows[0]

    @property
    def a_norm(self) -> float:
        """Row normaliser of the input-side factor: 1 over the expanded rows, 1/n for reduce."""
        if self.sharing == "reduce":
            return 1.0 / self.n
        if self._conv_kernel_path:
            return 1.0 / self.forwards[0][0][1][:, 0].numel()  # n * output pixels
        return 1.0 / sum(g.shape[0] * g.shape[1] for g, _ in self.blocks)

    def g_row_sq_norms(self) -> torch.Tensor:
        """|g_r|^2 per factor row."""
        return self.g_rows().to(self.dtype).square().sum(-1)

    def a_row_sq_norms(self) -> torch.Tensor:
        """|abar_r|^2 per factor row (the homogeneous 1 included); for expanded Conv2d rows
        computed as a convolution of x^2 with a ones kernel, without patches."""
        dtype = self.dtype
        if self._conv_kernel_path:
            m = self.adapter.module
            _, stride, padding, dilation = self.adapter.geometry
            ones = torch.ones(1, *m.weight.shape[1:], dtype=dtype, device=self._x.device)
            sq = F.conv2d(self._x.to(dtype).square(), ones, stride=stride, padding=padding, dilation=dilation)
            sq = sq.reshape(-1)
        else:
            sq = self.a_rows().to(dtype).square().sum(-1)
        return sq + 1.0 if self.bias else sq

    # --- factor accumulation ---------------------------------------------------------
    def accumulate_input_factor(self, A: torch.Tensor, beta: float, scale: float,
                                weights: Optional[torch.Tensor] = None) -> None:
        """A <- beta A + scale * sum_r w_r abar_r abar_r^T over the input-side rows."""
        if self._conv_kernel_path:
            kernel_size, stride, padding, dilation = self.adapter.geometry
            x = self._x
            w = None if weights is None else weights.reshape(x.shape[0], -1)
            accumulate_conv_factor(A, x, kernel_size=kernel_size, stride=stride, padding=padding,
                                   dilation=dilation, bias=self.bias, weights=w, beta=beta, alpha=scale,
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
    def scale_rows(self) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """(g, a) pairs shaped for ``accumulate_scale``, one per distinct number of positions T:
        2-D without weight sharing, else 3-D so that positions are summed per example before squaring."""
        by_T: dict = {}
        for g, a in self.blocks:
            by_T.setdefault(g.shape[1], []).append((g, a))
        out = []
        for T, blocks in by_T.items():
            g = torch.cat([b[0] for b in blocks]) if len(blocks) > 1 else blocks[0][0]
            a = torch.cat([b[1] for b in blocks]) if len(blocks) > 1 else blocks[0][1]
            out.append((g[:, 0], a[:, 0]) if T == 1 else (g, a))
        return out
