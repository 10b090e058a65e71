// CPU emulation shim standing in for <cuda_runtime.h> (tests only; see tests/emulation/build.py).
// Runs each kernel launch on the host: the blocks one after another, the threads of a block as
// real std::threads, __syncthreads as a std::barrier, __shared__ variables as function statics
// (one per kernel instantiation, shared by the block's threads; blocks never overlap).
// Warps: threads 32w..32w+31 of a block form warp w; the warp collectives of warp.h
// (ldmatrix, mma.sync, tf32 conversion) exchange registers between its 32 lanes.
#pragma once

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <thread>
#include <vector>

#define KFAC_CUDA_EMULATION 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct alignas(16) float4 {
    float x, y, z, w;
};
using std::max;
using std::min;
inline void __trap() { std::abort(); }

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
using cudaStream_t = void*;

namespace emu {
struct WarpState;
inline dim3 grid_dim, block_dim, block_idx;
inline thread_local dim3 thread_idx;
inline thread_local unsigned thread_rank;  // linear index of the thread in its block
inline std::vector<std::unique_ptr<WarpState>>* block_warps = nullptr;
inline std::vector<std::unique_ptr<WarpState>> make_warps(unsigned threads);  // defined in warp.h
inline std::barrier<>* block_barrier = nullptr;
inline int launches = 0;

template <class Body>
void launch(dim3 grid, dim3 block, std::size_t /*smem*/, cudaStream_t /*stream*/, Body body) {
    ++launches;
    const unsigned threads = block.x * block.y * block.z;
    grid_dim = grid;
    block_dim = block;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                block_idx = dim3(x, y, z);
                std::barrier<> bar(threads);
                block_barrier = &bar;
                auto warps = make_warps(threads);
                block_warps = &warps;
                std::vector<std::thread> pool;
                pool.reserve(threads);
                for (unsigned t = 0; t < threads; ++t)
                    pool.emplace_back([&body, &block, t] {
                        thread_idx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
                        thread_rank = t;
                        body();
                    });
                for (auto& th : pool) th.join();
            }
}
}  // namespace emu

#define gridDim (::emu::grid_dim)
#define blockDim (::emu::block_dim)
#define blockIdx (::emu::block_idx)
#define threadIdx (::emu::thread_idx)

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

#include "warp.h"
