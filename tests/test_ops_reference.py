"""CPU: the PyTorch references of precondition, accumulate_scale and accumulate_conv_factor
against independent float64 formulas (the kernels are tested against these references).

- precondition: the dense Kronecker system. With column-major vec, vec(G V A) = (A (x) G) vec(V)
  for symmetric A, so K-FAC's U solves (A (x) G + lambda I) vec(U) = vec(V) with
  A = Q_A diag(l_A) Q_A^T, G = Q_G diag(l_G) Q_G^T; EKFAC's with (Q_A (x) Q_G) diag(vec S) (.)^T.
- accumulate_scale: per-example gradients dW_i = sum_t g_it abar_it^T built by explicit loops.
- accumulate_conv_factor: patches gathered by explicit loops over positions (no F.unfold).
"""
import itertools

import pytest
import torch

import kfac_cuda.ops.scale_accumulate as scale_module
from kfac_cuda.ops.conv_factor_accumulate import accumulate_conv_factor, accumulate_conv_factor_reference
from kfac_cuda.ops.precondition import precondition, precondition_reference
from kfac_cuda.ops.scale_accumulate import accumulate_scale, accumulate_scale_reference


@pytest.fixture(autouse=True)
def _float32_default_dtype():
    """Other test modules set float64 as the default dtype at import; these tests build
    float32 inputs and must not depend on test order."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(old)

D64 = torch.float64


def vec(M):  # column-major
    return M.t().reshape(-1)


def unvec(v, rows, cols):
    return v.reshape(cols, rows).t()


def orthogonal(d, gen):
    return torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=D64))[0]


@pytest.mark.parametrize("d_out,d_in", [(1, 1), (3, 5), (7, 4)])
def test_precondition_eigen_form_is_the_damped_kronecker_inverse(d_out, d_in):
    gen = torch.Generator().manual_seed(d_out * 10 + d_in)
    QG, QA = orthogonal(d_out, gen), orthogonal(d_in, gen)
    eG, eA = torch.rand(d_out, generator=gen, dtype=D64), torch.rand(d_in, generator=gen, dtype=D64)
    G, A = QG @ torch.diag(eG) @ QG.t(), QA @ torch.diag(eA) @ QA.t()
    V = torch.randn(d_out, d_in, generator=gen, dtype=D64)
    lam = 0.03
    F = torch.kron(A, G) + lam * torch.eye(d_out * d_in, dtype=D64)
    u = torch.linalg.solve(F, vec(V))
    U, dot = precondition(V, QG, QA, damping=lam, eig_g=eG, eig_a=eA, backend="torch")
    torch.testing.assert_close(U, unvec(u, d_out, d_in), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dot, u @ vec(V), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("d_out,d_in", [(1, 1), (4, 3), (6, 5)])
def test_precondition_stored_scale_is_the_eigenvalue_corrected_inverse(d_out, d_in):
    gen = torch.Generator().manual_seed(d_out * 100 + d_in)
    QG, QA = orthogonal(d_out, gen), orthogonal(d_in, gen)
    S = torch.rand(d_out, d_in, generator=gen, dtype=D64)
    V = torch.randn(d_out, d_in, generator=gen, dtype=D64)
    lam = 0.1
    Q = torch.kron(QA, QG)  # eigenvectors of A (x) G: vec(QG e_j e_k^T QA^T) = (QA (x) QG) vec(e_j e_k^T)
    F = Q @ torch.diag(vec(S)) @ Q.t() + lam * torch.eye(d_out * d_in, dtype=D64)
    u = torch.linalg.solve(F, vec(V))
    U, dot = precondition_reference(V, QG, QA, damping=lam, scale=S)
    torch.testing.assert_close(U, unvec(u, d_out, d_in), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dot, u @ vec(V), rtol=1e-10, atol=1e-12)


def test_precondition_bfloat16_gradient_is_promoted():
    gen = torch.Generator().manual_seed(0)
    QG, QA = orthogonal(3, gen).float(), orthogonal(4, gen).float()
    V = torch.randn(3, 4, generator=gen).bfloat16()
    S = torch.rand(3, 4, generator=gen)
    U, dot = precondition(V, QG, QA, damping=0.1, scale=S, backend="torch")
    U32, dot32 = precondition(V.float(), QG, QA, damping=0.1, scale=S, backend="torch")
    assert U.dtype == torch.float32 and torch.equal(U, U32) and torch.equal(dot, dot32)


def per_example_scale(g, a, QG, QA, bias):
    """sum_i (QG^T dW_i QA)^2 with dW_i = sum_t g_it abar_it^T, by explicit loops."""
    if g.dim() == 2:
        g, a = g[:, None], a[:, None]
    n, T = g.shape[:2]
    total = torch.zeros(QG.shape[0], QA.shape[0], dtype=D64)
    for i in range(n):
        dW = torch.zeros(QG.shape[0], QA.shape[0], dtype=D64)
        for t in range(T):
            abar = torch.cat([a[i, t], torch.ones(1, dtype=D64)]) if bias else a[i, t]
            dW += torch.outer(g[i, t], abar)
        total += (QG.t() @ dW @ QA) ** 2
    return total


@pytest.mark.parametrize("T", [None, 1, 4])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.7])
def test_scale_matches_per_example_loops(T, bias, beta):
    gen = torch.Generator().manual_seed(3)
    n, d_out, d_in = 6, 3, 4
    lead = (n,) if T is None else (n, T)
    g = torch.randn(*lead, d_out, generator=gen, dtype=D64)
    a = torch.randn(*lead, d_in, generator=gen, dtype=D64)
    QG, QA = orthogonal(d_out, gen), orthogonal(d_in + bias, gen)
    S0 = torch.rand(d_out, d_in + bias, generator=gen, dtype=D64)
    expected = beta * S0 + 0.25 * per_example_scale(g, a, QG, QA, bias)
    start = S0.clone() if beta else torch.full_like(S0, float("nan"))  # beta == 0 never reads S
    S = accumulate_scale(start, g, a, QG, QA, bias=bias, beta=beta, alpha=0.25, backend="torch")
    torch.testing.assert_close(S, expected, rtol=1e-10, atol=1e-12)


def test_scale_reference_chunking_does_not_change_the_sum(monkeypatch):
    gen = torch.Generator().manual_seed(4)
    g = torch.randn(7, 3, 5, generator=gen, dtype=D64)
    a = torch.randn(7, 3, 2, generator=gen, dtype=D64)
    QG, QA = orthogonal(5, gen), orthogonal(3, gen)
    monkeypatch.setattr(scale_module, "_CHUNK_ELEMENTS", 2 * 15)  # two examples per chunk, ragged end
    S = accumulate_scale_reference(torch.zeros(5, 3, dtype=D64), g, a, QG, QA, bias=True)
    torch.testing.assert_close(S, per_example_scale(g, a, QG, QA, True), rtol=1e-10, atol=1e-12)


def loop_patches(x, k, s, p, d):
    """(n, positions, C*kh*kw) patches by explicit loops, zero padding, weight ordering (c, ki, kj)."""
    n, C, H, W = x.shape
    oh = (H + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    ow = (W + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    out = torch.zeros(n, oh * ow, C * k[0] * k[1], dtype=D64)
    for i, r, c in itertools.product(range(n), range(oh), range(ow)):
        col = 0
        for ch, ki, kj in itertools.product(range(C), range(k[0]), range(k[1])):
            y, xx = r * s[0] - p[0] + ki * d[0], c * s[1] - p[1] + kj * d[1]
            if 0 <= y < H and 0 <= xx < W:
                out[i, r * ow + c, col] = x[i, ch, y, xx]
            col += 1
    return out


@pytest.mark.parametrize("k,s,p,d", [((1, 1), (1, 1), (0, 0), (1, 1)), ((3, 3), (1, 1), (1, 1), (1, 1)),
                                     ((3, 2), (2, 1), (1, 0), (1, 2)), ((2, 2), (3, 2), (2, 2), (2, 1))])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
def test_conv_factor_matches_loop_patches(k, s, p, d, bias, weighted):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 6, 7, generator=gen, dtype=D64)
    P = loop_patches(x, k, s, p, d)
    rows = P.reshape(-1, P.shape[-1])
    if bias:
        rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=D64)], dim=1)
    w = torch.rand(2, P.shape[1], generator=gen, dtype=D64) if weighted else None
    wr = torch.ones(rows.shape[0], dtype=D64) if w is None else w.reshape(-1)
    A0 = torch.rand(rows.shape[1], rows.shape[1], generator=gen, dtype=D64)
    expected = 0.5 * A0 + 0.1 * sum(wr[j] * torch.outer(rows[j], rows[j]) for j in range(rows.shape[0]))
    A = accumulate_conv_factor(A0.clone(), x, kernel_size=k, stride=s, padding=p, dilation=d, bias=bias,
                               weights=w, beta=0.5, alpha=0.1, backend="torch")
    torch.testing.assert_close(A, expected, rtol=1e-10, atol=1e-12)
    A_zero = accumulate_conv_factor_reference(torch.full_like(A0, float("nan")), x, kernel_size=k, stride=s,
                                              padding=p, dilation=d, bias=bias, weights=w, beta=0.0, alpha=0.1)
    torch.testing.assert_close(A_zero, expected - 0.5 * A0, rtol=1e-10, atol=1e-12)
