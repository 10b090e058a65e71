"""Rounding-model error bounds of the 3xTF32 precondition kernel (csrc/precondition.cu), shared by
the CPU emulation test (tests/test_kernel_emulation.py) and the GPU test
(tests/gpu/test_precondition_kernel.py), and the plain-TF32 chain they must beat."""
from typing import Tuple

import torch

U_ROUND = 2.0 ** -24  # fp32 unit roundoff (round to nearest)


def precondition_error_bounds(V: torch.Tensor, QG: torch.Tensor, QA: torch.Tensor, D: torch.Tensor,
                              eig: bool) -> Tuple[torch.Tensor, float]:
    """Elementwise bound on |U - U_exact| and bound on |dot - dot_exact| for the 3xTF32 chain of
    csrc/precondition.cu, from the rounding model (first order; float64 inputs, D = S + damping).

    Each GEMM C = A B of reduction length K errs by at most gemm(K) |A||B| elementwise: the
    3xTF32 products (3 * 2^-22 = 12 u, split residues and the dropped lo lo'), the three mma of
    each k8 step into a fresh fragment (tensor-core model of tests/emulation/cuda_shim/warp.h:
    each within 2^-22 = 4 u of that step's terms), the round-to-nearest fp32 sum of the
    ceil(K/8) step partials (u each), and a split reduction (at most 16 splits: 16 u). An input
    error E of the left (right) operand adds E |B| (|A| E). Forming M = V' / D rounds the
    division and D (2 u, 3 u when S = eig_g eig_a is formed on the fly). The dot <M, V'> is
    first-order in the errors of M and V', plus its own summation: a product and fp32 chains
    of at most 64 elements per thread and an 8-level tree (73 u), then double accumulation and
    the final rounding (u |dot|)."""
    def gemm(K):
        return (12 + 3 * 4 + -(-K // 8) + 16) * U_ROUND
    m, n = V.shape
    aV, aG, aA = V.abs(), QG.abs(), QA.abs()
    Vp = QG.t() @ V @ QA
    M = Vp / D
    aM = M.abs()
    E1 = gemm(m) * aG.t() @ aV                       # W = Q_G^T V
    E2 = gemm(n) * aG.t() @ aV @ aA + E1 @ aA        # V' = W Q_A
    E3 = (E2 + (3 if eig else 2) * U_ROUND * Vp.abs()) / D.abs()
    E4 = gemm(m) * aG @ aM + aG @ E3                 # W = Q_G M
    E5 = gemm(n) * aG @ aM @ aA.t() + E4 @ aA.t()    # U = W Q_A^T
    dot = (M * Vp).sum()
    dot_bound = (E3 * Vp.abs() + aM * E2).sum() + 73 * U_ROUND * (aM * Vp.abs()).sum() + U_ROUND * dot.abs()
    return E5, dot_bound.item()


def tf32(x: torch.Tensor) -> torch.Tensor:
    """x rounded to tf32 as cvt.rna.tf32.f32 does (10-bit mantissa, ties away from zero)."""
    bits = x.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32).double()


def tf32_chain(V: torch.Tensor, QG: torch.Tensor, QA: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """U of the precondition chain in float64 with every GEMM operand rounded to tf32 (1xTF32)."""
    W = tf32(QG.t()) @ tf32(V)
    M = (tf32(W) @ tf32(QA)) / D
    return tf32(tf32(QG) @ tf32(M)) @ tf32(QA.t())
