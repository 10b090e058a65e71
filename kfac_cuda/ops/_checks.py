"""The argument check every op runs before either implementation (the PyTorch reference and
the CUDA kernel wrapper call the same check, so both refuse the same arguments): tensors must
be torch.Tensors (not None, not NumPy arrays) of a real floating dtype (no integer factor that
would be silently truncated, no complex input whose imaginary part would be dropped), and the
scalars finite real numbers. Shapes are checked by the implementations."""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Sequence

import torch

#: factors, scales and bases: float32 (float64 on the reference path)
STATE_DTYPES = (torch.float32, torch.float64)
#: activations and gradients
INPUT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_tensor(op: str, name: str, value: Any, dtypes: Sequence[torch.dtype], *,
                 ndims: Optional[Sequence[int]] = None, optional: bool = False) -> None:
    """TypeError unless ``value`` is a tensor of one of ``dtypes`` (or None when ``optional``);
    ValueError unless its number of dimensions is in ``ndims``."""
    if value is None and optional:
        return
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        raise TypeError(f"{op}: {name} must have dtype {' or '.join(str(d) for d in dtypes)}, got {value.dtype}")
    if ndims is not None and value.dim() not in ndims:
        raise ValueError(f"{op}: {name} must have {' or '.join(map(str, ndims))} dimensions, got shape "
                         f"{tuple(value.shape)}")


def check_scalar(op: str, name: str, value: Any) -> None:
    """TypeError unless ``value`` is a real number; ValueError unless it is finite."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{op}: {name} must be finite, got {value!r}")


def check_factor_args(op: str, A: Any, rows_name: str, rows: Any, rows_ndim: int, weights: Any, weights_ndim: int,
                      beta: Any, alpha: Any) -> None:
    """The check of the factor accumulations: A <- beta*A + alpha * (weighted rows)^T rows."""
    check_tensor(op, "A", A, STATE_DTYPES, ndims=(2,))
    check_tensor(op, rows_name, rows, INPUT_DTYPES, ndims=(rows_ndim,))
    check_tensor(op, "weights", weights, INPUT_DTYPES, ndims=(weights_ndim,), optional=True)
    check_scalar(op, "beta", beta)
    check_scalar(op, "alpha", alpha)
