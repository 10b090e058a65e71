"""The precondition / scale / conv-factor bindings of kfac_cuda._C reject bad arguments with
a Python exception naming the argument, before any launch, and never crash.

Runs without a GPU whenever the extension is built: CPU torch tensors are real DLPack
producers, FakeCudaTensor (tests/dlpack_fake.py) claims CUDA residence so the later checks
(dtype, shape, contiguity, workspace, geometry) are reached. Nothing here may get as far as
a launch: the fakes' memory is host memory.
"""
import pytest
import torch

from dlpack_fake import BFLOAT16, FLOAT16, FLOAT64, INT32, READ_ONLY, FakeCudaTensor
from kfac_cuda import cuda_extension_available, cuda_extension_error
from kfac_cuda.ops import accumulate_conv_factor, accumulate_scale, precondition

pytestmark = pytest.mark.skipif(not cuda_extension_available(),
                                reason=f"CUDA extension unavailable: {cuda_extension_error()}")



def ext():
    from kfac_cuda._extension import extension
    return extension()


F = FakeCudaTensor


# --- precondition ------------------------------------------------------------------------
def pre_args(d_out=5, d_in=3, **override):
    args = dict(grad=F([d_out, d_in]), QG=F([d_out, d_out]), QA=F([d_in, d_in]), scale=F([d_out, d_in]),
                eig_g=None, eig_a=None, damping=0.1, out=F([d_out, d_in]), dot=F([]),
                workspace=F([ext().precondition_workspace_size(d_out, d_in)]), stream=0)
    args.update(override)
    return args


def call_pre(**override):
    ext().precondition(**pre_args(**override))


PRE_TENSORS = ["grad", "QG", "QA", "scale", "out", "dot", "workspace"]


@pytest.mark.parametrize("name", PRE_TENSORS)
def test_precondition_cpu_tensor_names_argument(name):
    shape = list(pre_args()[name].shape)
    with pytest.raises(ValueError, match=rf"^{name}: expected a CUDA tensor, got one on cpu"):
        call_pre(**{name: torch.zeros(shape)})


@pytest.mark.parametrize("name", PRE_TENSORS)
def test_precondition_wrong_dtype_names_argument(name):
    shape = list(pre_args()[name].shape)
    with pytest.raises(TypeError, match=rf"^{name}: expected dtype"):
        call_pre(**{name: F(shape, dtype=FLOAT64)})


@pytest.mark.parametrize("dtype", [FLOAT16, INT32])
def test_precondition_grad_dtypes(dtype):
    with pytest.raises(TypeError, match=r"^grad: expected dtype float32, bfloat16, got"):
        call_pre(grad=F([5, 3], dtype=dtype))


@pytest.mark.parametrize("name", ["QG", "QA", "scale", "out"])
def test_precondition_bases_and_outputs_must_be_float32(name):
    shape = list(pre_args()[name].shape)
    with pytest.raises(TypeError, match=rf"^{name}: expected dtype float32, got bfloat16"):
        call_pre(**{name: F(shape, dtype=BFLOAT16)})


@pytest.mark.parametrize("name,shape,match", [
    ("grad", [5, 3, 1], r"^grad: expected 2 dimensions, got 3"),
    ("grad", [0, 3], r"^grad: expected 1 <= dimensions"),
    ("QG", [5, 4], r"^QG: expected shape \(5, 5\), got \(5, 4\)"),
    ("QA", [5, 5], r"^QA: expected shape \(3, 3\), got \(5, 5\)"),
    ("scale", [3, 5], r"^scale: expected shape \(5, 3\), got \(3, 5\)"),
    ("out", [5, 4], r"^out: expected shape \(5, 3\)"),
    ("dot", [1], r"^dot: expected 0 dimensions, got 1"),
    ("workspace", [15], r"^workspace: needs at least"),
    ("workspace", [4, 4], r"^workspace: expected 1 dimensions"),
])
def test_precondition_shapes(name, shape, match):
    with pytest.raises(ValueError, match=match):
        call_pre(**{name: F(shape)})


def test_precondition_scale_or_eigenvalues():
    with pytest.raises(ValueError, match=r"^scale: pass either scale, or both eig_g and eig_a"):
        call_pre(scale=None)
    with pytest.raises(ValueError, match=r"^scale: pass either"):
        call_pre(eig_g=F([5]), eig_a=F([3]))
    with pytest.raises(ValueError, match=r"^scale: pass either"):
        call_pre(scale=None, eig_g=F([5]))
    with pytest.raises(ValueError, match=r"^eig_g: expected shape \(5,\), got \(3,\)"):
        call_pre(scale=None, eig_g=F([3]), eig_a=F([3]))
    with pytest.raises(ValueError, match=r"^eig_a: expected shape \(3,\), got \(5,\)"):
        call_pre(scale=None, eig_g=F([5]), eig_a=F([5]))


def test_precondition_non_contiguous_and_read_only():
    with pytest.raises(ValueError, match=r"^QG: must be C-contiguous"):
        call_pre(QG=F([5, 5], strides=[1, 5]))
    with pytest.raises(ValueError, match=r"^grad: must be C-contiguous"):
        call_pre(grad=F([5, 3], strides=[1, 5]))
    with pytest.raises(ValueError, match=r"^out: is read-only"):
        call_pre(out=F([5, 3], flags=READ_ONLY))


def test_precondition_devices_must_match():
    with pytest.raises(ValueError, match=r"^QA: expected a tensor on cuda:0, got one on cuda:1"):
        call_pre(QA=F([3, 3], device_id=1))


def test_precondition_workspace_size_is_validated():
    with pytest.raises(ValueError):
        ext().precondition_workspace_size(0, 3)
    # W (d_out x d_in) + the dot partials (one 128 x 64 tile; K <= 65 is never split)
    assert ext().precondition_workspace_size(65, 3) == 65 * 3 + 1
    # 33 x 130: GEMMs 2 and 4 (K = 130, 3 tiles) split K in two: 2 partial tiles of 33 x 130,
    # and the split reduction's 17 blocks (ceil(4290 / 256)) each leave a dot partial
    assert ext().precondition_workspace_size(33, 130) == 33 * 130 + 17 + 2 * 33 * 130


# --- scale accumulation ------------------------------------------------------------------
def scale_args(shared=False, d_out=4, d_in=6, splits=1, **override):
    lead = [7, 3] if shared else [7]
    args = dict(S=F([d_out, d_in]), gt=F(lead + [d_out]), at=F(lead + [d_in]), workspace=None, splits=splits,
                beta=0.5, alpha=1.0, stream=0)
    args.update(override)
    return args


def call_scale(shared=False, **override):
    fn = ext().scale_accumulate_shared if shared else ext().scale_accumulate
    fn(**scale_args(shared, **override))


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("name", ["S", "gt", "at"])
def test_scale_cpu_tensor_and_dtype_name_argument(shared, name):
    shape = list(scale_args(shared)[name].shape)
    with pytest.raises(ValueError, match=rf"^{name}: expected a CUDA tensor, got one on cpu"):
        call_scale(shared, **{name: torch.zeros(shape)})
    with pytest.raises(TypeError, match=rf"^{name}: expected dtype float32, got"):
        call_scale(shared, **{name: F(shape, dtype=BFLOAT16)})
    with pytest.raises(ValueError, match=rf"^{name}: must be C-contiguous"):
        strides = [1] + [shape[0]] * (len(shape) - 1)
        call_scale(shared, **{name: F(shape, strides=strides)})


@pytest.mark.parametrize("shared,name,shape,match", [
    (False, "gt", [7, 3, 4], r"^gt: expected 2 dimensions, got 3"),
    (True, "gt", [7, 4], r"^gt: expected 3 dimensions, got 2"),
    (False, "gt", [7, 5], r"^gt: last dimension must be S.shape\[0\] = 4, got \(7, 5\)"),
    (False, "at", [7, 5], r"^at: last dimension must be S.shape\[1\] = 6, got \(7, 5\)"),
    (False, "at", [8, 6], r"^at: leading dimensions must match gt \(7, 4\), got \(8, 6\)"),
    (True, "at", [7, 2, 6], r"^at: leading dimensions must match gt \(7, 3, 4\)"),
    (False, "S", [0, 6], r"^S: expected 1 <= dimensions"),
])
def test_scale_shapes(shared, name, shape, match):
    with pytest.raises(ValueError, match=match):
        call_scale(shared, **{name: F(shape)})


@pytest.mark.parametrize("name,shape,match", [
    ("gt", [7, 4], r"^gt: expected 3 dimensions, got 2"),
    ("at", [7, 3, 6], r"^at: expected 2 dimensions, got 3"),
    ("at", [4, 6], r"^at: must have gt.shape\[1\] = 3 rows, got \(4, 6\)"),
    ("at", [3, 5], r"^at: last dimension must be S.shape\[1\] = 6, got \(3, 5\)"),
])
def test_scale_broadcast_shapes(name, shape, match):
    """The rotate order's binding: gt (n, K, d_out), one at (K, d_in) for every example."""
    args = dict(S=F([4, 6]), gt=F([7, 3, 4]), at=F([3, 6]), workspace=None, splits=1, beta=0.5, alpha=1.0, stream=0)
    args[name] = F(shape)
    with pytest.raises(ValueError, match=match):
        ext().scale_accumulate_broadcast(**args)


@pytest.mark.parametrize("shared", [False, True])
def test_scale_splits_and_workspace(shared):
    with pytest.raises(ValueError, match=r"^splits: expected 1 <= splits"):
        call_scale(shared, splits=0)
    with pytest.raises(ValueError, match=r"^workspace: is required when splits > 1"):
        call_scale(shared, splits=2)
    need = ext().scale_accumulate_workspace_size(4, 6, 3)
    assert need == 3 * 4 * 6 and ext().scale_accumulate_workspace_size(4, 6, 1) == 0
    with pytest.raises(ValueError, match=r"^workspace: needs at least 72 float32"):
        call_scale(shared, splits=3, workspace=F([need - 1]))
    with pytest.raises(ValueError, match=r"^S: is read-only"):
        call_scale(shared, S=F([4, 6], flags=READ_ONLY))


# --- conv factor -------------------------------------------------------------------------
def conv_args(C=3, k=(3, 3), bias=True, **override):
    D = C * k[0] * k[1] + bias
    args = dict(A=F([D, D]), x=F([2, C, 8, 9]), weights=None, kernel_size=k, stride=(1, 1), padding=(1, 1),
                dilation=(1, 1), bias=bias, workspace=None, splits=1, beta=0.0, alpha=1.0, stream=0)
    args.update(override)
    return args


def call_conv(**override):
    ext().conv_factor_accumulate(**conv_args(**override))


@pytest.mark.parametrize("name,shape", [("A", [28, 28]), ("x", [2, 3, 8, 9]), ("weights", [2, 72])])
def test_conv_cpu_tensor_names_argument(name, shape):
    with pytest.raises(ValueError, match=rf"^{name}: expected a CUDA tensor, got one on cpu"):
        call_conv(**{name: torch.zeros(shape)})


@pytest.mark.parametrize("name,fake,exc,match", [
    ("A", F([28, 28], dtype=BFLOAT16), TypeError, r"^A: expected dtype float32, got"),
    ("x", F([2, 3, 8, 9], dtype=FLOAT64), TypeError, r"^x: expected dtype float32, bfloat16, float16, got float64"),
    ("weights", F([2, 72], dtype=FLOAT16), TypeError, r"^weights: expected dtype float32"),
    ("x", F([2, 3, 72]), ValueError, r"^x: expected 4 dimensions, got 3"),
    ("x", F([2, 3, 8, 9], strides=[216, 1, 27, 3]), ValueError, r"^x: must be C-contiguous"),
    ("A", F([27, 27]), ValueError, r"^A: expected shape \(28, 28\), got \(27, 27\)"),
    ("weights", F([2, 71]), ValueError, r"^weights: expected shape \(2, 72\), got \(2, 71\)"),
    ("weights", F([144]), ValueError, r"^weights: expected 2 dimensions"),
    ("A", F([28, 28], flags=READ_ONLY), ValueError, r"^A: is read-only"),
])
def test_conv_argument_checks(name, fake, exc, match):
    with pytest.raises(exc, match=match):
        call_conv(**{name: fake})


@pytest.mark.parametrize("override,match", [
    (dict(stride=(0, 1)), r"^stride: expected two integers >= 1"),
    (dict(dilation=(1, 0)), r"^dilation: expected two integers >= 1"),
    (dict(padding=(-1, 0)), r"^padding: expected two integers >= 0"),
    (dict(kernel_size=(0, 3)), r"^kernel_size: expected two integers >= 1"),
    (dict(x=F([2, 3, 1, 9]), padding=(0, 0)), r"^x: input \(2, 3, 1, 9\) is smaller than the \(dilated\) kernel"),
    (dict(splits=0), r"^splits: expected 1 <= splits"),
    (dict(splits=4), r"^workspace: is required when splits > 1"),
    (dict(splits=2, workspace=F([28 * 28])), r"^workspace: needs at least 1568 float32"),
])
def test_conv_geometry_and_splits(override, match):
    with pytest.raises(ValueError, match=match):
        call_conv(**override)


def test_conv_geometry_must_be_pairs():
    with pytest.raises(TypeError):
        call_conv(kernel_size=(3, 3, 3))
    with pytest.raises(TypeError):
        call_conv(stride="ab")


# --- the public ops ----------------------------------------------------------------------
def test_public_ops_with_backend_cuda_reject_cpu_tensors():
    V, Q = torch.randn(3, 4), torch.eye(3)
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        precondition(V, Q, torch.eye(4), damping=0.1, scale=torch.ones(3, 4), backend="cuda")
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        accumulate_scale(torch.zeros(3, 4), torch.randn(5, 3), torch.randn(5, 4), Q, torch.eye(4), bias=False,
                         backend="cuda")
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        accumulate_conv_factor(torch.zeros(10, 10), torch.randn(1, 1, 4, 4), kernel_size=(3, 3), stride=(1, 1),
                               padding=(0, 0), dilation=(1, 1), bias=True, backend="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="valid fake tensors would reach a real kernel launch")
def test_valid_arguments_without_driver_raise_runtime_error():
    for call in (call_pre, call_scale, lambda: call_scale(True), call_conv):
        with pytest.raises(RuntimeError, match="cuda|CUDA|driver"):
            call()
