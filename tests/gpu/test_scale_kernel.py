"""GPU: the EKFAC / TEKFAC scale kernels against the PyTorch reference (float64): rows and
weight sharing, bias, every input dtype, odd shapes, EMA with NaN-poisoned S at beta = 0,
split-K partials with a poisoned workspace, determinism. Skipped without a GPU."""
import pytest
import torch

from kfac_cuda._extension import extension
from kfac_cuda.ops.scale_accumulate import accumulate_scale, accumulate_scale_reference


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def rel(x, ref):
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def orthogonal(d, gen):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return q.float().cuda()


def case(n, T, d_out, d_in, bias, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lead = (n,) if T is None else (n, T)
    g = torch.randn(*lead, d_out, generator=gen).to(dtype).cuda()
    a = torch.randn(*lead, d_in, generator=gen).to(dtype).cuda()
    QG, QA = orthogonal(d_out, gen), orthogonal(d_in + bias, gen)
    S0 = torch.rand(d_out, d_in + bias, generator=gen).cuda()
    return g, a, QG, QA, S0


def reference64(S0, g, a, QG, QA, bias, beta, alpha):
    return accumulate_scale_reference(S0.double().clone(), g.double(), a.double(), QG.double(), QA.double(),
                                      bias=bias, beta=beta, alpha=alpha)


ROW_CASES = [(1, 1, 1), (7, 33, 7), (255, 7, 33), (1000, 65, 64), (33, 255, 1000)]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d_out,d_in", ROW_CASES)
def test_rows_match_reference(n, d_out, d_in, dtype, bias):
    g, a, QG, QA, S0 = case(n, None, d_out, d_in, bias, dtype)
    S = S0.clone()
    accumulate_scale(S, g, a, QG, QA, bias=bias, beta=0.7, alpha=0.3 / n, backend="cuda")
    assert rel(S, reference64(S0, g, a, QG, QA, bias, 0.7, 0.3 / n)) < 1e-4


SHARED_CASES = [(1, 1, 1, 1), (7, 33, 7, 9), (3, 255, 33, 7), (16, 49, 64, 577), (5, 16, 255, 130)]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,T,d_out,d_in", SHARED_CASES)
def test_weight_sharing_matches_reference(n, T, d_out, d_in, dtype, bias):
    g, a, QG, QA, S0 = case(n, T, d_out, d_in, bias, dtype, seed=1)
    S = S0.clone()
    accumulate_scale(S, g, a, QG, QA, bias=bias, beta=0.5, alpha=1.0 / n, backend="cuda")
    assert rel(S, reference64(S0, g, a, QG, QA, bias, 0.5, 1.0 / n)) < 1e-4


@pytest.mark.parametrize("T", [None, 9])
def test_beta_zero_never_reads_poisoned_scale(T):
    g, a, QG, QA, S0 = case(37, T, 70, 33, True, torch.float32, seed=2)
    S = torch.full_like(S0, float("nan"))
    accumulate_scale(S, g, a, QG, QA, bias=True, beta=0.0, alpha=0.25, backend="cuda")
    assert torch.isfinite(S).all()
    assert rel(S, reference64(S0, g, a, QG, QA, True, 0.0, 0.25)) < 1e-4


@pytest.mark.parametrize("splits", [1, 2, 7, 64])
@pytest.mark.parametrize("T", [None, 5])
def test_raw_kernel_splits_with_poisoned_workspace(T, splits):
    ext = extension()
    n, d_out, d_in = 64, 65, 70
    g, a, QG, QA, S0 = case(n, T, d_out, d_in, False, torch.float32, seed=3)
    gt = (g.reshape(-1, d_out) @ QG).reshape(*g.shape)
    at = (a.reshape(-1, d_in) @ QA).reshape(*a.shape)
    size = ext.scale_accumulate_workspace_size(d_out, d_in, splits)
    ws = torch.full((size,), float("nan"), device="cuda") if size else None
    S = torch.full_like(S0, float("nan"))
    fn = ext.scale_accumulate if T is None else ext.scale_accumulate_shared
    fn(S, gt, at, ws, splits, 0.0, 1.0, torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    assert torch.isfinite(S).all()
    assert rel(S, reference64(S0, g, a, QG, QA, False, 0.0, 1.0)) < 1e-4


def test_deterministic_bitwise():
    g, a, QG, QA, S0 = case(64, 49, 128, 577, True, torch.bfloat16, seed=4)
    outs = []
    for _ in range(3):
        S = S0.clone()
        accumulate_scale(S, g, a, QG, QA, bias=True, beta=0.9, alpha=0.1, backend="cuda")
        outs.append(S)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
