"""Benchmark cases for the factor-accumulation kernel (A <- beta*A + alpha*abar^T abar, bias),
in the ``Case`` format of kernel_cases.py: n, d in {256, 1024, 4096}, fp32 and bf16 inputs,
plus the weighted (TKFAC) variant. The reference is the PyTorch path (cat ones + addmm)."""
from __future__ import annotations

from typing import List

import torch

from kernel_cases import Case, DTYPES, Setup

from kfac_cuda.ops.factor_accumulate import accumulate_factor

SIZES = [256, 1024, 4096]


def _factor_case(n: int, d: int, dtype: torch.dtype, weighted: bool) -> Setup:
    def setup(device):
        a = torch.randn(n, d, device=device).to(dtype)
        w = torch.rand(n, device=device) if weighted else None
        A = torch.zeros(d + 1, d + 1, device=device)
        # the kernel computes the upper triangle only; count the full GEMM the reference does
        info = {"flops": 2.0 * n * (d + 1) ** 2}
        kw = dict(bias=True, weights=w, beta=0.95, alpha=0.05 / n)
        return (lambda: accumulate_factor(A, a, backend="torch", **kw),
                lambda: accumulate_factor(A, a, backend="cuda", **kw), info)
    return setup


def all_cases() -> List[Case]:
    cases = [Case(f"n{n}.d{d}", "factor_accumulate", dname, _factor_case(n, d, dtype, False))
             for dname, dtype in DTYPES.items() for n in SIZES for d in SIZES]
    cases += [Case(f"n{n}.d{d}.weighted", "factor_accumulate", dname, _factor_case(n, d, dtype, True))
              for dname, dtype in DTYPES.items() for n, d in [(4096, 1024)]]
    return cases
