"""Per-step cost, side by side in one run (issue 4's step benchmarks):

1. the optimizer step alone, every layer preconditioned with bases already computed
   (no curvature update due), for each method with backend="torch" and, when the
   extension and a GPU are there, backend="cuda";
2. a whole training step (forward + backward + optimizer) with the default update
   intervals (factors every 10 steps, bases every 100), against AdamW and momentum SGD,
   averaged over a window that contains its share of curvature updates.

Models: a CIFAR ResNet-18 (32x32, batch 128) and a GPT-2-small-sized stack (width 768,
12 heads, sequence 512, batch 8; depth 12 unless --depth), from bench/e2e_gpu_tasks.py.
``--quick`` shrinks the GPT-2 stack and the repeats for a CPU smoke run (ResNet-18 keeps
its 512-channel layers, whose 4609-wide factors take seconds to decompose on a CPU, so
``--quick`` runs only the GPT-2 stack unless --models says otherwise). Prints a table; writes JSON with the
device name, torch version and git commit.

    python bench/step_time.py OUT.json [--quick] [--models resnet18 gpt2]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

import kfac_cuda
from e2e_gpu_tasks import TinyTransformer, resnet18
from kernel_table import git_commit

METHODS = ("KFAC", "EKFAC", "TKFAC", "TEKFAC")


def timed(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs, after two warm-up runs."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def workload(name: str, quick: bool, depth: int, device: torch.device):
    """(model factory, loss closure taking a model) for one benchmark model."""
    if name == "resnet18":
        batch = 128
        x = torch.randn(batch, 3, 32, 32, device=device)
        y = torch.randint(0, 10, (batch,), device=device)
        return resnet18, lambda m: F.cross_entropy(m(x), y)
    width, heads, length, batch, vocab = (64, 4, 32, 2, 128) if quick else (768, 12, 512, 8, 1024)
    tokens = torch.randint(0, vocab, (batch, length), device=device)
    factory = lambda: TinyTransformer(vocab, length, width=width, depth=2 if quick else depth, heads=heads)
    return factory, lambda m: F.cross_entropy(m(tokens).flatten(0, 1), tokens.flatten())


def backends(device: torch.device) -> List[str]:
    return ["torch", "cuda"] if device.type == "cuda" and kfac_cuda.cuda_extension_available() else ["torch"]


def optimizer_step_times(make_model, loss_fn, device, repeats) -> Dict[str, float]:
    out = {}
    for method in METHODS:
        for backend in backends(device):
            torch.manual_seed(0)
            model = make_model().to(device)
            opt = getattr(kfac_cuda, method)(model, lr=1e-3, backend=backend, factor_update_steps=10 ** 9,
                                              inv_update_steps=10 ** 9)
            loss_fn(model).backward()
            opt.step()  # step 0 builds factors, bases and scales
            out[f"{method}/{backend}"] = timed(opt.step, device, repeats)
    return out


def training_step_times(make_model, loss_fn, device, window) -> Dict[str, float]:
    def make(name, model):
        if name == "SGD":
            return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        if name == "AdamW":
            return torch.optim.AdamW(model.parameters(), lr=1e-3)
        method, backend = name.split("/")
        return getattr(kfac_cuda, method)(model, lr=1e-3, backend=backend)

    out = {}
    for name in ["SGD", "AdamW"] + [f"{m}/{b}" for m in METHODS for b in backends(device)]:
        torch.manual_seed(0)
        model = make_model().to(device)
        opt = make(name, model)

        def one_window():
            for _ in range(window):
                opt.zero_grad(set_to_none=True)
                loss_fn(model).backward()
                opt.step()

        out[name] = timed(one_window, device, 1) / window
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="JSON output path")
    parser.add_argument("--quick", action="store_true", help="tiny models, few repeats (CPU smoke run)")
    parser.add_argument("--models", nargs="+", choices=["resnet18", "gpt2"],
                        help="default: both, or gpt2 alone with --quick")
    parser.add_argument("--depth", type=int, default=12, help="blocks of the GPT-2-sized stack")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    args.models = args.models or (["gpt2"] if args.quick else ["resnet18", "gpt2"])
    repeats, window = (3, 20) if args.quick else (20, 200)
    record = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "commit": git_commit(), "quick": args.quick, "results": {}}
    for name in args.models:
        make_model, loss_fn = workload(name, args.quick, args.depth, device)
        opt_times = optimizer_step_times(make_model, loss_fn, device, repeats)
        train_times = training_step_times(make_model, loss_fn, device, window)
        record["results"][name] = {"optimizer_step_s": opt_times, "training_step_s": train_times}
        print(f"\n{name} on {record['device']} (commit {record['commit'][:10]})")
        print(f"  {'optimizer step (bases fixed)':<34}{'ms':>9}{'vs torch':>10}")
        for key, sec in opt_times.items():
            ref = opt_times[key.split('/')[0] + "/torch"]
            print(f"  {key:<34}{sec * 1e3:>9.2f}{ref / sec:>9.2f}x")
        print(f"  {'training step (default intervals)':<34}{'ms':>9}{'/AdamW':>10}")
        for key, sec in train_times.items():
            print(f"  {key:<34}{sec * 1e3:>9.2f}{sec / train_times['AdamW']:>9.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
