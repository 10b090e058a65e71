"""Character-level GPT benchmark: AdamW, heavyball's SOAP, and kfac_cuda's Preconditioner in
front of AdamW and the TEKFAC optimizer, on text from Python's standard library.

    python bench/gpt_bench.py --quick                 # smoke run, well under a minute
    python bench/gpt_bench.py --seeds 3 --steps 300   # the README's table (see there for the grid)

Every method of a seed starts from the same weights and sees the same batches (the batch
order is drawn from the seed alone). Learning rates are chosen per method from its grid in
``GRIDS`` (or ``--grid``, one grid for every method) on seed 0 (lowest final validation loss),
then every seed runs with it. The model is
``bench/gpt_models.NanoGPT`` (weight-tied lm_head; every parameter preconditioned). Reports:
validation loss vs steps and vs training seconds (evaluation excluded), the steps and seconds
to AdamW's final validation loss (median over seeds), per-step time and optimizer-state memory
relative to AdamW, and where a step's time goes (forward+backward, preconditioner, optimizer).
Seconds on a shared CPU are noisy: steps are the primary evidence.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import sysconfig
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt_models import NanoGPT  # noqa: E402
from kernel_table import git_commit  # noqa: E402

import kfac_cuda  # noqa: E402

#: Learning-rate grids per method (chosen on seed 0 by final validation loss).
GRIDS: Dict[str, Sequence[float]] = {
    "adamw": (3e-3, 1e-2),
    "soap": (3e-3, 1e-2),
    "pre-kfac": (3e-3, 1e-2),
    "pre-tkfac": (3e-3, 1e-2),
    "pre-ekfac": (3e-3, 1e-2),
    "pre-tekfac": (3e-3, 1e-2),
    "pre-kfac-sqrt": (3e-3, 1e-2),
    "pre-tekfac-sqrt": (3e-3, 1e-2),
    "tekfac-opt": (0.1, 0.03),
    "pre-kfac-sqrt-rel": (3e-3, 1e-2),
    "graft-kfac-sqrt": (3e-3, 1e-2),
    "graft-tekfac-sqrt": (3e-3, 1e-2),
    "moments-kfac": (3e-3, 1e-2),
    "moments-tkfac": (3e-3, 1e-2),
    "moments-tekfac": (3e-3, 1e-2),
    "moments-kfac-inv10": (3e-3, 1e-2),
    "moments-tkfac-inv10": (3e-3, 1e-2),
    "tekfac-opt-moments": (3e-3, 1e-2),
}
#: Curvature options of our methods: the library defaults' intervals, damping for a GPT.
KFAC_OPTIONS = dict(damping=1e-3, factor_decay=0.95, factor_update_steps=10, inv_update_steps=100)


def stdlib_text(chars: int) -> str:
    """The first ``chars`` ASCII characters of the standard library's .py files (sorted paths)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="ignore").encode("ascii", "ignore").decode()
        parts.append(text)
        total += len(text)
        if total >= chars:
            break
    return "".join(parts)[:chars]


class Data:
    """Character tokens split 90/10 into training and validation streams."""

    def __init__(self, chars: int, context: int):
        text = stdlib_text(chars)
        vocab = sorted(set(text))
        self.vocab = len(vocab)
        lookup = {c: i for i, c in enumerate(vocab)}
        ids = torch.tensor([lookup[c] for c in text], dtype=torch.long)
        cut = int(0.9 * len(ids))
        self.train, self.val = ids[:cut], ids[cut:]
        self.context = context

    def batch(self, stream: torch.Tensor, n: int, g: torch.Generator):
        start = torch.randint(0, len(stream) - self.context - 1, (n,), generator=g)
        x = torch.stack([stream[s:s + self.context] for s in start])
        y = torch.stack([stream[s + 1:s + self.context + 1] for s in start])
        return x, y


def schedule(steps: int) -> Callable[[int], float]:
    """Linear warmup over 10% of the steps, then cosine down to 10% of the peak."""
    warmup = max(1, steps // 10)
    return lambda s: (s + 1) / warmup if s < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup)))


def build(method: str, model: torch.nn.Module, lr: float):
    """(optimizer, preconditioner or None)."""
    if method == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0), None
    if method == "soap":
        import heavyball
        import heavyball.utils

        heavyball.utils.compile_mode = None  # eager: compile time would count as training time
        return heavyball.SOAP(model.parameters(), lr=lr), None
    if method.startswith(("pre-", "graft-")):
        # "pre-<method>[-sqrt][-rel]": Preconditioner -> AdamW; "graft-<method>[-sqrt][-rel]":
        # Preconditioner with Adam grafting -> plain SGD (as SOAP: the step's size is Adam's).
        # -sqrt: exponent 1/2; -rel: damping_mode="relative" (damping x the block's mean eigenvalue)
        kind, name, *flags = method.split("-")
        unknown = set(flags) - {"sqrt", "rel"}
        if unknown:
            raise ValueError(f"{method}: unknown suffix(es) {sorted(unknown)}")
        pre = kfac_cuda.Preconditioner(model, name, exponent=0.5 if "sqrt" in flags else 1.0,
                                       damping_mode="relative" if "rel" in flags else "absolute",
                                       grafting="adam" if kind == "graft" else None, **KFAC_OPTIONS)
        if kind == "graft":
            return torch.optim.SGD(model.parameters(), lr=lr), pre
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0), pre
    if method.startswith("moments-"):
        # "moments-<method>[-inv10]": Preconditioner with Adam's moments in the curvature's
        # eigenbasis (SOAP's step) -> plain SGD; -inv10: bases refreshed every 10 steps, not 100
        # (with the factors, which are updated every 10 steps)
        _, name, *flags = method.split("-")
        if set(flags) - {"inv10"}:
            raise ValueError(f"{method}: unknown suffix(es) {sorted(set(flags) - {'inv10'})}")
        kw = dict(KFAC_OPTIONS, inv_update_steps=10) if "inv10" in flags else KFAC_OPTIONS
        pre = kfac_cuda.Preconditioner(model, name, eigenbasis_moments="adam", **kw)
        return torch.optim.SGD(model.parameters(), lr=lr), pre
    if method == "tekfac-opt":
        return kfac_cuda.TEKFAC(model, lr=lr, momentum=0.9, kl_clip=1e-3, **KFAC_OPTIONS), None
    if method == "tekfac-opt-moments":  # the TEKFAC optimizer's own step with the option: lr * U
        return kfac_cuda.TEKFAC(model, lr=lr, momentum=0.0, kl_clip=None, eigenbasis_moments="adam",
                                **KFAC_OPTIONS), None
    raise ValueError(method)


def _tensor_bytes(obj) -> int:
    """Bytes of the tensors in a (nested) optimizer state."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def state_bytes(opt, pre) -> int:
    """Bytes of optimizer state and curvature buffers (shared buffers counted once)."""
    total = _tensor_bytes(list(opt.state.values()))
    precond = pre if pre is not None else getattr(opt, "preconditioner", None)
    if precond is not None:
        buffers = {id(t): t for _, c in precond.layers.values() for t in c.buffers.values() if t is not None}
        total += _tensor_bytes(list(buffers.values()))
        if getattr(precond, "grafting", None) is not None:  # the grafted Adam's per-layer moments
            total += _tensor_bytes(precond.grafting.moments)
        if getattr(precond, "moments", None) is not None:  # Adam's moments in the eigenbasis
            total += _tensor_bytes(precond.moments.moments)
    return total


@torch.no_grad()
def evaluate(model, batches) -> float:
    return statistics.mean(F.cross_entropy(model(x).reshape(-1, model.tok.num_embeddings), y.reshape(-1)).item()
                           for x, y in batches)


def run(method: str, lr: float, seed: int, data: Data, args) -> Dict:
    torch.manual_seed(seed)
    model = NanoGPT(data.vocab, args.d_model, args.layers, args.heads, args.context)
    opt, pre = build(method, model, lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(args.steps))
    g = torch.Generator().manual_seed(1000 + seed)
    val_g = torch.Generator().manual_seed(7)
    val = [data.batch(data.val, args.batch_size, val_g) for _ in range(args.val_batches)]
    phases = dict(forward_backward=0.0, preconditioner=0.0, optimizer=0.0)
    curve = [(0, 0.0, evaluate(model, val))]
    seconds = 0.0
    for step in range(1, args.steps + 1):
        x, y = data.batch(data.train, args.batch_size, g)
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = F.cross_entropy(model(x).reshape(-1, data.vocab), y.reshape(-1))
        loss.backward()
        t1 = time.perf_counter()
        if pre is not None:
            pre.step()
        t2 = time.perf_counter()
        opt.step()
        sched.step()
        t3 = time.perf_counter()
        phases["forward_backward"] += t1 - t0
        phases["preconditioner"] += t2 - t1
        phases["optimizer"] += t3 - t2
        seconds += t3 - t0
        if not math.isfinite(loss.item()):
            curve.append((step, seconds, float("nan")))
            break
        if step % args.eval_every == 0 or step == args.steps:
            curve.append((step, seconds, evaluate(model, val)))
    return dict(method=method, lr=lr, seed=seed, curve=curve, seconds=seconds, sec_per_step=seconds / step,
                phases=phases, state_mb=state_bytes(opt, pre) / 2**20, final=curve[-1][2])


def to_target(curve, target: float):
    for step, sec, val in curve:
        if val <= target:
            return step, sec
    return None, None


def median(values: List[Optional[float]]) -> Optional[float]:
    finite = [math.inf if v is None else v for v in values]
    m = statistics.median(finite) if finite else math.inf
    return None if math.isinf(m) else m


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, 30 steps, 1 seed, one lr per method")
    p.add_argument("--methods", default=",".join(GRIDS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--chars", type=int, default=1_000_000)
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--val-batches", type=int, default=4)
    p.add_argument("--no-tune", action="store_true", help="use each grid's first learning rate")
    p.add_argument("--grid", default=None, help="comma-separated learning rates tuned for every method "
                   "(default: each method's grid in GRIDS)")
    p.add_argument("--out", type=Path, default=Path("out/gpt_bench.json"))
    p.add_argument("--plot", type=Path, default=None, help="PNG of validation loss vs steps and seconds")
    p.add_argument("--combine", type=Path, nargs="+", default=None,
                   help="merge the JSON reports of earlier runs into --out (and --plot) and exit")
    args = p.parse_args(argv)
    if args.combine:
        combine(args.combine, args.out, args.plot)
        return 0
    if args.quick:
        args.seeds, args.steps, args.d_model, args.layers, args.heads = 1, 30, 32, 1, 2
        args.context, args.chars, args.eval_every, args.val_batches, args.batch_size = 32, 50_000, 10, 1, 8
        args.no_tune = True
    torch.set_num_threads(1)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "soap" in methods:
        try:
            import heavyball  # noqa: F401
        except ImportError:
            print("soap: not installed (pip install --no-deps heavyball opt-einsum); skipped")
            methods.remove("soap")
    data = Data(args.chars, args.context)
    print(f"gpt_bench: vocab {data.vocab}, {len(data.train)} training tokens, commit {git_commit()[:12]}, "
          f"torch {torch.__version__}, 1 thread")
    started = time.perf_counter()
    lrs, tuning, seed0 = {}, {}, {}
    common = None if args.grid is None else tuple(float(v) for v in args.grid.split(","))
    for m in methods:
        grid = GRIDS[m] if common is None else common
        if args.no_tune:
            lrs[m] = grid[0]
            continue
        results = {lr: run(m, lr, 0, data, args) for lr in grid}
        tuning[m] = {lr: r["final"] for lr, r in results.items()}
        lrs[m] = min((v if math.isfinite(v) else math.inf, lr) for lr, v in tuning[m].items())[1]
        seed0[m] = results[lrs[m]]
        print(f"  tune {m}: " + ", ".join(f"{lr:g}: {v:.3f}" for lr, v in tuning[m].items()) + f" -> {lrs[m]:g}",
              flush=True)
    runs = {m: [seed0[m] if s == 0 and m in seed0 else run(m, lrs[m], s, data, args) for s in range(args.seeds)]
            for m in methods}
    report = dict(args={k: str(v) for k, v in vars(args).items()}, commit=git_commit(), torch=torch.__version__,
                  vocab=data.vocab, lrs=lrs, tuning=tuning, runs=runs, wall_seconds=time.perf_counter() - started)
    finish(report, args.out, args.plot)
    return 0


def finish(report: Dict, out: Path, plot_path: Optional[Path]) -> None:
    """Summarise ``report["runs"]`` against AdamW's median final validation loss, print the
    table, write the JSON (and the plot)."""
    runs = report["runs"]
    base = "adamw" if "adamw" in runs else next(iter(runs))
    target = statistics.median(r["final"] for r in runs[base])
    base_sps = statistics.median(r["sec_per_step"] for r in runs[base])
    base_mb = statistics.median(r["state_mb"] for r in runs[base])
    rows, summary = [], {}
    for m, rs in runs.items():
        hits = [to_target(r["curve"], target) for r in rs]
        sps = statistics.median(r["sec_per_step"] for r in rs)
        ph = {k: statistics.median(r["phases"][k] / r["curve"][-1][0] for r in rs) for k in rs[0]["phases"]}
        s = dict(lr=rs[0]["lr"], final=statistics.median(r["final"] for r in rs),
                 final_range=[min(r["final"] for r in rs), max(r["final"] for r in rs)],
                 steps_to_target=median([h[0] for h in hits]), seconds_to_target=median([h[1] for h in hits]),
                 reached=sum(h[0] is not None for h in hits), time_per_step_vs_base=sps / base_sps,
                 state_mb=statistics.median(r["state_mb"] for r in rs), phases_ms=ph)
        s["state_vs_base"] = s["state_mb"] / base_mb if base_mb else None
        summary[m] = s
        steps_hit = "-" if s["steps_to_target"] is None else f"{s['steps_to_target']:.0f}"
        secs_hit = "-" if s["seconds_to_target"] is None else f"{s['seconds_to_target']:.1f}"
        lo, hi = s["final_range"]
        rows.append(f"| {m} | {s['lr']:g} | {s['final']:.3f} [{lo:.3f}-{hi:.3f}] | {steps_hit} ({s['reached']}/{len(rs)}) | "
                    f"{secs_hit} | {s['time_per_step_vs_base']:.2f} | {s['state_mb']:.2f} | "
                    + " / ".join(f"{1e3 * v:.1f}" for v in ph.values()) + " |")
    header = (f"| method | lr | final val (median [min-max]) | steps to {target:.3f} (reached) | s to target | "
              "time/step vs AdamW | state MB | ms/step fwd+bwd / precond / optim |\n|" + " --- |" * 8)
    seeds = max(len(rs) for rs in runs.values())
    print(f"\n{seeds} seed(s), target = {base}'s median final val loss {target:.3f}")
    print(header)
    print("\n".join(rows))
    report.update(target=target, summary=summary, table="\n".join([header, *rows]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    if plot_path:
        plot(runs, plot_path, target)
    print(f"JSON: {out}")


def combine(paths: Sequence[Path], out: Path, plot_path: Optional[Path]) -> None:
    """One report from several runs of this script (e.g. methods split over processes)."""
    reports = [json.loads(p.read_text()) for p in paths]
    merged = dict(reports[0])
    merged["runs"] = {m: rs for r in reports for m, rs in r["runs"].items()}
    merged["lrs"] = {m: lr for r in reports for m, lr in r["lrs"].items()}
    merged["parts"] = [dict(args=r["args"], commit=r["commit"], wall_seconds=r["wall_seconds"]) for r in reports]
    finish(merged, out, plot_path)


def plot(runs, path: Path, target: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for k, (m, rs) in enumerate(runs.items()):
        color = f"C{k}"
        for i, r in enumerate(rs):
            steps, secs, vals = zip(*r["curve"][1:])
            axes[0].plot(steps, vals, color=color, label=m if i == 0 else None, alpha=0.8, lw=1)
            axes[1].plot(secs, vals, color=color, alpha=0.8, lw=1)
    for ax, xlabel in zip(axes, ("step", "training seconds (1 CPU thread, shared machine)")):
        ax.axhline(target, color="k", ls=":", lw=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss")
        ax.set_ylim(top=min(4.0, ax.get_ylim()[1]))
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
