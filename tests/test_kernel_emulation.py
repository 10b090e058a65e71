"""CPU: the real kernel sources of csrc/precondition.cu, scale_accumulate.cu and
conv_factor_accumulate.cu, compiled with g++ against a CUDA emulation shim
(tests/emulation/), against the PyTorch references in float64.

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


@pytest.mark.parametrize("geometry,bias,weighted,dtype,splits", [
    ((1, 1, 1, 1, (1, 1), (1, 1), (0, 0), (1, 1)), False, False, torch.float32, 1),
    ((2, 3, 9, 7, (3, 2), (2, 1), (1, 0), (1, 2)), True, True, torch.float32, 1),
    ((3, 2, 5, 6, (1, 1), (1, 1), (0, 0), (1, 1)), False, False, torch.bfloat16, 2),
    ((2, 8, 9, 9, (3, 3), (1, 1), (1, 1), (1, 1)), True, False, torch.float16, 3),
    ((1, 9, 6, 6, (3, 3), (2, 2), (2, 1), (1, 1)), True, True, torch.float32, 2),
    ((1, 2, 4, 4, (3, 3), (1, 1), (3, 3), (1, 1)), True, True, torch.bfloat16, 1),
])
def test_conv_factor(E, geometry, bias, weighted, dtype, splits):
    n, C, H, W, k, s, p, d = geometry
    gen = torch.Generator().manual_seed(C * 31 + H)
    x = torch.randn(n, C, H, W, generator=gen).to(dtype)
    oh = (H + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    ow = (W + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    w = torch.rand(n, oh * ow, generator=gen) + 0.1 if weighted else None
    D = C * k[0] * k[1] + bias
    A0 = torch.randn(D, D, generator=gen)
    A0 = A0 + A0.t()
    for beta, start in [(0.9, A0.clone()), (0.0, torch.full_like(A0, float("nan")))]:
        A = E.conv_factor(start, x, k, s, p, d, bias, weights=w, splits=splits, beta=beta, alpha=0.1)
        ref = accumulate_conv_factor_reference(A0.double().clone(), x.double(), kernel_size=k, stride=s, padding=p,
                                               dilation=d, bias=bias, weights=None if w is None else w.double(),
                                               beta=beta, alpha=0.1)
        assert torch.isfinite(A).all() and torch.equal(A, A.t())
        assert rel(A, ref) < 1e-5
