"""Growing mini-batch sizes, as Martens & Grosse (2015, §13) use for the deep autoencoders:
K-FAC's curvature estimates and its quadratic model get better as the batch grows, so the
batch starts small and grows exponentially to a cap."""
from __future__ import annotations

import math


class ExponentialBatchSize:
    """m_k = min(round(initial * exp((k - 1) / b)), final) at step k = 1, 2, ..., with b set so
    that the batch reaches ``final`` at step ``steps_to_final`` (constant after).

    Pass it as the batch size of :func:`kfac_cuda.demo.train.train`, or call it in your own
    loop: ``batch = schedule(step)``.
    """

    def __init__(self, initial: int, final: int, steps_to_final: int):
        for name, value in (("initial", initial), ("final", final), ("steps_to_final", steps_to_final)):
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise ValueError(f"ExponentialBatchSize: {name} must be a positive integer, got {value!r}")
        if final < initial:
            raise ValueError(f"ExponentialBatchSize: final ({final}) must be >= initial ({initial})")
        self.initial, self.final, self.steps_to_final = int(initial), int(final), int(steps_to_final)
        ratio = math.log(self.final / self.initial)
        self.rate = ratio / (self.steps_to_final - 1) if self.steps_to_final > 1 else 0.0

    def __call__(self, step: int) -> int:
        if step < 1:
            raise ValueError(f"steps count from 1, got {step}")
        if step >= self.steps_to_final:
            return self.final
        return min(self.final, int(round(self.initial * math.exp((step - 1) * self.rate))))

    def __repr__(self) -> str:
        return f"ExponentialBatchSize(initial={self.initial}, final={self.final}, steps_to_final={self.steps_to_final})"
