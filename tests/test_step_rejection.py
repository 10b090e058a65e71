"""QuadraticModel(step_rejection=True): an update that raises the objective on its own batch is
undone. The failure it guards against, built from its cause: a model whose GGN (here equal to
the exact Hessian: the model is linear in its parameters) is tiny where the logits saturate, at
a small damping, so the quadratic model's minimiser overshoots and the Bernoulli loss rises
by orders of magnitude (what made kfac-mg/tekfac-mg diverge on the demo's CNN at lambda ~1e-4).
Ground truth: the update and the objective at theta + v recomputed here in float64 from the
dense GGN (tests/ggn_reference.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kfac_cuda
from ggn_reference import dense_ggn
from kfac_cuda import QuadraticModel

DECAY = 0.5


def saturated_problem():
    """A linear Bernoulli model with logits near -6 on soft targets 0.5: loss ~6 per output,
    curvature sigma(z)(1 - sigma(z)) ~ 2.5e-3."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    with torch.no_grad():
        model.weight.uniform_(-0.1, 0.1)
        model.bias.fill_(-6.0)
    x = torch.rand(6, 3, dtype=torch.float64)
    return model, x


def objective(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, 0.5), reduction="sum") / len(x)


def h_of(model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(objective(model, x))


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def make(model: nn.Module, lam: float, **options) -> kfac_cuda.KFAC:
    return kfac_cuda.KFAC(model, lr=0.0, momentum=0.0, kl_clip=None, damping=lam, factor_update_steps=1,
                          inv_update_steps=1,
                          quadratic_model=QuadraticModel(loss="bernoulli", damping_decay=DECAY, **options))


def closure_for(opt, model, x):
    def closure():
        opt.zero_grad()
        loss = objective(model, x)
        loss.backward()
        return loss
    return closure


def candidate_update(opt, model, x, lam: float) -> torch.Tensor:
    """The first step's v = alpha Delta (1x1 minimiser of the dense quadratic model at the current
    parameters), from the preconditioned gradient the optimizer leaves in .grad."""
    delta = -torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    with opt.preconditioner.paused():
        F_dense = dense_ggn(model, x, "bernoulli")
        g = torch.cat([gr.reshape(-1) for gr in torch.autograd.grad(objective(model, x), list(model.parameters()))])
    alpha = -(g @ delta) / (delta @ (F_dense + lam * torch.eye(len(delta), dtype=torch.float64)) @ delta)
    return alpha * delta


def h_at(model: nn.Module, x: torch.Tensor, theta: torch.Tensor) -> float:
    probe = nn.Linear(3, 2).double()
    torch.nn.utils.vector_to_parameters(theta, probe.parameters())
    return h_of(probe, x)


def test_an_update_that_raises_the_loss_is_undone_and_the_damping_raised() -> None:
    model, x = saturated_problem()
    lam = 1e-2
    opt = make(model, lam)
    theta, h0 = flat_params(model), h_of(model, x)
    opt.step(closure_for(opt, model, x))
    v = candidate_update(opt, model, x, lam)
    assert h_at(model, x, theta + v) > 5 * h0  # the quadratic model's step overshoots badly
    assert torch.equal(flat_params(model), theta)  # ... so it is not taken
    state = opt.state["quadratic_model"]
    assert state["damping"] == pytest.approx(lam / DECAY, rel=1e-15)  # raised once (step 0 is also an LM step)
    assert opt.preconditioner.damping == state["damping"]
    assert state["rejected"] == 1 and state["alpha"] is None
    assert all("previous_update" not in opt.state[p] for p in model.parameters())
    losses = [h0]
    for _ in range(25):
        opt.step(closure_for(opt, model, x))
        losses.append(h_of(model, x))
    assert all(b <= a for a, b in zip(losses, losses[1:]))  # h never rises on its batch
    assert losses[-1] < 0.8 * h0  # and once lambda is large enough the steps make progress
    assert state["rejections"] >= 2 and state["rejected"] == 0


def test_a_rejected_step_keeps_the_last_accepted_update_as_momentum() -> None:
    model, x = saturated_problem()
    opt = make(model, 10.0)  # large lambda: a short, accepted first step
    h0 = h_of(model, x)
    opt.step(closure_for(opt, model, x))
    accepted = {p: opt.state[p]["previous_update"] for p in model.parameters()}
    theta = flat_params(model)
    assert opt.state["quadratic_model"]["rejected"] == 0 and h_of(model, x) < h0
    opt.state["quadratic_model"]["damping"] = 1e-6  # now the model overshoots
    opt.step(closure_for(opt, model, x))
    assert opt.state["quadratic_model"]["rejected"] == 1
    assert torch.equal(flat_params(model), theta)
    assert all(opt.state[p]["previous_update"] is accepted[p] for p in model.parameters())


def test_rejections_that_never_end_warn_loudly() -> None:
    model, x = saturated_problem()
    opt = make(model, 1e-4, damping=False, warn_rejections=3)  # lambda fixed: every step overshoots
    theta = flat_params(model)
    with pytest.warns(RuntimeWarning, match="3 quadratic-model steps in a row rejected.*not making progress"):
        for _ in range(3):
            opt.step(closure_for(opt, model, x))
    assert torch.equal(flat_params(model), theta)
    assert opt.state["quadratic_model"]["damping"] == 1e-4


def test_without_step_rejection_the_overshoot_is_taken() -> None:
    """step_rejection=False is the paper's plain rule: the same step raises h (and lambda)."""
    model, x = saturated_problem()
    opt = make(model, 1e-4, step_rejection=False)
    h0 = h_of(model, x)
    opt.step(closure_for(opt, model, x))
    assert h_of(model, x) > 10 * h0
    assert opt.state["quadratic_model"]["damping"] == pytest.approx(1e-4 / DECAY, rel=1e-15)


@pytest.mark.parametrize("bad, message", [(dict(step_rejection=1), "step_rejection"),
                                          (dict(warn_rejections=0), "warn_rejections")])
def test_bad_rejection_options_are_refused(bad, message) -> None:
    with pytest.raises(ValueError, match=message):
        QuadraticModel(loss="bernoulli", **bad)
