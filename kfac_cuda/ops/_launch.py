"""Launch helpers shared by the CUDA wrappers of the ops (stream handle, split-K choice)."""
from __future__ import annotations

import functools

import torch

# Cap on the split-K workspace (float32 elements): 2^26 floats = 256 MiB.
MAX_SPLIT_WORKSPACE = 1 << 26
# Activation / gradient dtypes the kernels read (accumulating in float32).
KERNEL_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Largest matrix side a kernel takes: grid.y <= 65535 tiles of 64 rows.
MAX_KERNEL_DIM = 65535 * 64


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def stream_handle(device: torch.device) -> int:
    """The caller's current stream on ``device`` as the int handle the extension takes."""
    return torch.cuda.current_stream(device).cuda_stream


def choose_splits(device: torch.device, tiles: int, reduce_len: int, min_per_split: int, split_floats: int,
                  *, blocks_per_sm: int = 0) -> int:
    """How many parts to cut the reduction dimension into so that ``tiles`` thread blocks per
    part fill about two waves of the device's SMs (with ``blocks_per_sm``: the most whole waves
    of that many resident blocks per SM, so no SM runs one block more than the others), with at
    least ``min_per_split`` of the reduction per part and at most MAX_SPLIT_WORKSPACE floats of
    partial results (``split_floats`` per part). 1 means no split (and no workspace)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if blocks_per_sm > 0:
        want = max(1, blocks_per_sm * _sm_count(index) // max(1, tiles))
    else:
        want = -(-2 * _sm_count(index) // max(1, tiles))
    by_length = max(1, reduce_len // max(1, min_per_split))
    by_memory = max(1, MAX_SPLIT_WORKSPACE // max(1, split_floats))
    return int(max(1, min(want, by_length, by_memory, 256)))
