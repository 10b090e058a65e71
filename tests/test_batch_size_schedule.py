"""ExponentialBatchSize against the formula written out by hand."""
from __future__ import annotations

import pytest

from kfac_cuda import ExponentialBatchSize


def test_grows_geometrically_to_the_cap() -> None:
    schedule = ExponentialBatchSize(initial=100, final=1600, steps_to_final=5)
    # m_k = 100 * 16^((k-1)/4): 100, 200, 400, 800, 1600, then constant
    assert [schedule(k) for k in range(1, 8)] == [100, 200, 400, 800, 1600, 1600, 1600]


def test_constant_and_single_step_schedules() -> None:
    assert [ExponentialBatchSize(64, 64, 10)(k) for k in (1, 5, 20)] == [64, 64, 64]
    assert ExponentialBatchSize(8, 512, 1)(1) == 512


@pytest.mark.parametrize("args, message", [((0, 10, 5), "initial"), ((10, 5, 5), "final"),
                                           ((1, 10, 0), "steps_to_final"), ((1.5, 10, 5), "initial")])
def test_bad_arguments_are_refused(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ExponentialBatchSize(*args)
    with pytest.raises(ValueError, match="count from 1"):
        ExponentialBatchSize(1, 2, 2)(0)
