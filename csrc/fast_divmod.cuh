// Division by a run-time invariant divisor with a multiply-high and a shift (Granlund and
// Montgomery, "Division by invariant integers using multiplication", PLDI 1994, section 4,
// the round-up variant): for 1 <= d < 2^31 let l = ceil(log2 d) and
// m = floor(2^32 (2^l - d) / d) + 1 (< 2^32); then for 0 <= n < 2^31
//     n / d = (umulhi(m, n) + n) >> l
// (the sum stays below 2^32 because umulhi(m, n) <= n). The magic numbers are computed once
// on the host and passed to kernels by value; the device pays one IMAD.HI, one IADD and one
// shift instead of the ~20-instruction integer-division sequence.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace kfac {

struct FastDivmod {
  uint32_t divisor = 1;
  uint32_t multiplier = 1;
  uint32_t shift = 0;

  // Host: the magic numbers of `d` (1 <= d < 2^31).
  static FastDivmod make(int d) {
    FastDivmod f;
    f.divisor = static_cast<uint32_t>(d);
    uint32_t l = 0;
    while ((uint64_t(1) << l) < f.divisor) ++l;
    f.shift = l;
    f.multiplier = static_cast<uint32_t>(((uint64_t(1) << 32) * ((uint64_t(1) << l) - f.divisor)) / f.divisor + 1);
    return f;
  }

  // q = n / divisor and r = n - q * divisor, for 0 <= n < 2^31.
  __host__ __device__ __forceinline__ void divmod(int n, int& q, int& r) const {
    const uint32_t un = static_cast<uint32_t>(n);
#if defined(__CUDA_ARCH__)
    const uint32_t hi = __umulhi(multiplier, un);
#else
    const uint32_t hi = static_cast<uint32_t>((uint64_t(multiplier) * un) >> 32);
#endif
    q = static_cast<int>((hi + un) >> shift);
    r = n - q * static_cast<int>(divisor);
  }
};

}  // namespace kfac
