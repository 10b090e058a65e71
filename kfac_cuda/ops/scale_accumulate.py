"""Eigenvalue-corrected scales (EKFAC / TEKFAC):

    S <- beta*S + alpha * sum_i ( Q_G^T (sum_t g_it abar_it^T) Q_A )^2     (element-wise square)

For rows without weight sharing (g: (n, d_out), a: (n, d_in)) the per-example gradient is
the outer product g_i abar_i^T, so the sum is a GEMM of squared projections:
(G~ o G~)^T (A~ o A~) with G~ = g Q_G, A~ = abar Q_A; cost 2n*d*(d_out + d_in) + n*d_out*d_in.
With weight sharing (g: (n, T, d_out), a: (n, T, d_in)) the positions are summed per
example before squaring; the reference materialises per-example gradients in chunks.
abar = [a | 1] when ``bias``. With beta == 0 the old S is not read.

The CUDA path contracts weight sharing in the cheaper of two orders per layer
(:func:`contraction_order`, multiply-adds per example, D = d_in + bias):

- "project": project every position, G~ = g Q_G and A~ = abar Q_A (torch), then the kernel
  forms each example's G~_i^T A~_i tile and accumulates its square:
  T (d_out^2 + D^2) + T d_out D.
- "rotate": form each example's gradient and rotate one side in torch (chunks of examples),
  X_i = dW_i^T Q_G = (abar_i^T g_i) Q_G, then the kernel forms the tiles of
  X_i^T Q_A = Q_G^T dW_i Q_A and accumulates their squares: T d_out D + D d_out^2 + d_out D^2.

"project" wins when T (d_out^2 + D^2) <= d_out D (d_out + D): few positions or wide layers
(ResNet-18 layer3/layer4, ViT with 512-token sequences); "rotate" when the positions
outnumber the widths (ResNet-18 layer1/layer2: T = 1024 / 256 positions, 64 / 128 channels).
"""
from __future__ import annotations

import torch

from .._extension import extension
from ._checks import INPUT_DTYPES, STATE_DTYPES, check_scalar, check_tensor
from ._dispatch import select
from ._launch import KERNEL_INPUT_DTYPES, MAX_KERNEL_DIM, choose_splits, stream_handle

_CHUNK_ELEMENTS = 1 << 24  # per-example gradients materialised at once by the reference
_MIN_ROWS_PER_SPLIT = 128
# Resident blocks per SM of the scale kernels (scale_shared_tf32_kernel's launch bound; the others
# fit at least as many): splits fill whole waves of them (csrc/scale_accumulate.cu).
_BLOCKS_PER_SM = 4


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


def contraction_order(positions: int, d_out: int, D: int) -> str:
    """"project" or "rotate" (see the module docstring): the order with fewer multiply-adds per
    example for weight sharing over ``positions`` positions, S of shape (d_out, D). Ties and
    empty sums (positions == 0) go to "project", whose kernel handles S <- beta S alone."""
    project = positions * (d_out * d_out + D * D)
    rotate = d_out * D * (d_out + D)
    return "project" if project <= rotate else "rotate"


def _rotated_gradients(g: torch.Tensor, a: torch.Tensor, QG: torch.Tensor, bias: bool) -> torch.Tensor:
    """X_i = dW_i^T Q_G = (abar_i^T g_i) Q_G for every example of g (n, T, d_out), a (n, T, d_in):
    a C-contiguous float32 (n, D, d_out) tensor (the bias row of abar_i^T g_i is sum_t g_it)."""
    g32 = g.detach().to(torch.float32)
    a32 = a.detach().to(torch.float32)
    W = torch.bmm(a32.transpose(1, 2), g32)  # (n, d_in, d_out)
    if bias:
        W = torch.cat([W, g32.sum(1, keepdim=True)], dim=1)
    n, D, d_out = W.shape
    return (W.reshape(n * D, d_out) @ QG.detach()).view(n, D, d_out)


def _accumulate_rotated(S, g, a, QG, QA, bias: bool, beta: float, alpha: float) -> torch.Tensor:
    """The "rotate" order: X_i in chunks of examples (at most _CHUNK_ELEMENTS floats), each chunk
    one kernel launch S <- beta' S + alpha sum_i (X_i^T Q_A)^2 (beta' = beta, then 1)."""
    ext = extension()
    d_out, D = S.shape
    n = g.shape[0]
    QA32 = QA.detach().to(torch.float32).contiguous()
    tiles = ext.scale_accumulate_tiles(d_out, D)
    step = max(1, _CHUNK_ELEMENTS // (D * d_out))
    for start in range(0, n, step):
        X = _rotated_gradients(g[start:start + step], a[start:start + step], QG, bias)
        count = X.shape[0]
        splits = choose_splits(S.device, tiles, count, max(1, _MIN_ROWS_PER_SPLIT // D), d_out * D,
                               blocks_per_sm=_BLOCKS_PER_SM)
        size = ext.scale_accumulate_workspace_size(d_out, D, splits)
        workspace = torch.empty(size, dtype=torch.float32, device=S.device) if size else None
        ext.scale_accumulate_broadcast(S.detach(), X, QA32, workspace, splits, float(beta), float(alpha),
                                       stream_handle(S.device))
        beta = 1.0
    return S


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

    Same contract as the reference. Without weight sharing the projections G~ = g QG and
    A~ = abar QA run as torch (cuBLAS) GEMMs in float32 and the kernel squares on load. With
    weight sharing, in the order :func:`contraction_order` picks: "project" as above, then the
    kernel forms each example's G~_i^T A~_i tile in registers and accumulates its square; or
    "rotate", per-example gradients rotated by Q_G in torch, in chunks, then the kernel forms
    (X_i^T Q_A) tiles and accumulates their squares. Squared products are never materialised.
    S must be float32 and C-contiguous (updated in place); g and a may be float32, bfloat16 or
    float16.
    """
    _check_args(S, g, a, QG, QA, beta, alpha)
    ext = extension()
    d_out, d_in = S.shape
    if g.dim() == 3 and g.shape[0] > 0 and contraction_order(g.shape[1], d_out, d_in) == "rotate":
        return _accumulate_rotated(S, g, a, QG, QA, bias, beta, alpha)
    gt = _project(g, QG, False)
    at = _project(a, QA, bias)
    n = g.shape[0]
    tiles = ext.scale_accumulate_tiles(d_out, d_in)
    if g.dim() == 2:
        splits = choose_splits(S.device, tiles, n, _MIN_ROWS_PER_SPLIT, d_out * d_in, blocks_per_sm=_BLOCKS_PER_SM)
    else:
        T = g.shape[1]
        gt, at = gt.view(n, T, d_out), at.view(n, T, d_in)
        splits = choose_splits(S.device, tiles, n, max(1, _MIN_ROWS_PER_SPLIT // max(1, T)), d_out * d_in,
                               blocks_per_sm=_BLOCKS_PER_SM)
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
    """True when "auto" may use the kernels for these arguments (otherwise the reference).
    Weight sharing only: the rows form is out of consideration, since its projections (the
    bulk of its work) are the same cuBLAS GEMMs in both paths, which caps any kernel at about
    1.1-1.5x (docs/kernels.md); backend="cuda" still runs it."""
    return (
        g.dim() == 3
        and S.dtype == QG.dtype == QA.dtype == torch.float32
        and S.dim() == 2 and S.is_contiguous()
        and 1 <= min(S.shape) and max(S.shape) < MAX_KERNEL_DIM
        and g.dtype in KERNEL_INPUT_DTYPES and a.dtype in KERNEL_INPUT_DTYPES
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
