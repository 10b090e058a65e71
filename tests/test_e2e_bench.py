"""``bench/e2e.py --quick`` writes its JSON report (1 seed, a few steps)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")

REPO = Path(__file__).resolve().parents[1]


def test_e2e_quick_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "e2e.json"
    proc = subprocess.run([sys.executable, "bench/e2e.py", "--quick", "--seeds", "1", "--steps", "6",
                           "--eval-every", "3", "--methods", "sgd,adamw,tekfac,soap,nngeometry-ekfac",
                           "--device", "cpu", "--out", str(out), "--no-progress"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["torch"] and report["device_name"] and report["git_commit"]
    assert set(report["tasks"]) == {"autoencoder", "classifier"}
    for name, task in report["tasks"].items():
        summaries = task["summaries"]
        assert summaries["sgd"]["step_time_vs_sgd"] == pytest.approx(1.0)
        assert summaries["tekfac"]["sec_per_step"] > 0 and summaries["tekfac"]["step_time_vs_sgd"] > 0
        assert set(summaries["tekfac"]["loss_target_steps"]) == {"median", "min", "max"}
        assert len(task["runs"]["adamw"]) == 1 and task["runs"]["adamw"][0]["steps"][-1] == 6
        assert name in proc.stdout
    for peer in ("soap", "nngeometry-ekfac"):  # installed or not, a peer never ends the run
        assert report["peers"][peer] == "ok" or report["peers"][peer].startswith("not installed")
    if report["peers"]["nngeometry-ekfac"] == "ok":
        errors = report["tasks"]["autoencoder"]["summaries"]["nngeometry-ekfac"]["errors"]
        assert errors == ["n/a: classification tasks only"]
