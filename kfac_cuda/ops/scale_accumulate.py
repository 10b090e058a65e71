"""Eigenvalue-corrected scales (EKFAC / TEKFAC):

    S <- beta*S + alpha * sum_i ( Q_G^T (sum_t g_it abar_it^T) Q_A )^2     (element-wise square)

For rows without weight sharing (g: (n, d_out), a: (n, d_in)) the per-example gradient is
the outer product g_i abar_i^T, so the sum is a GEMM of squared projections:
(G~ o G~)^T (A~ o A~) with G~ = g Q_G, A~ = abar Q_A; cost 2n*d*(d_out + d_in) + n*d_out*d_in.
With weight sharing (g: (n, T, d_out), a: (n, T, d_in)) the positions are summed per
example before squaring; the reference materialises per-example gradients in chunks.
abar = [a | 1] when ``bias``. With beta == 0 the old S is not read.
"""
from __future__ import annotations

import torch

from .._extension import extension
from ._checks import INPUT_DTYPES, STATE_DTYPES, check_scalar, check_tensor
from ._dispatch import select
from ._launch import KERNEL_INPUT_DTYPES, MAX_KERNEL_DIM, choose_splits, stream_handle

_CHUNK_ELEMENTS = 1 << 24  # per-example gradients materialised at once by the reference
_MIN_ROWS_PER_SPLIT = 128


def accumulate_scale_reference(
    S: torch.Tensor,
    g: torch.Tensor,
    a: torch.Tensor,
    QG: torch.Tensor,
    QA: torch.Tensor,
    *,
    bias: bool,
    beta: float = 0.0,
    alpha: float = 1.0,
) -> torch.Tensor:
    _check_args(S, g, a, QG, QA, beta, alpha)
    g = g.to(S.dtype)
    a = a.to(S.dtype)
    if bias:
        a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
    if g.dim() == 2:
        batch = (g @ QG).square().t() @ (a @ QA).square()
    else:
        n = g.shape[0]
        step = max(1, _CHUNK_ELEMENTS // (S.numel()))
        batch = torch.zeros_like(S)
        for start in range(0, n, step):
            per_example = torch.einsum("ntg,nta->nga", g[start:start + step], a[start:start + step])
            batch += (QG.t() @ per_example @ QA).square().sum(0)
    if beta == 0.0:
        return S.copy_(batch).mul_(alpha)
    return S.mul_(beta).add_(batch, alpha=alpha)


def _project(x: torch.Tensor, Q: torch.Tensor, bias: bool) -> torch.Tensor:
    """x Q (or [x | 1] Q = x Q[:-1] + Q[-1] with bias, without materialising [x | 1]) as a
    C-contiguous float32 matrix over the flattened leading dimensions."""
    rows = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
    Q = Q.detach()
    if bias:
        return torch.addmm(Q[-1], rows, Q[:-1])
    return rows @ Q


def accumulate_scale_cuda(
    S: torch.Tensor,
    g: torch.Tensor,
    a: torch.Tensor,
    QG: torch.Tensor,
    QA: torch.Tensor,
    *,
    bias: bool,
    beta: float = 0.0,
    alpha: float = 1.0,
) -> torch.Tensor:
    """CUDA kernels ``kfac_cuda._C.scale_accumulate[_shared]`` on the current stream of S's device.

    Same contract as the reference. The projections G~ = g QG and A~ = abar QA run as torch
    (cuBLAS) GEMMs in float32; the kernel then squares on load (no weight sharing) or forms
    each example's G~_i^T A~_i tile in registers and accumulates its square (weight sharing),
    never materialising per-example gradients. S must be float32 and C-contiguous (updated
    in place); g and a may be float32, bfloat16 or float16.
    """
    _check_args(S, g, a, QG, QA, beta, alpha)
    ext = extension()
    d_out, d_in = S.shape
    gt = _project(g, QG, False)
    at = _project(a, QA, bias)
    n = g.shape[0]
    tiles = ext.scale_accumulate_tiles(d_out, d_in)
    if g.dim() == 2:
        splits = choose_splits(S.device, tiles, n, _MIN_ROWS_PER_SPLIT, d_out * d_in)
    else:
        T = g.shape[1]
        gt, at = gt.view(n, T, d_out), at.view(n, T, d_in)
        splits = choose_splits(S.device, tiles, n, max(1, _MIN_ROWS_PER_SPLIT // max(1, T)), d_out * d_in)
    size = ext.scale_accumulate_workspace_size(d_out, d_in, splits)
    workspace = torch.empty(size, dtype=torch.float32, device=S.device) if size else None
    launch = ext.scale_accumulate if g.dim() == 2 else ext.scale_accumulate_shared
    launch(S.detach(), gt, at, workspace, splits, float(beta), float(alpha), stream_handle(S.device))
    return S


def _check_args(S, g, a, QG, QA, beta, alpha) -> None:
    """The argument check both implementations run (kfac_cuda.ops._checks)."""
    for name, t in (("S", S), ("QG", QG), ("QA", QA)):
        check_tensor("accumulate_scale", name, t, STATE_DTYPES, ndims=(2,))
    for name, t in (("g", g), ("a", a)):
        check_tensor("accumulate_scale", name, t, INPUT_DTYPES, ndims=(2, 3))
    if g.dim() != a.dim() or g.shape[:-1] != a.shape[:-1]:
        raise ValueError(f"accumulate_scale: g {tuple(g.shape)} and a {tuple(a.shape)} rows differ")
    check_scalar("accumulate_scale", "beta", beta)
    check_scalar("accumulate_scale", "alpha", alpha)


def _cuda_supports(S, g, a, QG, QA) -> bool:
    """True when the kernels take these arguments (otherwise "auto" uses the reference)."""
    return (
        S.dtype == QG.dtype == QA.dtype == torch.float32
        and S.dim() == 2 and S.is_contiguous()
        and 1 <= min(S.shape) and max(S.shape) < MAX_KERNEL_DIM
        and g.dtype in KERNEL_INPUT_DTYPES and a.dtype in KERNEL_INPUT_DTYPES
        and g.dim() in (2, 3)
        and g[..., 0].numel() < 2**31
        and all(t.device == S.device for t in (g, a, QG, QA))
    )


def accumulate_scale(
    S: torch.Tensor,
    g: torch.Tensor,
    a: torch.Tensor,
    QG: torch.Tensor,
    QA: torch.Tensor,
    *,
    bias: bool,
    beta: float = 0.0,
    alpha: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """In place: S <- beta*S + alpha * sum_i (Q_G^T dW_i Q_A)^2 with dW_i = sum_t g_it abar_it^T.

    Args:
        S: (d_out, d_in + bias) scales.
        g: (n, d_out) or (n, T, d_out) output gradients (already per-example scaled).
        a: (n, d_in) or (n, T, d_in) activations.
        QG, QA: eigenbases, (d_out, d_out) and (d_in + bias, d_in + bias).
    """
    _check_args(S, g, a, QG, QA, beta, alpha)
    impl = select("accumulate_scale", backend, S, accumulate_scale_reference, accumulate_scale_cuda,
                  lambda: _cuda_supports(S, g, a, QG, QA))
    return impl(S, g, a, QG, QA, bias=bias, beta=beta, alpha=alpha)
