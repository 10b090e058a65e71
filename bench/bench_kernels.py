"""pytest-benchmark microbenchmarks: each fused kernel vs its PyTorch reference on the cases
of bench/kernel_table.py's CASE_MODULES (factor accumulation: n, d in {256, 1024, 4096};
the other kernels: ResNet-18/CIFAR convs, ViT-B/GPT-2-small linears, 4096^2), fp32 and bf16
inputs. Skipped without a CUDA device and the compiled extension.

    pytest bench/bench_kernels.py --benchmark-columns=median,iqr --benchmark-json=out/kernels.json
    pytest bench/bench_kernels.py -k "conv_factor and resnet18.layer1"

extra_info of every benchmark: flops, achieved TFLOP/s, peak extra memory of one call
(torch.cuda.max_memory_allocated above the inputs), and for the conv factor the bytes of the
im2col buffer the reference materialises (the kernel: none).
"""
import importlib
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from kernel_table import CASE_MODULES  # noqa: E402

from kfac_cuda import cuda_extension_available, cuda_extension_error  # noqa: E402

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
if not cuda_extension_available():
    pytest.skip(f"CUDA extension unavailable: {cuda_extension_error()}", allow_module_level=True)

CASES = [case for module in CASE_MODULES.values() for case in importlib.import_module(module).all_cases()]


def peak_extra_bytes(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return int(peak)


@pytest.mark.parametrize("backend", ["torch", "cuda"])
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_kernel(benchmark, case, backend):
    device = torch.device("cuda")
    run_torch, run_cuda, info = case.setup(device)
    fn = run_cuda if backend == "cuda" else run_torch
    for _ in range(3):  # warm-up: allocator, cuBLAS handles, module loading
        fn()
    memory = peak_extra_bytes(fn)

    def timed():
        fn()
        torch.cuda.synchronize()

    benchmark.group = case.id
    benchmark.pedantic(timed, rounds=10, iterations=3, warmup_rounds=1)
    benchmark.extra_info.update(info)
    benchmark.extra_info.update({"backend": backend, "device": torch.cuda.get_device_name(),
                                 "peak_extra_bytes": memory})
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["tflops"] = info["flops"] / benchmark.stats.stats.median / 1e12
