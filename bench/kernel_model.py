"""Performance model of every kernel against its PyTorch reference on an H100 SXM, for every
case of bench/kernel_cases.py and bench/factor_cases.py; a paper estimate (about +-30 %) to be
calibrated by the first GPU run:

    python bench/kernel_model.py                          # the model alone (no GPU needed)
    python bench/kernel_model.py --measured OUT/kernel_table.json   # beside a measurement

Assumptions (H100 SXM5, sm_90):
- 132 SMs at 1.98 GHz; FP32 SIMT 67 TFLOP/s, TF32 tensor 495, BF16 tensor 989 (dense);
  HBM3 3.35 TB/s of which 2.8 achievable; 4 warp-instructions issued per SM clock; shared
  memory 128 B per SM clock; a kernel launch costs >= 5 us in a stream (host-bound below).
- PyTorch references: torch's default allow_tf32=False, so every fp32 matmul is cuBLAS SGEMM at
  75 % of FP32 peak (50 TFLOP/s) once its 128x128 tiles (times a split of K >= 1024 into
  parts, as cuBLAS does for few tiles) fill the SMs, proportionally less below; "TF32 allowed" runs them on TF32 tensor cores at 60 % of peak. bf16 inputs are cast to
  fp32 by the references, so no reference matmul uses bf16 tensor cores. Elementwise passes
  (cast, cat, square, divide, EMA) move their bytes at 2.8 TB/s.
- Kernels: costs per block and K-slice from the sm_90 SASS (bench/kernel_sass.py) and the
  review of csrc/ (../shared/kernel-review.md): gemm_tile is shared-memory bound at 1024 clk
  per 64x64x16 block-slice (8 warps x 128 LDS wavefronts), factor SIMT issue-bound at 1044 clk
  per 64x64x16 slab (the sm<80 fallback, not modelled below), factor mma (ldmatrix + mma.sync,
  scalar 16-bit staging) issue-bound at about 820 clk per 64x64x32 slab (staging ~50
  instructions per element pair dominate), factor 3xTF32 (fp32 or weighted rows: 48 HMMA plus
  the hi/lo splits per warp and slab) issue-bound at about 600 clk per 64x64x16 slab,
  precondition 3xTF32 (4 warps, 128x64 tiles, split K for >= 264 evenly spread blocks) at 440
  clk of issue per 128x64x8 block-slice (its 48 HMMA need 208 at the TF32 peak), the next slice
  prefetched into registers, so each group of 3 resident blocks pays max(issue, ~1500 clk
  latency) per slice: latency-bound, since 3 x 440 / 0.85 is about 1550; all divided by 0.85
  for scheduling losses. An SM with too few blocks to hide it pays an exposed global latency of ~1500 clk
  per slice (no prefetch in these kernels but precondition's and conv's).
- Conv factor (sm_80+ tensor-core kernels, conv_factor_accumulate.cu): issue-bound at one clk
  per static instruction of the sm_90 hot loop per 64x64 block-slab (4 warps on the SM's 4
  schedulers, one instruction per scheduler and clk; `python bench/kernel_sass.py`):
  conv_tf32_kernel (fp32 x, 3xTF32) 685 instructions per 16-row slab, conv_mma_kernel
  (bf16/fp16 x) 524 per 32-row slab; their tensor work (192 m16n8k8.tf32 / 64 m16n8k16 per
  block-slab, ~1.08 clk each per SM) is 208 / 69 clk, below the issue time. 4 resident blocks
  per SM (96-114 registers x 128 threads). One slab of register prefetch overlaps the global
  latency with the slab's own work: a block alone on its SM pays max(clk, 1500) per slice.
  Splits as kfac_cuda.ops.conv_factor_accumulate.conv_splits chooses them (fill one wave of
  resident blocks), rows cut at multiples of 32.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).parent))

from kfac_cuda.ops.conv_factor_accumulate import conv_splits  # noqa: E402  (the op's own rule)

SMS, CLOCK = 132, 1.98e9
FP32, TF32 = 67e12, 495e12
HBM = 2.8e12
LAUNCH = 5e-6
SGEMM_EFF, TF32_EFF = 0.75, 0.60
REALISM = 0.85
EXPOSED_LATENCY = 1500  # clk per slice when a block is alone on its SM

# clk per (block, K-slice) and K-slice length, per kernel family
GEMM_TILE = (1024, 16)
FACTOR_SIMT = (1044, 16)
FACTOR_MMA = (820, 32)
FACTOR_TF32 = (600, 16)
# precondition's 3xTF32 GEMM (csrc/tf32_gemm.cuh), per 128x64x8 block-slice: issue-bound at the
# 421-475-instruction hot loop (440 taken) of each of the block's 4 warps (one per SM
# sub-partition, 1 instruction per clock each; bench/kernel_sass.py: 48 HMMA, 48 LDS, 64 FADD
# adding each k8 step's fresh fragment to the sum, the rest staging: 12 scalar loads with
# their address math, the hi/lo split, 24 STS); its 48 HMMA alone would take 48 x 4.3 = 208 clk
# at the dense TF32 peak. 168 registers -> 3 resident blocks per SM.
PRECONDITION_TF32 = (440, 8)
PRECONDITION_TILE = (128, 64)
# split K until >= 264 blocks spread >= 90 % evenly over the SMs; >= 64 K per split, <= 16 splits
PRECONDITION_SPLIT = (264, 64, 16, 0.9)
SCALE_ROWS_TF32 = (514, 16)
SCALE_SHARED_TF32 = (522, 16)
SCALE_MIN_ROWS_PER_SPLIT = 128    # kfac_cuda.ops.scale_accumulate._MIN_ROWS_PER_SPLIT
SCALE_CHUNK_ELEMENTS = 1 << 24    # kfac_cuda.ops.scale_accumulate._CHUNK_ELEMENTS
CONV_TF32 = (685, 16)  # conv_tf32_kernel: fp32 x (and weighted rows)
CONV_MMA = (524, 32)   # conv_mma_kernel: unweighted bf16/fp16 x
CONV_RESIDENT = 4


def ceil(a: float, b: float) -> int:
    return int(math.ceil(a / b))


def elementwise(nbytes: float) -> float:
    return LAUNCH + nbytes / HBM


def reference_gemm(M: int, N: int, K: int, tf32: bool) -> float:
    """cuBLAS GEMM C(MxN) = A(MxK) B(KxN), fp32 data."""
    peak = TF32 * TF32_EFF if tf32 else FP32 * SGEMM_EFF
    tiles = ceil(M, 128) * ceil(N, 128)
    split_k = max(1, min(ceil(SMS, tiles), K // 1024))  # cuBLAS splits long K when tiles are few
    fill = min(1.0, tiles * split_k / SMS)
    return max(LAUNCH, 2.0 * M * N * K / (peak * fill) + 4.0 * (M * K + K * N + M * N) / HBM)


def batched_gemm(batch: int, M: int, N: int, K: int, tf32: bool) -> float:
    """cuBLAS strided-batched GEMM, `batch` independent C(MxN) = A(MxK) B(KxN), fp32 data."""
    peak = TF32 * TF32_EFF if tf32 else FP32 * SGEMM_EFF
    fill = min(1.0, batch * ceil(M, 128) * ceil(N, 128) / SMS)
    return max(LAUNCH, 2.0 * batch * M * N * K / (peak * fill) + 4.0 * batch * (M * K + K * N + M * N) / HBM)


def tiled_kernel(blocks: int, slices_per_block: int, clk: int, resident: int = 4, prefetch: bool = False) -> float:
    """Blocks of `slices_per_block` K-slices at `clk` each: the busiest SM runs ceil(blocks/SMs)
    of them, limited by its issue/shared-memory throughput, or, with too few resident blocks to
    hide it, by the exposed global latency of each slice (overlapped with the slice's own work,
    max instead of sum, when the kernel prefetches the next slice into registers)."""
    per_sm = ceil(blocks, SMS)
    busy = per_sm * clk / REALISM
    own = clk / REALISM
    per_slice = max(own, EXPOSED_LATENCY) if prefetch else own + EXPOSED_LATENCY
    latency = ceil(per_sm, resident) * per_slice
    return max(LAUNCH, slices_per_block * max(busy, latency) / CLOCK)


def choose_splits(tiles: int, reduce_len: int, min_per_split: int = 256, blocks_per_sm: int = 0) -> int:
    """kfac_cuda.ops._launch.choose_splits on 132 SMs (workspace limit ignored)."""
    want = max(1, blocks_per_sm * SMS // max(1, tiles)) if blocks_per_sm else ceil(2 * SMS, max(1, tiles))
    return max(1, min(want, max(1, reduce_len // min_per_split), 256))


# --- per-op models: (kernel seconds, reference seconds, reference seconds with TF32) ----------

def factor(n: int, d: int, elt: int, weighted: bool) -> Tuple[float, float, float]:
    D = d + 1
    T = ceil(D, 64)
    tiles = T * (T + 1) // 2
    splits = choose_splits(tiles, n)
    clk, k = FACTOR_TF32 if (elt == 4 or weighted) else FACTOR_MMA
    kernel = tiled_kernel(tiles * splits, ceil(ceil(n, splits), k), clk, resident=5)
    if splits > 1:
        kernel += elementwise(4.0 * D * D * (splits + 2))
    passes = elementwise(n * d * (elt + 4)) if elt != 4 else 0.0          # a.to(float32)
    passes += elementwise(n * d * 4 + n * D * 4)                            # cat ones
    passes += elementwise(2 * n * D * 4) if weighted else 0.0              # rows * w
    refs = [passes + reference_gemm(D, D, n, tf32) + elementwise(8.0 * D * D) for tf32 in (False, True)]
    return kernel, refs[0], refs[1]


def precondition_gemm(M: int, N: int, K: int) -> float:
    """One 3xTF32 GEMM of csrc/precondition.cu with its split-K plan (plan_gemm there) and, when
    split, the reduction pass (reads splits partial tiles, writes the result)."""
    tiles = ceil(M, PRECONDITION_TILE[0]) * ceil(N, PRECONDITION_TILE[1])
    target, min_k, max_splits, balance = PRECONDITION_SPLIT
    splits, best = 1, -1.0
    for s in range(1, min(max_splits, max(1, K // min_k)) + 1):  # plan_gemm in csrc/precondition.cu
        blocks = tiles * s
        score = min(1.0, blocks / target) * blocks / (ceil(blocks, SMS) * SMS)
        if score > best:
            splits, best = s, score
        if score >= balance:
            break
    clk, bk = PRECONDITION_TF32
    chunk = ceil(ceil(K, splits), bk) * bk
    splits = ceil(K, chunk)
    t = tiled_kernel(tiles * splits, ceil(chunk, bk), clk, resident=3, prefetch=True)
    return t + (elementwise(4.0 * M * N * (splits + 1)) if splits > 1 else 0.0)


def precondition(d_out: int, d_in: int, elt: int) -> Tuple[float, float, float]:
    kernel = sum(precondition_gemm(d_out, d_in, K) for K in (d_out, d_in, d_out, d_in))
    kernel += LAUNCH  # the dot's partial sums
    refs = []
    for tf32 in (False, True):
        t = sum(reference_gemm(d_out, d_in, K, tf32) for K in (d_out, d_in, d_out, d_in))
        t += 3 * elementwise(3 * 4.0 * d_out * d_in)  # S + damping, divide, dot
        t += elementwise(d_out * d_in * (elt + 4)) if elt != 4 else 0.0
        refs.append(t)
    return kernel, refs[0], refs[1]


def scale_order(T: int, d_out: int, D: int) -> str:
    """kfac_cuda.ops.scale_accumulate.contraction_order (the same cost rule)."""
    return "project" if T * (d_out * d_out + D * D) <= d_out * D * (d_out + D) else "rotate"


def _scale_kernel(grid: int, examples: int, slices_per_example: int, clk: int, resident: int, d_out: int,
                  D: int, per_split_len: int, rows_per_slice: int = 1) -> float:
    """One scale-kernel launch over `examples` (rows for the rows form, `rows_per_slice` = 16 of
    them per K-slice) cut in choose_splits parts, plus the split reduction."""
    splits = choose_splits(grid, examples, per_split_len, blocks_per_sm=4)  # scale_accumulate._BLOCKS_PER_SM
    slices = ceil(ceil(examples, splits), rows_per_slice) * slices_per_example
    t = tiled_kernel(grid * splits, slices, clk, resident)
    return t + (elementwise(4.0 * d_out * D * (splits + 2)) if splits > 1 else 0.0)


def scale_kernel_path(n: int, T: int, d_out: int, d_in: int, elt: int, tf32: bool) -> float:
    """accumulate_scale_cuda on the sm_80+ (3xTF32) kernels; tf32: the torch GEMMs of the path
    run with TF32 allowed."""
    D = d_in + 1
    rows = n * T
    grid = ceil(d_out, 64) * ceil(D, 64)
    cast = elementwise(rows * (d_out + d_in) * (elt + 4)) if elt != 4 else 0.0  # .to(float32) of 16-bit rows
    if T == 1 or scale_order(T, d_out, D) == "project":
        t = cast + reference_gemm(rows, d_out, d_out, tf32) + reference_gemm(rows, D, D, tf32)
        if T == 1:
            return t + _scale_kernel(grid, n, 1, SCALE_ROWS_TF32[0], 5, d_out, D, SCALE_MIN_ROWS_PER_SPLIT, 16)
        return t + _scale_kernel(grid, n, ceil(T, 16), SCALE_SHARED_TF32[0], 4, d_out, D,
                                 max(1, SCALE_MIN_ROWS_PER_SPLIT // T))
    # rotate: per chunk of examples, W_i = abar_i^T g_i (batched), the bias row (cat), X = W Q_G,
    # then the broadcast kernel (K = D rows per example)
    step = max(1, SCALE_CHUNK_ELEMENTS // (D * d_out))
    t = cast
    for start in range(0, n, step):
        c = min(step, n - start)
        t += batched_gemm(c, d_in, d_out, T, tf32) + elementwise(2 * 4.0 * c * D * d_out)
        t += reference_gemm(c * D, d_out, d_out, tf32)
        t += _scale_kernel(grid, c, ceil(D, 16), SCALE_SHARED_TF32[0], 4, d_out, D,
                           max(1, SCALE_MIN_ROWS_PER_SPLIT // D))
    return t


def scale(n: int, T: int, d_out: int, d_in: int, elt: int) -> Tuple[float, float, float]:
    D = d_in + 1
    rows = n * T
    projections = [reference_gemm(rows, d_out, d_out, tf32) + reference_gemm(rows, D, D, tf32)
                   + elementwise(rows * (d_out + d_in) * (elt + 4)) for tf32 in (False, True)]
    if T == 1:
        refs = [p + 2 * elementwise(2 * 4.0 * rows * (d_out + D)) + reference_gemm(d_out, D, rows, tf32)
                + elementwise(8.0 * d_out * D) for p, tf32 in zip(projections, (False, True))]
    else:
        # the reference casts 16-bit rows, concatenates the ones column, forms each example's
        # d_out x D gradient (einsum over T) and rotates it (Q_G^T P Q_A) in batched GEMMs, in
        # chunks of SCALE_CHUNK_ELEMENTS // (d_out D) examples, then squares and sums
        step = max(1, SCALE_CHUNK_ELEMENTS // (d_out * D))
        refs = []
        for tf32 in (False, True):
            t = elementwise(rows * (d_out + d_in) * (elt + 4)) if elt != 4 else 0.0
            t += elementwise(rows * (d_in + D) * 4)  # cat ones
            for start in range(0, n, step):
                c = min(step, n - start)
                t += batched_gemm(c, d_out, D, T, tf32) + batched_gemm(c, d_out, D, d_out, tf32)
                t += batched_gemm(c, d_out, D, D, tf32) + elementwise(4 * 4.0 * c * d_out * D)
            refs.append(t)
    kernels = [scale_kernel_path(n, T, d_out, d_in, elt, tf32) for tf32 in (False, True)]
    return kernels[0], refs[0], refs[1], kernels[1]


def scale_rows_bound(n: int, d_out: int, d_in: int, elt: int) -> float:
    """Upper bound on the rows form's speed-up over the fp32 reference for ANY kernel: the
    reference time over its projections and casts alone (what the kernel path keeps)."""
    _, ref, _, _ = scale(n, 1, d_out, d_in, elt)
    D = d_in + 1
    kept = reference_gemm(n, d_out, d_out, False) + reference_gemm(n, D, D, False) + \
        elementwise(n * (d_out + d_in) * (elt + 4))
    return ref / kept


def conv(n: int, C: int, H: int, elt: int) -> Tuple[float, float, float]:
    d = 9 * C + 1
    rows = n * H * H
    t = ceil(d, 64)
    tiles = t * (t + 1) // 2
    splits = conv_splits(SMS, tiles, rows, d)
    clk, k = CONV_TF32 if elt == 4 else CONV_MMA
    rows_per_split = ceil(ceil(rows, splits), 32) * 32
    splits = ceil(rows, rows_per_split)
    kernel = tiled_kernel(tiles * splits, ceil(rows_per_split, k), clk, CONV_RESIDENT, prefetch=True)
    if splits > 1:
        kernel += elementwise(4.0 * d * d * (splits + 2))
    unfold = elementwise(n * C * H * H * elt + rows * (d - 1) * elt)
    passes = unfold + (elementwise(rows * (d - 1) * (elt + 4)) if elt != 4 else 0.0)
    passes += elementwise(rows * (d - 1) * 4 + rows * d * 4)  # cat ones
    refs = [passes + reference_gemm(d, d, rows, tf32) + elementwise(8.0 * d * d) for tf32 in (False, True)]
    return kernel, refs[0], refs[1]


@dataclass
class Row:
    op: str
    case: str
    dtype: str
    kernel_ms: float
    torch_ms: float
    torch_tf32_ms: float
    kernel_tf32_ms: Optional[float] = None  # the kernel path with TF32 allowed, where it differs

    @property
    def speedup(self) -> float:
        return self.torch_ms / self.kernel_ms

    @property
    def speedup_tf32(self) -> float:
        return self.torch_tf32_ms / (self.kernel_ms if self.kernel_tf32_ms is None else self.kernel_tf32_ms)


def model_rows() -> List[Row]:
    """The model for every case of kernel_cases.py and factor_cases.py (same names)."""
    import factor_cases
    import kernel_cases as kc

    elts = {"fp32": 4, "bf16": 2}
    rows: List[Row] = []

    def add(op, name, dtype, times):
        rows.append(Row(op, name, dtype, *(t * 1e3 for t in times)))

    for dtype, elt in elts.items():
        for n in factor_cases.SIZES:
            for d in factor_cases.SIZES:
                add("factor_accumulate", f"n{n}.d{d}", dtype, factor(n, d, elt, False))
        add("factor_accumulate", "n4096.d1024.weighted", dtype, factor(4096, 1024, elt, True))
        for name, d_in, d_out in kc.LINEARS:
            for kind in ("ekfac", "kfac"):
                add("precondition", f"{name}.{kind}", dtype, precondition(d_out, d_in + 1, elt))
        for name, c_in, c_out, _ in kc.RESNET_CONVS:
            add("precondition", f"{name}.ekfac", dtype, precondition(c_out, 9 * c_in + 1, elt))
        for name, d_in, d_out in kc.LINEARS:
            add("scale_accumulate", f"{name}.rows", dtype, scale(kc.TOKENS, 1, d_out, d_in, elt))
        for name, d_in, d_out in kc.LINEARS[:3]:
            add("scale_accumulate", f"{name}.seq512", dtype, scale(kc.TOKENS // 512, 512, d_out, d_in, elt))
        for name, c_in, c_out, H in kc.RESNET_CONVS:
            add("scale_accumulate", f"{name}.shared", dtype, scale(kc.BATCH, H * H, c_out, 9 * c_in, elt))
            add("conv_factor_accumulate", name, dtype, conv(kc.BATCH, c_in, H, elt))
    return rows


def verdict(row: Row) -> str:
    return "ahead" if row.speedup >= 1.5 and row.speedup_tf32 >= 1.0 else "behind"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measured", type=Path, help="kernel_table.py JSON to print beside the model")
    args = parser.parse_args()
    measured: Dict[Tuple[str, str, str], dict] = {}
    if args.measured:
        data = json.loads(args.measured.read_text())
        print(f"measured: {data.get('device')} commit {str(data.get('commit'))[:12]}")
        measured = {(r["op"], r["case"], r["dtype"]): r for r in data["rows"]}
    header = (f"{'op':<23} {'case':<30} {'dt':<4} {'model k ms':>10} {'ref ms':>9} {'x':>6} {'x tf32':>6} "
              f"{'verdict':>7} | {'meas k ms':>9} {'meas ref':>9} {'meas x':>6} {'k model/meas':>12}")
    print(header)
    print("-" * len(header))
    for r in model_rows():
        m = measured.get((r.op, r.case, r.dtype))
        tail = (f"{m['cuda_ms']:9.4f} {m['torch_ms']:9.4f} {m['speedup']:6.2f} {r.kernel_ms / m['cuda_ms']:12.2f}"
                if m else f"{'-':>9} {'-':>9} {'-':>6} {'-':>12}")
        print(f"{r.op:<23} {r.case:<30} {r.dtype:<4} {r.kernel_ms:10.4f} {r.torch_ms:9.4f} {r.speedup:6.2f} "
              f"{r.speedup_tf32:6.2f} {verdict(r):>7} | {tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
