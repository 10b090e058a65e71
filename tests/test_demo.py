"""End-to-end checks of ``python -m kfac_cuda.demo`` on a short setting."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_demo(*args: str) -> subprocess.CompletedProcess:
    """Run the demo CLI in a subprocess from the repository root."""
    return subprocess.run([sys.executable, "-m", "kfac_cuda.demo", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_demo_short_run_prints_table_and_saves_png(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    proc = run_demo("--task", "all", "--methods", "sgd,kfac,tekfac", "--steps", "12", "--eval-every", "4",
                    "--device", "cpu", "--out", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    for header in ("task / method", "steps to target", "s to target", "final train loss", "test"):
        assert header in proc.stdout
    for row in ("autoencoder / sgd", "autoencoder / tekfac", "classifier / kfac"):
        assert row in proc.stdout
    assert "acc" in proc.stdout  # the classifier reports a test accuracy
    png = out / "loss_curves.png"
    assert f"plot: {png}" in proc.stdout
    assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 5_000
    assert (out / "results.json").is_file()


def test_demo_runs_martens_grosse_on_the_classifier(tmp_path: Path) -> None:
    from kfac_cuda.demo.cli import DEFAULT_METHODS

    assert {"kfac-mg", "tekfac-mg"} <= set(DEFAULT_METHODS["classifier"])
    proc = run_demo("--task", "classifier", "--methods", "kfac-mg,tekfac-mg", "--steps", "6", "--eval-every", "3",
                    "--device", "cpu", "--out", str(tmp_path / "demo"), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    for row in ("classifier / kfac-mg", "classifier / tekfac-mg"):
        assert row in proc.stdout


def test_demo_bad_flag_exits_2_with_message() -> None:
    proc = run_demo("--methods", "sgd,lbfgs")
    assert proc.returncode == 2
    assert "unknown method(s) lbfgs; choose from sgd, adamw, kfac" in proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize("args, message", [
    (("--task", "mnist"), "invalid choice: 'mnist'"),
    (("--steps", "0"), "must be >= 1"),
    (("--target-loss", "nan"), "must be a finite number > 0"),
    (("--device", "tpu"), "invalid device 'tpu'"),
    (("--threads", "-1"), "must be >= 0, got -1"),
])
def test_demo_bad_flags_are_argparse_errors(args: tuple, message: str, capsys: pytest.CaptureFixture) -> None:
    from kfac_cuda.demo.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_demo_cuda_without_gpu_is_a_clear_error(capsys: pytest.CaptureFixture) -> None:
    import torch

    from kfac_cuda.demo.cli import main

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(SystemExit) as exit_info:
        main(["--device", "cuda"])
    assert exit_info.value.code == 2
    assert "CUDA is not available" in capsys.readouterr().err
