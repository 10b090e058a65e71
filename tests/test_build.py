"""The package imports, and says whether (and why not) the CUDA extension is loaded."""
import importlib.util
import os

import pytest

import kfac_cuda
from kfac_cuda._extension import extension


def test_extension_status_is_consistent():
    available = kfac_cuda.cuda_extension_available()
    assert isinstance(available, bool)
    if available:
        assert kfac_cuda.cuda_extension_error() is None
    else:
        error = kfac_cuda.cuda_extension_error()
        assert isinstance(error, str) and "kfac_cuda._C" in error
        with pytest.raises(RuntimeError, match="kfac_cuda._C"):
            extension()


@pytest.mark.skipif(os.environ.get("KFAC_CUDA_REQUIRE_EXTENSION") != "1",
                    reason="KFAC_CUDA_REQUIRE_EXTENSION=1 not set (CI sets it)")
def test_extension_is_built_when_required():
    assert importlib.util.find_spec("kfac_cuda._C") is not None, "kfac_cuda._C was not built"
    assert kfac_cuda.cuda_extension_available(), kfac_cuda.cuda_extension_error()
    module = extension()
    assert isinstance(module.cuda_architectures, str) and module.cuda_architectures
    assert hasattr(module, "factor_accumulate")


def test_device_count_is_clean():
    """Without a GPU or driver: 0 or a RuntimeError that says so, never a crash."""
    if not kfac_cuda.cuda_extension_available():
        pytest.skip(f"extension unavailable: {kfac_cuda.cuda_extension_error()}")
    try:
        count = extension().device_count()
    except RuntimeError as exc:
        assert "driver" in str(exc)
    else:
        assert isinstance(count, int) and count >= 0
