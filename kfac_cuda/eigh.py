"""Symmetric eigendecompositions that never end a training run.

Same-shaped factors are stacked and decomposed in one batched ``torch.linalg.eigh`` call.
When that fails (cuSOLVER does on exactly rank-deficient factors), each matrix of the
batch goes down a ladder: float64 with jitter scaled to the matrix (1e-6 * mean diagonal),
then the same on the CPU. A matrix that fails every rung comes back as ``None``: the caller
keeps its previous basis and warns. Negative eigenvalues are clamped to zero.
"""
from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import torch

Eig = Tuple[torch.Tensor, torch.Tensor]  # (eigenvalues ascending, eigenvectors as columns)

JITTER = 1e-6


def _symmetrise(m: torch.Tensor) -> torch.Tensor:
    return 0.5 * (m + m.transpose(-1, -2))


def _finish(evals: torch.Tensor, evecs: torch.Tensor, like: torch.Tensor) -> Eig:
    return evals.clamp_min(0).to(like.dtype), evecs.to(like.dtype).contiguous()


def _ladder(m: torch.Tensor, label: str) -> Optional[Eig]:
    """Float64 with jitter on the matrix's device, then on the CPU; None if both fail."""
    m64 = m.double()
    jitter = JITTER * m64.diagonal().abs().mean().clamp_min(torch.finfo(torch.float64).tiny)
    eye = torch.eye(m.shape[-1], dtype=torch.float64, device=m.device)
    for device in dict.fromkeys([m.device, torch.device("cpu")]):
        try:
            evals, evecs = torch.linalg.eigh((m64 + jitter * eye).to(device))
        except RuntimeError:
            continue
        warnings.warn(f"kfac_cuda: eigh of {label} needed float64 with jitter on {device}", RuntimeWarning)
        evals = (evals - jitter.to(device)).to(m.device)
        return _finish(evals, evecs.to(m.device), m)
    return None


def eigh_many(mats: Sequence[torch.Tensor], labels: Sequence[str]) -> List[Optional[Eig]]:
    """Decompose each symmetric matrix; same shape/dtype/device ones in one batched call.

    Returns, in input order, (eigenvalues, eigenvectors) or None where every attempt failed.
    """
    groups: Dict[tuple, List[int]] = defaultdict(list)
    for i, m in enumerate(mats):
        groups[(tuple(m.shape), m.dtype, m.device)].append(i)
    out: List[Optional[Eig]] = [None] * len(mats)
    for idx in groups.values():
        stack = _symmetrise(torch.stack([mats[i] for i in idx]))
        try:
            if not torch.isfinite(stack).all():
                raise RuntimeError("non-finite entries")
            evals, evecs = torch.linalg.eigh(stack)
        except RuntimeError:
            for j, i in enumerate(idx):
                out[i] = _ladder(stack[j], labels[i]) if torch.isfinite(stack[j]).all() else None
            continue
        for j, i in enumerate(idx):
            out[i] = _finish(evals[j], evecs[j], stack[j])
    return out
