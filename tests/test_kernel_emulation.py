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
from precondition_bounds import precondition_error_bounds, tf32_chain  # noqa: E402
from kfac_cuda.ops.scale_accumulate import _project, _rotated_gradients, accumulate_scale_reference  # noqa: E402


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


@pytest.mark.parametrize("d_out,d_in,dtype,stored,orthonormal", [
    (1, 1, torch.float32, True, True),
    (7, 33, torch.bfloat16, False, True),
    (130, 5, torch.float32, False, True),     # GEMMs 1, 3 split in K; a partial row of tiles
    (33, 130, torch.float32, True, True),     # GEMMs 2, 4 split: the dot through the split epilogue
    (129, 70, torch.bfloat16, True, True),    # 2 x 2 partial tiles; GEMMs 1, 3 split, 2, 4 not
    (20, 45, torch.float32, True, False),     # <U, V> = <M, Q_G^T V Q_A> needs no orthogonality
])
def test_precondition(E, d_out, d_in, dtype, stored, orthonormal):
    gen = torch.Generator().manual_seed(d_out * 1000 + d_in)
    V = torch.randn(d_out, d_in, generator=gen).to(dtype)
    if orthonormal:
        QG, QA = orthogonal(d_out, gen), orthogonal(d_in, gen)
    else:
        QG, QA = (torch.randn(d, d, generator=gen) / d ** 0.5 for d in (d_out, d_in))
    if stored:
        kw = dict(scale=torch.rand(d_out, d_in, generator=gen) + 0.05)
    else:
        kw = dict(eig_g=torch.rand(d_out, generator=gen) + 0.05, eig_a=torch.rand(d_in, generator=gen) + 0.05)
    U, dot = E.precondition(V, QG, QA, 0.01, **kw)
    kw64 = {k: v.double() for k, v in kw.items()}
    U_ref, dot_ref = precondition_reference(V.double(), QG.double(), QA.double(), damping=0.01, **kw64)
    D = (kw64["scale"] if stored else torch.outer(kw64["eig_g"], kw64["eig_a"])) + 0.01
    U_bound, dot_bound = precondition_error_bounds(V.double(), QG.double(), QA.double(), D, not stored)
    assert torch.isfinite(U).all()
    # 1.01: the bounds are first order; the neglected terms are below gemm(K)^2 (~1e-9) of them
    assert ((U.double() - U_ref).abs() <= 1.01 * U_bound).all(), ((U.double() - U_ref).abs() / U_bound).max()
    assert abs(dot.item() - dot_ref.item()) <= 1.01 * dot_bound
    # 3xTF32, not plain TF32: at least 10x closer than the same chain with tf32-rounded operands
    assert rel(U, U_ref) < 0.1 * rel(tf32_chain(V.double(), QG.double(), QA.double(), D), U_ref)


U = 2.0 ** -24  # fp32 unit roundoff (round to nearest)


def product_error(chain: int, tensor_cores: bool) -> float:
    """Bound on the error of a ``chain``-long fp32 dot product / sum|terms| (first order).
    SIMT: a sequential FMA chain, chain*u. 3xTF32 (model of tests/emulation/cuda_shim/warp.h,
    after Fasi et al. 2021): each product within 3*2^-22 (split residue, dropped lo*lo'), and
    2^-22 of the sum of |terms| per mma step, three steps per 8 rows."""
    if chain == 0:
        return 0.0
    return (3 + 3 * -(-chain // 8)) * 4 * U if tensor_cores else chain * U


def scale_rows_bound(rows_per_split: int, splits: int, tensor_cores: bool) -> float:
    """|S - S_exact| / (beta|S0| + alpha sum_k gt_k^2 at_k^2), S_exact from the fp32 inputs in
    float64: the two squares (2u), the product chain, the split reduction and EMA ((splits + 2) u)."""
    return 2 * U + product_error(rows_per_split, tensor_cores) + (splits + 2) * U


def scale_shared_bound(K: int, examples_per_split: int, splits: int, tensor_cores: bool) -> float:
    """|S - S_exact| / (beta|S0| + alpha sum_i A_i^2), A_i = |X_i|^T |Y_i|: each example's
    product P_i errs by e <= eps A_i (eps = product_error(K)), so its square by
    (2 eps + eps^2) A_i^2; the fp32 FMA sum of the squares over the split's examples adds
    examples * u (1 + eps)^2 A_i^2; then the split reduction and the EMA, (splits + 2) u."""
    eps = product_error(K, tensor_cores)
    return 2 * eps + eps * eps + examples_per_split * U * (1 + eps) ** 2 + (splits + 2) * U


def scale_exact(S0, gt, at, beta, alpha):
    """float64 result from the fp32 inputs the kernel receives, and the magnitude of its terms."""
    S0, gt, at = S0.double(), gt.double(), at.double()
    if gt.dim() == 2:
        exact, terms = (gt ** 2).t() @ (at ** 2), (gt ** 2).t() @ (at ** 2)
    else:
        Y = at if at.dim() == 3 else at.expand(gt.shape[0], *at.shape)
        exact = (gt.transpose(1, 2) @ Y).square().sum(0)
        terms = (gt.abs().transpose(1, 2) @ Y.abs()).square().sum(0)
    return beta * S0 + alpha * exact, abs(beta) * S0.abs() + alpha * terms


def check_scale_bound(S, S0, gt, at, beta, alpha, splits, tensor_cores):
    ref, terms = scale_exact(S0, gt, at, beta, alpha)
    n = gt.shape[0]
    per_split = -(-max(n, 1) // splits)
    if gt.dim() == 2:
        bound = scale_rows_bound(per_split, splits, tensor_cores)
    else:
        bound = scale_shared_bound(gt.shape[1], per_split, splits, tensor_cores)
    err = ((S.double() - ref).abs() / terms.clamp_min(1e-300)).max().item()
    assert err <= bound, (err, bound)


@pytest.mark.parametrize("tensor_cores", [True, False], ids=["sm80", "simt"])
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
def test_scale_accumulate(E, tensor_cores, n, T, d_out, d_in, bias, dtype, splits):
    """The "project" order (and the rows form): the kernels on what the CUDA wrapper launches
    with, against the float64 reference of the whole op, and elementwise within the rounding
    model against float64 on the kernel's own fp32 inputs."""
    gen = torch.Generator().manual_seed(n * 7 + d_out)
    lead = (n,) if T is None else (n, T)
    g = torch.randn(*lead, d_out, generator=gen).to(dtype)
    a = torch.randn(*lead, d_in, generator=gen).to(dtype)
    QG, QA = orthogonal(d_out, gen), orthogonal(d_in + bias, gen)
    S0 = torch.rand(d_out, d_in + bias, generator=gen)
    gt = _project(g, QG, False).reshape(*lead, d_out)  # exactly what the CUDA wrapper launches with
    at = _project(a, QA, bias).reshape(*lead, d_in + bias)
    for beta, start in [(0.6, S0.clone()), (0.0, torch.full_like(S0, float("nan")))]:
        S = E.scale_accumulate(start, gt, at, splits=splits, beta=beta, alpha=0.5, tensor_cores=tensor_cores)
        ref = accumulate_scale_reference(S0.double().clone(), g.double(), a.double(), QG.double(), QA.double(),
                                         bias=bias, beta=beta, alpha=0.5)
        assert torch.isfinite(S).all()
        assert rel(S, ref) < 1e-5
        check_scale_bound(S, S0, gt, at, beta, 0.5, splits, tensor_cores)


@pytest.mark.parametrize("tensor_cores", [True, False], ids=["sm80", "simt"])
@pytest.mark.parametrize("n,T,d_out,d_in,bias,dtype,splits", [
    (3, 40, 5, 9, True, torch.float32, 1),
    (7, 90, 66, 3, False, torch.bfloat16, 3),
    (2, 300, 3, 70, True, torch.float16, 2),
    (1, 1, 1, 1, False, torch.float32, 1),
])
def test_scale_rotate_order(E, tensor_cores, n, T, d_out, d_in, bias, dtype, splits):
    """The "rotate" order: X_i = (abar_i^T g_i) Q_G from the wrapper's helper, then the kernel
    with Q_A broadcast to every example, against the float64 reference and the rounding model."""
    gen = torch.Generator().manual_seed(n * 11 + T)
    g = torch.randn(n, T, d_out, generator=gen).to(dtype)
    a = torch.randn(n, T, d_in, generator=gen).to(dtype)
    QG, QA = orthogonal(d_out, gen), orthogonal(d_in + bias, gen)
    S0 = torch.rand(d_out, d_in + bias, generator=gen)
    X = _rotated_gradients(g, a, QG, bias)
    assert X.shape == (n, d_in + bias, d_out) and X.is_contiguous()
    for beta, start in [(0.6, S0.clone()), (0.0, torch.full_like(S0, float("nan")))]:
        S = E.scale_accumulate(start, X, QA, splits=splits, beta=beta, alpha=0.5, tensor_cores=tensor_cores)
        ref = accumulate_scale_reference(S0.double().clone(), g.double(), a.double(), QG.double(), QA.double(),
                                         bias=bias, beta=beta, alpha=0.5)
        assert torch.isfinite(S).all()
        assert rel(S, ref) < 1e-5
        check_scale_bound(S, S0, X, QA, beta, 0.5, splits, tensor_cores)


def test_scale_tf32_split_keeps_fp32_accuracy(E):
    """3xTF32 must stay near fp32 accuracy, far below plain TF32's ~2^-11 relative error, on
    inputs with full fp32 mantissas, in both forms."""
    gen = torch.Generator().manual_seed(9)
    gt, at = torch.randn(64, 40, generator=gen) * 3.7, torch.randn(64, 24, generator=gen) * 0.3
    S = E.scale_accumulate(torch.zeros(40, 24), gt, at, tensor_cores=True)
    ref = (gt.double() ** 2).t() @ (at.double() ** 2)
    assert ((S.double() - ref).abs() / ref).max().item() < 2e-6
    X, Y = gt.reshape(2, 32, 40), at.reshape(2, 32, 24)
    S = E.scale_accumulate(torch.zeros(40, 24), X, Y, tensor_cores=True)
    _, terms = scale_exact(torch.zeros(40, 24), X, Y, 0.0, 1.0)
    ref = (X.double().transpose(1, 2) @ Y.double()).square().sum(0)
    assert ((S.double() - ref).abs() / terms).max().item() < 4e-6




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


class EmulatedScaleExtension:
    """The scale entry points of kfac_cuda._C over the CPU emulation, recording which form each
    launch took, so the CUDA wrapper (order choice, chunking, EMA per chunk) runs on the CPU."""

    def __init__(self, E):
        self.E, self.launches = E, []

    def scale_accumulate_tiles(self, d_out, d_in):
        return -(-d_out // 64) * -(-d_in // 64)

    def scale_accumulate_workspace_size(self, d_out, d_in, splits):
        return self.E.lib().emu_scale_workspace(d_out, d_in, splits)

    def _launch(self, form, S, gt, at, workspace, splits, beta, alpha, stream):
        self.launches.append((form, tuple(gt.shape), beta))
        self.E.scale_accumulate(S, gt, at, splits=splits, beta=beta, alpha=alpha)

    def scale_accumulate(self, *args):
        self._launch("rows", *args)

    def scale_accumulate_shared(self, *args):
        self._launch("project", *args)

    def scale_accumulate_broadcast(self, *args):
        self._launch("rotate", *args)


@pytest.mark.parametrize("n,T,d_out,d_in,bias,order,chunk", [
    (5, 40, 5, 9, True, "rotate", 2 * 10 * 5),      # T (25 + 100) > 5 * 10 * 15: rotate, chunks of 2 examples
    (4, 3, 20, 18, False, "project", 1 << 24),     # 3 (400 + 324) < 20 * 18 * 38: project
    (3, 0, 6, 4, True, "project", 1 << 24),        # T = 0: S <- beta S, the project kernel alone
])
def test_scale_cuda_wrapper_chooses_the_cheaper_order(E, monkeypatch, n, T, d_out, d_in, bias, order, chunk):
    """accumulate_scale_cuda with weight sharing on the emulated kernels: the order the cost
    rule picks is the one launched, chunks of examples apply beta once, and the result is the
    float64 reference."""
    import kfac_cuda.ops.scale_accumulate as module
    fake = EmulatedScaleExtension(E)
    monkeypatch.setattr(module, "extension", lambda: fake)
    monkeypatch.setattr(module, "stream_handle", lambda device: 0)
    monkeypatch.setattr(module, "choose_splits", lambda device, tiles, length, per_split, floats, **kw: 2 if length > 1 else 1)
    monkeypatch.setattr(module, "_CHUNK_ELEMENTS", chunk)
    gen = torch.Generator().manual_seed(n + T)
    g, a = torch.randn(n, T, d_out, generator=gen), torch.randn(n, T, d_in, generator=gen)
    QG, QA = orthogonal(d_out, gen), orthogonal(d_in + bias, gen)
    S0 = torch.rand(d_out, d_in + bias, generator=gen)
    assert module.contraction_order(T, d_out, d_in + bias) == order
    S = module.accumulate_scale_cuda(S0.clone(), g, a, QG, QA, bias=bias, beta=0.7, alpha=0.2)
    ref = accumulate_scale_reference(S0.double().clone(), g.double(), a.double(), QG.double(), QA.double(),
                                     bias=bias, beta=0.7, alpha=0.2)
    assert rel(S, ref) < 1e-5
    assert {form for form, _, _ in fake.launches} == {order}
    assert [beta for _, _, beta in fake.launches] == [0.7] + [1.0] * (len(fake.launches) - 1)
    if order == "rotate":
        assert [shape[0] for _, shape, _ in fake.launches] == [2, 2, 1]


def test_scale_contraction_order_of_the_benchmarked_layers():
    """The cost rule on bench/kernel_cases.py's shapes: per-example rotations for ResNet-18
    layer1/layer2 (many positions, few channels), projections everywhere else."""
    from kfac_cuda.ops.scale_accumulate import contraction_order
    resnet = {name: contraction_order(H * H, c_out, 9 * c_in + 1) for name, c_in, c_out, H in
              [("l1", 64, 64, 32), ("l2", 128, 128, 16), ("l3", 256, 256, 8), ("l4", 512, 512, 4)]}
    assert resnet == {"l1": "rotate", "l2": "rotate", "l3": "project", "l4": "project"}
    vit = [contraction_order(512, d_out, d_in + 1) for d_in, d_out in [(768, 3072), (3072, 768), (768, 768)]]
    assert vit == ["project"] * 3


def test_scale_rows_form_is_out_of_auto_consideration():
    """"auto" may take the kernel for weight sharing only (the rows form cannot win: docs/kernels.md)."""
    from kfac_cuda.ops.scale_accumulate import _cuda_supports
    S, QG, QA = torch.zeros(4, 6), torch.eye(4), torch.eye(6)
    assert not _cuda_supports(S, torch.zeros(3, 4), torch.zeros(3, 5), QG, QA)
    assert _cuda_supports(S, torch.zeros(3, 2, 4), torch.zeros(3, 2, 5), QG, QA)


def test_choose_splits_whole_waves(monkeypatch):
    """With blocks_per_sm the split count fills whole waves (at ResNet l2's rotate launch, 38
    tiles on 132 SMs: 13 splits = 494 blocks <= 4 per SM, where the two-wave rule's 7 splits =
    266 blocks leave the busiest SM one block more than the average); the default rule is unchanged."""
    from kfac_cuda.ops import _launch
    monkeypatch.setattr(_launch, "_sm_count", lambda index: 132)
    dev = torch.device("cuda", 0)
    assert _launch.choose_splits(dev, 38, 113, 1, 128 * 1153, blocks_per_sm=4) == 13
    assert _launch.choose_splits(dev, 38, 113, 1, 128 * 1153) == 7
    assert _launch.choose_splits(dev, 600, 10 ** 6, 1, 10, blocks_per_sm=4) == 1
    assert _launch.choose_splits(dev, 38, 5, 1, 10, blocks_per_sm=4) == 5
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
