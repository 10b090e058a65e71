"""The demo's CURVES deep autoencoder with Martens & Grosse's full algorithm (kfac-mg, tekfac-mg)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[1]


def test_curves_are_deterministic_images_of_thin_strokes() -> None:
    from kfac_cuda.demo.tasks import make_curves

    a, b = make_curves(20, seed=3), make_curves(20, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, make_curves(20, seed=4))
    assert a.shape == (20, 1, 16, 16) and a.min() >= 0 and a.max() <= 1
    on = (a > 0.5).flatten(1).float().mean(1)
    assert ((on > 0.01) & (on < 0.3)).all()  # a curve, neither empty nor a blob


def test_demo_runs_the_full_algorithm_on_curves(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "kfac_cuda.demo", "--task", "curves", "--methods",
                           "sgd,kfac-mg,tekfac-mg", "--steps", "6", "--eval-every", "3", "--device", "cpu",
                           "--out", str(tmp_path), "--no-progress"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    for row in ("curves / sgd", "curves / kfac-mg", "curves / tekfac-mg"):
        assert row in proc.stdout
    assert "(diverged)" not in proc.stdout


def test_full_algorithm_needs_the_task_loss() -> None:
    from kfac_cuda.demo.methods import make_optimizer

    with pytest.raises(ValueError, match="needs the task's loss"):
        make_optimizer("kfac-mg", torch.nn.Linear(2, 2), 0.0)
