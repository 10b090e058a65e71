"""Wide layers (kfac_cuda/blocks/wide.py): a side wider than max_factor_dim is kept diagonal (or
a scaled identity) instead of skipping the layer; checked against dense float64 blocks."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kfac_cuda

from fisher_reference import layer_matrix, per_example_grads, unvec, vec, with_ones


def setup(wide, policy="diagonal", method="kfac", seed=0):
    torch.manual_seed(seed)
    d_in, d_out = (12, 3) if wide == "input" else (3, 12)
    model = nn.Sequential(nn.Linear(d_in, d_out), nn.Tanh(), nn.Linear(d_out, 2)).double()
    x, y = torch.randn(10, d_in, dtype=torch.float64), torch.randint(0, 2, (10,))
    factors = dense_factors(model, x, y)  # before the Preconditioner hooks the model
    pre = kfac_cuda.Preconditioner(model, method, factor_decay=0.0, factor_update_steps=1, damping=1e-2,
                                   max_factor_dim=8, wide_side=policy, scale_restart="batch", backend="torch")
    return model, x, y, pre, factors


def step(model, pre, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    V = layer_matrix(model[0].weight.grad, model[0].bias.grad).clone()
    assert pre.step()
    return V, layer_matrix(model[0].weight.grad, model[0].bias.grad)


def dense_factors(model, x, y):
    """A = E[abar abar^T], G = E[g g^T] of layer 0 from its input and per-example output gradients."""
    store = {}
    hook = model[0].register_forward_hook(lambda m, i, o: (o.retain_grad(), store.__setitem__("o", o))[-1])
    out = model(x)
    sum(F.cross_entropy(out[i:i + 1], y[i:i + 1]) for i in range(x.shape[0])).backward()
    hook.remove()
    model.zero_grad()
    a, g = with_ones(x), store["o"].grad
    return a.t() @ a / len(x), g.t() @ g / len(x)


@pytest.mark.parametrize("wide", ["input", "output"])
def test_diagonal_side_is_kfac_with_that_factor_diagonal(wide):
    model, x, y, pre, (A, G) = setup(wide)
    A, G = (torch.diag(torch.diagonal(A)), G) if wide == "input" else (A, torch.diag(torch.diagonal(G)))
    V, U = step(model, pre, x, y)
    expected = torch.linalg.solve(torch.kron(A, G) + 1e-2 * torch.eye(A.shape[0] * G.shape[0], dtype=A.dtype), vec(V))
    torch.testing.assert_close(U, unvec(expected, G.shape[0]), rtol=1e-8, atol=1e-12)
    buffers = pre.layers["0"][1].buffers
    assert buffers["A" if wide == "input" else "G"].dim() == 1  # no d x d matrix on the wide side
    assert "diagonal" in pre.summary() and "MB" in pre.summary()


def test_identity_side_uses_the_mean_eigenvalue():
    model, x, y, pre, (A, G) = setup("output", policy="identity")
    G = torch.diagonal(G).mean() * torch.eye(G.shape[0], dtype=G.dtype)
    V, U = step(model, pre, x, y)
    expected = torch.linalg.solve(torch.kron(A, G) + 1e-2 * torch.eye(A.shape[0] * G.shape[0], dtype=A.dtype), vec(V))
    torch.testing.assert_close(U, unvec(expected, 12), rtol=1e-8, atol=1e-12)


def test_skip_policy_leaves_the_layer_out():
    with pytest.warns(RuntimeWarning, match="no supported layer"):  # both layers have a side of 12 or 13
        _, _, _, pre, _ = setup("output", policy="skip")
    assert "0" not in pre.layers and "max_factor_dim" in dict(pre.unsupported)["0"]


@pytest.mark.parametrize("wide", ["input", "output"])
def test_ekfac_scales_on_a_diagonal_side_are_the_dense_fisher_diagonal_in_the_basis(wide):
    model, x, y, pre, _ = setup(wide, method="ekfac", seed=1)
    fisher_rows = torch.stack([vec(v) for v in per_example_grads(model, F.cross_entropy, x, y, "0")])
    fisher = fisher_rows.t() @ fisher_rows / len(x)
    step(model, pre, x, y)
    b = pre.layers["0"][1].buffers
    QA = b["QA"] if b["QA"] is not None else torch.eye(b["S"].shape[1], dtype=torch.float64)
    QG = b["QG"] if b["QG"] is not None else torch.eye(b["S"].shape[0], dtype=torch.float64)
    basis = torch.kron(QA, QG)
    torch.testing.assert_close(vec(b["S"]), torch.diagonal(basis.t() @ fisher @ basis), rtol=1e-9, atol=1e-13)


def test_unknown_wide_side_is_refused():
    with pytest.raises(ValueError, match="wide_side"):
        kfac_cuda.Preconditioner(nn.Linear(2, 2), wide_side="drop")
