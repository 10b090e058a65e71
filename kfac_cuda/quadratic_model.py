"""The exact local quadratic model of Martens & Grosse (2015, §6-7) and its two uses:
choosing the learning rate and momentum of each update, and Levenberg-Marquardt damping.

With h the objective (loss plus the L2 term (eta/2)|theta|^2 of ``weight_decay``), F the exact
GGN/Fisher of the loss on the current batch (:mod:`kfac_cuda.curvature_products`), lambda the
damping and v a candidate update,

    M(v) = 1/2 v^T (F + (lambda + eta) I) v + grad h^T v            (M(0) = 0).

The update is v = alpha Delta + mu delta, with Delta the preconditioned descent direction and
delta the previous update. Writing Q_ij = v_i^T (F + eta I) v_j, D_ij = v_i^T v_j and
b_i = grad h^T v_i for (v_1, v_2) = (Delta, delta), M(c_1 v_1 + c_2 v_2) = 1/2 c^T (Q + lambda D) c
+ b^T c, and the free coefficients solve the linear system (2x2, or 1x1 when only one is adapted
or when there is no previous update) with the others held at their fixed values (kfac-jax's
``_solve_quad_model`` handles the same cases).

Levenberg-Marquardt (Martens & Grosse §6.5; kfac-jax ``_compute_new_damping_and_rho``): every
``damping_interval`` steps the reduction ratio rho = (h(theta + v) - h(theta)) / (M_0(v) - M_0(0))
is measured on the same batch, where M_0 is M without the lambda term (as kfac-jax's default
``include_damping_in_quad_change=False``; the eta term is kept), and
    lambda <- omega lambda  if rho > 3/4,    lambda <- lambda / omega  if rho < 1/4,
with omega = ``damping_decay`` < 1, then clipped to [min_damping, max_damping]. A non-finite rho
counts as rho < 1/4.

Step rejection (``step_rejection``, on by default; kfac-jax's ``use_step_rejection``): the
quadratic model is only trusted where lambda |v|^2 keeps v short, and rho is only seen every T_1
steps. Once rho > 3/4 has shrunk lambda far (it falls by omega every T_1 steps while the model is
accurate on the measured batches), a single step whose batch GGN underestimates the loss' growth
along v (e.g. cross-entropy at near-zero loss, whose curvature p(1 - p) vanishes) can raise the
loss by orders of magnitude; the next gradients, directions and momentum inherit it and lambda,
raised by 1/omega at most once per T_1 steps, cannot catch up. With step rejection, h(theta + v)
is evaluated on the same batch at every step (one more closure call on the steps that are not
damping steps) and an update with h(theta + v) > h(theta), or a non-finite h, is undone: theta is
restored, the previous update stays the last accepted one, lambda <- lambda / omega (once per
rejected step, also on a damping step; clipped to max_damping; unchanged when ``damping`` is
off) and alpha, mu are re-solved at the next step. ``warn_rejections`` rejections in a row (and
every as many more) raise a RuntimeWarning: the optimizer is then not making progress.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from .curvature_products import check_loss

Coefficients = Tuple[float, ...]


@dataclass
class QuadraticModel:
    """Options of the Martens-Grosse step (``KFAC(..., quadratic_model=QuadraticModel(...))``).

    Args:
        loss: the training loss' predictive distribution, for the exact GGN products:
            "cross_entropy" | "bernoulli" | "mse", summed over output elements and divided by
            the batch size (conventions of :mod:`kfac_cuda.curvature_products`). The closure's
            loss must be this loss (plus nothing else: weight decay is the optimizer's).
        learning_rate: choose the learning rate alpha from the quadratic model (else alpha is the
            param group's ``lr``).
        momentum: choose the momentum mu from the quadratic model (else mu is the group's ``momentum``).
        interval: adapt alpha and mu every this many steps, keeping their last values in between.
        damping: adapt lambda by the Levenberg-Marquardt rule (else lambda stays at the
            optimizer's ``damping``).
        damping_interval: T_1, steps between damping adaptations (Martens & Grosse use 5).
        damping_decay: omega_1 of the rule, in (0, 1) (Martens & Grosse: (19/20)^T_1).
        min_damping, max_damping: the clip range of lambda.
        loss_reduction: "mean" (the loss is divided by the batch size) or "sum".
        step_rejection: undo an update that raises the objective on its own batch and raise
            lambda (module docstring); costs one more closure call on steps that are not
            damping steps. False is the paper's plain rule.
        warn_rejections: warn (RuntimeWarning) after this many rejected steps in a row, and
            every as many more.
    """

    loss: str
    learning_rate: bool = True
    momentum: bool = True
    interval: int = 1
    damping: bool = True
    damping_interval: int = 5
    damping_decay: float = (19 / 20) ** 5
    min_damping: float = 1e-8
    max_damping: float = math.inf
    loss_reduction: str = "mean"
    step_rejection: bool = True
    warn_rejections: int = 10

    def __post_init__(self) -> None:
        check_loss(self.loss)
        if not isinstance(self.step_rejection, bool):
            raise ValueError(f"QuadraticModel.step_rejection must be True or False, got {self.step_rejection!r}")
        for name in ("interval", "damping_interval", "warn_rejections"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"QuadraticModel.{name} must be a positive integer, got {value!r}")
        if not 0.0 < self.damping_decay < 1.0:
            raise ValueError(f"QuadraticModel.damping_decay must be in (0, 1), got {self.damping_decay!r}")
        if not 0.0 < self.min_damping <= self.max_damping:
            raise ValueError("QuadraticModel needs 0 < min_damping <= max_damping, got "
                             f"{self.min_damping!r}, {self.max_damping!r}")
        if self.loss_reduction not in ("mean", "sum"):
            raise ValueError(f"QuadraticModel.loss_reduction must be 'mean' or 'sum', got {self.loss_reduction!r}")


def solve_coefficients(curvature: torch.Tensor, linear: torch.Tensor,
                       fixed: Sequence[Optional[float]]) -> Coefficients:
    """argmin_c 1/2 c^T C c + b^T c over the coefficients whose ``fixed`` entry is None, the
    others held at their fixed values. ``curvature`` C must be positive definite on the free
    coefficients (a singular block raises ValueError, e.g. a zero direction)."""
    k = len(fixed)
    c = torch.tensor([0.0 if f is None else float(f) for f in fixed], dtype=torch.float64)
    free = [i for i, f in enumerate(fixed) if f is None]
    if not free:
        return tuple(c.tolist())
    held = [i for i in range(k) if fixed[i] is not None]
    C = curvature.double()
    rhs = -linear.double()[free]
    if held:
        rhs = rhs - C[free][:, held] @ c[held]
    block = C[free][:, free]
    try:
        c[free] = torch.linalg.solve(block, rhs)
    except RuntimeError as err:
        raise ValueError("the quadratic model is singular in the adapted coefficients "
                         "(zero update direction?)") from err
    return tuple(c.tolist())


def model_change(curvature: torch.Tensor, linear: torch.Tensor, coefficients: Sequence[float]) -> float:
    """M(sum_i c_i v_i) - M(0) = 1/2 c^T C c + b^T c."""
    c = torch.tensor(list(coefficients), dtype=torch.float64)
    return float(0.5 * c @ curvature.double() @ c + linear.double() @ c)


def updated_damping(damping: float, rho: float, options: QuadraticModel) -> float:
    """The Levenberg-Marquardt rule of the module docstring."""
    if math.isfinite(rho) and rho > 0.75:
        damping = damping * options.damping_decay
    elif not math.isfinite(rho) or rho < 0.25:
        damping = damping / options.damping_decay
    return min(max(damping, options.min_damping), options.max_damping)
