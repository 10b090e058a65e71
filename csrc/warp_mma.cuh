// Warp-level tensor-core primitives (sm_80+) as thin inline-PTX wrappers, one per instruction,
// so the kernels hold explicit per-lane fragments in registers.
//
// Fragment layouts (PTX ISA 9.0, "Warp Level Matrix Multiply-Accumulate Instructions", sections
// "Matrix Fragments for mma.m16n8k16 with floating point type" and "... for mma.m16n8k8"),
// with g = lane / 4 (groupID) and t = lane % 4 (threadID_in_group):
//   m16n8k16 .bf16/.f16: A (16x16, row) in 4 x b32 = 8 halves a0..a7:
//       a_i at row g + 8*((i/2) & 1), col 2t + (i & 1) + 8*(i >= 4);
//     B (16x8, col) in 2 x b32 = 4 halves b0..b3: b_i at row 2t + (i & 1) + 8*(i >= 2), col g;
//     C/D (16x8 f32) c0..c3: c_i at row g + 8*(i >= 2), col 2t + (i & 1).
//   m16n8k8 .tf32: A (16x8) a0..a3: a_i at row g + 8*(i & 1), col t + 4*(i >= 2);
//     B (8x8) b0..b1: b_i at row t + 4*i, col g; C/D as above.
//   ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 (same chapter, section "ldmatrix"): lanes
//     8j..8j+7 give the 16-byte-aligned row addresses of 8x8 matrix j; with .trans, register j
//     of lane l holds the pair (M_j[2t][g], M_j[2t+1][g]) (lower element in the lower half).
// The CPU emulation (tests/emulation/cuda_shim/warp.h) implements the same functions as warp
// collectives over 32 emulated lanes with exactly these layouts; it defines KFAC_CUDA_EMULATION.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace kfac {
namespace warp {

enum class Mma16 { BFloat16, Float16 };

// ldmatrix .x4 .trans: r[j] = (M_j[2t][g], M_j[2t+1][g]), row_ptr: this lane's row of matrix lane/8.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_ptr) {
#if defined(__CUDA_ARCH__)
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row_ptr));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#elif defined(KFAC_CUDA_EMULATION)
  ::emu::ldmatrix_x4_trans(r, row_ptr);
#endif
}

// d += A B, m16n8k16, A/B bf16 or fp16 (products exact in fp32), fp32 accumulate.
template <Mma16 kType>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__)
  if constexpr (kType == Mma16::BFloat16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#elif defined(KFAC_CUDA_EMULATION)
  ::emu::mma_m16n8k16(d, a, b, kType == Mma16::BFloat16);
#endif
}

// d += A B, m16n8k8, A/B tf32 (fp32 bit patterns with the low 13 mantissa bits zero).
__device__ __forceinline__ void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__)
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#elif defined(KFAC_CUDA_EMULATION)
  ::emu::mma_m16n8k8_tf32(d, a, b);
#endif
}

// d = A B (zero accumulator input), m16n8k8, A/B tf32: starts a fresh partial sum.
__device__ __forceinline__ void mma_m16n8k8_tf32_zero(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__)
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %10, %10, %10};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(0.0f));
#elif defined(KFAC_CUDA_EMULATION)
  d[0] = d[1] = d[2] = d[3] = 0.0f;
  ::emu::mma_m16n8k8_tf32(d, a, b);
#endif
}

// cvt.rna.tf32.f32 (PTX ISA, section "cvt"): round to nearest, ties away from zero, to a
// 10-bit mantissa; the result is an fp32 bit pattern with the low 13 bits zero.
__device__ __forceinline__ uint32_t to_tf32(float x) {
#if defined(__CUDA_ARCH__)
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
#elif defined(KFAC_CUDA_EMULATION)
  return ::emu::to_tf32(x);
#else
  return 0u;  // nvcc's host pass only: __device__ code never runs on the host
#endif
}

// The same rounding done on the fp32 bits, (bits + 2^12) & ~(2^13 - 1): two integer
// instructions instead of cvt.rna's longer sequence on sm_90 (its Inf/NaN test included).
// Bit-identical to to_tf32 for every finite x, including the carry into the exponent and x
// within half a tf32 ulp of FLT_MAX rounding to Inf; +-Inf stay +-Inf. NOT safe for NaN: NaNs
// whose payload sits in the low 13 bits become Inf, and the GPU's canonical NaN 0x7fffffff
// (what fp32 arithmetic on a NaN returns) becomes -0.0 (0xffffffff becomes +0.0), so a value
// that may be NaN needs to_tf32 (or a NaN test elsewhere) if the NaN must propagate.
__device__ __forceinline__ uint32_t round_tf32_bits(float x) {
  return (__float_as_uint(x) + 0x1000u) & 0xffffe000u;
}

// The 3xTF32 split x ~= hi + lo (within 2^-22 |x|; x - hi is exact in fp32): hi = to_tf32(x),
// lo = round_tf32_bits(x - hi) (x - hi is finite and tiny for finite x). NaN-safe: a NaN or Inf
// x gives a NaN or Inf hi, so the products stay non-finite.
__device__ __forceinline__ void split_tf32(float x, uint32_t& hi, uint32_t& lo) {
  hi = to_tf32(x);
  lo = round_tf32_bits(x - __uint_as_float(hi));
}

// The same split with both parts rounded on the bits (2 integer instructions each): identical to
// split_tf32 for finite x, +-Inf included; a NaN x may come out finite (see round_tf32_bits).
__device__ __forceinline__ void split_tf32_bits(float x, uint32_t& hi, uint32_t& lo) {
  hi = round_tf32_bits(x);
  lo = round_tf32_bits(x - __uint_as_float(hi));
}

}  // namespace warp
}  // namespace kfac
