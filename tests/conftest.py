"""Shared pytest setup: the ``gpu`` marker and its clean skip.

Tests marked ``@pytest.mark.gpu`` (and every test under tests/gpu/) need a CUDA device AND
the compiled extension; without either they are skipped with the reason.
"""
from pathlib import Path

import pytest
import torch

from kfac_cuda import cuda_extension_available, cuda_extension_error

GPU_DIR = Path(__file__).parent / "gpu"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device and the compiled kfac_cuda._C extension")


def gpu_skip_reason():
    """Why GPU tests cannot run here, or None when they can."""
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    if not cuda_extension_available():
        return f"CUDA extension unavailable: {cuda_extension_error()}"
    return None


def pytest_collection_modifyitems(config, items):
    reason = gpu_skip_reason()
    for item in items:
        if GPU_DIR in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.gpu)
        if reason is not None and item.get_closest_marker("gpu") is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def float64_default():
    """Run a test with float64 as torch's default dtype (ground-truth comparisons), then restore it."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
