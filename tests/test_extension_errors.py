"""The extension's tensor intake rejects bad arguments with a Python exception naming the
argument, before touching memory or launching anything, and never crashes.

Runs without a GPU: CPU tensors and NumPy arrays are real producers; FakeCudaTensor
(tests/dlpack_fake.py) claims CUDA residence so every later check can be reached.
"""
import numpy as np
import pytest
import torch

from dlpack_fake import BFLOAT16, FLOAT16, FLOAT64, INT32, READ_ONLY, FakeCudaTensor, capsule_has_name
from kfac_cuda import cuda_extension_available, cuda_extension_error

pytestmark = pytest.mark.skipif(not cuda_extension_available(),
                                reason=f"CUDA extension unavailable: {cuda_extension_error()}")


def call(A, a, weights=None, bias=True, beta=0.0, alpha=1.0, stream=0):
    from kfac_cuda._extension import extension
    extension().factor_accumulate(A, a, weights, bias, None, 1, beta, alpha, stream)


def good_A(d=3, bias=True, **kw):
    return FakeCudaTensor([d + bias, d + bias], **kw)


@pytest.mark.parametrize("make", [lambda s: torch.zeros(s, dtype=torch.float32),
                                  lambda s: np.zeros(s, dtype=np.float32)], ids=["torch", "numpy"])
def test_cpu_tensor_is_value_error_naming_argument(make):
    with pytest.raises(ValueError, match=r"^A: expected a CUDA tensor, got one on cpu"):
        call(make((4, 4)), make((5, 3)))
    A = good_A()
    with pytest.raises(ValueError, match=r"^a: expected a CUDA tensor, got one on cpu"):
        call(A, make((5, 3)))
    assert A.deleted == 1
    with pytest.raises(ValueError, match=r"^weights: expected a CUDA tensor"):
        call(good_A(), FakeCudaTensor([5, 3]), weights=make((5,)))


def test_cpu_tensor_is_never_exported():
    cpu = FakeCudaTensor([5, 3], device_type=1)
    with pytest.raises(ValueError, match="^a: "):
        call(good_A(), cpu)
    assert cpu.streams == []  # the device check came first


@pytest.mark.parametrize("obj", [None, [1.0, 2.0], 3.0, "A"])
def test_non_tensor_is_type_error(obj):
    with pytest.raises(TypeError, match=r"^A: expected a CUDA tensor supporting DLPack"):
        call(obj, FakeCudaTensor([5, 3]))
    with pytest.raises(TypeError, match=r"^a: "):
        call(good_A(), obj)


def test_bad_dlpack_device_is_type_error():
    class Odd:
        def __dlpack__(self, stream=None):
            raise AssertionError("must not export")

        def __dlpack_device__(self):
            return "cuda"

    with pytest.raises(TypeError, match="^A: __dlpack_device__"):
        call(Odd(), FakeCudaTensor([5, 3]))


@pytest.mark.parametrize("dtype", [FLOAT64, INT32])
def test_wrong_input_dtype_is_type_error(dtype):
    a = FakeCudaTensor([5, 3], dtype=dtype)
    with pytest.raises(TypeError, match=r"^a: expected dtype float32, bfloat16, float16, got"):
        call(good_A(), a)
    assert a.deleted == 1


@pytest.mark.parametrize("dtype", [BFLOAT16, FLOAT16, FLOAT64])
def test_factor_must_be_float32(dtype):
    with pytest.raises(TypeError, match=r"^A: expected dtype float32, got"):
        call(good_A(dtype=dtype), FakeCudaTensor([5, 3]))


def test_weights_must_be_float32():
    with pytest.raises(TypeError, match=r"^weights: expected dtype float32"):
        call(good_A(), FakeCudaTensor([5, 3]), weights=FakeCudaTensor([5], dtype=BFLOAT16))


def test_non_contiguous_is_value_error():
    with pytest.raises(ValueError, match=r"^a: must be C-contiguous"):
        call(good_A(), FakeCudaTensor([5, 3], strides=[1, 5]))
    with pytest.raises(ValueError, match=r"^A: must be C-contiguous"):
        call(FakeCudaTensor([4, 4], strides=[8, 1]), FakeCudaTensor([5, 3]))


def test_extent_one_strides_are_ignored_for_contiguity():
    """torch reports arbitrary strides for size-1 dims; those tensors are contiguous."""
    with pytest.raises(ValueError, match=r"^A: expected shape \(4, 4\)"):  # got past contiguity
        call(FakeCudaTensor([3, 3]), FakeCudaTensor([1, 3], strides=[123, 1]))


@pytest.mark.parametrize("A_shape,a_shape,bias,match", [
    ([4, 4], [5, 3], False, r"^A: expected shape \(3, 3\) for a of shape \(5, 3\) without bias, got \(4, 4\)"),
    ([3, 3], [5, 3], True, r"^A: expected shape \(4, 4\) for a of shape \(5, 3\) with bias"),
    ([4, 5], [5, 3], True, r"^A: expected shape \(4, 4\)"),
    ([16], [5, 3], True, r"^A: expected 2 dimensions, got 1"),
    ([4, 4], [15], True, r"^a: expected 2 dimensions, got 1"),
    ([4, 4], [5, 3, 1], True, r"^a: expected 2 dimensions, got 3"),
])
def test_mismatched_shapes_are_value_errors(A_shape, a_shape, bias, match):
    A, a = FakeCudaTensor(A_shape), FakeCudaTensor(a_shape)
    with pytest.raises(ValueError, match=match):
        call(A, a, bias=bias)
    a_taken = not match.startswith("^A: expected 2 dimensions")  # A is checked before a is taken
    assert A.deleted == 1 and a.deleted == int(a_taken)


def test_weights_length_must_match_rows():
    with pytest.raises(ValueError, match=r"^weights: expected shape \(5,\) to match a's rows, got \(4,\)"):
        call(good_A(), FakeCudaTensor([5, 3]), weights=FakeCudaTensor([4]))


def test_read_only_factor_is_rejected():
    with pytest.raises(ValueError, match=r"^A: is read-only"):
        call(good_A(flags=READ_ONLY), FakeCudaTensor([5, 3]))


def test_tensors_on_different_devices_are_rejected():
    with pytest.raises(ValueError, match=r"^a: expected a tensor on cuda:0, got one on cuda:1"):
        call(good_A(device_id=0), FakeCudaTensor([5, 3], device_id=1))


def test_unknown_major_version_is_buffer_error():
    A = good_A(major=2)
    with pytest.raises(BufferError, match="^A: unsupported DLPack major version 2"):
        call(A, FakeCudaTensor([5, 3]))
    assert capsule_has_name(A.capsule, b"dltensor_versioned")  # left to the producer


@pytest.mark.parametrize("versioned", [True, False])
@pytest.mark.parametrize("accepts_max_version", [True, False])
def test_capsules_are_consumed_renamed_and_deleted(versioned, accepts_max_version):
    A = good_A(versioned=versioned, accepts_max_version=accepts_max_version)
    bad = FakeCudaTensor([5, 3], dtype=FLOAT64)
    with pytest.raises(TypeError, match="^a: "):
        call(A, bad, stream=7)
    name = b"used_dltensor_versioned" if versioned else b"used_dltensor"
    assert capsule_has_name(A.capsule, name)
    assert A.deleted == 1 and bad.deleted == 1
    assert A.streams == [7]


def test_default_stream_is_sent_as_one():
    A = good_A()
    with pytest.raises(TypeError):
        call(A, FakeCudaTensor([5, 3], dtype=FLOAT64), stream=0)
    assert A.streams == [1]  # DLPack: 0 is ambiguous, 1 is the legacy default stream


@pytest.mark.parametrize("kwargs", [{"beta": "x"}, {"alpha": None}, {"bias": "yes"}, {"stream": -1.5}])
def test_bad_scalars_are_type_errors(kwargs):
    with pytest.raises(TypeError):
        call(good_A(), FakeCudaTensor([5, 3]), **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="valid fake tensors would reach a real kernel launch")
def test_valid_arguments_without_driver_raise_runtime_error():
    A, a, w = good_A(), FakeCudaTensor([5, 3]), FakeCudaTensor([5])
    with pytest.raises(RuntimeError, match="cuda"):
        call(A, a, weights=w)
    assert (A.deleted, a.deleted, w.deleted) == (1, 1, 1)
