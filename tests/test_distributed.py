"""Data-parallel K-FAC on a CPU gloo group (torch.multiprocessing spawn, 127.0.0.1 only).

Ground truth is a single process on the concatenated batch: with equal per-rank batches and
a mean-reduced loss, W ranks must take the same steps (float64 model, tight tolerance), for
every ``grad_worker_fraction`` tiling, with and without DistributedDataParallel; a NaN on one
rank skips the step on all; a checkpoint from world size 2 resumes on world sizes 1 and 3.
"""
from __future__ import annotations

import copy
import functools
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import kfac_cuda
from kfac_cuda.distributed import grad_workers, lpt_assign
from kfac_cuda.eigh import eigh_many

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")

ROOT = Path(__file__).resolve().parents[1]
BATCH = 24  # global batch: divisible by 1, 2, 3, 4 and larger than every factor side
OPTIONS = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, kl_clip=1e-2, damping=1e-2,
               factor_update_steps=1, inv_update_steps=2)
OPTIMIZERS = {"kfac": kfac_cuda.KFAC, "tekfac": kfac_cuda.TEKFAC}
WORLD = 4
FRACTIONS = (1 / WORLD, 0.5, 1.0)  # one, two and four grad workers per layer
STEPS = 4
NAN_STEP = 2
CKPT_STEP, RESUME_STOP = 3, 6


# --- shared by the test process and the ranks ---------------------------------------------------
def make_model() -> nn.Module:
    """Conv (weight sharing), dense layers and an unsupported LayerNorm (plain SGD), float64
    (explicitly: other test modules change the default dtype of the test process)."""
    torch.manual_seed(0)
    f64 = dict(dtype=torch.float64)
    return nn.Sequential(nn.Conv2d(2, 3, 3, **f64), nn.Tanh(), nn.Flatten(), nn.Linear(12, 6, **f64), nn.Tanh(),
                         nn.LayerNorm(6, **f64), nn.Linear(6, 3, **f64))


def batch(step: int, rank: int = 0, world: int = 1):
    """This rank's equal share of the global batch of ``step``."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(BATCH, 2, 4, 4, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (BATCH,), generator=g)
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    return x[rows], y[rows]


def train(model: nn.Module, opt, steps, rank: int = 0, world: int = 1, nan_step=None) -> None:
    for s in steps:
        x, y = batch(s, rank, world)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if s == nan_step and rank == 1:
            opt.param_groups[0]["params"][0].grad.view(-1)[0] = math.nan
        opt.step()


def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@functools.lru_cache(maxsize=None)
def single_process(method: str, steps: tuple) -> torch.Tensor:
    model = make_model()
    train(model, OPTIMIZERS[method](model, **OPTIONS), steps)
    return flat_params(model)


# --- process group plumbing ------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, *args) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` processes of a fresh gloo group."""
    mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)


# --- the rank program: one 4-process group runs every scenario (process start-up dominates) ---------
def run_all(rank: int, world: int, out: Path) -> None:
    results = {"configs": run_configs(rank, world), "nan": run_nan_skip(rank, world), "eigh": run_eigh(),
               "uneven": run_uneven(rank, world)}
    pair, trio, solo = dist.new_group([0, 1]), dist.new_group([0, 1, 2]), dist.new_group([3])
    if rank < 2:
        save_checkpoint(pair, out, CKPT_STEP)
    dist.barrier()
    results["resumed"] = resume(trio if rank < 3 else solo, out, CKPT_STEP, RESUME_STOP)
    torch.save(results, out / f"rank{rank}.pt")


def run_configs(rank: int, world: int) -> dict:
    """Every method x fraction x DDP: (parameters, bytes communicated per kind)."""
    results = {}
    for method, opt_cls in OPTIMIZERS.items():
        for fraction in FRACTIONS:
            for ddp in (False, True):
                model = make_model()
                net = DDP(model) if ddp else model
                comm = kfac_cuda.DistributedComm(grad_worker_fraction=fraction)
                train(net, opt_cls(net, comm=comm, **OPTIONS), range(STEPS), rank, world)
                results[(method, fraction, ddp)] = (flat_params(model), dict(comm.bytes_communicated))
    return results


def run_nan_skip(rank: int, world: int) -> dict:
    """Rank 1 alone gets a NaN gradient at NAN_STEP (after DDP averaged): every rank must skip."""
    model = make_model()
    net = DDP(model)
    comm = kfac_cuda.DistributedComm()
    opt = kfac_cuda.KFAC(net, comm=comm, **OPTIONS)
    train(net, opt, range(STEPS + 1), rank, world, nan_step=NAN_STEP)
    return {"params": flat_params(model), "steps": opt.preconditioner.steps,
            "all_true": (comm.all_true(rank != 1), comm.all_true(True))}


class Branchy(nn.Module):
    """A layer (``branch``) that only the first ``branch_rows`` rows of a batch go through."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        f64 = dict(dtype=torch.float64)
        self.trunk, self.branch, self.head = nn.Linear(4, 5, **f64), nn.Linear(5, 5, **f64), nn.Linear(5, 3, **f64)

    def forward(self, x, branch_rows: int):
        h = torch.tanh(self.trunk(x))
        if branch_rows:
            h = torch.cat([torch.tanh(self.branch(h[:branch_rows])), h[branch_rows:]])
        return self.head(h)


def uneven_batch(rank: int = 0, world: int = 1):
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(BATCH, 4, dtype=torch.float64, generator=g), torch.randint(0, 3, (BATCH,), generator=g)
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    return x[rows], y[rows]


def uneven_backward(model, rank: int, world: int, used: bool) -> None:
    """Ranks < world/2 route their rows through the branch when ``used`` (in a single process:
    the first half of the batch)."""
    x, y = uneven_batch(rank, world)
    model.zero_grad()
    rows = (len(x) if world > 1 and rank < world // 2 else BATCH // 2 if world == 1 else 0) if used else 0
    F.cross_entropy(model(x, rows), y).backward()


def run_uneven(rank: int, world: int) -> dict:
    """No DDP, and a layer that only half of the ranks use: the collectives must agree in shape."""
    model = Branchy()
    comm = kfac_cuda.DistributedComm()
    comm.attach(model)
    uneven_backward(model, rank, world, used=True)
    comm.average_gradients()
    state = {"raw": {n: p.grad.clone() for n, p in model.named_parameters()}}
    model = Branchy()
    pre = kfac_cuda.Preconditioner(model, "ekfac", comm=kfac_cuda.DistributedComm(), damping=1e-2,
                                   factor_update_steps=1, inv_update_steps=1)
    uneven_backward(model, rank, world, used=True)
    pre.step()
    state["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}
    state["curvature"] = copy.deepcopy(pre.state_dict())
    uneven_backward(model, rank, world, used=False)  # nobody uses the branch
    pre.step()
    state["unused_grad"], state["steps"] = model.branch.weight.grad, pre.steps
    return state


def eigh_inputs() -> list:
    """Symmetric matrices of mixed sizes and dtypes, one of them not finite (no decomposition)."""
    g = torch.Generator().manual_seed(7)
    mats = [torch.randn(d, d, generator=g, dtype=dtype) for d, dtype in
            [(5, torch.float64), (3, torch.float32), (5, torch.float64), (4, torch.float64), (2, torch.float32)]]
    mats = [m @ m.T for m in mats]
    mats[3][0, 0] = math.nan
    return mats


def run_eigh() -> list:
    """Distributed eigendecompositions of ``eigh_inputs`` (spread over the ranks by cost)."""
    mats = eigh_inputs()
    return kfac_cuda.DistributedComm().eigh_many(mats, [str(i) for i in range(len(mats))],
                                                 [float(m.shape[0]) ** 3 for m in mats])


def save_checkpoint(group, out: Path, steps: int) -> None:
    """TEKFAC on a world of 2 without DDP; its rank 0 writes the checkpoint."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    model = make_model()
    opt = kfac_cuda.TEKFAC(model, comm=kfac_cuda.DistributedComm(0.5, group=group), **OPTIONS)
    train(model, opt, range(steps), rank, world)
    if rank == 0:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, out / "ckpt.pt")


def resume(group, out: Path, start: int, stop: int) -> tuple:
    """Load the checkpoint on ``group`` (under DDP, one grad worker per layer) and train on."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    state = torch.load(out / "ckpt.pt")
    model = make_model()
    model.load_state_dict(state["model"])
    net = DDP(model, process_group=group)
    opt = kfac_cuda.TEKFAC(net, comm=kfac_cuda.DistributedComm(1 / world, group=group), **OPTIONS)
    opt.load_state_dict(state["opt"])
    train(net, opt, range(start, stop), rank, world)
    return world, flat_params(model)


# --- tests --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Per-rank results of ``run_all`` on a gloo group of 4 processes."""
    out = tmp_path_factory.mktemp("distributed")
    spawn(run_all, WORLD, out)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def test_lpt_and_grad_workers():
    assert lpt_assign([1, 8, 1, 1, 1, 4, 4], 2) == [0, 0, 1, 0, 1, 1, 1]  # loads 10 and 10
    assert lpt_assign([3, 3, 2, 2, 2], 2) == [0, 1, 0, 1, 0]
    assert [grad_workers(f, 4) for f in (0.25, 0.5, 0.75, 1.0)] == [1, 2, 2, 4]  # 3 does not divide 4
    assert grad_workers(0.5, 3) == 1 and grad_workers(1.0, 3) == 3
    with pytest.raises(ValueError):
        grad_workers(0.0, 4)


def test_distributed_comm_needs_a_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        kfac_cuda.DistributedComm()


@pytest.mark.parametrize("method", list(OPTIMIZERS))
@pytest.mark.parametrize("fraction", FRACTIONS)
@pytest.mark.parametrize("ddp", [False, True])
def test_ranks_match_single_process(ranks, method, fraction, ddp):
    key = (method, fraction, ddp)
    params = [r["configs"][key][0] for r in ranks]
    for p in params[1:]:
        assert torch.equal(p, params[0]), "ranks disagree"
    torch.testing.assert_close(params[0], single_process(method, tuple(range(STEPS))), rtol=1e-9, atol=1e-11)
    sent = ranks[0]["configs"][key][1]
    assert ("gradients" in sent) == (not ddp)
    assert ("precondition" in sent) == (fraction < 1)  # fraction 1: every rank computes every layer
    assert sent["eigh"] > 0 and sent["curvature"] > 0 and sent["flags"] > 0


def test_nan_on_one_rank_skips_the_step_on_every_rank(ranks):
    expected = single_process("kfac", tuple(s for s in range(STEPS + 1) if s != NAN_STEP))
    for r in ranks:
        torch.testing.assert_close(r["nan"]["params"], expected, rtol=1e-9, atol=1e-11)
        assert r["nan"]["steps"] == STEPS
        assert r["nan"]["all_true"] == (False, True)


def test_layer_unused_on_some_ranks_matches_a_single_process(ranks):
    """Without DDP, ranks 0 and 1 use the branch and ranks 2 and 3 do not (gloo aborted on
    the gradient all_reduce of unequal lengths before). Ground truth, single processes:
    gradients and the other layers' curvature from the concatenated batch with its first half
    through the branch; the branch's curvature from the batch of the ranks that used it."""
    model = Branchy()
    pre = kfac_cuda.Preconditioner(model, "ekfac", damping=1e-2, factor_update_steps=1, inv_update_steps=1)
    uneven_backward(model, 0, 1, used=True)
    raw = {n: p.grad.clone() for n, p in model.named_parameters()}
    pre.step()
    layers = pre.state_dict()["layers"]
    users = Branchy()  # ranks 0 and 1 (the first half of the batch) alone, all through the branch
    users_pre = kfac_cuda.Preconditioner(users, "ekfac", damping=1e-2, factor_update_steps=1, inv_update_steps=1)
    uneven_backward(users, 0, 2, used=True)
    users_pre.step()
    layers["branch"] = users_pre.state_dict()["layers"]["branch"]
    for r in ranks:
        got = r["uneven"]
        for n in raw:  # gradients of the mean loss: zeros from the ranks that skipped the branch
            torch.testing.assert_close(got["raw"][n], raw[n], rtol=1e-10, atol=1e-13)
        for layer in ("trunk", "branch", "head"):
            for key in ("A", "G", "S"):  # (eigenvector signs are arbitrary)
                torch.testing.assert_close(got["curvature"]["layers"][layer]["buffers"][key],
                                           layers[layer]["buffers"][key], rtol=1e-8, atol=1e-11,
                                           msg=lambda m, layer=layer, key=key: f"{layer} {key}: {m}")
        assert got["unused_grad"] is None and got["steps"] == 2
        for n in got["grads"]:
            assert torch.equal(got["grads"][n], ranks[0]["uneven"]["grads"][n]), "ranks disagree"


def test_eigendecompositions_spread_over_ranks_equal_local_ones(ranks):
    mats = eigh_inputs()
    expected = eigh_many(mats, [str(i) for i in range(len(mats))])
    assert expected[3] is None
    for r in ranks:
        for got, want in zip(r["eigh"], expected):
            if want is None:
                assert got is None
                continue
            for g, w in zip(got, want):
                assert g.dtype == w.dtype
                torch.testing.assert_close(g, w, rtol=1e-12, atol=0)  # same matrix, same routine


def test_checkpoint_from_two_ranks_resumes_on_one_and_three(ranks):
    expected = single_process("tekfac", tuple(range(RESUME_STOP)))
    assert sorted(r["resumed"][0] for r in ranks) == [1, 3, 3, 3]
    for r in ranks:
        torch.testing.assert_close(r["resumed"][1], expected, rtol=1e-9, atol=1e-11)


def test_torchrun_example_ranks_agree():
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "examples" / "train_ddp.py"), "--steps", "5", "--device", "cpu"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = re.findall(r"^rank (\d) step (\d+) loss (\S+) checksum (\S+)$", proc.stdout, re.MULTILINE)
    by_rank = {r: [line[1:] for line in lines if line[0] == r] for r in ("0", "1")}
    assert len(by_rank["0"]) == 5 and by_rank["0"] == by_rank["1"], proc.stdout
