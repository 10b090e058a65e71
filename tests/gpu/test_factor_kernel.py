"""GPU: the factor-accumulation kernel against a float64 formula on odd sizes, every input
dtype, bias/weights, EMA and NaN-poisoned A at beta = 0; symmetry; non-default streams;
CUDA-graph capture; CuPy inputs. Skipped without a GPU (tests/conftest.py)."""
import pytest
import torch

from kfac_cuda._extension import extension
from kfac_cuda.ops.factor_accumulate import accumulate_factor

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (n, d) over {1, 7, 33, 255, 1000, 4097}: single tiles, tile edges, split-K (large n, small d).
SHAPES = [(1, 1), (7, 7), (1, 33), (33, 1), (7, 255), (255, 33), (33, 1000), (1000, 255),
          (1000, 7), (4097, 33), (4097, 255), (255, 1000), (7, 4097), (1000, 1000)]
TOL = 5e-5  # fp32 accumulation; relative to the sum of absolute terms



def inputs(n, d, bias, weighted, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = (torch.randn(n, d, generator=gen) + 0.5).to(dtype).cuda()  # non-zero mean: bias terms matter
    w = torch.rand(n, generator=gen).add_(0.1).cuda() if weighted else None
    D = d + bias
    A0 = torch.randn(D, D, generator=gen)
    return a, w, (A0 + A0.T).cuda()


def expected(A0, a, bias, w, beta, alpha):
    """(beta*A0 + alpha*abar^T diag(w) abar, the same with |.| for the error scale), float64."""
    rows = a.double()
    if bias:
        rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=torch.float64, device=rows.device)], 1)
    wd = torch.ones(rows.shape[0], dtype=torch.float64, device=rows.device) if w is None else w.double()
    base = beta * A0.double() if beta != 0 else torch.zeros_like(A0, dtype=torch.float64)
    value = base + alpha * (rows * wd[:, None]).T @ rows
    scale = base.abs() + abs(alpha) * (rows.abs() * wd[:, None]).T @ rows.abs()
    return value, scale


def check(out, value, scale):
    assert torch.isfinite(out).all()
    err = ((out.double() - value).abs() / scale.clamp_min(1e-30)).max().item()
    assert err < TOL, f"max relative error {err:.3g}"
    assert torch.equal(out, out.T)  # deterministic split reduction, mirrored: exactly symmetric


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_kernel_matches_float64(n, d, dtype, bias, weighted):
    a, w, A0 = inputs(n, d, bias, weighted, dtype)
    for beta, alpha in [(0.0, 1.0 / n), (0.9, 0.1 / n)]:
        A = torch.full_like(A0, float("nan")) if beta == 0 else A0.clone()
        out = accumulate_factor(A, a, bias=bias, weights=w, beta=beta, alpha=alpha, backend="cuda")
        torch.cuda.synchronize()
        assert out.data_ptr() == A.data_ptr()
        check(out, *expected(A0, a, bias, w, beta, alpha))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_no_rows_scales_or_clears(beta):
    A0 = torch.randn(4, 4, device="cuda")
    A = torch.full_like(A0, float("nan")) if beta == 0 else A0.clone()
    accumulate_factor(A, torch.empty(0, 3, device="cuda"), bias=True, beta=beta, alpha=1.0, backend="cuda")
    torch.testing.assert_close(A, beta * A0 if beta else torch.zeros_like(A0))


def test_bias_only_factor_counts_rows():
    A = torch.full((1, 1), float("nan"), device="cuda")
    accumulate_factor(A, torch.empty(5, 0, device="cuda"), bias=True, beta=0.0, alpha=1.0, backend="cuda")
    assert A.item() == 5.0


def test_auto_backend_picks_kernel_and_falls_back_for_float64():
    a, _, A0 = inputs(100, 20, True, False, torch.float32)
    out = accumulate_factor(A0.clone(), a, bias=True, beta=0.5, alpha=0.01)
    check(out, *expected(A0, a, True, None, 0.5, 0.01))
    out64 = accumulate_factor(A0.double(), a.double(), bias=True, beta=0.5, alpha=0.01)  # reference path
    check(out64, *expected(A0, a, True, None, 0.5, 0.01))


def test_runs_on_the_callers_stream():
    a, _, A0 = inputs(2000, 300, True, False, torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        A = torch.full_like(A0, float("nan"))
        for _ in range(3):
            accumulate_factor(A, a, bias=True, beta=0.0, alpha=1e-3, backend="cuda")
        result = A.clone()
    torch.cuda.current_stream().wait_stream(side)
    check(result, *expected(A0, a, True, None, 0.0, 1e-3))


@pytest.mark.parametrize("n,d", [(64, 40), (4096, 100)])  # single pass and split-K (scale + atomics)
def test_cuda_graph_capture_and_replay(n, d):
    a, w, A0 = inputs(n, d, True, True, torch.float32)
    A = A0.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture
        accumulate_factor(A, a, bias=True, weights=w, beta=0.9, alpha=0.1, backend="cuda")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        accumulate_factor(A, a, bias=True, weights=w, beta=0.9, alpha=0.1, backend="cuda")
    A.copy_(A0)
    graph.replay()
    graph.replay()
    torch.cuda.synchronize()
    once, _ = expected(A0, a, True, w, 0.9, 0.1)
    twice, scale = expected(once.float(), a, True, w, 0.9, 0.1)
    check(A, twice, scale)


def test_cupy_arrays_are_accepted():
    cupy = pytest.importorskip("cupy")
    if not cupy.cuda.is_available():
        pytest.skip("CuPy sees no CUDA device")
    rng = cupy.random.default_rng(0)
    a = rng.standard_normal((300, 70), dtype=cupy.float32)
    A = cupy.full((71, 71), cupy.nan, dtype=cupy.float32)
    extension().factor_accumulate(A, a, None, True, None, 1, 0.0, 1.0, cupy.cuda.get_current_stream().ptr)
    value, scale = expected(torch.zeros(71, 71, device="cuda"), torch.from_dlpack(a), True, None, 0.0, 1.0)
    check(torch.from_dlpack(A), value, scale)


def test_bf16_long_chain_within_tensor_core_error_model():
    """One output accumulates 32768 rows in a single chain (D = 4097: enough tiles that the rows
    are not split). Tensor-core fp32 accumulation truncates (csrc/factor_accumulate.cu): the
    model bounds the error by ceil(n/16) * 2^-22 (plus the EMA) of the sum of |terms|, about
    4.9e-4 here, against ~n * 2^-24 for sequential fp32."""
    n, d = 32768, 4096
    a, _, A0 = inputs(n, d, True, False, torch.bfloat16)
    A = torch.full_like(A0, float("nan"))
    accumulate_factor(A, a, bias=True, beta=0.0, alpha=1.0 / n, backend="cuda")
    value, scale = expected(A0, a, True, None, 0.0, 1.0 / n)
    err = ((A.double() - value).abs() / scale.clamp_min(1e-30)).max().item()
    assert err <= (n // 16) * 2.0 ** -22 + 3 * 2.0 ** -24, err
    assert torch.equal(A, A.T)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_split_reduction_is_bitwise_reproducible(dtype):
    a, _, A0 = inputs(5000, 40, True, False, dtype)  # one tile, many rows: split
    first = accumulate_factor(A0.clone(), a, bias=True, beta=0.5, alpha=0.1, backend="cuda")
    second = accumulate_factor(A0.clone(), a, bias=True, beta=0.5, alpha=0.1, backend="cuda")
    assert torch.equal(first, second)
