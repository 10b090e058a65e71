"""Nothing half-changed, nothing silently NaN: option validation, non-finite steps and
curvature, atomic checkpoint loading, a failed first eigendecomposition, replaced weights.

Ground truth is the state before the refused step (or load): parameters, momentum buffers
and the curvature checkpoint must be bit-identical to it.
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kfac_cuda

METHODS = ["KFAC", "EKFAC", "TKFAC", "TEKFAC"]


def mlp(width: int = 6, norm: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, width), nn.ReLU(), nn.LayerNorm(width) if norm else nn.Identity(),
                         nn.Linear(width, 3))


def batch(seed: int, n: int = 8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def make(method: str, model: nn.Module, **kw):
    options = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, damping=1e-2, factor_update_steps=1,
                   inv_update_steps=2, backend="torch")
    return getattr(kfac_cuda, method)(model, **{**options, **kw})


def backward(model, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()


def train(model, opt, seeds):
    for s in seeds:
        x, y = batch(s)
        backward(model, x, y)
        opt.step()


def everything(model, opt, eigh_failures: bool = True) -> dict:
    """Parameters and the full optimizer state (momentum and curvature), copied; without the
    eigh failure counters when ``eigh_failures`` is False."""
    state = copy.deepcopy({"params": [p.detach() for p in model.parameters()], "opt": opt.state_dict()})
    if not eigh_failures:
        for layer in state["opt"]["curvature"]["layers"].values():
            del layer["eigh_failures"]
    return state


def assert_same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


# --- options ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name, value", [
    ("damping", 0.0), ("damping", math.nan), ("damping", math.inf), ("damping", -1e-3),
    ("kl_clip", math.nan), ("kl_clip", math.inf), ("kl_clip", 0.0),
    ("factor_decay", math.nan), ("scale_decay", math.nan), ("scale_decay", 1.0),
    ("factor_update_steps", math.inf), ("factor_update_steps", math.nan), ("factor_update_steps", 2.5),
    ("inv_update_steps", 0), ("scale_update_steps", 0), ("scale_update_steps", -3),
    ("max_factor_dim", 0), ("lr", math.nan), ("lr", -1.0),
])
def test_bad_preconditioner_option_is_refused_by_name(name, value):
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        kfac_cuda.Preconditioner(mlp(), "ekfac", **{name: value})


@pytest.mark.parametrize("name, value", [("lr", math.nan), ("lr", math.inf), ("momentum", math.nan),
                                         ("weight_decay", math.inf), ("damping", 0.0), ("kl_clip", math.nan)])
def test_bad_optimizer_option_is_refused_by_name(name, value):
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        make("KFAC", mlp(), **{name: value})


@pytest.mark.parametrize("name, value", [("adaptive_damping", "yes"), ("factor_update_steps", "10"),
                                         ("damping", "1e-3"), ("method", None)])
def test_option_of_the_wrong_kind_is_a_clear_error(name, value):
    with pytest.raises((TypeError, ValueError), match=rf"^{name} must be"):
        kfac_cuda.Preconditioner(mlp(), **{"method": "kfac", name: value})


def test_a_nan_learning_rate_set_later_is_refused_before_any_change():
    model = mlp()
    opt = make("KFAC", model)
    train(model, opt, range(2))
    before = everything(model, opt)
    opt.param_groups[0]["lr"] = math.nan
    backward(model, *batch(5))
    with pytest.raises(ValueError, match="^lr must be"):
        opt.step()
    opt.param_groups[0]["lr"] = 0.05
    assert_same(everything(model, opt), before)


def test_tiny_damping_never_produces_nan_parameters():
    """The smallest accepted damping at batch size 2 (singular factors): a finite step or a
    refused one, never a NaN parameter."""
    for method in METHODS:
        model = mlp()
        opt = make(method, model, damping=1e-30, kl_clip=None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for s in range(4):
                x, y = batch(s, n=2)
                backward(model, x, y)
                opt.step()
        assert all(torch.isfinite(p).all() for p in model.parameters()), method


def test_scale_update_steps_is_kept_not_replaced():
    pre = kfac_cuda.Preconditioner(mlp(), "ekfac", factor_update_steps=4, scale_update_steps=1)
    assert pre.scale_update_steps == 1
    assert kfac_cuda.Preconditioner(mlp(), "ekfac", factor_update_steps=4).scale_update_steps == 4


# --- non-finite gradients of layers the preconditioner does not handle -------------------------
@pytest.mark.parametrize("method", METHODS)
def test_nan_in_a_layernorm_gradient_skips_the_optimizer_step(method):
    model = mlp()
    opt = make(method, model)
    train(model, opt, range(3))
    before = everything(model, opt)
    backward(model, *batch(9))
    model[2].weight.grad[0] = math.nan
    with pytest.warns(RuntimeWarning, match=r"non-finite gradient.*'2.weight'"):
        opt.step()
    assert_same(everything(model, opt), before)


def test_preconditioner_alone_checks_every_parameter_of_its_model():
    model = mlp()
    pre = kfac_cuda.Preconditioner(model, "kfac", factor_update_steps=1, inv_update_steps=1)
    backward(model, *batch(0))
    model[2].bias.grad[1] = math.inf
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="'2.bias'"):
        assert pre.step() is False
    assert pre.steps == 0 and all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


def test_the_finiteness_check_reads_each_parameter_gradient_once(monkeypatch):
    """A step that captures nothing checks the model's gradients once each (the layers' gradient
    matrices are copies of them), then each layer's U and <U, V>: no duplicate work per step."""
    model = mlp(norm=False)
    pre = kfac_cuda.Preconditioner(model, "kfac", factor_update_steps=10, inv_update_steps=10, backend="torch")
    backward(model, *batch(0))
    assert pre.step()
    backward(model, *batch(1))
    calls = []
    real = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: calls.append(t.shape) or real(t))
    assert pre.step()
    params, layers = len(list(model.parameters())), len(pre.layers)
    assert len(calls) == params + 2 * layers


# --- curvature that would overflow ------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_huge_activations_are_refused_and_training_continues(method):
    """One batch of finite activations x 1e20 overflows a float32 factor EMA: the step is
    refused with nothing changed, and training goes on (eigh never raises later)."""
    model = mlp(norm=False)  # a LayerNorm's variance would overflow too (a non-finite gradient)
    opt = make(method, model)
    train(model, opt, range(3))
    before = everything(model, opt)
    x, y = batch(7)
    backward(model, x * 1e20, y)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())  # only the curvature overflows
    with pytest.warns(RuntimeWarning, match=r"layer\(s\) \['0'.*would become non-finite"):
        opt.step()
    assert_same(everything(model, opt), before)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        train(model, opt, range(10, 16))
    assert opt.preconditioner.steps == 9
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_preconditioned_gradient_that_would_overflow_is_refused_between_updates():
    """A step that updates no curvature: finite gradients whose preconditioned value overflows
    float32 are refused, not written back (with KL-clipping inf * 0 would become NaN)."""
    model = mlp(norm=False)
    opt = make("KFAC", model, factor_update_steps=10, inv_update_steps=10)
    train(model, opt, range(2))
    before = everything(model, opt)
    backward(model, *batch(3))
    for p in model.parameters():
        p.grad.mul_(1e36)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    with pytest.warns(RuntimeWarning, match="preconditioned gradient of layer"):
        opt.step()
    assert_same(everything(model, opt), before)


# --- failed first eigendecomposition ----------------------------------------------------------
def test_failed_first_eigendecomposition_skips_the_step_and_says_so(monkeypatch):
    model = mlp()
    opt = make("EKFAC", model)
    before = everything(model, opt, eigh_failures=False)
    import kfac_cuda.comm as comm

    real_eigh_many = comm.eigh_many
    monkeypatch.setattr(comm, "eigh_many", lambda mats, labels: [None] * len(mats))
    backward(model, *batch(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    messages = [str(w.message) for w in caught]
    assert any("first eigendecomposition of layer(s) ['0', '3'] failed" in m and "skipped" in m for m in messages)
    assert not any("previous basis" in m for m in messages), messages
    assert_same(everything(model, opt, eigh_failures=False), before)  # no raw-gradient step at the K-FAC lr
    assert {n: c.eigh_failures for n, (_, c) in opt.preconditioner.layers.items()} == {"0": 1, "2": 0, "3": 1}
    monkeypatch.setattr(comm, "eigh_many", real_eigh_many)
    train(model, opt, range(1, 3))
    assert opt.preconditioner.steps == 2


def test_repeated_eigh_failures_raise_with_nothing_half_changed(monkeypatch):
    model = mlp()
    opt = make("KFAC", model)
    import kfac_cuda.comm as comm

    monkeypatch.setattr(comm, "eigh_many", lambda mats, labels: [None] * len(mats))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(2):
            backward(model, *batch(0))
            opt.step()
    before = everything(model, opt, eigh_failures=False)
    backward(model, *batch(0))
    with pytest.raises(RuntimeError, match="layer '0' failed 3 times"):
        opt.step()
    assert_same(everything(model, opt, eigh_failures=False), before)


# --- a weight replaced after construction -----------------------------------------------------
def test_weight_replaced_by_another_shape_names_the_layer():
    model = mlp()
    opt = make("KFAC", model)
    train(model, opt, range(2))
    model[0].weight, model[0].bias = nn.Parameter(torch.randn(4, 5)), nn.Parameter(torch.zeros(4))
    model[2] = nn.LayerNorm(4)
    model[3].weight = nn.Parameter(torch.randn(3, 4))
    backward(model, *batch(3))
    with pytest.raises(ValueError, match="layer '0' changed shape"):
        opt.step()


# --- checkpoints -------------------------------------------------------------------------------
def trained(method: str, width: int = 6):
    model = mlp(width)
    opt = make(method, model)
    train(model, opt, range(3))
    return model, opt


@pytest.mark.parametrize("source, match, error", [
    (lambda: trained("EKFAC")[1].state_dict(), "method 'ekfac', not 'kfac'", ValueError),
    (lambda: trained("KFAC", width=6)[1].state_dict(), r"layer '0'.*buffer 'G' has shape \(6, 6\).*\(7, 7\)",
     ValueError),
])
def test_bad_checkpoint_changes_nothing(source, match, error):
    model, opt = trained("KFAC", width=7)
    state = source()
    before = everything(model, opt)
    with pytest.raises(error, match=match):
        opt.load_state_dict(state)
    assert_same(everything(model, opt), before)


def test_checkpoint_with_other_layer_names_changes_nothing():
    model, opt = trained("KFAC")
    state = trained("KFAC")[1].state_dict()
    state["curvature"]["layers"]["encoder.0"] = state["curvature"]["layers"].pop("0")
    before = everything(model, opt)
    with pytest.raises(KeyError, match=r"only in the checkpoint \['encoder.0'\], only in the model \['0'\]"):
        opt.load_state_dict(state)
    assert_same(everything(model, opt), before)


@pytest.mark.parametrize("corrupt, match", [
    (lambda layer: layer["buffers"].update(A=layer["buffers"]["A"].to(torch.int32)), "'A' must be a real floating"),
    (lambda layer: layer["buffers"].update(QA=None), "eigenbases only partly present"),
    (lambda layer: layer["buffers"]["G"].fill_(math.nan), "'G' is not finite"),
    (lambda layer: layer["buffers"].pop("S"), "buffers .* differ"),
    (lambda layer: layer.update(eigh_failures=-1), "eigh_failures must be a non-negative integer"),
])
def test_corrupt_layer_state_is_refused_by_the_preconditioner(corrupt, match):
    model, opt = trained("EKFAC")
    state = copy.deepcopy(opt.preconditioner.state_dict())
    corrupt(state["layers"]["3"])
    before = copy.deepcopy(opt.preconditioner.state_dict())
    with pytest.raises(ValueError, match=match):
        opt.preconditioner.load_state_dict(state)
    assert_same(opt.preconditioner.state_dict(), before)


def test_checkpoint_round_trip_through_weights_only_load(tmp_path):
    model, opt = trained("TEKFAC")
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    other_model, other = trained("TEKFAC")
    other.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    assert_same(other.state_dict(), opt.state_dict())
