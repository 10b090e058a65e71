"""Checkpoints, bad steps, composition with torch optimizers, MC Fisher, unsupported layers."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kfac_cuda

METHODS = ["KFAC", "EKFAC", "TKFAC", "TEKFAC"]


def small_cnn():
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 16), nn.Tanh(), nn.Linear(16, 4))


def batches(steps, seed=0, n=12):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)) for _ in range(steps)]


def train(model, opt, data):
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def make(method, model):
    return getattr(kfac_cuda, method)(model, lr=0.05, momentum=0.9, weight_decay=1e-3, factor_update_steps=2,
                                      inv_update_steps=3, scale_update_steps=2, backend="torch")


@pytest.mark.parametrize("method", METHODS)
def test_checkpoint_resume_is_identical(method, tmp_path):
    torch.manual_seed(0)
    model = small_cnn()
    data = batches(9)
    reference = copy.deepcopy(model)
    train(reference, make(method, reference), data)

    opt = make(method, model)
    train(model, opt, data[:5])
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")

    torch.manual_seed(123)
    fresh = small_cnn()
    fresh_opt = make(method, fresh)
    ckpt = torch.load(tmp_path / "ckpt.pt")
    fresh.load_state_dict(ckpt["model"])
    fresh_opt.load_state_dict(ckpt["opt"])
    train(fresh, fresh_opt, data[5:])
    for p, q in zip(reference.parameters(), fresh.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("where", ["input", "grad"])
def test_non_finite_step_changes_nothing(method, where):
    torch.manual_seed(1)
    model = small_cnn()
    opt = make(method, model)
    data = batches(4)
    train(model, opt, data[:3])
    params = [p.detach().clone() for p in model.parameters()]
    curvature = copy.deepcopy(opt.preconditioner.state_dict())
    momentum = copy.deepcopy(opt.state_dict()["state"])

    x, y = data[3]
    x = x.clone()
    if where == "input":
        x[0, 0, 0, 0] = float("nan")
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    if where == "grad":
        model[4].weight.grad[0, 0] = float("inf")
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step()
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    after = opt.preconditioner.state_dict()
    assert after["steps"] == curvature["steps"]
    for name, layer in curvature["layers"].items():
        for k, v in layer["buffers"].items():
            if v is not None:
                assert torch.equal(after["layers"][name]["buffers"][k], v), (name, k)
    for k, v in momentum.items():
        assert torch.equal(opt.state_dict()["state"][k]["momentum_buffer"], v["momentum_buffer"])
    train(model, opt, batches(2, seed=5))  # training continues
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_preconditioner_with_adamw_and_scheduler_trains():
    torch.manual_seed(2)
    model = small_cnn()
    pre = kfac_cuda.Preconditioner(model, "tekfac", factor_update_steps=1, inv_update_steps=5)
    adamw = torch.optim.AdamW(model.parameters(), lr=3e-2)
    sched = torch.optim.lr_scheduler.StepLR(adamw, step_size=10, gamma=0.5)
    x, y = batches(1, n=64)[0]
    losses = []
    for _ in range(30):
        adamw.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        pre.step()
        adamw.step()
        sched.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert adamw.param_groups[0]["lr"] == pytest.approx(3e-2 * 0.125)


def test_preconditioner_rewrites_grad_in_place():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 3))
    pre = kfac_cuda.Preconditioner(model, "kfac", factor_update_steps=1, inv_update_steps=1, damping=0.1)
    F.mse_loss(model(torch.randn(10, 4)), torch.randn(10, 3)).backward()
    g = model[0].weight.grad
    before = g.clone()
    assert pre.step()
    assert model[0].weight.grad is g and not torch.equal(g, before)


def test_mc_fisher_regression_output_factor_is_identity_in_expectation():
    """Linear output, Gaussian unit-variance sampling: E[g g^T] = I for the last layer."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 5))
    pre = kfac_cuda.Preconditioner(model, "kfac", fisher="mc", factor_decay=0.0, factor_update_steps=1)
    out = model(torch.randn(20000, 3))
    pre.sample_fisher(out, "mse")
    F.mse_loss(out, torch.zeros_like(out)).backward()
    pre.step()
    torch.testing.assert_close(pre.layers["0"][1].buffers["G"], torch.eye(5), atol=0.05, rtol=0)


def test_mc_fisher_classification_matches_softmax_fisher():
    """E_y[g g^T] = diag(p) - p p^T for logits produced by the last layer."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4))
    x = torch.randn(1, 3).repeat(20000, 1)
    pre = kfac_cuda.Preconditioner(model, "kfac", fisher="mc", factor_decay=0.0, factor_update_steps=1)
    out = model(x)
    pre.sample_fisher(out, "cross_entropy")
    F.cross_entropy(out, torch.zeros(len(x), dtype=torch.long)).backward()
    pre.step()
    p = F.softmax(out[0].detach(), -1)
    torch.testing.assert_close(pre.layers["0"][1].buffers["G"], torch.diag(p) - torch.outer(p, p), atol=0.01, rtol=0)


def test_mc_fisher_without_sampling_raises():
    model = nn.Sequential(nn.Linear(3, 2))
    opt = kfac_cuda.KFAC(model, lr=0.1, fisher="mc")
    F.mse_loss(model(torch.randn(4, 3)), torch.zeros(4, 2)).backward()
    with pytest.raises(RuntimeError, match="sample_fisher"):
        opt.step()


def test_unsupported_layers_listed_and_trained_by_sgd():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    opt = kfac_cuda.KFAC(model, lr=0.1)
    unsupported = dict(opt.preconditioner.unsupported)
    assert "groups=2" in unsupported["0"] and "BatchNorm2d" in unsupported["1"]
    assert list(opt.preconditioner.layers) == ["3"]
    assert "not preconditioned" in opt.summary()
    bn_before = model[1].weight.detach().clone()
    F.cross_entropy(model(torch.randn(5, 2, 8, 8)), torch.randint(0, 3, (5,))).backward()
    opt.step()
    assert not torch.equal(model[1].weight, bn_before)


def test_max_factor_dim_and_skip_modules():
    model = nn.Sequential(nn.Linear(100, 4), nn.Linear(4, 2))
    with pytest.warns(RuntimeWarning, match="no supported layer"):
        pre = kfac_cuda.Preconditioner(model, max_factor_dim=50, wide_side="skip", skip_modules=["1"])
    assert not pre.layers
    assert {n for n, _ in pre.unsupported} == {"0", "1"}


def test_bad_options_raise():
    model = nn.Sequential(nn.Linear(3, 2))
    for bad in [dict(method="sgd"), dict(fisher="true"), dict(weight_sharing="x"), dict(loss_reduction="avg"),
                dict(backend="gpu"), dict(factor_update_steps=0), dict(factor_decay=1.0), dict(damping=-1),
                dict(method="ekfac", damping_style="factored")]:
        with pytest.raises(ValueError):
            kfac_cuda.Preconditioner(model, **bad)


def test_backend_cuda_without_cuda_tensors_raises():
    model = nn.Sequential(nn.Linear(3, 2))
    opt = kfac_cuda.KFAC(model, lr=0.1, backend="cuda", factor_update_steps=1)
    F.mse_loss(model(torch.randn(4, 3)), torch.zeros(4, 2)).backward()
    with pytest.raises((ValueError, RuntimeError), match="cuda"):
        opt.step()


def test_eigh_failure_keeps_previous_basis_then_raises(monkeypatch):
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(3, 2))
    opt = kfac_cuda.KFAC(model, lr=0.1, factor_update_steps=1, inv_update_steps=1)
    train_step = lambda: (opt.zero_grad(), F.mse_loss(model(torch.randn(6, 3)), torch.zeros(6, 2)).backward(),
                          opt.step())
    train_step()
    basis = opt.preconditioner.layers["0"][1].buffers["QA"].clone()

    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("simulated cuSOLVER failure")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    with pytest.warns(RuntimeWarning, match="keeping its previous basis"):
        train_step()
    assert torch.equal(opt.preconditioner.layers["0"][1].buffers["QA"], basis)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_step()
        with pytest.raises(RuntimeError, match="failed 3 times"):
            train_step()


def test_rank_deficient_factor_decomposes():
    """ReLU-dead inputs give an exactly singular A; eigenvalues come back clamped at 0."""
    from kfac_cuda.eigh import eigh_many
    a = torch.randn(3, 6)
    A = a.t() @ a  # rank 3 of 6
    (evals, evecs), = eigh_many([A], ["A"])
    assert evals.min() >= 0
    torch.testing.assert_close(evecs @ torch.diag(evals) @ evecs.t(), A, atol=1e-4, rtol=1e-4)


def test_sequence_inputs_linear_layers():
    for sharing in ["expand", "reduce"]:
        torch.manual_seed(8)
        model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 6))  # one optimizer per model
        opt = kfac_cuda.EKFAC(model, lr=0.05, weight_sharing=sharing, factor_update_steps=1)
        x = torch.randn(4, 5, 6)
        F.mse_loss(model(x), x).backward()
        opt.step()
        assert opt.preconditioner.steps == 1


def test_torch_func_transforms_of_the_model_are_not_captured():
    from torch.func import functional_call, grad, vmap

    model = nn.Sequential(nn.Linear(3, 2))
    opt = kfac_cuda.KFAC(model, lr=0.1, factor_update_steps=1)
    params = {k: v.detach() for k, v in model.named_parameters()}
    loss_one = lambda p, xi: functional_call(model, p, (xi.unsqueeze(0),)).square().sum()
    vmap(grad(loss_one), in_dims=(None, 0))(params, torch.randn(5, 3))  # e.g. per-example gradients
    assert not opt.preconditioner.hooks.captures["0"]
    F.mse_loss(model(torch.randn(4, 3)), torch.zeros(4, 2)).backward()
    opt.step()
    assert opt.preconditioner.steps == 1


def test_grad_scaler_scale_is_removed_from_captured_gradients():
    class FixedScaler:  # the two calls the Preconditioner makes of a torch.amp.GradScaler
        def is_enabled(self):
            return True

        def get_scale(self):
            return 1024.0

    torch.manual_seed(9)
    x, y = torch.randn(6, 3), torch.randn(6, 2)
    factors = []
    for scaler, scale in ((None, 1.0), (FixedScaler(), 1024.0)):
        torch.manual_seed(10)
        model = nn.Sequential(nn.Linear(3, 2))
        pre = kfac_cuda.Preconditioner(model, factor_update_steps=1, grad_scaler=scaler)
        (scale * F.mse_loss(model(x), y)).backward()
        for p in model.parameters():
            p.grad /= scale  # what scaler.unscale_ does
        pre.step()
        factors.append(pre.layers["0"][1].buffers["G"].clone())
    torch.testing.assert_close(factors[1], factors[0])


@pytest.mark.parametrize("method", METHODS)
def test_bf16_autocast_keeps_curvature_float32(method):
    torch.manual_seed(11)
    model = small_cnn()
    opt = make(method, model)
    x, y = batches(1)[0]
    for _ in range(3):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        assert opt.step() is None
    for _, curvature in opt.preconditioner.layers.values():
        for name, t in curvature.buffers.items():
            if t is not None:
                assert t.dtype == torch.float32 and torch.isfinite(t).all(), name


def test_mc_fisher_bernoulli_matches_diagonal_fisher():
    """Independent Bernoulli outputs: E_y[g g^T] = diag(p (1 - p))."""
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(3, 4))
    x = torch.randn(1, 3).repeat(20000, 1)
    pre = kfac_cuda.Preconditioner(model, "kfac", fisher="mc", factor_decay=0.0, factor_update_steps=1)
    out = model(x)
    pre.sample_fisher(out, "bernoulli")
    F.binary_cross_entropy_with_logits(out, torch.zeros_like(out)).backward()
    pre.step()
    p = torch.sigmoid(out[0].detach())
    torch.testing.assert_close(pre.layers["0"][1].buffers["G"], torch.diag(p * (1 - p)), atol=0.01, rtol=0)


def test_multihead_attention_projections_are_preconditioned():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.ff = nn.Linear(8, 8)

        def forward(self, x):
            return self.ff(self.attn(x, x, x)[0])

    pre = kfac_cuda.Preconditioner(Block())
    assert list(pre.layers) == ["attn.in_proj.q", "attn.in_proj.k", "attn.in_proj.v", "attn.out_proj", "ff"]
    assert not pre.unsupported


def test_skip_modules_covers_submodules():
    model = nn.Sequential(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4)), nn.Linear(4, 2))
    pre = kfac_cuda.Preconditioner(model, skip_modules=["0"])
    assert list(pre.layers) == ["1"]
    assert {n for n, _ in pre.unsupported} == {"0.0", "0.1"}
    with pytest.warns(RuntimeWarning, match="no supported layer"):
        pre = kfac_cuda.Preconditioner(model, skip_modules=[nn.Sequential])
    assert not pre.layers
