"""The curvature's estimation within one step, apart from its use: the factors' EMAs, the
eigenbases and the scales, each as the schedule says, averaged over ranks.

Order (TEKFAC paper, Algorithm 1, and George et al. 2018): factors, then (on refresh steps)
eigenbases, then the scales re-estimated in the NEW basis, never carried over from the old one.
Across ranks a layer's factors and scales are averaged over the ranks whose batch used it (the
estimate those ranks' batches give together): a rank whose batch did not use the layer adds
zeros to the sum, which is then divided by the number of ranks that used it, so that every
collective has the same shape on every rank.
"""
from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Sequence

import torch

from .batch import LayerBatch
from .comm import LocalComm
from .curvature import KFACCurvature
from .registration import Layers
from .schedule import Due

MAX_EIGH_FAILURES = 3


def update_curvature(layers: Layers, names: Sequence[str], batches: Dict[str, LayerBatch], due: Due,
                     comm: LocalComm, *, factor_decay: float, scale_decay: float, scale_restart: str) -> List[str]:
    """Update the factors, bases and scales of ``names`` as ``due``; return the layers left
    without a basis (their first eigendecomposition failed)."""
    curvatures = [layers[n][1] for n in names]
    used = comm.count_true([n in batches for n in names]) if (due.factors or due.scales) else []
    if due.factors:
        for n, c, count in zip(names, curvatures, used):
            if n in batches:
                c.update_factors(batches[n], factor_decay)
            elif count:
                c.zero_synced_factors()
        _average_where_used(comm, curvatures, used, lambda c: c.synced_factors())
    without_basis: List[str] = []
    if due.bases or any(not c.has_basis for c in curvatures):
        without_basis = refresh_bases(layers, [n for n, c in zip(names, curvatures)
                                               if c.factors_initialized and (due.bases or not c.has_basis)], comm)
    if due.scales and not without_basis:
        for n, c, count in zip(names, curvatures, used):
            if c.has_basis and n in batches:
                c.update_scales(batches[n], scale_decay, fresh=due.bases, restart=scale_restart)
            elif c.has_basis and count:
                c.zero_synced_scales()
        _average_where_used(comm, curvatures, [count if c.has_basis else 0 for c, count in zip(curvatures, used)],
                            lambda c: c.synced_scales())
    return without_basis


def refresh_bases(layers: Layers, names: Sequence[str], comm: LocalComm) -> List[str]:
    """Recompute the eigenbases of ``names`` (spread over ranks by ``comm``). A layer whose
    decomposition fails keeps its previous basis (warned); an error after ``MAX_EIGH_FAILURES``
    consecutive failures. Returns the layers that failed and have no basis at all."""
    mats, labels, costs, counts = [], [], [], []
    for n in names:
        sources = layers[n][1].basis_sources()  # full factors only (a diagonal side has none)
        sides = getattr(layers[n][1], "basis_sides", ("input", "output"))
        counts.append(len(sources))
        for side, m in zip(sides, sources):
            mats.append(m)
            labels.append(f"{n or '<model>'} {side} factor")
            costs.append(float(m.shape[0]) ** 3)
    eigs = comm.eigh_many(mats, labels, costs)
    start = 0
    without_basis = []
    for n, count in zip(names, counts):
        curvature = layers[n][1]
        layer_eigs, start = eigs[start:start + count], start + count
        if any(e is None for e in layer_eigs):
            curvature.eigh_failures += 1
            if curvature.eigh_failures >= MAX_EIGH_FAILURES:
                raise RuntimeError(f"kfac_cuda: eigendecomposition of layer {n!r} failed "
                                   f"{curvature.eigh_failures} times in a row")
            if curvature.has_basis:
                warnings.warn(f"kfac_cuda: eigendecomposition of layer {n!r} failed; keeping its previous "
                              "basis", RuntimeWarning)
            else:
                without_basis.append(n)
            continue
        curvature.eigh_failures = 0
        curvature.set_bases(*layer_eigs)
    return without_basis


def _average_where_used(comm: LocalComm, curvatures: Sequence[KFACCurvature], used: List[int],
                        tensors_of: Callable[[KFACCurvature], List[torch.Tensor]]) -> None:
    """Average ``tensors_of(c)`` of every layer used on ``used[i]`` > 0 ranks over those ranks."""
    world = comm.world_size
    comm.average_([t for c, count in zip(curvatures, used) if count for t in tensors_of(c)])
    for c, count in zip(curvatures, used):
        if 0 < count < world:  # the average counted the ranks that did not use the layer
            for t in tensors_of(c):
                t.mul_(world / count)
