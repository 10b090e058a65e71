"""pytest-benchmark microbenchmarks: the factor-accumulation kernel vs its PyTorch reference
(bench/factor_cases.py). Skipped without a CUDA device and the compiled extension.

    pytest bench/bench_factor_accumulate.py --benchmark-columns=median,iqr --benchmark-json=out/factor.json
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from factor_cases import all_cases  # noqa: E402

from kfac_cuda import cuda_extension_available, cuda_extension_error  # noqa: E402

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
if not cuda_extension_available():
    pytest.skip(f"CUDA extension unavailable: {cuda_extension_error()}", allow_module_level=True)

CASES = all_cases()


@pytest.mark.parametrize("backend", ["torch", "cuda"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_factor_accumulate(benchmark, case, backend):
    run_torch, run_cuda, info = case.setup(torch.device("cuda"))
    fn = run_cuda if backend == "cuda" else run_torch
    for _ in range(3):
        fn()

    def timed():
        fn()
        torch.cuda.synchronize()

    benchmark.group = case.id
    benchmark.pedantic(timed, rounds=10, iterations=5, warmup_rounds=1)
    benchmark.extra_info.update(info)
    benchmark.extra_info.update({"backend": backend, "device": torch.cuda.get_device_name()})
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["tflops"] = info["flops"] / benchmark.stats.stats.median / 1e12
