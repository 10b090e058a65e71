"""CPU: the conv factor's split rule (kfac_cuda.ops.conv_factor_accumulate.conv_splits) keeps
tiles * splits within one wave of resident blocks, each part at least 256 rows long and the
partials within the workspace cap."""
import pytest

from kfac_cuda.ops._launch import MAX_SPLIT_WORKSPACE
from kfac_cuda.ops.conv_factor_accumulate import _RESIDENT_BLOCKS_PER_SM, conv_splits


@pytest.mark.parametrize("sms,tiles,rows,d", [(132, 55, 131072, 577), (132, 190, 32768, 1153), (132, 703, 8192, 2305),
                                              (108, 1, 10**6, 10), (132, 3, 1000, 100), (132, 1, 10**7, 4000)])
def test_splits_fill_one_wave_within_bounds(sms, tiles, rows, d):
    s = conv_splits(sms, tiles, rows, d)
    assert 1 <= s <= 256
    if s > 1:
        assert tiles * s <= _RESIDENT_BLOCKS_PER_SM * sms      # no partial second wave
        assert rows // s >= 256                                  # parts long enough to pay the reduction
        assert s * d * d <= MAX_SPLIT_WORKSPACE
    # maximal: one more split would break one of the bounds
    more = s + 1
    assert (tiles * more > _RESIDENT_BLOCKS_PER_SM * sms or more > rows // 256
            or more * d * d > MAX_SPLIT_WORKSPACE or more > 256)


def test_resnet18_layer1_fills_the_resident_slots():
    # 55 upper tiles of d = 577 on 132 SMs: 9 splits -> 495 of 528 resident slots
    assert conv_splits(132, 55, 128 * 32 * 32, 577) == 9
