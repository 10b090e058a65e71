"""The deep-autoencoder benchmark of Martens & Grosse (2015), scaled to a CPU: K-FAC and TEKFAC
with the full algorithm (learning rate and momentum from the exact quadratic model,
Levenberg-Marquardt damping) against momentum SGD, AdamW and heavyball's SOAP.

    python bench/deep_autoencoder.py --seeds 3 --out out/deep_autoencoder.json
    python bench/deep_autoencoder.py --seeds 3 --target 40 --out out/deep_autoencoder_40.json

Task: ``curves`` of kfac_cuda/demo/tasks.py (generated CURVES-like 16×16 images, 5,000 for
training; 256-200-100-50-25-6 autoencoder and its mirror; Bernoulli loss summed over pixels,
mean over the batch). Protocol, for a fixed ``--budget`` of updates and ``--batch-size``:

1. SGD (momentum 0.9): each learning rate of its grid on seed 0 for the whole budget; the lowest
   final training loss wins; the winner runs on every seed. The target is the median over seeds
   of SGD's full training loss at the end of its budget.
2. Every other method: each setting of its grid (learning rate; for the Martens-Grosse methods,
   whose learning rate the quadratic model sets, the initial damping) on seed 0, stopping at the
   target or the budget; the fewest updates to the target wins (then the lowest final loss);
   the winner runs on every seed.
With ``--target LOSS`` the target is fixed instead, and SGD is tuned like the others (fewest
updates to it, then the lowest final loss).
3. Per method: median [min-max] over seeds of updates and training seconds to the target (runs
   that miss count as infinite), and the ratios SGD / method of the medians.

Seconds are training wall-clock only (evaluations excluded, see kfac_cuda/demo/train.py) with
one torch thread; on a shared machine they depend on the load, update counts do not.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from e2e import spread  # noqa: E402
from e2e_peers import PEERS, peer_status, set_heavyball_compile  # noqa: E402
from kernel_table import git_commit  # noqa: E402

from kfac_cuda.demo.cli import positive_int  # noqa: E402
from kfac_cuda.demo.methods import MARTENS_GROSSE, make_optimizer  # noqa: E402
from kfac_cuda.demo.report import fmt, format_table  # noqa: E402
from kfac_cuda.demo.tasks import Task, build_task  # noqa: E402
from kfac_cuda.demo.train import RunResult, train  # noqa: E402

#: The tuning grid of each method: learning rates, or initial dampings for the Martens-Grosse methods.
GRIDS: Dict[str, Sequence[float]] = {
    "sgd": (0.003, 0.01, 0.03, 0.05),
    "adamw": (3e-4, 1e-3, 3e-3, 1e-2),
    "soap": (1e-3, 3e-3, 1e-2),
    "kfac-mg": (1.0, 10.0, 100.0),
    "tekfac-mg": (1.0, 10.0, 100.0),
}
METHODS = tuple(GRIDS)


def run(task: Task, method: str, setting: float, *, seed: int, budget: int, batch_size: int,
        eval_every: int, stop_below: Optional[float]) -> RunResult:
    """One training run of ``method`` at ``setting`` (learning rate or initial damping)."""
    if method in PEERS:
        factory = lambda model: PEERS[method](model, setting)  # noqa: E731
    elif method in MARTENS_GROSSE:
        factory = partial(make_optimizer, method, lr=0.0, kfac_options=dict(damping=setting), loss=task.fisher_loss)
    else:
        factory = partial(make_optimizer, method, lr=setting)
    return train(task, factory, method=method, lr=setting, steps=budget, batch_size=batch_size, seed=seed,
                 eval_every=eval_every, progress=False, stop_below=stop_below)


def rank_key(result: RunResult, target: Optional[float]):
    """Tuning criterion: fewer updates to the target, then a lower final loss."""
    steps = result.loss_target(target)[0] if target is not None else None
    final = result.final_train_loss
    return (math.inf if steps is None else steps, final if math.isfinite(final) else math.inf)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/deep_autoencoder.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=positive_int, default=3)
    parser.add_argument("--budget", type=positive_int, default=2000, help="updates per run (SGD's budget)")
    parser.add_argument("--batch-size", type=positive_int, default=256)
    parser.add_argument("--eval-every", type=positive_int, default=10)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--target", type=float, default=None,
                        help="a fixed training-loss target (default: SGD's median final loss)")
    parser.add_argument("--out", type=Path, default=Path("out/deep_autoencoder.json"))
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in GRIDS]
    if unknown or "sgd" not in methods:
        parser.error(f"methods must include sgd and come from {', '.join(METHODS)}; got {args.methods}")
    torch.set_num_threads(1)
    set_heavyball_compile(False)
    status = peer_status()
    if "soap" in methods and status["soap"] != "ok":
        print(f"soap left out: {status['soap']}", file=sys.stderr)
        methods.remove("soap")
    task = build_task("curves", 0, torch.device("cpu"))
    common = dict(budget=args.budget, batch_size=args.batch_size, eval_every=args.eval_every)
    started = time.perf_counter()
    record: Dict[str, Any] = dict(command=" ".join(sys.argv), commit=git_commit(), torch=torch.__version__,
                                  machine=f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread",
                                  args={k: str(v) for k, v in vars(args).items()}, grids=GRIDS, methods={})
    target: Optional[float] = args.target
    record["target_loss"] = target
    for method in methods:  # sgd first: it sets the target
        tuning = [(setting, run(task, method, setting, seed=0, stop_below=target, **common)) for setting in GRIDS[method]]
        for setting, r in tuning:
            print(f"tune {method} {setting:g}: updates to target {fmt(r.loss_target(target)[0] if target else None, 'd')}, "
                  f"final loss {r.final_train_loss:.3f}", flush=True)
        best, best_run = min(tuning, key=lambda t: rank_key(t[1], target))
        runs = [best_run] + [run(task, method, best, seed=s, stop_below=target, **common) for s in range(1, args.seeds)]
        if method == "sgd" and args.target is None:
            target = spread([r.final_train_loss for r in runs])["median"]
            record["target_loss"] = target
        reached = [r.loss_target(target) for r in runs]
        record["methods"][method] = dict(
            setting=best, tuning={str(s): r.to_dict() for s, r in tuning}, runs=[r.to_dict() for r in runs],
            updates=spread([u for u, _ in reached]), seconds=spread([s for _, s in reached]),
            ms_per_update=spread([1e3 * r.sec_per_step for r in runs]))
        print(f"{method}: setting {best:g}, updates to target {record['methods'][method]['updates']}", flush=True)
    sgd = record["methods"]["sgd"]
    rows = []
    for method, m in record["methods"].items():
        ratio_u = ratio_s = None
        if m["updates"]["median"] and sgd["updates"]["median"]:
            ratio_u = sgd["updates"]["median"] / m["updates"]["median"]
            ratio_s = sgd["seconds"]["median"] / m["seconds"]["median"]
        elif sgd["updates"]["median"] is None and m["updates"]["median"]:
            # SGD missed the target in most seeds: its budget bounds the ratios from below
            sgd_seconds = spread([r["seconds"][-1] for r in sgd["runs"]])["median"]
            ratio_u, ratio_s = args.budget / m["updates"]["median"], sgd_seconds / m["seconds"]["median"]
            m["sgd_missed_target"] = True
        m["sgd_over_method"] = dict(updates=ratio_u, seconds=ratio_s)
        bound = ">" if m.get("sgd_missed_target") else ""
        rows.append([method, f"{m['setting']:g}", f"{fmt(m['updates']['median'], '.0f')} [{fmt(m['updates']['min'], '.0f')}-"
                     f"{fmt(m['updates']['max'], '.0f')}]", f"{fmt(m['seconds']['median'], '.2f')} "
                     f"[{fmt(m['seconds']['min'], '.2f')}-{fmt(m['seconds']['max'], '.2f')}]",
                     fmt(m["ms_per_update"]["median"], ".1f"), bound + fmt(ratio_u, ".1f"), bound + fmt(ratio_s, ".1f")])
    record["wall_seconds"] = time.perf_counter() - started
    what = f"fixed at {target:g}" if args.target is not None else \
        f"SGD's median final training loss after {args.budget} updates = {target:.3f}"
    print(f"\ntarget: {what} ({args.seeds} seeds, batch {args.batch_size}, budget {args.budget} updates)")
    print(format_table(rows, ["method", "lr / initial damping", "updates to target", "seconds to target", "ms/update",
                              "SGD/method updates", "SGD/method seconds"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    print(f"\nwall {record['wall_seconds']:.0f} s; results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
