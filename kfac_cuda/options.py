"""One place that checks every option of the Preconditioner and the optimizers.

Each check returns the value converted to its type or raises a ``ValueError`` (``TypeError``
for a value of the wrong kind) naming the argument, so that no accepted option can turn into
NaN parameters later: numbers must be finite (``nan`` and ``inf`` fail every range check),
step intervals are integers >= 1 (``0`` is refused, never replaced by a default), and
``damping`` is > 0 because every method divides by (curvature + damping) and the curvature
of a small batch is singular.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Sequence, Union

LrArg = Union[None, float, Callable[[Any], float]]


def choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    """``value`` if it is one of ``allowed``."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value


def real(name: str, value: Any, *, low: float = -math.inf, high: float = math.inf,
         low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a finite float in [low, high] (an end is excluded when ``*_open``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    too_low = v <= low if low_open else v < low
    too_high = v >= high if high_open else v > high
    if not math.isfinite(v) or too_low or too_high:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")
    return v


def positive_int(name: str, value: Any) -> int:
    """``value`` as an int >= 1 (an integral float such as 10.0 is accepted)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive integer, got {value!r}")
    if not math.isfinite(float(value)) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def optional(check: Callable[..., Any], name: str, value: Any, **bounds: Any) -> Any:
    """None, or ``check(name, value, **bounds)``."""
    return None if value is None else check(name, value, **bounds)


def flag(name: str, value: Any) -> bool:
    """``value`` if it is a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def damping(value: Any) -> float:
    """Tikhonov damping: finite and > 0."""
    return real("damping", value, low=0.0, low_open=True)


def decay(name: str, value: Any) -> float:
    """An EMA weight of the old value, in [0, 1)."""
    return real(name, value, low=0.0, high=1.0, high_open=True)


def betas(name: str, value: Any) -> tuple:
    """A pair (beta1, beta2) of EMA weights, each in [0, 1)."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be a pair (beta1, beta2), got {value!r}")
    return (decay(f"{name}[0]", value[0]), decay(f"{name}[1]", value[1]))


def learning_rate(value: LrArg, name: str = "lr") -> LrArg:
    """None, a callable (param -> lr), or a finite number >= 0."""
    if value is None or callable(value):
        return value
    return real(name, value, low=0.0)


def sgd_hyperparameters(lr: Any, momentum: Any, weight_decay: Any) -> dict:
    """The optimizers' SGD hyper-parameters: finite, lr >= 0, 0 <= momentum, weight_decay >= 0."""
    return dict(lr=real("lr", lr, low=0.0), momentum=real("momentum", momentum, low=0.0),
                weight_decay=real("weight_decay", weight_decay, low=0.0))
