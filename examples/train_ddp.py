"""Data-parallel K-FAC-family training of an MLP on the sklearn digits, launched by torchrun.

One machine with several GPUs (NCCL):
    torchrun --standalone --nproc_per_node=4 examples/train_ddp.py --method tekfac
Several machines (run on every node; the rendezvous endpoint is one of them):
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_id=digits \\
        --rdzv_endpoint=node0.example:29500 examples/train_ddp.py --grad-worker-fraction 0.25
CPU only (gloo):
    torchrun --standalone --nproc_per_node=2 examples/train_ddp.py --device cpu

Every step draws one global batch (same seed on every rank) and each rank trains on its equal
share; DDP averages the gradients and kfac_cuda.DistributedComm keeps the curvature identical
on every rank. Each rank prints the global loss and a checksum of its parameters: the lines
of all ranks agree, which is the proof that every rank takes the same step.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import kfac_cuda

OPTIMIZERS = {"kfac": kfac_cuda.KFAC, "ekfac": kfac_cuda.EKFAC, "tkfac": kfac_cuda.TKFAC, "tekfac": kfac_cuda.TEKFAC}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=sorted(OPTIMIZERS), default="tekfac")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=64, help="examples per rank and step")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--grad-worker-fraction", type=float, default=1.0,
                   help="fraction of ranks that precondition each layer (1/world .. 1)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def digits(device: torch.device):
    """Standardised 8x8 digit images (1797 x 64) and labels; synthetic blobs without sklearn."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        g = torch.Generator().manual_seed(0)
        y = torch.randint(0, 10, (1797,), generator=g)
        x = torch.randn(10, 64, generator=g)[y] + torch.randn(1797, 64, generator=g)
    else:
        data = load_digits()
        x, y = torch.tensor(data.data, dtype=torch.float32), torch.tensor(data.target)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    return x.to(device), y.to(device)


def main() -> None:
    args = parse_args()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.device == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    x, y = digits(device)
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)).to(device)
    net = DDP(model, device_ids=[local_rank] if args.device == "cuda" else None)
    comm = kfac_cuda.DistributedComm(grad_worker_fraction=args.grad_worker_fraction)
    opt = OPTIMIZERS[args.method](net, lr=args.lr, momentum=0.9, weight_decay=5e-4, damping=1e-2,
                                  factor_update_steps=1, inv_update_steps=10, comm=comm)

    batches = torch.Generator().manual_seed(args.seed)  # the same global batches on every rank
    for step in range(args.steps):
        idx = torch.randint(0, len(y), (args.batch_size * world,), generator=batches)
        idx = idx[rank * args.batch_size:(rank + 1) * args.batch_size].to(device)
        opt.zero_grad()
        loss = F.cross_entropy(net(x[idx]), y[idx])
        loss.backward()
        opt.step()
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        checksum = sum(p.detach().double().sum() for p in model.parameters())
        # one write per line: the ranks share torchrun's stdout, and print() writes the newline apart
        sys.stdout.write(f"rank {rank} step {step} loss {global_loss.item() / world:.10f} "
                         f"checksum {checksum.item():.17g}\n")
        sys.stdout.flush()
    if rank == 0:
        with torch.no_grad():
            accuracy = (model(x).argmax(1) == y).float().mean().item()
        sent = {k: v // max(args.steps, 1) for k, v in comm.bytes_communicated.items()}
        # one write, like the step lines: print() writes the newline apart, and another rank's
        # line could land in between and be lost to the line-based comparison of the ranks
        sys.stdout.write(f"final train accuracy {accuracy:.3f}; bytes per step sent by rank 0: {sent}\n")
        sys.stdout.flush()
    # Leave the process group in step: rank 0 evaluates above while the others would already
    # exit, and a rank exiting with a peer still inside gloo, or an interpreter destroying DDP's
    # reducer after its group, aborts ("terminate called without an active exception"). So wait
    # for every rank, drop what holds the group (DDP, the optimizer's comm), then destroy it.
    dist.barrier()
    del net, opt, comm
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
