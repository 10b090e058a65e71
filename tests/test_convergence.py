"""Convergence on real data (scikit-learn's digits, shipped with the package): every method
reaches a fixed training-loss target in fewer steps than momentum SGD with the best
learning rate of a small grid, for an MLP and a small CNN. Same seed, same batches, same
initial weights for every optimizer; the full training loss is checked every 5 steps."""
from typing import Callable, Optional

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import kfac_cuda
from kfac_cuda.demo.tasks import load_digits_split

TARGET, MAX_STEPS, BATCH, EVERY = 0.05, 200, 128, 5
SGD_GRID = (0.1, 0.3, 1.0)
KFAC_OPTIONS = dict(lr=0.1, damping=1e-2, kl_clip=1e-3, factor_update_steps=1, inv_update_steps=20)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))


@pytest.fixture(scope="module")
def digits():
    x, y, _, _ = load_digits_split(0, torch.device("cpu"))
    return x, y


def steps_to_target(digits, make_model, make_opt: Callable[[nn.Module], torch.optim.Optimizer]) -> Optional[int]:
    x, y = digits
    torch.manual_seed(0)
    model = make_model()
    opt = make_opt(model)
    batches = torch.Generator().manual_seed(0)
    for step in range(1, MAX_STEPS + 1):
        idx = torch.randint(0, len(x), (BATCH,), generator=batches)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        if step % EVERY == 0:
            with torch.no_grad():
                if F.cross_entropy(model(x), y).item() <= TARGET:
                    return step
    return None


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def task(request, digits):
    make_model = {"mlp": mlp, "cnn": cnn}[request.param]
    sgd = {lr: steps_to_target(digits, make_model, lambda m, lr=lr: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9))
           for lr in SGD_GRID}
    reached = [s for s in sgd.values() if s is not None]
    assert reached, f"momentum SGD reached loss {TARGET} with no learning rate of {SGD_GRID}"
    return request.param, make_model, min(reached), sgd


@pytest.mark.parametrize("method", ["KFAC", "EKFAC", "TKFAC", "TEKFAC"])
def test_fewer_steps_than_tuned_sgd(digits, task, method):
    name, make_model, sgd_best, sgd = task
    steps = steps_to_target(digits, make_model, lambda m: getattr(kfac_cuda, method)(m, **KFAC_OPTIONS))
    print(f"{name}: {method} reached train loss {TARGET} in {steps} steps; momentum SGD in {sgd_best} "
          f"(best of lr grid {sgd})")
    assert steps is not None and steps < sgd_best
