"""GPU: the precondition kernel against its PyTorch reference (float64), odd shapes, both
gradient dtypes, stored and on-the-fly scales, poisoned outputs, determinism, streams and
CUDA-graph capture. Skipped without a GPU and the compiled extension (tests/conftest.py).
Accuracy: elementwise within the 3xTF32 rounding-model bound (tests/precondition_bounds.py, the
same bound the CPU emulation is held to) and at least 10x closer than plain TF32."""
import sys
from pathlib import Path

import pytest
import torch

from kfac_cuda._extension import extension
from kfac_cuda.ops.precondition import precondition, precondition_reference

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from precondition_bounds import precondition_error_bounds, tf32_chain  # noqa: E402


SHAPES = [(1, 1), (1, 7), (7, 1), (7, 33), (33, 7), (64, 64), (65, 63), (255, 1000), (1000, 255)]


def rel(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def orthogonal(d, gen):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return q.float().cuda()


def inputs(d_out, d_in, dtype, stored, seed=0):
    gen = torch.Generator().manual_seed(seed)
    V = torch.randn(d_out, d_in, generator=gen).to(dtype).cuda()
    QG, QA = orthogonal(d_out, gen), orthogonal(d_in, gen)
    if stored:
        S = (torch.rand(d_out, d_in, generator=gen) + 0.05).cuda()
        return V, QG, QA, dict(scale=S)
    eg = (torch.rand(d_out, generator=gen) + 0.05).cuda()
    ea = (torch.rand(d_in, generator=gen) + 0.05).cuda()
    return V, QG, QA, dict(eig_g=eg, eig_a=ea)


def reference64(V, QG, QA, damping, kw):
    kw64 = {k: v.double() for k, v in kw.items()}
    return precondition_reference(V.double(), QG.double(), QA.double(), damping=damping, **kw64)


def assert_within_model(U, dot, V, QG, QA, damping, kw):
    """U and dot within the rounding-model bounds of the 3xTF32 kernel, and U at least 10x closer
    to the float64 result than the same chain with tf32-rounded operands."""
    U_ref, dot_ref = reference64(V, QG, QA, damping, kw)
    kw64 = {k: v.double() for k, v in kw.items()}
    D = (kw64["scale"] if "scale" in kw64 else torch.outer(kw64["eig_g"], kw64["eig_a"])) + damping
    U_bound, dot_bound = precondition_error_bounds(V.double(), QG.double(), QA.double(), D, "scale" not in kw64)
    assert ((U.double() - U_ref).abs() <= 1.01 * U_bound).all()  # 1.01: the bound is first order
    assert abs(dot.item() - dot_ref.item()) <= 1.01 * dot_bound
    assert rel(U, U_ref) < 0.1 * rel(tf32_chain(V.double(), QG.double(), QA.double(), D), U_ref)


@pytest.mark.parametrize("stored", [True, False], ids=["stored", "eig"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, dtype, stored):
    V, QG, QA, kw = inputs(*shape, dtype, stored)
    U, dot = precondition(V, QG, QA, damping=0.01, backend="cuda", **kw)
    assert U.dtype == torch.float32 and U.shape == shape and dot.shape == ()
    assert torch.isfinite(U).all()
    assert_within_model(U, dot, V, QG, QA, 0.01, kw)


@pytest.mark.parametrize("stored", [True, False], ids=["stored", "eig"])
@pytest.mark.parametrize("shape", [(7, 33), (129, 70)])
def test_raw_kernel_overwrites_poisoned_outputs(shape, stored):
    ext = extension()
    V, QG, QA, kw = inputs(*shape, torch.float32, stored, seed=1)
    out = torch.full(shape, float("nan"), device="cuda")
    dot = torch.full((), float("nan"), device="cuda")
    ws = torch.full((ext.precondition_workspace_size(*shape),), float("nan"), device="cuda")
    ext.precondition(V, QG, QA, kw.get("scale"), kw.get("eig_g"), kw.get("eig_a"), 0.1, out, dot, ws,
                     torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all() and torch.isfinite(dot)
    assert_within_model(out, dot, V, QG, QA, 0.1, kw)


def test_zero_damping_with_identity_bases_is_division():
    V = torch.randn(5, 9, device="cuda")
    S = torch.rand(5, 9, device="cuda") + 0.5
    U, dot = precondition(V, torch.eye(5, device="cuda"), torch.eye(9, device="cuda"), damping=0.0, scale=S,
                          backend="cuda")
    torch.testing.assert_close(U, V / S, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dot, (V * V / S).sum(), rtol=1e-5, atol=0)


def test_deterministic_bitwise():
    V, QG, QA, kw = inputs(300, 517, torch.float32, True, seed=2)
    first = precondition(V, QG, QA, damping=1e-3, backend="cuda", **kw)
    for _ in range(3):
        again = precondition(V, QG, QA, damping=1e-3, backend="cuda", **kw)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_non_contiguous_bases_from_eigh_are_accepted():
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(40, 40, generator=gen)
    G = torch.randn(30, 30, generator=gen)
    eA, QA = torch.linalg.eigh((A @ A.t()).cuda())
    eG, QG = torch.linalg.eigh((G @ G.t()).cuda())
    V = torch.randn(30, 40, device="cuda")
    U, dot = precondition(V, QG.t().t(), QA.mT, damping=0.1, eig_g=eG, eig_a=eA, backend="cuda")
    U_ref, dot_ref = precondition_reference(V.double(), QG.double(), QA.mT.double(), damping=0.1,
                                            eig_g=eG.double(), eig_a=eA.double())
    assert rel(U, U_ref) < 2e-5


def test_auto_uses_kernel_and_matches():
    V, QG, QA, kw = inputs(33, 65, torch.float32, False, seed=4)
    U_auto, _ = precondition(V, QG, QA, damping=0.01, **kw)
    U_cuda, _ = precondition(V, QG, QA, damping=0.01, backend="cuda", **kw)
    assert torch.equal(U_auto, U_cuda)


def test_runs_on_the_callers_stream():
    V, QG, QA, kw = inputs(200, 300, torch.float32, True, seed=5)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        U, dot = precondition(V, QG, QA, damping=0.01, backend="cuda", **kw)
    torch.cuda.current_stream().wait_stream(side)
    U_ref, _ = reference64(V, QG, QA, 0.01, kw)
    assert rel(U, U_ref) < 2e-5


@pytest.mark.parametrize("stored", [True, False], ids=["stored", "eig"])
def test_cuda_graph_capture_and_replay(stored):
    V, QG, QA, kw = inputs(97, 131, torch.float32, stored, seed=6)
    static_V = V.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture, as torch recommends
        precondition(static_V, QG, QA, damping=0.01, backend="cuda", **kw)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_U, static_dot = precondition(static_V, QG, QA, damping=0.01, backend="cuda", **kw)
    for seed in range(3):
        new_V = torch.randn(97, 131, generator=torch.Generator().manual_seed(100 + seed)).cuda()
        static_V.copy_(new_V)
        graph.replay()
        torch.cuda.synchronize()
        U_ref, dot_ref = reference64(new_V, QG, QA, 0.01, kw)
        assert rel(static_U, U_ref) < 2e-5
        assert abs(static_dot.item() - dot_ref.item()) <= 2e-5 * abs(dot_ref.item())
