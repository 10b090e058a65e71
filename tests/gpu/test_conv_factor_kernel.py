"""GPU: the implicit-im2col Conv2d factor kernel against the unfold reference (float64):
kernel sizes, strides, padding, dilation, bias, per-row weights, every input dtype, NaN-
poisoned A at beta = 0, split-K with a poisoned workspace, exact symmetry, determinism.
Skipped without a GPU."""
import pytest
import torch

from kfac_cuda._extension import extension
from kfac_cuda.ops.conv_factor_accumulate import accumulate_conv_factor, accumulate_conv_factor_reference


DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (n, C, H, W, kernel, stride, padding, dilation)
GEOMETRIES = [
    (1, 1, 1, 1, (1, 1), (1, 1), (0, 0), (1, 1)),
    (7, 3, 9, 7, (3, 3), (1, 1), (1, 1), (1, 1)),
    (2, 5, 11, 13, (3, 2), (2, 1), (1, 0), (1, 2)),
    (3, 64, 8, 8, (3, 3), (1, 1), (1, 1), (1, 1)),      # d = 577 with bias
    (4, 33, 7, 7, (1, 1), (2, 2), (0, 0), (1, 1)),      # 1x1 downsample
    (2, 3, 32, 33, (5, 5), (3, 2), (2, 2), (2, 1)),
    (1, 2, 4, 4, (3, 3), (1, 1), (3, 3), (1, 1)),       # padding larger than the kernel
]


# Max error relative to the sum of |terms| (beta |A0| + alpha sum |w abar abar^T|), as for the factor
# kernel: the tensor-core paths' rounding model (csrc/conv_factor_accumulate.cu) bounds it by about
# ceil(rows/16) 2^-22 for bf16/fp16 and (3 + 3 ceil(rows/8)) 2^-22 for 3xTF32, < 5e-5 at these sizes.
TOL = 5e-5


def error(A, A0, x, w, geo, beta, alpha):
    """Max |A - exact| / sum|terms|, elementwise, against the float64 unfold reference."""
    value = reference64(A0, x, w, geo, beta, alpha)
    w_abs = None if w is None else w.double()
    scale = accumulate_conv_factor_reference(abs(beta) * A0.double().abs(), x.double().abs(), weights=w_abs,
                                             beta=1.0, alpha=abs(alpha), **geo)
    return ((A.double() - value).abs() / scale.clamp_min(1e-30)).max().item()


def positions(H, W, k, s, p, d):
    oh = (H + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    ow = (W + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    return oh * ow


def case(geometry, dtype, bias, weighted, seed=0):
    n, C, H, W, k, s, p, d = geometry
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, C, H, W, generator=gen).to(dtype).cuda()
    w = (torch.rand(n, positions(H, W, k, s, p, d), generator=gen) + 0.1).cuda() if weighted else None
    D = C * k[0] * k[1] + bias
    A0 = torch.randn(D, D, generator=gen)
    A0 = (A0 + A0.t()).cuda()
    return x, w, A0, dict(kernel_size=k, stride=s, padding=p, dilation=d, bias=bias)


def reference64(A0, x, w, geo, beta, alpha):
    return accumulate_conv_factor_reference(A0.double().clone(), x.double(), weights=None if w is None else w.double(),
                                            beta=beta, alpha=alpha, **geo)


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_matches_unfold_reference(geometry, dtype, bias, weighted):
    x, w, A0, geo = case(geometry, dtype, bias, weighted)
    A = A0.clone()
    accumulate_conv_factor(A, x, weights=w, beta=0.9, alpha=0.1, backend="cuda", **geo)
    assert error(A, A0, x, w, geo, 0.9, 0.1) < TOL
    assert torch.equal(A, A.t())


def test_beta_zero_never_reads_poisoned_factor():
    x, w, A0, geo = case(GEOMETRIES[2], torch.float32, True, True, seed=1)
    A = torch.full_like(A0, float("nan"))
    accumulate_conv_factor(A, x, weights=w, beta=0.0, alpha=0.5, backend="cuda", **geo)
    assert torch.isfinite(A).all()
    assert error(A, A0, x, w, geo, 0.0, 0.5) < TOL


@pytest.mark.parametrize("splits", [1, 2, 5, 33])
def test_raw_kernel_splits_with_poisoned_workspace(splits):
    ext = extension()
    x, w, A0, geo = case(GEOMETRIES[1], torch.bfloat16, True, True, seed=2)
    D = A0.shape[0]
    size = ext.conv_factor_workspace_size(D, splits)
    ws = torch.full((size,), float("nan"), device="cuda") if size else None
    A = torch.full_like(A0, float("nan"))
    ext.conv_factor_accumulate(A, x, w, geo["kernel_size"], geo["stride"], geo["padding"], geo["dilation"],
                               geo["bias"], ws, splits, 0.0, 1.0, torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    assert torch.isfinite(A).all() and torch.equal(A, A.t())
    assert error(A, A0, x, w, geo, 0.0, 1.0) < TOL


def test_channels_last_input_is_accepted():
    x, w, A0, geo = case(GEOMETRIES[3], torch.float32, True, False, seed=3)
    A = A0.clone()
    accumulate_conv_factor(A, x.to(memory_format=torch.channels_last), beta=0.5, alpha=0.5, backend="cuda", **geo)
    assert error(A, A0, x, None, geo, 0.5, 0.5) < TOL


def test_deterministic_bitwise():
    x, w, A0, geo = case((16, 64, 16, 16, (3, 3), (1, 1), (1, 1), (1, 1)), torch.bfloat16, True, False, seed=4)
    outs = []
    for _ in range(3):
        A = A0.clone()
        accumulate_conv_factor(A, x, beta=0.95, alpha=0.05, backend="cuda", **geo)
        outs.append(A)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_input_that_requires_grad_is_accepted():
    """Hooks may hand over the layer input still attached to the graph; DLPack refuses such
    tensors, so the wrapper must detach."""
    x, w, A0, geo = case(GEOMETRIES[1], torch.float32, True, True, seed=5)
    x.requires_grad_(True)
    A = A0.clone()
    accumulate_conv_factor(A, x, weights=w, beta=0.5, alpha=0.5, backend="cuda", **geo)
    assert error(A, A0, x.detach(), w, geo, 0.5, 0.5) < TOL
