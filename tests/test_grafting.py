"""Grafting and relative damping (kfac_cuda/grafting.py), checked against a dense float64
solve of the damped Kronecker block and against torch.optim.Adam's step for the grafted size."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kfac_cuda

from fisher_reference import dense_block, unvec, vec

DAMPING = 1e-2


def model_and_batches(steps=3):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    batches = [(torch.randn(9, 3, dtype=torch.float64), torch.randint(0, 2, (9,))) for _ in range(steps)]
    return model, batches


def layer_grad(layer):
    return torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1)


def dense_kfac_step(curvature, V, damping):
    """(A kron G + damping I)^-1 vec V, from the layer's factors."""
    b = curvature.buffers
    block = torch.kron(b["A"], b["G"])
    return unvec(torch.linalg.solve(block + damping * torch.eye(block.shape[0], dtype=block.dtype), vec(V)), V.shape[0])


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_grafting_rescales_each_layer_to_the_grafted_step_norm(kind):
    model, batches = model_and_batches()
    pre = kfac_cuda.Preconditioner(model, "kfac", factor_decay=0.5, factor_update_steps=1, inv_update_steps=1,
                                   damping=DAMPING, backend="torch", grafting=kind, grafting_betas=(0.8, 0.9),
                                   grafting_eps=1e-6)
    layers = {"0": model[0], "2": model[2]}
    # the grafted optimizer, independently: torch's Adam on a copy of each layer's gradient matrix
    shadows = {n: torch.zeros_like(layer_grad_shape) for n, layer_grad_shape in
               ((n, torch.cat([l.weight, l.bias[:, None]], 1)) for n, l in layers.items())}
    shadows = {n: nn.Parameter(z) for n, z in shadows.items()}
    adam = torch.optim.Adam(list(shadows.values()), lr=1.0, betas=(0.8, 0.9), eps=1e-6)
    for x, y in batches:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        V = {n: layer_grad(l).clone() for n, l in layers.items()}
        assert pre.step()
        before = {n: s.detach().clone() for n, s in shadows.items()}
        for n, s in shadows.items():
            s.grad = V[n].clone()
        adam.step()
        for n, layer in layers.items():
            U = dense_kfac_step(pre.layers[n][1], V[n], DAMPING)
            grafted = before[n] - shadows[n].detach() if kind == "adam" else V[n]
            expected = U * grafted.norm() / U.norm()
            torch.testing.assert_close(layer_grad(layer), expected, rtol=1e-8, atol=1e-12)


def test_grafting_state_round_trips_and_resumes_exactly():
    model, batches = model_and_batches(4)
    kw = dict(factor_update_steps=1, inv_update_steps=2, backend="torch", grafting="adam")
    twin_model = copy.deepcopy(model)
    pre = kfac_cuda.Preconditioner(model, "ekfac", **kw)

    def step(p, m, batch):
        m.zero_grad()
        F.cross_entropy(m(batch[0]), batch[1]).backward()
        assert p.step()
        return layer_grad(m[2]).clone()

    for b in batches[:2]:
        step(pre, model, b)
    state = copy.deepcopy(pre.state_dict())
    assert set(state["grafting"]["moments"]) == {"0", "2"}
    twin = kfac_cuda.Preconditioner(twin_model, "ekfac", **kw)
    twin.load_state_dict(state)
    for b in batches[2:]:
        torch.testing.assert_close(step(twin, twin_model, b), step(pre, model, b), rtol=0, atol=0)


def test_bad_grafting_checkpoints_are_refused_with_nothing_changed():
    model, batches = model_and_batches(1)
    pre = kfac_cuda.Preconditioner(model, factor_update_steps=1, backend="torch", grafting="adam")
    F.cross_entropy(model(batches[0][0]), batches[0][1]).backward()
    assert pre.step()
    good = pre.state_dict()
    plain = kfac_cuda.Preconditioner(copy.deepcopy(model), backend="torch")
    with pytest.raises(ValueError, match="grafting"):
        plain.load_state_dict(good)
    with pytest.raises(ValueError, match="no grafting state"):
        kfac_cuda.Preconditioner(copy.deepcopy(model), backend="torch", grafting="adam").load_state_dict(plain.state_dict())
    bad = copy.deepcopy(good)
    bad["grafting"]["moments"]["2"]["v"] = torch.full((2, 5), float("nan"), dtype=torch.float64)
    other = kfac_cuda.Preconditioner(copy.deepcopy(model), backend="torch", grafting="adam")
    with pytest.raises(ValueError, match="'v' is not finite"):
        other.load_state_dict(bad)
    assert other.steps == 0 and other.grafting.moments == {}
    bad["grafting"]["moments"]["2"]["v"] = torch.ones(3, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="shape"):
        other.load_state_dict(bad)
    bad["grafting"]["moments"]["2"]["v"] = -torch.ones(2, 5, dtype=torch.float64)  # a second moment is >= 0
    with pytest.raises(ValueError, match="negative"):
        other.load_state_dict(bad)
    assert other.steps == 0 and other.grafting.moments == {}


def test_a_refused_step_leaves_the_grafting_moments_untouched():
    model, batches = model_and_batches(2)
    pre = kfac_cuda.Preconditioner(model, factor_update_steps=1, backend="torch", grafting="adam")
    F.cross_entropy(model(batches[0][0]), batches[0][1]).backward()
    assert pre.step()
    moments = copy.deepcopy(pre.grafting.moments)
    model.zero_grad()
    F.cross_entropy(model(batches[1][0]), batches[1][1]).backward()
    model[2].weight.grad[0, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        assert not pre.step()
    for n, s in moments.items():
        assert pre.grafting.moments[n]["step"] == s["step"]
        torch.testing.assert_close(pre.grafting.moments[n]["m"], s["m"], rtol=0, atol=0)


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_relative_damping_scales_damping_by_the_blocks_mean_eigenvalue(method):
    model, batches = model_and_batches(1)
    x, y = batches[0]
    pre = kfac_cuda.Preconditioner(model, method, factor_decay=0.0, factor_update_steps=1, damping=DAMPING,
                                   backend="torch", damping_mode="relative")
    F.cross_entropy(model(x), y).backward()
    V = layer_grad(model[2]).clone()
    assert pre.step()
    block = dense_block(pre.layers["2"][1].buffers, method)
    lam = DAMPING * torch.linalg.eigvalsh(block).mean()
    expected = torch.linalg.solve(block + lam * torch.eye(block.shape[0], dtype=block.dtype), vec(V))
    torch.testing.assert_close(layer_grad(model[2]), unvec(expected, 2), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("kw, match", [(dict(grafting="adagrad"), "grafting"),
                                       (dict(grafting="adam", grafting_betas=(0.9, 1.0)), "grafting_betas"),
                                       (dict(grafting="adam", grafting_eps=0.0), "grafting_eps"),
                                       (dict(damping_mode="spectral"), "damping_mode")])
def test_bad_grafting_and_damping_options_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        kfac_cuda.Preconditioner(nn.Linear(2, 2), **kw)
