"""Kernel vs PyTorch-reference table: median time of each, speedup, achieved TFLOP/s.

    python bench/kernel_table.py out/kernel_table.json                 # every registered op
    python bench/kernel_table.py out/t.json --ops factor_accumulate --repeats 50

Cases come from the case-list modules in CASE_MODULES (each exposes ``all_cases()`` returning
kernel_cases.Case objects: ``setup(device) -> (run_torch, run_cuda, info)`` with
``info["flops"]``). To add an op to the table, write such a module and register it here.
Timing: CUDA events around ``inner`` back-to-back calls, after warm-up, the two backends
interleaved repeat by repeat; the median over repeats is reported. The JSON holds the device
name, git commit, torch version and one row per case.
"""
from __future__ import annotations

import argparse
import importlib
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).parent))

# op-family label -> case-list module (in bench/)
CASE_MODULES: Dict[str, str] = {
    "factor_accumulate": "factor_cases",
    "precondition|scale_accumulate|conv_factor_accumulate": "kernel_cases",
}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def time_ms(fn: Callable[[], object], inner: int) -> float:
    """Milliseconds per call over ``inner`` back-to-back calls, measured with CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(inner):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / inner


def measure(case, device, warmup: int, repeats: int, inner: int) -> dict:
    run_torch, run_cuda, info = case.setup(device)
    for _ in range(warmup):
        run_torch()
        run_cuda()
    torch.cuda.synchronize()
    times = {"torch": [], "cuda": []}
    for _ in range(repeats):  # interleaved: both see the same clocks and thermal state
        times["torch"].append(time_ms(run_torch, inner))
        times["cuda"].append(time_ms(run_cuda, inner))
    t_ms, c_ms = statistics.median(times["torch"]), statistics.median(times["cuda"])
    flops = info["flops"]
    return {"op": case.op, "case": case.name, "dtype": case.dtype, "torch_ms": t_ms, "cuda_ms": c_ms,
            "speedup": t_ms / c_ms, "torch_tflops": flops / t_ms / 1e9, "cuda_tflops": flops / c_ms / 1e9,
            **{k: v for k, v in info.items() if k != "flops"}, "flops": flops}


def load_cases(ops: List[str] | None) -> list:
    cases = []
    for module_name in dict.fromkeys(CASE_MODULES.values()):
        cases += importlib.import_module(module_name).all_cases()
    return [c for c in cases if ops is None or c.op in ops]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json_out", type=Path, help="where to write the JSON results")
    parser.add_argument("--ops", nargs="*", help="only these ops (default: all registered)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--inner", type=int, default=5, help="calls per timed repeat")
    args = parser.parse_args()

    from kfac_cuda import cuda_extension_available, cuda_extension_error
    if not torch.cuda.is_available():
        print("kernel_table: no CUDA device", file=sys.stderr)
        return 1
    if not cuda_extension_available():
        print(f"kernel_table: CUDA extension unavailable: {cuda_extension_error()}", file=sys.stderr)
        return 1

    device = torch.device("cuda")
    meta = {"device": torch.cuda.get_device_name(device), "commit": git_commit(),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "timing": f"CUDA events, median of {args.repeats} repeats x {args.inner} calls, "
                      f"{args.warmup} warm-up, backends interleaved"}
    print(f"device {meta['device']}  commit {meta['commit'][:12]}  torch {meta['torch']}")
    header = f"{'op':<24} {'case':<30} {'dtype':<5} {'torch ms':>10} {'cuda ms':>10} {'speedup':>8} " \
             f"{'torch TF/s':>10} {'cuda TF/s':>10}"
    print(header)
    print("-" * len(header))
    rows = []
    for case in load_cases(args.ops):
        row = measure(case, device, args.warmup, args.repeats, args.inner)
        rows.append(row)
        print(f"{row['op']:<24} {row['case']:<30} {row['dtype']:<5} {row['torch_ms']:>10.4f} "
              f"{row['cuda_ms']:>10.4f} {row['speedup']:>7.2f}x {row['torch_tflops']:>10.2f} "
              f"{row['cuda_tflops']:>10.2f}", flush=True)
        torch.cuda.empty_cache()
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps({**meta, "rows": rows}, indent=2))
    print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
