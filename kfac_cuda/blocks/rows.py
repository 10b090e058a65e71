"""Helper shared by the transformer blocks: a LayerBatch's per-example blocks."""
from __future__ import annotations

from typing import List, Tuple

import torch


def example_blocks(batch) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """(g (n, T, d_out), a (n, T, d_in)) per forward pass of a LayerBatch."""
    return list(batch.blocks)
