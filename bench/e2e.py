"""End-to-end benchmark: time to a target training loss and to a target test metric.

    python bench/e2e.py                           # digits tasks, every method, 3 seeds
    python bench/e2e.py --quick                   # CI-sized (< 60 s on CPU)
    python bench/e2e.py --gpu-scale --seeds 3     # + ResNet-18 and a transformer (CUDA only)

For each task, method and seed one run of :func:`kfac_cuda.demo.train.train` (same
initial weights and batch order for every method of a seed; evaluation time excluded
from the clock) gives the steps and training seconds until the full training loss first
reaches the task's target, and until the test metric does (accuracy ≥ target for
classifiers, test loss ≤ target for the autoencoder). Over the seeds the benchmark
reports the median and the min–max range, with unreached targets counted as infinite
(so a median is "-" when most seeds miss), plus per-step time and steps-to-target as
ratios to momentum SGD. Methods: ours (kfac, ekfac, tkfac, tekfac), torch SGD and AdamW,
and the peers of ``e2e_peers.py`` that import (others are listed "not installed"; a peer
that fails during training is reported with its error, never ending the benchmark).
The JSON (default ``out/e2e.json``) holds the device, torch version, git commit, the
arguments, the summaries and every run's curves.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from e2e_gpu_tasks import GPU_TASKS, build_gpu_task  # noqa: E402
from e2e_peers import CLASSIFICATION_ONLY, PEER_LR, PEERS, peer_status, set_heavyball_compile  # noqa: E402
from kernel_table import git_commit  # noqa: E402

import kfac_cuda  # noqa: E402
from kfac_cuda.demo.cli import DEFAULT_STEPS, method_list, positive_int, resolve_device  # noqa: E402
from kfac_cuda.demo.methods import DEFAULT_LR, KFAC_OPTIONS, MARTENS_GROSSE, METHODS, make_optimizer  # noqa: E402
from kfac_cuda.demo.report import fmt, format_table  # noqa: E402
from kfac_cuda.demo.tasks import Task, build_task  # noqa: E402
from kfac_cuda.demo.train import train  # noqa: E402

#: The digits tasks and the fixed-step methods; the CURVES autoencoder and the Martens-Grosse
#: methods have their own benchmark, bench/deep_autoencoder.py.
TASKS = ("autoencoder", "classifier")
ALL_METHODS = [*(m for m in METHODS if m not in MARTENS_GROSSE), *PEERS]
QUICK_STEPS = 60
#: Looser (training loss, test metric) targets for --quick's short runs.
QUICK_TARGETS = {"autoencoder": (28.0, 28.0), "classifier": (0.3, 0.9)}
#: Steps and untuned learning rates of the GPU-scale tasks (the design's default curvature
#: schedule: factors every 10 steps, eigenbases every 100, empirical Fisher).
GPU_STEPS = {"resnet18": 1000, "transformer": 1000}
GPU_LR = {"sgd": 0.05, "adamw": 1e-3, "kfac": 0.05, "ekfac": 0.05, "tkfac": 0.05, "tekfac": 0.05}
GPU_KFAC_OPTIONS: Dict[str, Any] = dict(momentum=0.9, damping=1e-3, factor_decay=0.95, factor_update_steps=10,
                                        inv_update_steps=100, kl_clip=1e-3, fisher="empirical")


def learning_rate(task: str, method: str, gpu_scale: bool) -> float:
    """The learning rate a method gets on a task (tuned for the digits tasks)."""
    if method in PEER_LR:
        return PEER_LR[method]
    return GPU_LR[method] if gpu_scale else DEFAULT_LR[task][method]


def run_method(task: Task, method: str, *, seed: int, steps: int, batch_size: int, eval_every: int,
               progress: bool, gpu_scale: bool) -> Dict[str, Any]:
    """One run as a JSON-ready dict, or ``{"error": ...}`` if a peer failed."""
    lr = learning_rate(task.name, method, gpu_scale)
    if method in CLASSIFICATION_ONLY and not task.higher_test_is_better:
        return {"method": method, "seed": seed, "lr": lr, "error": "n/a: classification tasks only"}
    built: List[torch.optim.Optimizer] = []
    if method in PEERS:
        def factory(model):
            built.append(PEERS[method](model, lr))
            return built[-1]
    else:
        options = GPU_KFAC_OPTIONS if gpu_scale else KFAC_OPTIONS

        def factory(model):
            return make_optimizer(method, model, lr, options)
    try:
        result = train(task, factory, method=method, lr=lr, steps=steps, batch_size=batch_size, seed=seed,
                       eval_every=eval_every, progress=progress)
    except Exception as err:  # a peer failing must not end the benchmark
        if method not in PEERS:
            raise
        print(f"{task.name} / {method} seed {seed} failed:\n{traceback.format_exc(limit=2)}", file=sys.stderr)
        origin = traceback.extract_tb(err.__traceback__)[-1]
        error = f"{type(err).__name__}: {str(err) or '(no message)'} in {Path(origin.filename).name}:{origin.lineno}"
        return {"method": method, "seed": seed, "lr": lr, "error": error}
    run = result.to_dict()
    if built and hasattr(built[0], "eigh_failures"):
        run["eigh_failures"] = built[0].eigh_failures
    run["loss_target_steps"], run["loss_target_seconds"] = result.loss_target(task.target_loss)
    run["test_target_steps"], run["test_target_seconds"] = result.test_target(task.target_test)
    return run


def spread(values: Sequence[Optional[float]]) -> Dict[str, Optional[float]]:
    """Median, min and max with None (target not reached) counted as +inf, then shown as None."""
    finite = [math.inf if v is None else float(v) for v in values]
    if not finite:
        return dict(median=None, min=None, max=None)
    stats = dict(median=statistics.median(finite), min=min(finite), max=max(finite))
    return {k: (None if math.isinf(v) else v) for k, v in stats.items()}


def summarise(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Per-method summary over seeds; failed runs are counted, not summarised."""
    ok = [r for r in runs if "error" not in r]
    summary: Dict[str, Any] = dict(seeds=len(runs), failed=len(runs) - len(ok),
                                   errors=sorted({r["error"] for r in runs if "error" in r}))
    if not ok:
        return summary
    summary["lr"] = ok[0]["lr"]
    for key in ("loss_target_steps", "loss_target_seconds", "test_target_steps", "test_target_seconds"):
        summary[key] = spread([r[key] for r in ok])
    summary["reached_loss_target"] = sum(r["loss_target_steps"] is not None for r in ok)
    summary["reached_test_target"] = sum(r["test_target_steps"] is not None for r in ok)
    summary["sec_per_step"] = statistics.median(r["sec_per_step"] for r in ok)
    summary["final_train_loss"] = statistics.median(r["train_loss"][-1] for r in ok)
    summary["final_test"] = statistics.median(r["test"][-1] for r in ok)
    summary["diverged"] = sum(r["diverged"] for r in ok)
    if any("eigh_failures" in r for r in ok):
        summary["eigh_failures"] = sum(r.get("eigh_failures", 0) for r in ok)
    return summary


def add_ratios(summaries: Dict[str, Dict[str, Any]]) -> None:
    """Per-step time and median steps-to-target of each method relative to SGD (in place)."""
    sgd = summaries.get("sgd", {})
    for summary in summaries.values():
        if "sec_per_step" not in summary or "sec_per_step" not in sgd:
            continue
        summary["step_time_vs_sgd"] = summary["sec_per_step"] / sgd["sec_per_step"]
        for key in ("loss_target_steps", "test_target_steps", "loss_target_seconds", "test_target_seconds"):
            ours, base = summary[key]["median"], sgd[key]["median"]
            summary[f"{key}_vs_sgd"] = ours / base if ours is not None and base else None


def note(summary: Dict[str, Any]) -> str:
    """Diverged and failed runs and peer eigh failures of a summary, or ''."""
    parts = []
    if summary.get("diverged"):
        parts.append(f"{summary['diverged']} diverged")
    if summary.get("failed"):
        parts.append(f"{summary['failed']} failed: {'; '.join(summary['errors'])[:60]}")
    if summary.get("eigh_failures"):
        parts.append(f"{summary['eigh_failures']} eigh failures (previous Fisher kept)")
    return ", ".join(parts)


def median_range(stats: Optional[Dict[str, Optional[float]]], spec: str) -> str:
    """'median [min–max]' of a spread: '-' when no seed reached the target, '∞' for a
    bound that did not, the median alone when all seeds agree."""
    if not stats or stats["min"] is None:
        return "-"
    if stats["min"] == stats["max"]:
        return fmt(stats["median"], spec)
    high = "∞" if stats["max"] is None else fmt(stats["max"], spec)
    return f"{fmt(stats['median'], spec)} [{fmt(stats['min'], spec)}–{high}]"


def task_table(task: Task, summaries: Dict[str, Dict[str, Any]]) -> str:
    """Plain-text table of one task's summaries (ratios to SGD in parentheses)."""
    test_name = "test acc" if task.higher_test_is_better else "test loss"
    header = ["method", "lr", "ms/step (×sgd)", f"steps to loss≤{task.target_loss:g}", "s to loss target",
              f"steps to {test_name} {task.target_test:g}", "s to test target", "final loss", test_name,
              "reached loss/test", "note"]
    rows = []
    for method, s in summaries.items():
        if "sec_per_step" not in s:  # not installed, or every run failed
            rows.append([method, *["-"] * 9, "; ".join(s["errors"])[:80]])
            continue
        ratio = s.get("loss_target_steps_vs_sgd")
        rows.append([method, fmt(s["lr"]),
                     f"{fmt(1e3 * s['sec_per_step'], '.2f')} ({fmt(s.get('step_time_vs_sgd'), '.2f')})",
                     median_range(s["loss_target_steps"], ".0f") + (f" ({ratio:.2f})" if ratio else ""),
                     median_range(s["loss_target_seconds"], ".2f"),
                     median_range(s["test_target_steps"], ".0f"), median_range(s["test_target_seconds"], ".2f"),
                     fmt(s["final_train_loss"], ".4g"), fmt(s["final_test"], ".4g"),
                     f"{s['reached_loss_target']}/{s['reached_test_target']} of {s['seeds'] - s['failed']}",
                     note(s)])
    return format_table(rows, header)


def device_name(device: torch.device) -> str:
    """GPU name, or the CPU's with torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} torch thread(s)"


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's argument parser."""
    parser = argparse.ArgumentParser(prog="python bench/e2e.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"CI-sized: {QUICK_STEPS} steps, looser targets, 1 seed (unless given), no GPU-scale tasks")
    parser.add_argument("--seeds", type=positive_int, default=None, help="seeds per method (default 3, --quick 1)")
    parser.add_argument("--steps", type=positive_int, default=None, help="steps per run (default: per task)")
    parser.add_argument("--methods", type=lambda text: method_list(text, ALL_METHODS), default=ALL_METHODS,
                        help=f"comma-separated subset of {','.join(ALL_METHODS)} (default: all)")
    parser.add_argument("--tasks", choices=[*TASKS, "none"], nargs="+", default=list(TASKS),
                        help="digits tasks to run ('none' with --gpu-scale runs the GPU tasks only)")
    parser.add_argument("--gpu-scale", action="store_true",
                        help=f"also run {', '.join(GPU_TASKS)} (batch 128; needs CUDA)")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="minibatch size (default: 64 for digits, 128 for GPU-scale tasks)")
    parser.add_argument("--eval-every", type=positive_int, default=None,
                        help="steps between evaluations (default 10, --quick 5)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--peer-compile", action="store_true",
                        help="let heavyball torch.compile its updates (compile time counts as training time)")
    parser.add_argument("--out", type=Path, default=Path("out/e2e.json"), help="JSON output path")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmark, print one table per task and write the JSON."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        parser.error(str(err))
    if args.gpu_scale and (device.type != "cuda" or args.quick):
        parser.error("--gpu-scale needs a CUDA device and is not part of --quick")
    torch.set_num_threads(args.threads)
    set_heavyball_compile(args.peer_compile)
    seeds = args.seeds or (1 if args.quick else 3)
    args.eval_every = args.eval_every or (5 if args.quick else 10)
    status = peer_status()
    methods = [m for m in args.methods if status.get(m, "ok") == "ok"]
    plan = [(name, False) for name in args.tasks if name != "none"] + [(name, True) for name in GPU_TASKS
                                                                       if args.gpu_scale]
    print(f"e2e on {device_name(device)}, torch {torch.__version__}, kfac_cuda {kfac_cuda.__version__}, "
          f"commit {git_commit()[:12]}, {seeds} seed(s)")
    for name, state in status.items():
        if name in args.methods and state != "ok":
            print(f"  peer {name}: {state}")

    report: Dict[str, Any] = dict(
        device=str(device), device_name=device_name(device), torch=torch.__version__,
        kfac_cuda=kfac_cuda.__version__, python=platform.python_version(),
        git_commit=git_commit(), args={k: str(v) for k, v in vars(args).items()}, peers=status, tasks={})
    started = time.perf_counter()
    for name, gpu_scale in plan:
        batch_size = args.batch_size or (128 if gpu_scale else 64)
        steps = args.steps or (QUICK_STEPS if args.quick else (GPU_STEPS if gpu_scale else DEFAULT_STEPS)[name])
        runs: Dict[str, List[Dict[str, Any]]] = {m: [] for m in methods}
        for seed in range(seeds):
            task = build_gpu_task(name, seed, device) if gpu_scale else build_task(name, seed, device)
            if args.quick:
                task.target_loss, task.target_test = QUICK_TARGETS[name]
            for method in methods:
                runs[method].append(run_method(task, method, seed=seed, steps=steps, batch_size=batch_size,
                                               eval_every=args.eval_every, progress=not args.no_progress,
                                               gpu_scale=gpu_scale))
        summaries = {m: summarise(r) for m, r in runs.items()}
        add_ratios(summaries)
        summaries.update({m: dict(seeds=0, failed=0, errors=[status[m]]) for m in args.methods if m not in methods})
        print(f"\n{name}: {steps} steps, batch {batch_size}, median [min–max] over {seeds} seed(s)")
        print(task_table(task, summaries))
        report["tasks"][name] = dict(steps=steps, batch_size=batch_size, target_loss=task.target_loss,
                                     target_test=task.target_test, test_metric=task.test_metric,
                                     summaries=summaries, runs=runs)
    report["wall_seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\nwall time {report['wall_seconds']:.1f} s; JSON: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
