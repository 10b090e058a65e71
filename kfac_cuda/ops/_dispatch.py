"""Backend selection shared by every op: one signature, two implementations.

Each op module registers a pure-PyTorch reference (the definition of the math, runs
anywhere) and, where the compiled extension provides one, a CUDA implementation.
``backend="torch"`` forces the reference, ``backend="cuda"`` forces the kernel (and
raises a clear error when it cannot run), ``backend="auto"`` picks the kernel for CUDA
tensors when the extension is loaded, the op is in ``AUTO_KERNELS`` and the op's
``cuda_supports`` check accepts the arguments, the reference otherwise.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .._extension import cuda_extension_available, cuda_extension_error

BACKENDS = ("auto", "torch", "cuda")

#: Ops whose kernel ``backend="auto"`` may pick: only those measured correct and at least as
#: fast as the reference on an H100/H200 (tests/gpu, bench/kernel_table.py). Empty until a GPU
#: session has verified them: every kernel is compiled and CPU-emulated, none has yet run on a
#: GPU, so "auto" stays on the PyTorch reference and ``backend="cuda"`` opts in.
AUTO_KERNELS: frozenset = frozenset()


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def select(
    op_name: str,
    backend: str,
    first: torch.Tensor,
    reference: Callable,
    cuda: Optional[Callable],
    cuda_supports: Optional[Callable[[], bool]] = None,
) -> Callable:
    """Return the implementation of ``op_name`` to call for tensors living like ``first``."""
    check_backend(backend)
    if backend == "torch":
        return reference
    usable = first.is_cuda and cuda is not None and cuda_extension_available()
    if backend == "cuda":
        if not first.is_cuda:
            raise ValueError(f"{op_name}: backend='cuda' needs CUDA tensors, got device {first.device}")
        if not cuda_extension_available():
            raise RuntimeError(
                f"{op_name}: backend='cuda' but the compiled extension kfac_cuda._C is not usable: "
                f"{cuda_extension_error()}"
            )
        if cuda is None:
            raise RuntimeError(f"{op_name}: no CUDA kernel is compiled for this op")
        return cuda
    if usable and op_name in AUTO_KERNELS and (cuda_supports is None or cuda_supports()):
        return cuda
    return reference
