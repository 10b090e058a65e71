"""Result table and loss-curve plot of demo runs."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .train import RunResult


def format_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    """Plain-text table with columns padded to their widest cell (first column left-aligned)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def fmt(value: Optional[float], spec: str = ".3g") -> str:
    """Format a number, with '-' for a missing value (target not reached) or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def results_table(results: Sequence[RunResult], target_loss: Dict[str, float]) -> str:
    """Table of steps and seconds to each task's target training loss, the final training
    loss, the final test metric (accuracy for the classifier) and milliseconds per step."""
    header = ["task / method", "lr", "target loss", "steps to target", "s to target",
              "final train loss", "test", "ms/step"]
    rows = []
    for r in results:
        steps, secs = r.loss_target(target_loss[r.task])
        test = f"{r.final_test:.1%} acc" if r.test_metric == "accuracy" else f"{fmt(r.final_test, '.4g')} loss"
        rows.append([f"{r.task} / {r.method}" + (" (diverged)" if r.diverged else ""),
                     fmt(r.lr), fmt(target_loss[r.task]), fmt(steps, "d"), fmt(secs, ".2f"),
                     fmt(r.final_train_loss, ".4g"), test, fmt(1e3 * r.sec_per_step, ".2f")])
    return format_table(rows, header)


def plot_curves(results: Sequence[RunResult], path: Path, target_loss: Dict[str, float]) -> Path:
    """Save training loss vs steps and vs wall-clock seconds (one row per task) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks: Dict[str, List[RunResult]] = {}
    for r in results:
        tasks.setdefault(r.task, []).append(r)
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 4 * len(tasks)), squeeze=False)
    for row, (task, runs) in zip(axes, tasks.items()):
        for r in runs:
            row[0].plot(r.steps, r.train_loss, label=r.method)
            row[1].plot(r.seconds, r.train_loss, label=r.method)
        for ax, xlabel in zip(row, ("steps", "training wall-clock (s)")):
            ax.axhline(target_loss[task], color="grey", linestyle=":", linewidth=1)
            ax.set(xlabel=xlabel, ylabel="full training loss", title=task, yscale="log")
            ax.grid(True, which="both", alpha=0.3)
        row[0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
