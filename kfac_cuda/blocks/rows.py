"""Helpers shared by the transformer blocks: a LayerBatch's per-example blocks and the
rotation with a diagonal (identity-basis) input side."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch


def example_blocks(batch) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """(g (n, T, d_out), a (n, T, d_in)) per forward pass of a LayerBatch."""
    return list(batch.blocks)


def precondition_diagonal_input(V: torch.Tensor, QG: torch.Tensor, *, damping: float,
                                scale: Optional[torch.Tensor] = None, eig_g: Optional[torch.Tensor] = None,
                                eig_a: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(U, <U, V>) with U = Q_G [(Q_G^T V) / (S + damping)] (input basis = identity), S = ``scale``
    or ``eig_g eig_a^T`` -- ``ops.precondition`` with Q_A = I, without forming I."""
    V = V.to(QG.dtype)
    S = scale if scale is not None else torch.outer(eig_g, eig_a)
    U = QG @ ((QG.t() @ V) / (S + damping))
    return U, (U * V).sum()
