"""Smoke test of the GPT benchmark's --quick mode (bench/gpt_bench.py): it runs end to end,
every method trains (finite, decreasing validation loss) and the report has the table's fields."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import gpt_bench  # noqa: E402


def test_quick_benchmark_runs_and_reports(tmp_path):
    out = tmp_path / "gpt.json"
    threads = gpt_bench.torch.get_num_threads()
    try:
        assert gpt_bench.main(["--quick", "--methods", "adamw,pre-tekfac-sqrt,moments-kfac", "--out", str(out)]) == 0
    finally:
        gpt_bench.torch.set_num_threads(threads)
    report = json.loads(out.read_text())
    assert set(report["summary"]) == {"adamw", "pre-tekfac-sqrt", "moments-kfac"}
    for method, runs in report["runs"].items():
        first, last = runs[0]["curve"][0][2], runs[0]["curve"][-1][2]
        assert last < first, method
        assert report["summary"][method]["time_per_step_vs_base"] > 0
    assert "steps to" in report["table"]
