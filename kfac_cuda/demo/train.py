"""The training loop shared by the demo and ``bench/e2e.py``.

Timing convention: ``seconds`` is training wall-clock only (forward, backward, optimizer
step, batch sampling). Every ``eval_every`` steps the clock is stopped (after a device
synchronisation), the full training loss and the test metric are measured, and the clock
restarts, so evaluation never counts against a method. "Time to target" is therefore
resolved to ``eval_every`` steps.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from .tasks import Task

MakeOptimizer = Callable[[nn.Module], torch.optim.Optimizer]


@dataclass
class RunResult:
    """Curves and summary numbers of one training run (one task, method and seed)."""

    task: str
    method: str
    lr: float
    seed: int
    test_metric: str
    steps: List[int] = field(default_factory=list)
    seconds: List[float] = field(default_factory=list)
    train_loss: List[float] = field(default_factory=list)
    test: List[float] = field(default_factory=list)
    diverged: bool = False

    @property
    def sec_per_step(self) -> float:
        """Mean training wall-clock seconds per step."""
        return self.seconds[-1] / self.steps[-1] if self.steps and self.steps[-1] else math.nan

    @property
    def final_train_loss(self) -> float:
        """Full training-set loss at the last evaluation (NaN after divergence)."""
        return self.train_loss[-1] if self.train_loss else math.nan

    @property
    def final_test(self) -> float:
        """Test metric at the last evaluation."""
        return self.test[-1] if self.test else math.nan

    def loss_target(self, target: float) -> Tuple[Optional[int], Optional[float]]:
        """(steps, seconds) at the first evaluation whose training loss is <= ``target``."""
        return self._first_crossing(self.train_loss, lambda v: v <= target)

    def test_target(self, target: float) -> Tuple[Optional[int], Optional[float]]:
        """(steps, seconds) at the first evaluation whose test metric reaches ``target``
        (>= for an accuracy, <= for a loss)."""
        if self.test_metric == "accuracy":
            return self._first_crossing(self.test, lambda v: v >= target)
        return self._first_crossing(self.test, lambda v: v <= target)

    def _first_crossing(self, values: List[float], reached: Callable[[float], bool]
                        ) -> Tuple[Optional[int], Optional[float]]:
        for step, sec, value in zip(self.steps, self.seconds, values):
            if reached(value):
                return step, sec
        return None, None

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict of the curves and summary numbers."""
        return dict(asdict(self), sec_per_step=self.sec_per_step)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(task: Task, make_optimizer: MakeOptimizer, *, method: str, lr: float, steps: int,
          batch_size: Union[int, Callable[[int], int]], seed: int, eval_every: int = 10,
          progress: bool = True, stop_below: Optional[float] = None) -> RunResult:
    """Train a fresh model of ``task`` for ``steps`` minibatch steps and record its curves.

    The model's initial weights and the batch order depend only on ``seed``, so every
    method starts from the same point and sees the same batches. A run whose training
    loss becomes non-finite stops early with ``diverged=True``. Optimizers of this package
    built with ``fisher="mc"`` get :meth:`~kfac_cuda.KFAC.sample_fisher` called with the
    task's predictive distribution before every backward pass. Optimizers built with
    ``quadratic_model`` (Martens & Grosse's step) are stepped with a closure. ``batch_size``
    is a number or a function of the step (1, 2, ...), e.g. :class:`kfac_cuda.ExponentialBatchSize`.
    With ``stop_below`` the run ends at the first evaluation whose training loss is <= it.
    """
    device = task.x_train.device
    torch.manual_seed(seed)
    model = task.make_model().to(device)
    optimizer = make_optimizer(model)
    mc_fisher = getattr(getattr(optimizer, "preconditioner", None), "fisher", None) == "mc"
    uses_closure = getattr(optimizer, "quadratic_model", None) is not None
    batches = torch.Generator(device="cpu").manual_seed(seed)
    n = len(task.x_train)
    size_at = batch_size if callable(batch_size) else (lambda step: batch_size)
    result = RunResult(task.name, method, lr, seed, task.test_metric)

    def record(step: int, elapsed: float) -> bool:
        train_loss, test = task.evaluate(model)
        result.steps.append(step)
        result.seconds.append(elapsed)
        result.train_loss.append(train_loss)
        result.test.append(test)
        return math.isfinite(train_loss)

    record(0, 0.0)
    elapsed, order, cursor = 0.0, torch.empty(0, dtype=torch.long), n
    bar = tqdm(total=steps, desc=f"{task.name:<11} {method:<7}", unit="step", disable=not progress,
               dynamic_ncols=True)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        size = min(size_at(step), n)
        if cursor + size > n:
            order, cursor = torch.randperm(n, generator=batches).to(device), 0
        idx = order[cursor:cursor + size]
        cursor += size
        x, y = task.x_train[idx], task.y_train[idx]

        def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            outputs = model(x)
            if mc_fisher:
                optimizer.sample_fisher(outputs, task.fisher_loss)
            loss = task.criterion(outputs, x, y)
            loss.backward()
            return loss

        if uses_closure:
            optimizer.step(closure)
        else:
            closure()
            optimizer.step()
        bar.update()
        if step % eval_every == 0 or step == steps:
            _synchronize(device)
            elapsed += time.perf_counter() - start
            finite = record(step, elapsed)
            bar.set_postfix(loss=f"{result.train_loss[-1]:.4g}", refresh=False)
            if not finite:
                result.diverged = True
                break
            if stop_below is not None and result.train_loss[-1] <= stop_below:
                break
            start = time.perf_counter()
    bar.close()
    return result
