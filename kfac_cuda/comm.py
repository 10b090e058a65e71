"""What the preconditioner asks of its process group. ``LocalComm`` is the single-process
answer; the distributed implementation (kfac_cuda.distributed) answers the same calls
across ranks."""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .eigh import Eig, eigh_many


class OutputSpec(NamedTuple):
    """Shape, dtype and device of one layer's preconditioned gradient U (what a rank that
    does not compute U must allocate to receive it)."""

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device


class LocalComm:
    """Single process: nothing to communicate."""

    world_size = 1

    def attach(self, model: nn.Module) -> None:
        """Called once by the Preconditioner with the model it was given (possibly wrapped
        in DistributedDataParallel)."""

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank."""
        return flag

    def average_gradients(self) -> None:
        """Make every rank's ``.grad`` of the attached model's parameters the average over
        ranks (no-op when a wrapper such as DDP already did)."""

    def count_true(self, flags: Sequence[bool]) -> List[int]:
        """For each flag, on how many ranks it holds."""
        return [int(f) for f in flags]

    def average_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Replace each tensor in place by its average over ranks."""

    def eigh_many(self, mats: Sequence[torch.Tensor], labels: Sequence[str], costs: Sequence[float]) -> List[Optional[Eig]]:
        """Decompose every matrix (the distributed version spreads them over ranks by cost)."""
        return eigh_many(mats, labels)

    def precondition_all(self, jobs: Sequence[Callable[[], Tuple[torch.Tensor, torch.Tensor]]],
                         costs: Sequence[float], specs: Sequence[OutputSpec]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Run every layer's preconditioning job, returning (U, <U, V>) per job on every rank
        (the distributed version runs each job on some ranks and sends U, shaped as in
        ``specs``, to the others)."""
        return [job() for job in jobs]
