"""Kronecker-factor accumulation: A <- beta*A + alpha * abar^T diag(w) abar.

abar = [a | 1] when ``bias`` (the homogeneous column; the kernel never materialises it),
w is an optional per-row weight (1 for K-FAC; |g_i|^2 or |abar_i|^2 for the trace-weighted
TKFAC factors). A is float32 (float64 allowed on the reference path), a may be fp32,
bf16 or fp16 (accumulated in A's dtype). With beta == 0 the old A is never read, so
NaN/Inf left in it do not propagate (the same contract as torch.addmm).
Cost: n*d^2 multiply-adds (half of them needed by symmetry), reads n*d + d^2, writes d^2.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._extension import extension
from ._checks import check_factor_args
from ._dispatch import select
from ._launch import KERNEL_INPUT_DTYPES, choose_splits, stream_handle

_MIN_ROWS_PER_SPLIT = 256


def accumulate_factor_reference(
    A: torch.Tensor,
    a: torch.Tensor,
    *,
    bias: bool,
    weights: Optional[torch.Tensor] = None,
    beta: float = 0.0,
    alpha: float = 1.0,
) -> torch.Tensor:
    """Pure-PyTorch definition; updates ``A`` in place and returns it."""
    _check_args(A, a, weights, beta, alpha)
    rows = a.to(A.dtype)
    if bias:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
    weighted = rows if weights is None else rows * weights.to(A.dtype).unsqueeze(1)
    return A.addmm_(weighted.t(), rows, beta=beta, alpha=alpha)


def accumulate_factor_cuda(
    A: torch.Tensor,
    a: torch.Tensor,
    *,
    bias: bool,
    weights: Optional[torch.Tensor] = None,
    beta: float = 0.0,
    alpha: float = 1.0,
) -> torch.Tensor:
    """CUDA kernel ``kfac_cuda._C.factor_accumulate`` on the current stream of A's device.

    Same contract as the reference; A float32, a float32/bfloat16/float16, weights float32,
    all C-contiguous on one device (the extension raises ValueError/TypeError otherwise).
    The only allocation is a split-K workspace when the factor's tiles alone cannot fill the
    GPU; the split reduction is deterministic (no atomics).
    """
    _check_args(A, a, weights, beta, alpha)
    ext = extension()
    D = A.shape[0]
    splits = choose_splits(A.device, ext.factor_accumulate_tiles(D), a.shape[0], _MIN_ROWS_PER_SPLIT, D * D)
    size = ext.factor_accumulate_workspace_size(D, splits)
    workspace = torch.empty(size, dtype=torch.float32, device=A.device) if size else None
    ext.factor_accumulate(A, a, weights, bool(bias), workspace, splits, float(beta), float(alpha),
                          stream_handle(A.device))
    return A


def _check_args(A, a, weights, beta, alpha) -> None:
    """The argument check both implementations run (kfac_cuda.ops._checks)."""
    check_factor_args("accumulate_factor", A, "a", a, 2, weights, 1, beta, alpha)


def _cuda_supports(A: torch.Tensor, a: torch.Tensor, weights: Optional[torch.Tensor]) -> bool:
    """True when the kernel accepts these arguments (otherwise "auto" uses the reference)."""
    tensors = (A, a) if weights is None else (A, a, weights)
    return (
        A.dtype == torch.float32
        and a.dtype in KERNEL_INPUT_DTYPES
        and (weights is None or weights.dtype == torch.float32)
        and all(t.is_cuda and t.device == A.device and t.is_contiguous() for t in tensors)
    )


def accumulate_factor(
    A: torch.Tensor,
    a: torch.Tensor,
    *,
    bias: bool,
    weights: Optional[torch.Tensor] = None,
    beta: float = 0.0,
    alpha: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """A <- beta*A + alpha * abar^T diag(weights) abar, in place.

    Args:
        A: (d + bias, d + bias) factor, updated in place.
        a: (n, d) rows of activations (or output gradients, with ``bias=False``).
        bias: append the implicit homogeneous 1 to every row.
        weights: optional (n,) per-row weights.
        beta, alpha: EMA weights.
        backend: "auto" | "torch" | "cuda".
    """
    _check_args(A, a, weights, beta, alpha)
    impl = select(
        "accumulate_factor", backend, A, accumulate_factor_reference, accumulate_factor_cuda,
        lambda: _cuda_supports(A, a, weights),
    )
    return impl(A, a, bias=bias, weights=weights, beta=beta, alpha=alpha)
