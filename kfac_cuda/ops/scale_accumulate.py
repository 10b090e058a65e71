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

from ._dispatch import select

_CHUNK_ELEMENTS = 1 << 24  # per-example gradients materialised at once by the reference


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
    if g.dim() != a.dim() or g.shape[:-1] != a.shape[:-1]:
        raise ValueError(f"accumulate_scale: g {tuple(g.shape)} and a {tuple(a.shape)} rows differ")
    impl = select("accumulate_scale", backend, S, accumulate_scale_reference, None)
    return impl(S, g, a, QG, QA, bias=bias, beta=beta, alpha=alpha)
