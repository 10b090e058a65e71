"""Command line of the demo: ``python -m kfac_cuda.demo`` or ``kfac-demo``."""
from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch

from .methods import DEFAULT_LR, METHODS, make_optimizer
from .report import plot_curves, results_table
from .tasks import TASKS, build_task
from .train import RunResult, train

#: Steps per task when ``--steps`` is not given (all methods, all tasks: a few minutes on 2 CPU cores).
DEFAULT_STEPS = {"autoencoder": 600, "classifier": 300, "curves": 300}
#: Methods per task when ``--methods`` is not given: Martens & Grosse's full algorithm (kfac-mg,
#: tekfac-mg) on the CNN and on the deep autoencoder it was made for.
DEFAULT_METHODS = {"autoencoder": ("sgd", "adamw", "kfac", "ekfac", "tkfac", "tekfac"),
                   "classifier": ("sgd", "adamw", "kfac", "ekfac", "tkfac", "tekfac", "kfac-mg", "tekfac-mg"),
                   "curves": ("sgd", "adamw", "kfac", "tekfac", "kfac-mg", "tekfac-mg")}


def int_at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


positive_int = int_at_least(1)


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def method_list(text: str, choices: Sequence[str] = tuple(METHODS)) -> List[str]:
    """argparse type: comma-separated method names, each one of ``choices``."""
    names = [name.strip().lower() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in choices]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(choices)}")
    return list(dict.fromkeys(names))


def resolve_device(name: str) -> torch.device:
    """Turn ``auto``/``cpu``/``cuda[:N]`` into a device, raising ValueError when CUDA is
    asked for but not usable."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"invalid device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available (torch {torch.__version__}, "
                             "no usable GPU); use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type != "cpu":
        raise ValueError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    return device


def build_parser() -> argparse.ArgumentParser:
    """The demo's argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m kfac_cuda.demo",
        description="Train a deep autoencoder and a small CNN on scikit-learn's digits, and the CURVES "
                    "deep autoencoder (generated images), with momentum SGD, AdamW, KFAC, EKFAC, TKFAC, "
                    "TEKFAC and K-FAC/TEKFAC with Martens & Grosse's full algorithm (kfac-mg, tekfac-mg); "
                    "print a table of time to a target loss and save loss curves as a PNG.")
    parser.add_argument("--task", choices=[*TASKS, "all"], default="all", help="task to run (default: all)")
    parser.add_argument("--methods", type=method_list, default=None,
                        help=f"comma-separated subset of {','.join(METHODS)} (default: per task, " +
                             "; ".join(f"{k}: {','.join(v)}" for k, v in DEFAULT_METHODS.items()) + ")")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="training steps per run (default: " +
                             ", ".join(f"{k} {v}" for k, v in DEFAULT_STEPS.items()) + ")")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="minibatch size (default: 64)")
    parser.add_argument("--lr", type=positive_float, default=None,
                        help="learning rate for every method (default: each method's tuned rate)")
    parser.add_argument("--target-loss", type=positive_float, default=None,
                        help="training-loss target for every selected task (default: autoencoder 20, "
                             "classifier 0.05, curves 30)")
    parser.add_argument("--eval-every", type=positive_int, default=10,
                        help="steps between full training/test evaluations (default: 10)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split, the init and the batches")
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder (default: out/demo)")
    parser.add_argument("--threads", type=int_at_least(0), default=1,
                        help="CPU threads for torch (default: 1, fastest for these small layers and "
                             "robust on a busy machine; 0 keeps torch's default)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the demo; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        parser.error(str(err))
    if args.threads:
        torch.set_num_threads(args.threads)
    tasks = TASKS if args.task == "all" else (args.task,)
    print(f"kfac_cuda demo on {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, seed {args.seed}")
    results: List[RunResult] = []
    targets = {}
    started = time.perf_counter()
    for name in tasks:
        task = build_task(name, args.seed, device)
        targets[name] = args.target_loss or task.target_loss
        for method in args.methods or DEFAULT_METHODS[name]:
            lr = args.lr or DEFAULT_LR[name][method]
            results.append(train(task, partial(make_optimizer, method, lr=lr, loss=task.fisher_loss),
                                 method=method, lr=lr,
                                 steps=args.steps or DEFAULT_STEPS[name], batch_size=args.batch_size,
                                 seed=args.seed, eval_every=args.eval_every, progress=not args.no_progress))
    wall = time.perf_counter() - started
    print()
    print(results_table(results, targets))
    print(f"\ntotal wall time {wall:.1f} s (the table's seconds count training only, not evaluations)")
    args.out.mkdir(parents=True, exist_ok=True)
    plot = plot_curves(results, args.out / "loss_curves.png", targets)
    with open(args.out / "results.json", "w") as f:
        json.dump(dict(device=str(device), torch=torch.__version__, seed=args.seed, target_loss=targets,
                       runs=[r.to_dict() for r in results]), f, indent=1)
    print(f"plot: {plot}\nresults: {args.out / 'results.json'}")
    return 0
