"""Benchmark cases for the precondition, scale-accumulation and conv-factor kernels, each
timed against its PyTorch reference on the same inputs (shared by bench_kernels.py and the
kernel table). Layer shapes: ResNet-18 on CIFAR (3x3 convs, batch 128), ViT-B / GPT-2-small
linear layers (768 <-> 3072, 768 <-> 768; n = 4096 tokens) and a 4096 x 4096 layer.

A case is ``Case(name, op, dtype, setup)``; ``setup(device)`` builds the inputs and returns
``(run_torch, run_cuda, info)`` where the two callables run the op once on the current
stream and ``info`` holds flops and, for the conv factor, the bytes of the im2col buffer the
reference allocates (the kernel allocates none).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch

from kfac_cuda.ops.conv_factor_accumulate import accumulate_conv_factor
from kfac_cuda.ops.precondition import precondition
from kfac_cuda.ops.scale_accumulate import accumulate_scale

Setup = Callable[[torch.device], Tuple[Callable[[], object], Callable[[], object], Dict[str, float]]]

BATCH = 128          # ResNet-18 / CIFAR batch
TOKENS = 4096        # tokens per batch for the transformer layers
# (name, C_in, C_out, H = W) of the 3x3 stride-1 pad-1 convs of ResNet-18 on 32x32 inputs
RESNET_CONVS = [("resnet18.layer1", 64, 64, 32), ("resnet18.layer2", 128, 128, 16),
                ("resnet18.layer3", 256, 256, 8), ("resnet18.layer4", 512, 512, 4)]
# (name, d_in, d_out) of ViT-B / GPT-2-small linear layers, and a large square layer
LINEARS = [("vit_b.mlp_fc1", 768, 3072), ("vit_b.mlp_fc2", 3072, 768), ("vit_b.attn_proj", 768, 768),
           ("square4096", 4096, 4096)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    name: str
    op: str
    dtype: str
    setup: Setup

    @property
    def id(self) -> str:
        return f"{self.op}[{self.name},{self.dtype}]"


def _orthogonal(d: int, device) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, d, device=device, dtype=torch.float32))[0].contiguous()


def _precondition_case(d_out: int, d_in: int, dtype: torch.dtype, stored: bool) -> Setup:
    def setup(device):
        V = torch.randn(d_out, d_in, device=device, dtype=torch.float32).to(dtype)
        QG, QA = _orthogonal(d_out, device), _orthogonal(d_in, device)
        kw = (dict(scale=torch.rand(d_out, d_in, device=device, dtype=torch.float32)) if stored else
              dict(eig_g=torch.rand(d_out, device=device, dtype=torch.float32),
                   eig_a=torch.rand(d_in, device=device, dtype=torch.float32)))
        info = {"flops": 4.0 * d_out * d_in * (d_out + d_in)}
        return (lambda: precondition(V, QG, QA, damping=1e-3, backend="torch", **kw),
                lambda: precondition(V, QG, QA, damping=1e-3, backend="cuda", **kw), info)
    return setup


def _scale_case(n: int, T: int, d_out: int, d_in: int, dtype: torch.dtype) -> Setup:
    def setup(device):
        lead = (n,) if T == 1 else (n, T)
        g = torch.randn(*lead, d_out, device=device, dtype=torch.float32).to(dtype)
        a = torch.randn(*lead, d_in, device=device, dtype=torch.float32).to(dtype)
        QG, QA = _orthogonal(d_out, device), _orthogonal(d_in + 1, device)
        S = torch.zeros(d_out, d_in + 1, device=device, dtype=torch.float32)
        rows = n * T
        proj = 2.0 * rows * (d_out * d_out + (d_in + 1) ** 2)
        info = {"flops": proj + 2.0 * rows * d_out * (d_in + 1)}
        return (lambda: accumulate_scale(S, g, a, QG, QA, bias=True, beta=0.9, alpha=0.1 / n, backend="torch"),
                lambda: accumulate_scale(S, g, a, QG, QA, bias=True, beta=0.9, alpha=0.1 / n, backend="cuda"), info)
    return setup


def _conv_case(n: int, C: int, H: int, dtype: torch.dtype) -> Setup:
    def setup(device):
        x = torch.randn(n, C, H, H, device=device, dtype=torch.float32).to(dtype)
        d = C * 9 + 1
        A = torch.zeros(d, d, device=device, dtype=torch.float32)
        geo = dict(kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1), bias=True)
        rows = n * H * H
        elem = torch.tensor([], dtype=dtype).element_size()
        info = {"flops": 2.0 * rows * d * d,
                # unfold output in x's dtype, plus its float32 copy when x is not float32, plus the
                # [rows | 1] float32 concatenation: what the reference path materialises
                "reference_im2col_bytes": float(rows * (d - 1) * elem + (rows * (d - 1) * 4 if elem != 4 else 0)
                                                + rows * d * 4),
                "kernel_im2col_bytes": 0.0}
        return (lambda: accumulate_conv_factor(A, x, beta=0.9, alpha=0.1, backend="torch", **geo),
                lambda: accumulate_conv_factor(A, x, beta=0.9, alpha=0.1, backend="cuda", **geo), info)
    return setup


def all_cases() -> List[Case]:
    cases: List[Case] = []
    for dname, dtype in DTYPES.items():
        for name, d_in, d_out in LINEARS:
            cases.append(Case(f"{name}.ekfac", "precondition", dname, _precondition_case(d_out, d_in + 1, dtype, True)))
            cases.append(Case(f"{name}.kfac", "precondition", dname, _precondition_case(d_out, d_in + 1, dtype, False)))
        for name, c_in, c_out, _ in RESNET_CONVS:
            cases.append(Case(f"{name}.ekfac", "precondition", dname,
                              _precondition_case(c_out, 9 * c_in + 1, dtype, True)))
        for name, d_in, d_out in LINEARS:
            cases.append(Case(f"{name}.rows", "scale_accumulate", dname, _scale_case(TOKENS, 1, d_out, d_in, dtype)))
        for name, d_in, d_out in LINEARS[:3]:  # sequences of 512 tokens, weight sharing
            cases.append(Case(f"{name}.seq512", "scale_accumulate", dname,
                              _scale_case(TOKENS // 512, 512, d_out, d_in, dtype)))
        for name, c_in, c_out, H in RESNET_CONVS:
            cases.append(Case(f"{name}.shared", "scale_accumulate", dname,
                              _scale_case(BATCH, H * H, c_out, 9 * c_in, dtype)))
            cases.append(Case(name, "conv_factor_accumulate", dname, _conv_case(BATCH, c_in, H, dtype)))
    return cases
