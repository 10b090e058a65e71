"""CPU: the real kernel sources of csrc/precondition.cu, scale_accumulate.cu,
conv_factor_accumulate.cu and factor_accumulate.cu, compiled with g++ against a CUDA
emulation shim (tests/emulation/), against the PyTorch references in float64. Warps run as
32 lanes with explicit registers: ldmatrix and mma.sync are warp collectives with the PTX
ISA's per-lane fragment layouts (tests/emulation/cuda_shim/warp.h).

This checks what can go wrong by reading the code without a GPU — tile indexing, bounds
on odd sizes, implicit im2col addressing, split-K partials and their reduction, the
epilogues (scaling, dot, EMA, beta = 0, mirroring) — on the machine without a GPU. It says
nothing about the GPU memory model or speed; tests/gpu/ covers the real device.
Shapes stay small: every emulated block runs 256 host threads.
"""
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "emulation"))

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="no g++ to build the kernel emulation")

from kfac_cuda.ops.conv_factor_accumulate import accumulate_conv_factor_reference  # noqa: E402
from kfac_cuda.ops.factor_accumulate import accumulate_factor_reference  # noqa: E402
from kfac_cuda.ops.precondition import precondition_reference  # noqa: E402
from kfac_cuda.ops.scale_accumulate import _project, accumulate_scale_reference  # noqa: E402


@pytest.fixture(autouse=True)
def _float32_default_dtype():
    """Other test modules set float64 as the default dtype at import; these tests build
    float32 inputs and must not depend on test order."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(scope="module")
def E():
    import emulated_ops
    emulated_ops.lib()
    return emulated_ops


def rel(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def orthogonal(d, gen):
    return torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0].float().contiguous()


@pytest.mark.parametrize("d_out,d_in,dtype,stored", [
    (1, 1, torch.float32, True), (7, 33, torch.bfloat16, False), (70, 5, torch.float32, False),
    (65, 130, torch.float32, True), (129, 64, torch.bfloat16, True),
])
def test_precondition(E, d_out, d_in, dtype, stored):
    gen = torch.Generator().manual_seed(d_out * 1000 + d_in)
    V = torch.randn(d_out, d_in, generator=gen).to(dtype)
    QG, QA = orthogonal(d_out, gen), orthogonal(d_in, gen)
    if stored:
        kw = dict(scale=torch.rand(d_out, d_in, generator=gen) + 0.05)
    else:
        kw = dict(eig_g=torch.rand(d_out, generator=gen) + 0.05, eig_a=torch.rand(d_in, generator=gen) + 0.05)
    U, dot = E.precondition(V, QG, QA, 0.01, **kw)
    U_ref, dot_ref = precondition_reference(V.double(), QG.double(), QA.double(), damping=0.01,
                                            **{k: v.double() for k, v in kw.items()})
    assert torch.isfinite(U).all()
    assert rel(U, U_ref) < 1e-5
    assert abs(dot.item() - dot_ref.item()) <= 1e-5 * abs(dot_ref.item())


@pytest.mark.parametrize("n,T,d_out,d_in,bias,dtype,splits", [
    (1, None, 1, 1, False, torch.float32, 1),
    (37, None, 70, 5, True, torch.bfloat16, 1),
    (300, None, 9, 66, False, torch.float16, 3),
    (1, 1, 1, 1, True, torch.float32, 1),
    (5, 7, 66, 65, False, torch.float32, 2),
    (6, 17, 3, 8, True, torch.bfloat16, 6),
    (4, 2, 65, 3, False, torch.float32, 1),
    (4, 0, 8, 5, True, torch.float32, 1),  # T = 0: an empty sum per example, S <- beta S
    (4, 0, 8, 5, False, torch.float32, 2),
])
def test_scale_accumulate(E, n, T, d_out, d_in, bias, dtype, splits):
    gen = torch.Generator().manual_seed(n * 7 + d_out)
    lead = (n,) if T is None else (n, T)
    g = torch.randn(*lead, d_out, generator=gen).to(dtype)
    a = torch.randn(*lead, d_in, generator=gen).to(dtype)
    QG, QA = orthogonal(d_out, gen), orthogonal(d_in + bias, gen)
    S0 = torch.rand(d_out, d_in + bias, generator=gen)
    gt = _project(g, QG, False).reshape(*lead, d_out)  # exactly what the CUDA wrapper launches with
    at = _project(a, QA, bias).reshape(*lead, d_in + bias)
    for beta, start in [(0.6, S0.clone()), (0.0, torch.full_like(S0, float("nan")))]:
        S = E.scale_accumulate(start, gt, at, splits=splits, beta=beta, alpha=0.5)
        ref = accumulate_scale_reference(S0.double().clone(), g.double(), a.double(), QG.double(), QA.double(),
                                         bias=bias, beta=beta, alpha=0.5)
        assert torch.isfinite(S).all()
        assert rel(S, ref) < 1e-5


U = 2.0 ** -24  # fp32 unit roundoff (round to nearest)


def factor_error_bound(chain: int, splits: int, path: str) -> float:
    """Bound on |A - A_exact| / sum|terms|, elementwise, from the rounding model.

    "simt": a sequential fp32 FMA chain of ``chain`` rows errs by at most chain*u (first order).
    Tensor cores (model of tests/emulation/cuda_shim/warp.h, after Fasi et al. 2021): every mma
    step truncates its terms below 2^-26 of the largest and rounds toward zero, at most 2^-22 of
    the sum of |terms| per step. "mma16": bf16/fp16 products are exact, ceil(chain/16) steps.
    "tf32": 3xTF32 products err by up to 3*2^-22 (split residue, dropped lo*lo'), and there are
    3 steps per 8 rows. Then the split reduction (splits - 1 additions) and the EMA (2 roundings)
    add (splits + 2) u."""
    if path == "simt":
        steps = chain * U
    elif path == "mma16":
        steps = -(-chain // 16) * 4 * U
    else:
        steps = (3 + 3 * -(-chain // 8)) * 4 * U
    return steps + (splits + 2) * U


@pytest.mark.parametrize("tensor_cores", [True, False], ids=["sm80", "simt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,d,bias,weighted,splits", [
    (1, 1, False, False, 1), (7, 33, True, False, 1), (97, 64, False, False, 2), (70, 65, True, True, 3),
    (40, 130, True, False, 1), (300, 9, True, False, 4), (0, 5, True, False, 1), (33, 0, True, False, 1),
])
def test_factor(E, tensor_cores, dtype, n, d, bias, weighted, splits):
    gen = torch.Generator().manual_seed(n * 131 + d)
    a = torch.randn(n, d, generator=gen).to(dtype)
    w = torch.rand(n, generator=gen) + 0.1 if weighted else None
    D = d + bias
    A0 = torch.randn(D, D, generator=gen)
    A0 = A0 + A0.t()
    rows_per_split = -(-max(n, 1) // splits)
    path = "simt" if not tensor_cores else "mma16" if dtype != torch.float32 and not weighted else "tf32"
    abs_rows = a.double().abs()
    if bias:
        abs_rows = torch.cat([abs_rows, torch.ones(n, 1, dtype=torch.float64)], dim=1)
    for beta, start in [(0.75, A0.clone()), (0.0, torch.full_like(A0, float("nan")))]:
        A = E.factor(start, a, bias, weights=w, splits=splits, beta=beta, alpha=0.5, tensor_cores=tensor_cores)
        ref = accumulate_factor_reference(A0.double().clone(), a.double(), bias=bias,
                                          weights=None if w is None else w.double(), beta=beta, alpha=0.5)
        terms = accumulate_factor_reference(abs(beta) * A0.double().abs(), abs_rows, bias=False,
                                            weights=None if w is None else w.double(), beta=1.0, alpha=0.5)
        assert torch.isfinite(A).all() and torch.equal(A, A.t())
        err = ((A.double() - ref).abs() / terms.clamp_min(1e-300)).max().item() if D else 0.0
        assert err <= factor_error_bound(rows_per_split, splits, path), err


def test_tf32_split_keeps_fp32_accuracy(E):
    """3xTF32 must be far more accurate than plain TF32 (10-bit mantissas, ~2^-11 relative):
    on rows with full fp32 mantissas the error stays near the fp32 level."""
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(64, 40, generator=gen) * 3.7
    A = E.factor(torch.zeros(40, 40), a, False, tensor_cores=True)
    ref = a.double().t() @ a.double()
    terms = a.double().abs().t() @ a.double().abs()
    assert ((A.double() - ref).abs() / terms).max().item() < 2e-6


# (n, C, H, W, kernel, stride, padding, dilation), bias, weighted, dtype, splits: odd channels,
# strides, dilations and paddings (one larger than the kernel), D across two tile rows
# (C 9 x 3x3 + bias = 82), rows not a multiple of the slab, splits of which some are empty
# (rows are cut at multiples of 32 on the tensor-core path).
CONV_CASES = [
    ((1, 1, 1, 1, (1, 1), (1, 1), (0, 0), (1, 1)), False, False, torch.float32, 1),
    ((2, 3, 9, 7, (3, 2), (2, 1), (1, 0), (1, 2)), True, True, torch.float32, 1),
    ((3, 2, 5, 6, (1, 1), (1, 1), (0, 0), (1, 1)), False, False, torch.bfloat16, 2),
    ((2, 8, 9, 9, (3, 3), (1, 1), (1, 1), (1, 1)), True, False, torch.float16, 3),
    ((1, 9, 6, 6, (3, 3), (2, 2), (2, 1), (1, 1)), True, True, torch.float32, 2),
    ((1, 2, 4, 4, (3, 3), (1, 1), (3, 3), (1, 1)), True, True, torch.bfloat16, 1),
    ((2, 9, 7, 5, (3, 3), (1, 2), (1, 2), (2, 1)), True, False, torch.bfloat16, 5),
    ((3, 9, 5, 5, (3, 3), (1, 1), (1, 1), (1, 1)), True, False, torch.float32, 4),
    ((2, 7, 6, 5, (2, 3), (1, 1), (0, 1), (1, 1)), False, True, torch.float16, 3),
]


@pytest.mark.parametrize("tensor_cores", [True, False], ids=["sm80", "simt"])
@pytest.mark.parametrize("geometry,bias,weighted,dtype,splits", CONV_CASES)
def test_conv_factor(E, tensor_cores, geometry, bias, weighted, dtype, splits):
    n, C, H, W, k, s, p, d = geometry
    gen = torch.Generator().manual_seed(C * 31 + H)
    x = torch.randn(n, C, H, W, generator=gen).to(dtype)
    oh = (H + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    ow = (W + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    w = torch.rand(n, oh * ow, generator=gen) + 0.1 if weighted else None
    D = C * k[0] * k[1] + bias
    A0 = torch.randn(D, D, generator=gen)
    A0 = A0 + A0.t()
    rows = n * oh * ow
    per_split = -(-rows // splits)
    if tensor_cores:
        chain = -(-per_split // 32) * 32  # the kernel cuts the rows at multiples of 32
        path = "mma16" if dtype != torch.float32 and not weighted else "tf32"
    else:
        chain, path = per_split, "simt"
    geo = dict(kernel_size=k, stride=s, padding=p, dilation=d, bias=bias)
    w64 = None if w is None else w.double()
    for beta, start in [(0.9, A0.clone()), (0.0, torch.full_like(A0, float("nan")))]:
        A = E.conv_factor(start, x, k, s, p, d, bias, weights=w, splits=splits, beta=beta, alpha=0.1,
                          tensor_cores=tensor_cores)
        ref = accumulate_conv_factor_reference(A0.double().clone(), x.double(), weights=w64, beta=beta, alpha=0.1,
                                               **geo)
        terms = accumulate_conv_factor_reference(abs(beta) * A0.double().abs(), x.double().abs(), weights=w64,
                                                 beta=1.0, alpha=0.1, **geo)
        assert torch.isfinite(A).all() and torch.equal(A, A.t())
        err = ((A.double() - ref).abs() / terms.clamp_min(1e-300)).max().item()
        # the weight product w * x is one more fp32 rounding on every term
        assert err <= factor_error_bound(chain, splits, path) + (U if weighted else 0.0), err


def test_conv_factor_tensor_cores_keep_fp32_accuracy(E):
    """The 3xTF32 conv path on full-mantissa fp32 input stays near the fp32 level (plain TF32
    would err by ~2^-11 relative)."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(2, 5, 6, 6, generator=gen) * 3.7
    geo = dict(kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), bias=False)
    A = E.conv_factor(torch.zeros(45, 45), x, (3, 3), (1, 1), (1, 1), (1, 1), False)
    ref = accumulate_conv_factor_reference(torch.zeros(45, 45, dtype=torch.float64), x.double(), **geo)
    terms = accumulate_conv_factor_reference(torch.zeros(45, 45, dtype=torch.float64), x.double().abs(), **geo)
    assert ((A.double() - ref).abs() / terms.clamp_min(1e-300)).max().item() < 2e-6


@pytest.mark.parametrize("divisor", [1, 2, 3, 7, 9, 64, 65, 1000, 1023, 1024, 1025, 2**20 + 7, 2**30 - 1, 2**30,
                                     2**30 + 1, 2**31 - 1])
def test_fast_divmod_matches_integer_division(E, divisor):
    gen = torch.Generator().manual_seed(divisor % 1000)
    numerators = [0, 1, divisor - 1, divisor, divisor + 1, 2**31 - 1, 2**31 - 2, (2**31 - 1) // divisor * divisor]
    numerators += torch.randint(0, 2**31 - 1, (200,), generator=gen).tolist()
    for n in numerators:
        if 0 <= n < 2**31:
            assert E.fast_divmod(divisor, n) == divmod(n, divisor), (divisor, n)


@pytest.mark.parametrize("chunk_examples,dtype,weighted", [(2, torch.float32, True), (1, torch.bfloat16, False),
                                                            (0, torch.float16, False)])
def test_conv_factor_chunks_x_into_32bit_launches(E, chunk_examples, dtype, weighted):
    """x of 2^31 elements or more goes through the tensor-core kernels in launches of < 2^31
    elements (32-bit offsets), the first applying beta and the rest adding; an example larger
    than a launch takes the SIMT kernel. Forced here by lowering the per-launch limit."""
    gen = torch.Generator().manual_seed(chunk_examples + 3)
    n, C, H, W = 5, 3, 6, 5
    x = torch.randn(n, C, H, W, generator=gen).to(dtype)
    w = torch.rand(n, H * W, generator=gen) + 0.1 if weighted else None
    D = C * 9 + 1
    A0 = torch.randn(D, D, generator=gen)
    A0 = A0 + A0.t()
    geo = dict(kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), bias=True)
    w64 = None if w is None else w.double()
    limit = chunk_examples * C * H * W if chunk_examples else C * H * W - 1
    if chunk_examples:
        chunks = -(-n // chunk_examples)
        chain = -(-chunk_examples * H * W // 32) * 32
        path = "tf32" if weighted or dtype == torch.float32 else "mma16"
        bound = factor_error_bound(chain, 1, path) + 2 * chunks * U  # alpha S and the add, per chunk
    else:
        bound = factor_error_bound(n * H * W, 1, "simt")
    for beta, start in [(0.9, A0.clone()), (0.0, torch.full_like(A0, float("nan")))]:
        A = E.conv_factor(start, x, (3, 3), (1, 1), (1, 1), (1, 1), True, weights=w, beta=beta, alpha=0.1,
                          chunk_elements=limit)
        ref = accumulate_conv_factor_reference(A0.double().clone(), x.double(), weights=w64, beta=beta, alpha=0.1,
                                               **geo)
        terms = accumulate_conv_factor_reference(abs(beta) * A0.double().abs(), x.double().abs(), weights=w64,
                                                 beta=1.0, alpha=0.1, **geo)
        assert torch.isfinite(A).all() and torch.equal(A, A.t())
        err = ((A.double() - ref).abs() / terms.clamp_min(1e-300)).max().item()
        assert err <= bound + (U if weighted else 0.0), err
