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

from ._dispatch import select
from .factor_accumulate import accumulate_factor_reference


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
    patches = conv_patches(x, kernel_size, stride, padding, dilation)
    rows = patches.reshape(-1, patches.shape[-1])
    w = None if weights is None else weights.reshape(-1)
    return accumulate_factor_reference(A, rows, bias=bias, weights=w, beta=beta, alpha=alpha)


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
    impl = select("accumulate_conv_factor", backend, A, accumulate_conv_factor_reference, None)
    return impl(A, x, kernel_size=kernel_size, stride=stride, padding=padding,
                dilation=dilation, bias=bias, weights=weights, beta=beta, alpha=alpha)
