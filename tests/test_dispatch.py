"""Backend selection: the reference unless a kernel is asked for or verified for "auto"."""
from types import SimpleNamespace

import pytest
import torch

from kfac_cuda.ops import _dispatch
from kfac_cuda.ops._dispatch import select


def reference():
    pass


def kernel():
    pass


CUDA_LIKE = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))


def test_torch_and_cpu_tensors_take_the_reference():
    assert select("op", "torch", CUDA_LIKE, reference, kernel) is reference
    assert select("op", "auto", torch.zeros(1), reference, kernel) is reference


def test_cuda_backend_on_cpu_tensor_is_a_clear_error():
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        select("op", "cuda", torch.zeros(1), reference, kernel)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        select("op", "gpu", torch.zeros(1), reference, kernel)


def test_auto_uses_only_verified_kernels(monkeypatch):
    monkeypatch.setattr(_dispatch, "cuda_extension_available", lambda: True)
    assert select("op", "auto", CUDA_LIKE, reference, kernel) is reference
    monkeypatch.setattr(_dispatch, "AUTO_KERNELS", frozenset({"op"}))
    assert select("op", "auto", CUDA_LIKE, reference, kernel) is kernel
    assert select("op", "auto", CUDA_LIKE, reference, kernel, lambda: False) is reference
    assert select("op", "cuda", CUDA_LIKE, reference, kernel, lambda: False) is kernel
