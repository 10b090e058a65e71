"""accumulate_factor's PyTorch reference equals the explicit float64 sum of outer products."""
import pytest
import torch

from kfac_cuda.ops import accumulate_factor


def explicit_factor(A0, a, bias, weights, beta, alpha):
    """beta*A0 + alpha * sum_i w_i abar_i abar_i^T, one outer product at a time, in float64."""
    rows = a.double()
    out = beta * A0.double() if beta != 0 else torch.zeros_like(A0, dtype=torch.float64)
    for i in range(rows.shape[0]):
        abar = torch.cat([rows[i], torch.ones(1, dtype=torch.float64)]) if bias else rows[i]
        w = 1.0 if weights is None else float(weights[i])
        out += alpha * w * torch.outer(abar, abar)
    return out


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("beta,alpha", [(0.0, 1.0), (0.95, 0.05), (1.0, 0.25), (0.5, -2.0)])
@pytest.mark.parametrize("a_dtype,A_dtype,tol", [
    (torch.float64, torch.float64, 1e-12),
    (torch.float32, torch.float32, 1e-5),
    (torch.bfloat16, torch.float32, 1e-5),
    (torch.float16, torch.float32, 1e-5),
])
def test_reference_matches_explicit_sum(bias, weighted, beta, alpha, a_dtype, A_dtype, tol):
    gen = torch.Generator().manual_seed(0)
    n, d = 13, 6
    D = d + bias
    a = torch.randn(n, d, generator=gen, dtype=torch.float64).to(a_dtype)
    weights = torch.rand(n, generator=gen, dtype=torch.float64).to(A_dtype) if weighted else None
    A0 = torch.randn(D, D, generator=gen, dtype=torch.float64)
    A0 = (A0 + A0.T).to(A_dtype)
    # bf16/fp16 inputs are exact in float64, so the only error is A's accumulation.
    expected = explicit_factor(A0, a, bias, weights, beta, alpha)
    out = accumulate_factor(A0.clone(), a, bias=bias, weights=weights, beta=beta, alpha=alpha, backend="torch")
    assert out.dtype == A_dtype and out.shape == (D, D)
    err = (out.double() - expected).abs().max() / expected.abs().max()
    assert err < tol


def test_beta_zero_ignores_nan_in_A():
    a = torch.randn(5, 3, dtype=torch.float32)
    A = torch.full((4, 4), float("nan"))
    out = accumulate_factor(A, a, bias=True, beta=0.0, alpha=1.0, backend="torch")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), explicit_factor(torch.zeros(4, 4), a, True, None, 0.0, 1.0),
                               rtol=1e-5, atol=1e-5)
