"""Data-parallel K-FAC over ``torch.distributed`` (NCCL on GPUs, gloo on CPUs).

Every rank holds the same curvature (factors, bases, scales) and takes the same step, so a
run on W ranks with per-rank batches of equal size and a mean-reduced loss equals a single
process on the concatenated batch (up to rounding), and a checkpoint written by rank 0
resumes on any world size. Per step (see ``Preconditioner.step``):

- gradients: averaged with one all_reduce per bucket unless the model is wrapped in
  DistributedDataParallel (which already averaged them);
- finiteness: one all_reduce (MIN) of a flag, so a NaN/Inf on any rank skips the step on all;
- factors, then scales: every rank folds its own batch into the EMA, then the updated
  tensors are averaged (the EMA is linear, so this is the global-batch EMA), flattened into
  buckets per dtype/device with one asynchronous all_reduce per bucket;
- eigendecompositions: spread over ranks by greedy longest-processing-time assignment of
  their cubic costs, each rank decomposing its share in batched calls; each rank then
  broadcasts its results as one flat buffer per dtype/device;
- preconditioning (KAISA, Pauloski et al. 2021): ``grad_worker_fraction`` f in (0, 1] sets
  k = f * W grad workers per layer (rounded down to a divisor of W). Ranks form W/k worker
  groups of k consecutive ranks; each layer is assigned to a worker group (longest-processing-
  time by cost) whose k ranks compute its U; worker i of the group sends U (and <U, V>) to
  receiver group i = {i, i + k, i + 2k, ...}, one broadcast per worker and dtype. f = 1/W:
  one rank per layer, least compute, the most traffic; f = 1: every rank computes every
  layer and nothing is sent.

Every rank keeps every layer's bases (EKFAC/TEKFAC need them on all ranks to estimate the
scales from the local batch), so ``grad_worker_fraction`` trades compute for traffic, not
memory. ``bytes_communicated`` counts, per kind, the data delivered to this rank: the payload
of every all_reduce (a ring all_reduce moves about 2 (W-1)/W times that over each link) and
of every broadcast this rank receives (a rank receives the (W - k)/W of the U's it does not
compute, and the eigendecompositions of the others).
"""
from __future__ import annotations

from collections import Counter, defaultdict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from .comm import LocalComm, OutputSpec
from .eigh import Eig, eigh_many

BucketKey = Tuple[torch.dtype, torch.device]


def lpt_assign(costs: Sequence[float], bins: int) -> List[int]:
    """Greedy longest-processing-time assignment: the costliest job first, each to the
    least-loaded bin (ties to the lower index). Deterministic, so every rank agrees."""
    load = [0.0] * bins
    owner = [0] * len(costs)
    for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        b = min(range(bins), key=lambda b: (load[b], b))
        owner[j] = b
        load[b] += costs[j]
    return owner


def grad_workers(fraction: float, world_size: int) -> int:
    """Grad workers per layer for ``grad_worker_fraction``: round(fraction * W), at least 1,
    lowered to the nearest divisor of W (worker groups must tile the ranks)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"grad_worker_fraction must be in (0, 1], got {fraction!r}")
    k = max(1, round(fraction * world_size))
    while world_size % k:
        k -= 1
    return k


def _flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _split(flat: torch.Tensor, shapes: Sequence[torch.Size]) -> List[torch.Tensor]:
    """Views of ``flat`` with the given shapes, in order."""
    out, offset = [], 0
    for shape in shapes:
        n = shape.numel()
        out.append(flat[offset: offset + n].view(shape))
        offset += n
    return out


class DistributedComm(LocalComm):
    """The Preconditioner's communication over a ``torch.distributed`` process group.

    Construct it on every rank after ``dist.init_process_group`` (its constructor creates
    the receiver subgroups, a collective call) and pass it to the optimizer:
    ``kfac_cuda.KFAC(model, lr=0.1, comm=kfac_cuda.DistributedComm(grad_worker_fraction=0.5))``.
    One instance per Preconditioner.

    Args:
        grad_worker_fraction: fraction of the ranks that precondition each layer (KAISA);
            1/W up to 1 (default 1: every rank computes every layer, no gradient broadcast).
        group: the process group (default: the world).
        grad_averaging: average ``.grad`` over ranks in ``step()``: None (default) does it
            unless the model given to the optimizer is a DistributedDataParallel; True/False
            forces it (e.g. False when gradients are averaged by other means).
        bucket_cap_mb: largest flattened buffer per all_reduce of averaged tensors.
    """

    def __init__(self, grad_worker_fraction: float = 1.0, *, group: Optional[dist.ProcessGroup] = None,
                 grad_averaging: Optional[bool] = None, bucket_cap_mb: float = 25.0):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("DistributedComm needs torch.distributed initialised (dist.init_process_group)")
        if bucket_cap_mb <= 0:
            raise ValueError(f"bucket_cap_mb must be positive, got {bucket_cap_mb!r}")
        self.group = group if group is not None else dist.group.WORLD
        self.ranks: List[int] = dist.get_process_group_ranks(self.group)  # group rank -> global rank
        self.rank = dist.get_rank(self.group)
        self.world_size = len(self.ranks)
        self.grad_workers = grad_workers(grad_worker_fraction, self.world_size)
        self.worker_groups = self.world_size // self.grad_workers
        self.grad_averaging = grad_averaging
        self.bucket_cap_bytes = int(bucket_cap_mb * 2**20)
        self.bytes_communicated: Counter = Counter()
        self._params: List[nn.Parameter] = []
        self._receivers, self._receiver_ranks = self._make_receiver_group()
        self._flag_device = (torch.device("cuda", torch.cuda.current_device())
                             if dist.get_backend(self.group) == "nccl" else torch.device("cpu"))

    def _make_receiver_group(self) -> Tuple[Optional[dist.ProcessGroup], List[int]]:
        """This rank's receiver group {i, i + k, ...} (i = rank mod k, k grad workers), as
        (process group, global ranks ordered by worker group). Every rank creates every group."""
        k, mine = self.grad_workers, self.rank % self.grad_workers
        if self.worker_groups == 1:
            return None, [self.ranks[self.rank]]
        if k == 1:
            return self.group, self.ranks
        chosen = None
        for i in range(k):
            members = [self.ranks[i + k * c] for c in range(self.worker_groups)]
            pg = dist.new_group(members)
            if i == mine:
                chosen = (pg, members)
        return chosen

    # --- LocalComm interface -------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        """Remember the parameters to average, and whether DDP already averages them."""
        self._params = [p for p in model.parameters() if p.requires_grad]
        if self.grad_averaging is None:
            self.grad_averaging = not isinstance(model, nn.parallel.DistributedDataParallel)

    def all_true(self, flag: bool) -> bool:
        t = torch.tensor([int(flag)], dtype=torch.int32, device=self._flag_device)
        self._count("flags", t)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return bool(t.item())

    def count_true(self, flags: Sequence[bool]) -> List[int]:
        if not flags:
            return []
        t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=self._flag_device)
        self._count("flags", t)
        dist.all_reduce(t, group=self.group)
        return t.tolist()

    def average_gradients(self) -> None:
        """Average every parameter's ``.grad`` over ranks, a rank without a gradient for a
        parameter (a layer its batch did not use) counting as zeros: the gradient of the mean
        of the ranks' losses. A parameter without a gradient on every rank keeps ``None``. The
        collectives have the same shapes on every rank whatever each rank's batch did."""
        if not self.grad_averaging:
            return
        anywhere = self.count_true([p.grad is not None for p in self._params])
        for p, n in zip(self._params, anywhere):
            if n and p.grad is None:
                p.grad = torch.zeros_like(p)
        self._average([p.grad for p, n in zip(self._params, anywhere) if n], "gradients")

    def average_(self, tensors: Sequence[torch.Tensor]) -> None:
        self._average(tensors, "curvature")

    def eigh_many(self, mats: Sequence[torch.Tensor], labels: Sequence[str], costs: Sequence[float]) -> List[Optional[Eig]]:
        """Each rank decomposes its longest-processing-time share; results are broadcast."""
        owners = lpt_assign(costs, self.world_size)
        mine = [j for j, o in enumerate(owners) if o == self.rank]
        local: Dict[int, List[torch.Tensor]] = {}
        for j, eig in zip(mine, eigh_many([mats[j] for j in mine], [labels[j] for j in mine])):
            m = mats[j]
            ok = torch.ones(1, dtype=m.dtype, device=m.device)
            if eig is None:  # every rung of the ladder failed: zeros and flag 0
                eig, ok = (m.new_zeros(m.shape[0]), torch.zeros_like(m)), ok.zero_()
            local[j] = [eig[0], eig[1], ok]
        shapes = [[torch.Size([m.shape[0]]), m.shape, torch.Size([1])] for m in mats]
        pieces = self._share(owners, shapes, [(m.dtype, m.device) for m in mats], local,
                             self.group, self.ranks, "eigh")
        oks = torch.cat([ok for _, _, ok in pieces]).tolist() if pieces else []  # one device sync
        return [(evals, evecs) if ok else None for (evals, evecs, _), ok in zip(pieces, oks)]

    def precondition_all(self, jobs: Sequence[Callable[[], Tuple[torch.Tensor, torch.Tensor]]],
                         costs: Sequence[float], specs: Sequence[OutputSpec]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """The ranks of each layer's worker group compute U; worker i sends it to receiver group i."""
        owners = lpt_assign(costs, self.worker_groups)
        mine = self.rank // self.grad_workers
        local = {j: list(job()) for j, job in enumerate(jobs) if owners[j] == mine}
        if self.worker_groups == 1:
            return [tuple(local[j]) for j in range(len(jobs))]
        shapes = [[s.shape, torch.Size([])] for s in specs]
        pieces = self._share(owners, shapes, [(s.dtype, s.device) for s in specs], local,
                             self._receivers, self._receiver_ranks, "precondition")
        return [tuple(p) for p in pieces]

    # --- collectives -----------------------------------------------------------------------
    def _count(self, kind: str, t: torch.Tensor) -> None:
        self.bytes_communicated[kind] += t.numel() * t.element_size()

    def _buckets(self, tensors: Sequence[torch.Tensor]) -> List[List[torch.Tensor]]:
        """Tensors grouped by dtype/device, in order, each group cut at ``bucket_cap_bytes``."""
        groups: Dict[BucketKey, List[List[torch.Tensor]]] = defaultdict(lambda: [[]])
        filled: Dict[BucketKey, int] = defaultdict(int)  # bytes in each key's last bucket
        for t in tensors:
            key = (t.dtype, t.device)
            if groups[key][-1] and filled[key] + t.nbytes > self.bucket_cap_bytes:
                groups[key].append([])
                filled[key] = 0
            groups[key][-1].append(t)
            filled[key] += t.nbytes
        return [b for bs in groups.values() for b in bs]

    def _average(self, tensors: Sequence[torch.Tensor], kind: str) -> None:
        """In-place average over ranks: one asynchronous all_reduce per bucket, so that the
        next bucket is packed while the previous one is reduced."""
        if self.world_size == 1:
            return
        pending = []
        for bucket in self._buckets(tensors):
            flat = _flatten(bucket)
            self._count(kind, flat)
            pending.append((dist.all_reduce(flat, group=self.group, async_op=True), flat, bucket))
        for work, flat, bucket in pending:
            work.wait()
            flat.div_(self.world_size)
            for t, avg in zip(bucket, _split(flat, [t.shape for t in bucket])):
                t.copy_(avg)

    def _share(self, owners: Sequence[int], shapes: Sequence[Sequence[torch.Size]], keys: Sequence[BucketKey],
               local: Dict[int, List[torch.Tensor]], group: Optional[dist.ProcessGroup], ranks: Sequence[int],
               kind: str) -> List[List[torch.Tensor]]:
        """Give every rank of ``group`` the pieces of every item: item j (pieces shaped
        ``shapes[j]``, dtype/device ``keys[j]``) is computed by group member ``owners[j]``
        (``local`` holds this rank's items); one broadcast per owner and dtype/device. The
        owner too takes its results as views of the broadcast buffer: identical strides and
        alignment on every rank keep later BLAS calls bitwise identical across ranks."""
        if len(ranks) == 1:
            return [local[j] for j in range(len(owners))]
        me = ranks.index(dist.get_rank())
        items: Dict[Tuple[int, BucketKey], List[int]] = defaultdict(list)
        for j, (owner, key) in enumerate(zip(owners, keys)):
            items[(owner, key)].append(j)
        pending = []
        for (owner, (dtype, device)), idx in items.items():
            if owner == me:
                buf = _flatten([p for j in idx for p in local[j]])
            else:
                buf = torch.empty(sum(s.numel() for j in idx for s in shapes[j]), dtype=dtype, device=device)
                self._count(kind, buf)
            pending.append((dist.broadcast(buf, src=ranks[owner], group=group, async_op=True), buf, idx))
        out: List[List[torch.Tensor]] = [[] for _ in owners]
        for work, buf, idx in pending:
            work.wait()
            views = _split(buf, [s for j in idx for s in shapes[j]])
            for j in idx:
                out[j], views = views[: len(shapes[j])], views[len(shapes[j]):]
        return out


def default_comm() -> LocalComm:
    """``DistributedComm()`` when torch.distributed is initialised with more than one rank (a
    model trained on several ranks must not keep each rank's own curvature), else ``LocalComm()``."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return DistributedComm()
    return LocalComm()
