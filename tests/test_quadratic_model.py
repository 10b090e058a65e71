"""The Martens-Grosse step (quadratic_model=) through the public optimizers, against ground
truth computed here: the dense GGN (tests/ggn_reference.py), the dense quadratic model's
minimiser, and the Levenberg-Marquardt rule recomputed by hand."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kfac_cuda
from ggn_reference import dense_ggn
from kfac_cuda import QuadraticModel

WD = 0.01


def problem(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 5)).double()
    x = torch.rand(8, 5, dtype=torch.float64)
    return model, x


def objective(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The training loss: Bernoulli NLL summed over outputs, mean over the batch."""
    return F.binary_cross_entropy_with_logits(model(x), x, reduction="sum") / len(x)


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def flat_grad(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    grads = torch.autograd.grad(objective(model, x), list(model.parameters()))
    return torch.cat([g.reshape(-1) for g in grads])


def make(model, method="kfac", lr=0.1, group_momentum=0.9, **qm):
    opt_cls = {"kfac": kfac_cuda.KFAC, "ekfac": kfac_cuda.EKFAC, "tkfac": kfac_cuda.TKFAC,
               "tekfac": kfac_cuda.TEKFAC}[method]
    return opt_cls(model, lr=lr, momentum=group_momentum, weight_decay=WD, kl_clip=None, damping=0.1,
                   factor_update_steps=1, inv_update_steps=1,
                   quadratic_model=QuadraticModel(loss="bernoulli", **qm))


def closure_for(opt, model, x):
    def closure():
        opt.zero_grad()
        loss = objective(model, x)
        loss.backward()
        return loss
    return closure


@pytest.mark.parametrize("adapt_mu", [True, False])
@pytest.mark.parametrize("method", ["kfac", "tekfac"])
def test_lr_and_momentum_minimise_the_dense_quadratic_model(method: str, adapt_mu: bool) -> None:
    model, x = problem()
    momentum = 0.9
    # step_rejection=False: every step is taken, so each one can be checked against the dense minimiser
    opt = make(model, method, group_momentum=momentum, momentum=adapt_mu, damping=False, step_rejection=False)
    closure = closure_for(opt, model, x)
    lam = opt.preconditioner.damping
    for step in range(3):
        theta = flat_params(model)
        with opt.preconditioner.paused():  # reference passes must not feed the curvature
            g = flat_grad(model, x)
            F_dense = dense_ggn(model, x, "bernoulli")
        opt.step(closure)
        U = torch.cat([p.grad.reshape(-1) for p in model.parameters()])  # preconditioned gradient
        Delta = -(U + WD * theta)
        v = flat_params(model) - theta
        C = F_dense + (lam + WD) * torch.eye(len(theta), dtype=torch.float64)
        grad_h = g + WD * theta
        if step == 0:  # no previous update: 1x1 in alpha
            alpha = -(grad_h @ Delta) / (Delta @ C @ Delta)
            expected = alpha * Delta
        elif adapt_mu:
            vs = torch.stack([Delta, previous])
            coef = torch.linalg.solve(vs @ C @ vs.T, -(vs @ grad_h))
            expected = coef @ vs
            assert opt.state["quadratic_model"]["mu"] == pytest.approx(float(coef[1]), rel=1e-9)
        else:  # momentum held at the group's value, alpha free
            alpha = -(grad_h @ Delta + momentum * Delta @ C @ previous) / (Delta @ C @ Delta)
            expected = alpha * Delta + momentum * previous
        assert torch.allclose(v, expected, atol=1e-10, rtol=0)
        previous = v


def test_fixed_lr_and_momentum_is_momentum_sgd_on_the_preconditioned_gradient() -> None:
    """With nothing adapted the step is the optimizer's plain one (kl_clip=None)."""
    model_a, x = problem()
    model_b, _ = problem()
    adaptive = make(model_a, lr=0.05, learning_rate=False, momentum=False, damping=False)
    plain = kfac_cuda.KFAC(model_b, lr=0.05, momentum=0.9, weight_decay=WD, kl_clip=None, damping=0.1,
                           factor_update_steps=1, inv_update_steps=1)
    for _ in range(4):
        adaptive.step(closure_for(adaptive, model_a, x))
        plain.step(closure_for(plain, model_b, x))
    assert torch.allclose(flat_params(model_a), flat_params(model_b), atol=1e-12, rtol=0)


@pytest.mark.parametrize("initial_damping", [10.0, 1e-4])
def test_levenberg_marquardt_damping_follows_the_rule(initial_damping: float) -> None:
    model, x = problem(1)
    decay, interval = 0.8, 2
    # step_rejection=False: the paper's rule alone (tests/test_step_rejection.py adds rejection)
    opt = make(model, damping_interval=interval, damping_decay=decay, step_rejection=False)
    opt.preconditioner.damping = initial_damping
    closure = closure_for(opt, model, x)
    lam, expected, observed = initial_damping, [], []
    for step in range(8):
        theta = flat_params(model)
        with opt.preconditioner.paused():  # reference passes must not feed the curvature
            g = flat_grad(model, x)
            h_old = float(objective(model, x).detach()) + WD / 2 * float(theta @ theta)
            F_dense = dense_ggn(model, x, "bernoulli")
        opt.step(closure)
        v = flat_params(model) - theta
        if step % interval == 0:
            new = flat_params(model)
            h_new = float(objective(model, x).detach()) + WD / 2 * float(new @ new)
            predicted = 0.5 * v @ (F_dense + WD * torch.eye(len(v), dtype=torch.float64)) @ v + (g + WD * theta) @ v
            rho = (h_new - h_old) / float(predicted)
            lam = lam * decay if rho > 0.75 else (lam / decay if rho < 0.25 else lam)
            assert opt.state["quadratic_model"]["rho"] == pytest.approx(rho, rel=1e-8, abs=1e-10)
        expected.append(lam)
        observed.append(opt.state["quadratic_model"]["damping"])
    assert observed == pytest.approx(expected, rel=1e-12)
    assert len(set(expected)) > 1  # the rule acted on this problem
    assert opt.preconditioner.damping == observed[-1]  # the factor damping follows lambda


@pytest.mark.parametrize("method", ["kfac", "ekfac", "tkfac", "tekfac"])
def test_every_method_takes_the_step_and_reduces_the_loss(method: str) -> None:
    model, x = problem(2)
    opt = make(model, method, damping_interval=1)
    closure = closure_for(opt, model, x)
    start = float(objective(model, x))
    for _ in range(10):
        loss = opt.step(closure)
        assert math.isfinite(float(loss))
    assert float(objective(model, x)) < start - 0.5


def test_checkpoint_resumes_exactly() -> None:
    model_a, x = problem(3)
    opt_a = make(model_a, damping_interval=2)
    for _ in range(3):
        opt_a.step(closure_for(opt_a, model_a, x))
    model_b, _ = problem(4)
    model_b.load_state_dict(model_a.state_dict())
    opt_b = make(model_b, damping_interval=2)
    opt_b.load_state_dict(opt_a.state_dict())
    for _ in range(3):
        opt_a.step(closure_for(opt_a, model_a, x))
        opt_b.step(closure_for(opt_b, model_b, x))
    assert torch.equal(flat_params(model_a), flat_params(model_b))
    assert opt_a.state["quadratic_model"]["damping"] == opt_b.state["quadratic_model"]["damping"]


def test_misuse_is_refused_clearly() -> None:
    model, x = problem()
    with pytest.raises(ValueError, match="pass kl_clip=None"):
        kfac_cuda.KFAC(model, quadratic_model=QuadraticModel(loss="mse"))
    with pytest.raises(ValueError, match="both describe the same loss"):
        kfac_cuda.KFAC(model, kl_clip=None, loss_reduction="sum", quadratic_model=QuadraticModel(loss="mse"))
    with pytest.raises(ValueError, match="single-process only"):
        # a DistributedComm needs an initialised process group; its type is all the check reads
        kfac_cuda.KFAC(model, kl_clip=None, comm=object.__new__(kfac_cuda.DistributedComm),
                       quadratic_model=QuadraticModel(loss="mse"))
    with pytest.raises(TypeError, match="kfac_cuda.QuadraticModel"):
        kfac_cuda.KFAC(model, kl_clip=None, quadratic_model={"loss": "mse"})
    for bad, message in [(dict(loss="hinge"), "loss must be one of"), (dict(loss="mse", interval=0), "interval"),
                         (dict(loss="mse", damping_decay=1.5), "damping_decay"),
                         (dict(loss="mse", min_damping=2.0, max_damping=1.0), "min_damping")]:
        with pytest.raises(ValueError, match=message):
            QuadraticModel(**bad)
    opt = make(model)
    before = flat_params(model)
    with pytest.raises(ValueError, match="needs step\\(closure\\)"):
        opt.step()
    other = nn.Linear(5, 5).double()

    def closure_without_model():
        opt.zero_grad()
        loss = objective(other, x) + 0 * sum(p.sum() for p in model.parameters())
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="did not call the model"):
        opt.step(closure_without_model)
    assert torch.equal(flat_params(model), before)


def test_non_finite_update_changes_nothing_and_raises_the_damping(monkeypatch: pytest.MonkeyPatch) -> None:
    """A forward-mode pass that overflows (float32, a huge direction) gives a NaN Gram matrix:
    simulated here, since the preconditioner itself already refuses non-finite directions."""
    import kfac_cuda.adaptive_step as adaptive_step

    model, x = problem()
    opt = make(model, damping_decay=0.5)
    real = adaptive_step.ggn_gram_matrix
    monkeypatch.setattr(adaptive_step, "ggn_gram_matrix", lambda *a, **k: real(*a, **k) * float("nan"))
    before = flat_params(model)
    with pytest.warns(RuntimeWarning, match="non-finite update"):
        opt.step(closure_for(opt, model, x))
    assert torch.equal(flat_params(model), before)
    assert opt.state["quadratic_model"]["damping"] == pytest.approx(0.2)  # 0.1 / 0.5
    assert opt.preconditioner.damping == pytest.approx(0.2)
    monkeypatch.setattr(adaptive_step, "ggn_gram_matrix", real)
    opt.step(closure_for(opt, model, x))  # the next step is a normal one
    assert torch.isfinite(flat_params(model)).all() and not torch.equal(flat_params(model), before)


def test_interval_keeps_the_last_coefficients_between_adaptations() -> None:
    model, x = problem(5)
    opt = make(model, interval=2, damping=False)
    closure = closure_for(opt, model, x)
    alphas = []
    for step in range(4):
        theta = flat_params(model)
        opt.step(closure)
        Delta = -(torch.cat([p.grad.reshape(-1) for p in model.parameters()]) + WD * theta)
        v = flat_params(model) - theta
        state = opt.state["quadratic_model"]
        alphas.append(state["alpha"])
        if step == 1:  # not an adaptation step: step 0's alpha, and no momentum solved yet (mu 0)
            assert alphas[1] == alphas[0]
            assert torch.allclose(v, alphas[0] * Delta, atol=1e-12, rtol=0)
        if step == 3:  # step 2's alpha and mu
            assert alphas[3] == alphas[2]
            assert torch.allclose(v, state["alpha"] * Delta + state["mu"] * previous, atol=1e-12, rtol=0)
        previous = v
    assert alphas[2] != alphas[0]  # step 2 re-solved
