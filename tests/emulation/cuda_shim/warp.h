// Warp collectives of the CPU emulation (tests only), the counterparts of csrc/warp_mma.cuh.
//
// A warp is 32 emulated lanes (host threads 32w..32w+31 of the block). A collective is a
// rendezvous: every lane deposits its operand registers, all wait, each computes ITS OWN
// result registers from the gathered ones with the per-lane fragment layout of the PTX ISA
// (9.0, chapter "Warp Level Matrix Multiply-Accumulate Instructions"), all wait again. So a
// kernel that indexes a fragment wrongly, or reaches a collective with fewer than 32 lanes
// (divergence: an abort after a timeout), fails here as it would on the GPU.
//
// Layouts (g = lane / 4, t = lane % 4):
//   ldmatrix .m8n8 .x4 .trans .b16 (section "ldmatrix"): lanes 8j..8j+7 supply the row
//     addresses of matrix j (16-byte aligned, checked); register j = (M_j[2t][g], M_j[2t+1][g]).
//   mma.m16n8k16 .f16/.bf16 (section "Matrix Fragments for mma.m16n8k16 with floating point
//     type"): a_i (i = 0..7, two per register, lower index in the lower half) at row
//     g + 8*((i/2) & 1), col 2t + (i & 1) + 8*(i >= 4); b_i (i = 0..3) at row 2t + (i & 1) +
//     8*(i >= 2), col g; c_i / d_i at row g + 8*(i >= 2), col 2t + (i & 1).
//   mma.m16n8k8 .tf32 (section "Matrix Fragments for mma.m16n8k8"): a_i at row g + 8*(i & 1),
//     col t + 4*(i >= 2); b_i at row t + 4*i, col g; c/d as above.
//
// Rounding model of the tensor-core accumulation (stated, not proven; after Fasi, Higham,
// Mikaitis, Pranesh, "Numerical behavior of NVIDIA tensor cores", PeerJ CS 2021): the
// products are exact; the K products and c are aligned to the largest magnitude among them
// and truncated toward zero below 2^(e_max - 26) (3 guard bits past fp32's 24), summed
// exactly, and the sum is rounded toward zero to fp32. Per mma this errs by at most
// (K + 2) 2^-26 * sum|terms| + 2^-23 |d|, i.e. below 2^-22 sum|terms| for K <= 16: the bound
// the tests' tolerances are derived from (tests/test_kernel_emulation.py).
#pragma once

#include <array>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <mutex>

#include "cuda_fp16.h"

namespace emu {

// A barrier that aborts (instead of hanging) when not every lane arrives.
class LaneBarrier {
  public:
    explicit LaneBarrier(unsigned count) : count_(count) {}
    void arrive_and_wait(const char* what) {
        std::unique_lock<std::mutex> lock(mutex_);
        const unsigned long long generation = generation_;
        if (++waiting_ == count_) {
            waiting_ = 0;
            ++generation_;
            cv_.notify_all();
            return;
        }
        if (!cv_.wait_for(lock, std::chrono::seconds(60), [&] { return generation_ != generation; })) {
            std::fprintf(stderr, "emulation: %s was not reached by all 32 lanes of a warp\n", what);
            std::abort();
        }
    }

  private:
    std::mutex mutex_;
    std::condition_variable cv_;
    unsigned count_;
    unsigned waiting_ = 0;
    unsigned long long generation_ = 0;
};

struct WarpState {
    LaneBarrier barrier{32};
    alignas(16) unsigned char slots[32][64];
};

inline std::vector<std::unique_ptr<WarpState>> make_warps(unsigned threads) {
    std::vector<std::unique_ptr<WarpState>> warps;
    for (unsigned w = 0; w < (threads + 31) / 32; ++w) warps.push_back(std::make_unique<WarpState>());
    return warps;
}

inline unsigned lane_id() { return thread_rank % 32; }

// Every lane passes `mine`; returns all 32 lanes' values (index = lane).
template <class T>
std::array<T, 32> warp_gather(const T& mine, const char* what) {
    static_assert(sizeof(T) <= 64, "warp slot size");
    if (block_dim.x * block_dim.y * block_dim.z % 32 != 0) {
        std::fprintf(stderr, "emulation: %s in a block whose size is not a multiple of 32\n", what);
        std::abort();
    }
    WarpState& warp = *(*block_warps)[thread_rank / 32];
    std::memcpy(warp.slots[lane_id()], &mine, sizeof(T));
    warp.barrier.arrive_and_wait(what);
    std::array<T, 32> all;
    for (int l = 0; l < 32; ++l) std::memcpy(&all[l], warp.slots[l], sizeof(T));
    warp.barrier.arrive_and_wait(what);  // nobody overwrites a slot before everyone has read it
    return all;
}

inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row_ptr) {
    if (reinterpret_cast<uintptr_t>(row_ptr) % 16 != 0) {
        std::fprintf(stderr, "emulation: ldmatrix row address %p is not 16-byte aligned\n", row_ptr);
        std::abort();
    }
    const auto rows = warp_gather(row_ptr, "ldmatrix");
    const unsigned g = lane_id() / 4, t = lane_id() % 4;
    for (int j = 0; j < 4; ++j) {
        const uint16_t lo = static_cast<const uint16_t*>(rows[8 * j + 2 * t])[g];
        const uint16_t hi = static_cast<const uint16_t*>(rows[8 * j + 2 * t + 1])[g];
        r[j] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
}

inline float bits_to_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline float half_bits_to_float(uint16_t bits, bool bf16) {
    return bf16 ? bits_to_float(static_cast<uint32_t>(bits) << 16) : __half2float(__half{bits});
}

// The accumulation model above: d = RZ(c + sum_k products) with the terms truncated below
// 2^(e_max - 26).
inline float tensor_core_sum(float c, const double* products, int count) {
    double largest = std::fabs(static_cast<double>(c));
    for (int k = 0; k < count; ++k) largest = std::max(largest, std::fabs(products[k]));
    if (largest == 0.0 || !std::isfinite(largest)) {
        double s = c;
        for (int k = 0; k < count; ++k) s += products[k];
        return static_cast<float>(s);
    }
    const double quantum = std::ldexp(1.0, std::ilogb(largest) - 26);
    double sum = std::trunc(static_cast<double>(c) / quantum) * quantum;  // exact: < 2^32 quanta in all
    for (int k = 0; k < count; ++k) sum += std::trunc(products[k] / quantum) * quantum;
    float rounded = static_cast<float>(sum);
    if (std::fabs(static_cast<double>(rounded)) > std::fabs(sum)) rounded = std::nextafter(rounded, 0.f);  // RZ
    return rounded;
}

struct Operands {
    uint32_t a[4];
    uint32_t b[2];
};

inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], bool bf16) {
    const auto all = warp_gather(Operands{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}}, "mma.sync.m16n8k16");
    float A[16][16], B[16][8];
    for (unsigned l = 0; l < 32; ++l) {
        const unsigned g = l / 4, t = l % 4;
        for (int i = 0; i < 8; ++i) {
            const uint16_t bits = static_cast<uint16_t>(all[l].a[i / 2] >> (16 * (i & 1)));
            A[g + 8 * ((i / 2) & 1)][2 * t + (i & 1) + 8 * (i >= 4)] = half_bits_to_float(bits, bf16);
        }
        for (int i = 0; i < 4; ++i) {
            const uint16_t bits = static_cast<uint16_t>(all[l].b[i / 2] >> (16 * (i & 1)));
            B[2 * t + (i & 1) + 8 * (i >= 2)][g] = half_bits_to_float(bits, bf16);
        }
    }
    const unsigned g = lane_id() / 4, t = lane_id() % 4;
    for (int i = 0; i < 4; ++i) {
        const unsigned row = g + 8 * (i >= 2), col = 2 * t + (i & 1);
        double products[16];
        for (int k = 0; k < 16; ++k) products[k] = static_cast<double>(A[row][k]) * B[k][col];
        d[i] = tensor_core_sum(d[i], products, 16);
    }
}

inline void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    const auto all = warp_gather(Operands{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}}, "mma.sync.m16n8k8.tf32");
    float A[16][8], B[8][8];
    for (unsigned l = 0; l < 32; ++l) {
        const unsigned g = l / 4, t = l % 4;
        for (int i = 0; i < 4; ++i) {
            if (all[l].a[i] & 0x1fffu) {
                std::fprintf(stderr, "emulation: mma.tf32 operand is not a tf32 value (low mantissa bits set)\n");
                std::abort();
            }
            A[g + 8 * (i & 1)][t + 4 * (i >= 2)] = bits_to_float(all[l].a[i]);
        }
        for (int i = 0; i < 2; ++i) {
            if (all[l].b[i] & 0x1fffu) {
                std::fprintf(stderr, "emulation: mma.tf32 operand is not a tf32 value (low mantissa bits set)\n");
                std::abort();
            }
            B[t + 4 * i][g] = bits_to_float(all[l].b[i]);
        }
    }
    const unsigned g = lane_id() / 4, t = lane_id() % 4;
    for (int i = 0; i < 4; ++i) {
        const unsigned row = g + 8 * (i >= 2), col = 2 * t + (i & 1);
        double products[8];
        for (int k = 0; k < 8; ++k) products[k] = static_cast<double>(A[row][k]) * B[k][col];
        d[i] = tensor_core_sum(d[i], products, 8);
    }
}

}  // namespace emu

inline float __uint_as_float(uint32_t u) { return emu::bits_to_float(u); }
inline uint32_t __float_as_uint(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

namespace emu {

// cvt.rna.tf32.f32: nearest, ties away from zero, 10 mantissa bits kept.
inline uint32_t to_tf32(float x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    if ((u & 0x7f800000u) == 0x7f800000u) return u;  // Inf / NaN unchanged
    const uint32_t sign = u & 0x80000000u;
    const uint32_t magnitude = ((u & 0x7fffffffu) + 0x1000u) & ~0x1fffu;
    return sign | magnitude;
}

}  // namespace emu
