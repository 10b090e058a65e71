// CPU emulation shim for <cuda_fp16.h>: storage type and the one conversion the kernels use.
#pragma once
#include <cmath>
#include <cstdint>

struct __half {
    uint16_t bits;
};

inline float __half2float(__half v) {
    const int sign = (v.bits >> 15) & 1;
    const int exponent = (v.bits >> 10) & 0x1f;
    const int mantissa = v.bits & 0x3ff;
    float magnitude;
    if (exponent == 0) {
        magnitude = std::ldexp(static_cast<float>(mantissa), -24);  // subnormal
    } else if (exponent == 31) {
        magnitude = mantissa ? NAN : INFINITY;
    } else {
        magnitude = std::ldexp(static_cast<float>(mantissa + 1024), exponent - 25);
    }
    return sign ? -magnitude : magnitude;
}
