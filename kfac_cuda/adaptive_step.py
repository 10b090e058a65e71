"""The closure step of the Kronecker optimizers with the Martens-Grosse quadratic model
(see :mod:`kfac_cuda.quadratic_model` for the math), shared by KFAC, EKFAC, TKFAC and TEKFAC.

One step:
1. call the closure (it zeroes the gradients, runs the model, calls backward and returns the
   loss); a forward hook on the model records the inputs of its last call;
2. the Preconditioner, with damping lambda, turns the gradients into U (KL-clipping is off:
   the quadratic model sets the step size); Delta = -(U + eta theta) for each parameter
   (the raw gradient in place of U for parameters it does not precondition);
3. on adaptation steps, the exact GGN Gram matrix of (Delta, delta) on the same inputs
   (two forward-mode passes), and alpha, mu from the quadratic model;
4. theta <- theta + v, v = alpha Delta + mu delta;
5. an update that is not finite (say, a direction that overflowed at a tiny lambda) changes no
   parameter: the step warns and raises lambda as for rho < 1/4;
6. on damping steps, and on every step with ``step_rejection`` (the default), the closure runs
   once more at theta + v (capture paused; ``.grad`` is then put back to the preconditioned
   gradient U, as after a plain step); on damping steps rho is formed and lambda updated;
7. with ``step_rejection``, an update that raised h on its own batch (or made it non-finite) is
   undone: theta is restored exactly, delta stays the last accepted update and lambda rises as
   for rho < 1/4 (see :class:`~kfac_cuda.quadratic_model.QuadraticModel`); otherwise v is kept as
   the next step's delta.
A fixed learning rate or momentum is the param group's (so per-group rates are honoured then);
an adapted one is a single scalar for the whole model, as in the paper.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.nn as nn

from .comm import LocalComm
from .distributed import default_comm
from .curvature_products import ggn_gram_matrix
from .quadratic_model import QuadraticModel, model_change, solve_coefficients, updated_damping

STATE_KEY = "quadratic_model"


class _LastCall:
    """The positional and keyword arguments of a module's last (non-transformed) call."""

    args: Optional[Tuple[Any, ...]] = None
    kwargs: Dict[str, Any] = {}


@contextmanager
def recording_inputs(model: nn.Module) -> Iterator[_LastCall]:
    """Record the inputs of ``model``'s last forward call inside the block."""
    call = _LastCall()

    def hook(module, args, kwargs, output) -> None:
        call.args, call.kwargs = args, kwargs

    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        yield call
    finally:
        handle.remove()


def check_supported(quadratic_model: QuadraticModel, kl_clip: Optional[float], options: Dict[str, Any]) -> None:
    """Refuse what the quadratic model cannot do, before the optimizer is built.

    Args:
        options: the Preconditioner options the optimizer was given.
    """
    if not isinstance(quadratic_model, QuadraticModel):
        raise TypeError(f"quadratic_model must be a kfac_cuda.QuadraticModel, got {type(quadratic_model).__name__}")
    if kl_clip is not None:
        raise ValueError("quadratic_model chooses the step size itself: pass kl_clip=None")
    comm = options.get("comm")
    if type(comm if comm is not None else default_comm()) is not LocalComm:
        raise ValueError("quadratic_model is single-process only: its GGN products and rho would use "
                         "the local batch while the gradients are averaged over ranks")
    reduction = options.get("loss_reduction", "mean")
    if reduction != quadratic_model.loss_reduction:
        raise ValueError(f"loss_reduction={reduction!r} but QuadraticModel.loss_reduction="
                         f"{quadratic_model.loss_reduction!r}: both describe the same loss")
    if options.get("eigenbasis_moments") is not None:
        raise ValueError("quadratic_model adapts the damping and step of the curvature's own step; with "
                         "eigenbasis_moments the step is Adam's and uses no damping: pass eigenbasis_moments=None")
    if options.get("loss_terms", "examples") != "examples":
        raise ValueError("quadratic_model supports loss_terms='examples' only (its loss is divided by the "
                         "batch size, not by the number of tokens)")


def _dot(xs: List[torch.Tensor], ys: List[torch.Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(xs, ys)))


def martens_grosse_step(optimizer, model: nn.Module, closure: Optional[Callable[[], torch.Tensor]]):
    """One step of ``optimizer`` (a _KroneckerOptimizer with ``quadratic_model``) on ``model``."""
    options: QuadraticModel = optimizer.quadratic_model
    if closure is None:
        raise ValueError("quadratic_model needs step(closure): the closure zeroes the gradients, runs the "
                         "model, calls backward on the loss and returns it (torch.optim's convention)")
    pre = optimizer.preconditioner
    state = optimizer.state.setdefault(STATE_KEY, {"step": 0, "damping": pre.damping, "alpha": None, "mu": None})
    with recording_inputs(model) as call, torch.enable_grad():
        loss = closure()
    if call.args is None:
        raise RuntimeError("quadratic_model: the closure did not call the model given to the optimizer")
    names = {id(p): n for n, p in model.named_parameters()}
    entries = [(g, p) for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    missing = [p for _, p in entries if id(p) not in names]
    if missing:
        raise ValueError("quadratic_model needs every optimized parameter to belong to the model")
    grads = [p.grad.clone() for _, p in entries]
    pre.damping = state["damping"]
    if not pre.step(params=[p for g in optimizer.param_groups for p in g["params"]]):
        return loss
    step, damping = state["step"], state["damping"]
    adapt_lr, adapt_mu = options.learning_rate, options.momentum
    # Delta (and delta) carry the group's fixed lr (momentum), whose coefficient is then held at 1
    delta_dir = [-(p.grad + g["weight_decay"] * p) * (1.0 if adapt_lr else g["lr"]) for g, p in entries]
    previous = [optimizer.state[p].get("previous_update") for _, p in entries]
    has_previous = all(v is not None for v in previous) and (adapt_mu or any(g["momentum"] for g, _ in entries))
    vectors = [delta_dir]
    if has_previous:
        vectors.append([v * (1.0 if adapt_mu else g["momentum"]) for (g, _), v in zip(entries, previous)])
    fixed = [None if adapt_lr else 1.0] + ([None if adapt_mu else 1.0] if has_previous else [])
    damping_due = options.damping and step % options.damping_interval == 0
    adapt_due = (adapt_lr or adapt_mu) and (step % options.interval == 0 or state["alpha"] is None)
    gram = linear = None
    if adapt_due or damping_due:
        wd = [g["weight_decay"] for g, _ in entries]
        k = len(vectors)
        with pre.paused():
            gram = ggn_gram_matrix(model, call.args, call.kwargs,
                                   [{names[id(p)]: v[i] for i, (_, p) in enumerate(entries)} for v in vectors],
                                   options.loss, options.loss_reduction)
        eye = torch.tensor([[_dot(vectors[i], vectors[j]) for j in range(k)] for i in range(k)], dtype=torch.float64)
        l2 = torch.tensor([[_dot([w * x for w, x in zip(wd, vectors[i])], vectors[j]) for j in range(k)]
                           for i in range(k)], dtype=torch.float64)
        gram = gram + l2
        grad_h = [gr + w * p for gr, w, (_, p) in zip(grads, wd, entries)]
        linear = torch.tensor([_dot(grad_h, v) for v in vectors], dtype=torch.float64)
    if adapt_due:
        coefficients = solve_coefficients(gram + damping * eye, linear, fixed)
        state["alpha"] = coefficients[0] if adapt_lr else None
        state["mu"] = coefficients[1] if has_previous and adapt_mu else None
    else:
        coefficients = tuple(1.0 if f is not None else (state["alpha"] if i == 0 else (state["mu"] or 0.0))
                             for i, f in enumerate(fixed))
    update = [sum(c * v[i] for c, v in zip(coefficients, vectors)) for i in range(len(entries))]
    if not all(bool(torch.isfinite(u).all()) for u in update):
        # e.g. a direction that overflowed at a tiny lambda: change no parameter, raise lambda
        state["damping"] = updated_damping(damping, float("nan"), options) if options.damping else damping
        pre.damping = state["damping"]
        state.update(step=step + 1, alpha=None, mu=None)  # re-solve alpha, mu at the next step
        warnings.warn(f"kfac_cuda: non-finite update at quadratic-model step {step} (damping {damping:.3g}); "
                      f"parameters left unchanged, damping now {state['damping']:.3g}", RuntimeWarning)
        return loss
    l2_change = sum(g["weight_decay"] * (_dot([p], [u]) + 0.5 * _dot([u], [u])) for (g, p), u in zip(entries, update))
    theta = [p.detach().clone() for _, p in entries] if options.step_rejection else None
    for (_, p), u in zip(entries, update):
        p.add_(u)
    actual = float("nan")
    if damping_due or options.step_rejection:
        preconditioned = [p.grad.clone() for _, p in entries]
        with pre.paused(), torch.enable_grad():
            new_loss = closure()
        actual = float(new_loss.detach()) - float(loss.detach()) + l2_change
        for (_, p), u in zip(entries, preconditioned):  # .grad holds U again, as after a plain step
            p.grad = u
    if damping_due:
        predicted = model_change(gram, linear, coefficients)
        state["rho"] = actual / predicted if predicted != 0 else float("nan")
        state["damping"] = updated_damping(damping, state["rho"], options)
    if options.step_rejection and not actual <= 0.0:  # h rose on its own batch (or is not finite)
        _reject(entries, theta, state, step, damping, actual, options)
    else:
        for (_, p), u in zip(entries, update):
            optimizer.state[p]["previous_update"] = u
        state["rejected"] = 0
    pre.damping = state["damping"]
    state["step"] = step + 1
    return loss


def _reject(entries, theta: List[torch.Tensor], state: Dict[str, Any], step: int, damping: float,
            actual: float, options: QuadraticModel) -> None:
    """Undo a step whose update raised h on its own batch: the parameters go back to theta, the
    previous update stays the last accepted one, lambda rises as for rho < 1/4 (once, also on a
    damping step) and alpha, mu are re-solved at the next step. After ``warn_rejections`` rejected
    steps in a row (and every as many more) a RuntimeWarning says that no progress is being made."""
    for (_, p), t in zip(entries, theta):
        p.copy_(t)
    if options.damping:
        state["damping"] = updated_damping(damping, float("nan"), options)
    state.update(alpha=None, mu=None, rejected=state.get("rejected", 0) + 1)
    state["rejections"] = state.get("rejections", 0) + 1
    if state["rejected"] % options.warn_rejections == 0:
        warnings.warn(f"kfac_cuda: {state['rejected']} quadratic-model steps in a row rejected (each raised the "
                      f"objective on its own batch or made it non-finite; the last, step {step}, by {actual:.3g}); "
                      f"parameters unchanged since, damping now {state['damping']:.3g}: the optimizer is not "
                      "making progress", RuntimeWarning)
