"""When each part of the curvature is updated: factors, eigenbases and scales, by step."""
from __future__ import annotations

from typing import NamedTuple


class Due(NamedTuple):
    """What the current step updates."""

    factors: bool
    bases: bool
    scales: bool

    @property
    def capture(self) -> bool:
        """Whether the step needs the layers' inputs and output gradients."""
        return self.factors or self.scales


class Schedule:
    """Update intervals in steps. A basis refresh always takes the factors first and is
    followed by a scale re-estimate in the new basis (methods with scales)."""

    def __init__(self, factor_update_steps: int, inv_update_steps: int, scale_update_steps: int, has_scales: bool):
        self.factor_update_steps = factor_update_steps
        self.inv_update_steps = inv_update_steps
        self.scale_update_steps = scale_update_steps
        self.has_scales = has_scales

    def due(self, step: int) -> Due:
        bases = step % self.inv_update_steps == 0
        factors = bases or step % self.factor_update_steps == 0
        scales = self.has_scales and (bases or step % self.scale_update_steps == 0)
        return Due(factors, bases, scales)
