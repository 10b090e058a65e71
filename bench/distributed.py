"""Communication volume and optimizer-step time of data-parallel K-FAC, per method and
``grad_worker_fraction``, on one machine.

    python bench/distributed.py out/distributed_cpu.json --world 2            # gloo on CPU
    python bench/distributed.py out/distributed_nccl.json --backend nccl      # one rank per GPU

W processes (spawned, FileStore rendezvous) train an MLP on random data with per-rank batches,
DDP-free so that gradient averaging is counted too. Per method and every fraction d/W
(d a divisor of W), after ``--warmup`` steps, ``--steps`` steps are measured:
- bytes per step that rank 0 passes to collectives, per kind (DistributedComm's counter:
  gradients, curvature = factor and scale averages, eigh, precondition, flags), averaged
  over the measured steps, which span whole basis-refresh cycles;
- wall time of ``optimizer.step()`` (CUDA-synchronised on GPU): median and mean over steps
  of the slowest rank. The mean includes the amortised eigendecomposition steps.
The JSON holds device, backend, world size, git commit, torch version and one row per case.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import List

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from kernel_table import git_commit  # noqa: E402

import kfac_cuda  # noqa: E402

OPTIMIZERS = {"kfac": kfac_cuda.KFAC, "ekfac": kfac_cuda.EKFAC, "tkfac": kfac_cuda.TKFAC, "tekfac": kfac_cuda.TEKFAC}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="JSON file to write")
    p.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    p.add_argument("--world", type=int, default=None, help="ranks (default: 2 for gloo, every GPU for nccl)")
    p.add_argument("--width", type=int, default=256, help="hidden width of the MLP")
    p.add_argument("--depth", type=int, default=4, help="Linear layers in the MLP")
    p.add_argument("--batch-size", type=int, default=128, help="examples per rank")
    p.add_argument("--factor-update-steps", type=int, default=1, help="1: factors averaged every step (worst case)")
    p.add_argument("--inv-update-steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=20, help="measured steps (a multiple of --inv-update-steps)")
    p.add_argument("--methods", nargs="+", choices=sorted(OPTIMIZERS), default=list(OPTIMIZERS))
    return p.parse_args()


def fractions(world: int) -> List[float]:
    """d / world for every divisor d: each distinct number of grad workers per layer."""
    return [d / world for d in range(1, world + 1) if world % d == 0]


def device_name(backend: str) -> str:
    if backend == "nccl":
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


def measure(args: argparse.Namespace, method: str, fraction: float, device: torch.device) -> dict:
    """Train ``warmup + steps`` steps; return bytes per step and step times of this rank."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    dims = [args.width] * args.depth + [10]
    layers: List[nn.Module] = []
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        layers += [nn.Linear(d_in, d_out), nn.ReLU()]
    model = nn.Sequential(*layers[:-1]).to(device)
    comm = kfac_cuda.DistributedComm(grad_worker_fraction=fraction)
    opt = OPTIMIZERS[method](model, lr=0.01, factor_update_steps=args.factor_update_steps,
                             inv_update_steps=args.inv_update_steps, comm=comm)
    data = torch.Generator(device=device).manual_seed(rank)
    times = []
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            comm.bytes_communicated.clear()
        x = torch.randn(args.batch_size, args.width, device=device, generator=data)
        y = torch.randint(0, 10, (args.batch_size,), device=device, generator=data)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        dist.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    measured = torch.tensor(times[args.warmup:], dtype=torch.float64)
    dist.all_reduce(measured, op=dist.ReduceOp.MAX)  # per step, the slowest rank
    per_step = {k: v / args.steps for k, v in sorted(comm.bytes_communicated.items())}
    return {"method": method, "grad_worker_fraction": fraction, "grad_workers": comm.grad_workers,
            "bytes_per_step": per_step, "bytes_per_step_total": sum(per_step.values()),
            "step_ms_median": 1e3 * statistics.median(measured.tolist()),
            "step_ms_mean": 1e3 * measured.mean().item()}


def run(rank: int, world: int, args: argparse.Namespace, store: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if args.backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        device = torch.device("cpu")
    dist.init_process_group(args.backend, init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        rows = [measure(args, m, f, device) for m in args.methods for f in fractions(world)]
        if rank == 0:
            report = {"device": device_name(args.backend), "backend": args.backend, "world_size": world,
                      "commit": git_commit(), "torch": torch.__version__,
                      "model": {"width": args.width, "depth": args.depth, "batch_per_rank": args.batch_size,
                                "inv_update_steps": args.inv_update_steps,
                                "factor_update_steps": args.factor_update_steps},
                      "rows": rows}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2))
            print(f"{report['device']}  {args.backend} x{world}  commit {report['commit'][:12]}")
            print(f"{'method':8} {'fraction':>8} {'KiB/step':>10} {'step ms (median)':>17} {'(mean)':>8}  per kind")
            for r in rows:
                kinds = ", ".join(f"{k} {v / 1024:.1f}" for k, v in r["bytes_per_step"].items())
                print(f"{r['method']:8} {r['grad_worker_fraction']:8.3f} {r['bytes_per_step_total'] / 1024:10.1f} "
                      f"{r['step_ms_median']:17.2f} {r['step_ms_mean']:8.2f}  {kinds}")
    finally:
        dist.destroy_process_group()


def main() -> int:
    args = parse_args()
    if args.steps % args.inv_update_steps:
        raise SystemExit("--steps must be a multiple of --inv-update-steps (whole refresh cycles)")
    if args.backend == "nccl" and not torch.cuda.is_available():
        raise SystemExit("--backend nccl needs CUDA devices")
    world = args.world or (torch.cuda.device_count() if args.backend == "nccl" else 2)
    if args.backend == "nccl" and world > torch.cuda.device_count():
        raise SystemExit(f"--world {world} > {torch.cuda.device_count()} GPUs (NCCL needs one GPU per rank)")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(run, args=(world, args, os.path.join(tmp, "store")), nprocs=world, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
