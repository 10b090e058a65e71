"""Conv2d activation factor (K-FAC-expand / KFC): A <- beta*A + alpha * sum over rows of
abar abar^T, where the rows are the im2col patches of the input (one per example and
output position), with the homogeneous 1 appended when the layer has a bias, and an
optional per-row weight w of shape (n, positions).

The reference builds the im2col buffer with ``torch.nn.functional.unfold``
(n * positions * C*kh*kw elements); the kernel reads the input tensor directly.
Cost: n*positions*d^2 multiply-adds with d = C*kh*kw (+1).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .._extension import extension
from ._checks import check_factor_args
from ._dispatch import select
from ._launch import KERNEL_INPUT_DTYPES, MAX_KERNEL_DIM, MAX_SPLIT_WORKSPACE, _sm_count, stream_handle
from .factor_accumulate import accumulate_factor_reference

_MIN_ROWS_PER_SPLIT = 256
# Thread blocks of the conv kernels resident per SM (128 threads x <= 128 registers: the
# register budget of tests/test_sass_gates.py; the SIMT fallback, 256 x 64, also 4).
_RESIDENT_BLOCKS_PER_SM = 4


def conv_splits(sms: int, tiles: int, rows: int, d: int) -> int:
    """Parts to cut the n*positions rows into: as many as keep tiles * splits within one wave
    of resident blocks (_RESIDENT_BLOCKS_PER_SM per SM; a partial second wave would leave a
    tail of lone, latency-bound blocks), with >= _MIN_ROWS_PER_SPLIT rows per part and at most
    MAX_SPLIT_WORKSPACE floats of partials (d*d per part). 1 means no split."""
    want = _RESIDENT_BLOCKS_PER_SM * sms // max(1, tiles)
    by_length = rows // _MIN_ROWS_PER_SPLIT
    by_memory = MAX_SPLIT_WORKSPACE // max(1, d * d)
    return int(max(1, min(want, by_length, by_memory, 256)))


def conv_patches(
    x: torch.Tensor,
    kernel_size: Tuple[int, int],
    stride: Tuple[int, int],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
) -> torch.Tensor:
    """(n, C, H, W) input -> (n, positions, C*kh*kw) patches, ordered like the weight's
    (C_out, C, kh, kw) view as (C_out, C*kh*kw)."""
    cols = F.unfold(x, kernel_size, dilation=dilation, padding=padding, stride=stride)
    return cols.transpose(1, 2)


def accumulate_conv_factor_reference(
    A: torch.Tensor,
    x: torch.Tensor,
    *,
    kernel_size: Tuple[int, int],
    stride: Tuple[int, int],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
    bias: bool,
    weights: Optional[torch.Tensor] = None,
    beta: float = 0.0,
    alpha: float = 1.0,
) -> torch.Tensor:
    _check_args(A, x, weights, beta, alpha)
    patches = conv_patches(x, kernel_size, stride, padding, dilation)
    rows = patches.reshape(-1, patches.shape[-1])
    w = None if weights is None else weights.reshape(-1)
    return accumulate_factor_reference(A, rows, bias=bias, weights=w, beta=beta, alpha=alpha)


def _pair(v) -> Tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _patch_rows(x: torch.Tensor, kernel_size, stride, padding, dilation) -> int:
    """n * OH * OW: rows of the implicit im2col matrix (0 when the kernel does not fit)."""
    out = []
    for i in range(2):
        span = x.shape[2 + i] + 2 * padding[i] - dilation[i] * (kernel_size[i] - 1) - 1
        out.append(0 if span < 0 else span // stride[i] + 1)
    return x.shape[0] * out[0] * out[1]


def accumulate_conv_factor_cuda(
    A: torch.Tensor,
    x: torch.Tensor,
    *,
    kernel_size: Tuple[int, int],
    stride: Tuple[int, int],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
    bias: bool,
    weights: Optional[torch.Tensor] = None,
    beta: float = 0.0,
    alpha: float = 1.0,
) -> torch.Tensor:
    """CUDA kernel ``kfac_cuda._C.conv_factor_accumulate`` on the current stream of A's device.

    Same contract as the reference, without its im2col buffer: patches are gathered from x
    on the fly. A must be float32 and C-contiguous (updated in place, exactly symmetric);
    x float32/bfloat16/float16 (a channels-last x is copied to NCHW first); weights are
    cast to float32. The only allocation is a split-K workspace when the factor alone has
    too few 64 x 64 tiles to fill the GPU (at most 256 MiB).
    """
    _check_args(A, x, weights, beta, alpha)
    ext = extension()
    kernel_size, stride, padding, dilation = (_pair(v) for v in (kernel_size, stride, padding, dilation))
    x = x.detach().contiguous()  # DLPack refuses tensors that require grad
    if weights is not None:
        weights = weights.detach().to(torch.float32).contiguous()
    d = A.shape[0]
    rows = _patch_rows(x, kernel_size, stride, padding, dilation)
    index = A.device.index if A.device.index is not None else torch.cuda.current_device()
    splits = conv_splits(_sm_count(index), ext.conv_factor_tiles(d), rows, d)
    size = ext.conv_factor_workspace_size(d, splits)
    workspace = torch.empty(size, dtype=torch.float32, device=A.device) if size else None
    ext.conv_factor_accumulate(A.detach(), x, weights, kernel_size, stride, padding, dilation, bool(bias), workspace,
                               splits, float(beta), float(alpha), stream_handle(A.device))
    return A


def _check_args(A, x, weights, beta, alpha) -> None:
    """The argument check both implementations run (kfac_cuda.ops._checks)."""
    check_factor_args("accumulate_conv_factor", A, "x", x, 4, weights, 2, beta, alpha)


def _cuda_supports(A, x, weights, geometry) -> bool:
    """True when the kernel takes these arguments (otherwise "auto" uses the reference)."""
    if any(isinstance(v, str) for v in geometry):  # e.g. padding="same": leave it to the reference
        return False
    return (
        A.dtype == torch.float32 and A.dim() == 2 and A.is_contiguous()
        and x.dim() == 4 and x.dtype in KERNEL_INPUT_DTYPES
        and 1 <= A.shape[0] < MAX_KERNEL_DIM
        and _patch_rows(x, *(_pair(v) for v in geometry)) < 2**31  # row index fits an int
        and all(t.device == A.device for t in ([x] if weights is None else [x, weights]))
    )


def accumulate_conv_factor(
    A: torch.Tensor,
    x: torch.Tensor,
    *,
    kernel_size: Tuple[int, int],
    stride: Tuple[int, int],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
    bias: bool,
    weights: Optional[torch.Tensor] = None,
    beta: float = 0.0,
    alpha: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """In place: A <- beta*A + alpha * sum_{i,t} w_it abar_it abar_it^T over the patches of ``x``.

    Args:
        A: (C*kh*kw + bias) square factor.
        x: (n, C, H, W) layer input.
        kernel_size, stride, padding, dilation: the Conv2d's geometry (pairs).
        weights: optional (n, positions) per-row weights.
    """
    _check_args(A, x, weights, beta, alpha)
    impl = select("accumulate_conv_factor", backend, A, accumulate_conv_factor_reference,
                  accumulate_conv_factor_cuda,
                  lambda: _cuda_supports(A, x, weights, (kernel_size, stride, padding, dilation)))
    return impl(A, x, kernel_size=kernel_size, stride=stride, padding=padding,
                dilation=dilation, bias=bias, weights=weights, beta=beta, alpha=alpha)
