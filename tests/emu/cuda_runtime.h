// A SIMT emulator of the small part of CUDA the Fisher/OBS kernels use, so that their sources
// (csrc/woodbury.cu, obs.cu, packed.cu) compile as host C++ and run on a CPU in the tests.
//
// Every CUDA thread of a block is an OS thread; blocks run one after another. __syncthreads
// is a barrier over the block, warp shuffles exchange through a per-warp buffer between two
// warp barriers, static __shared__ arrays are function-local statics (one copy, shared by the
// threads of the running block) and dynamic shared memory is a per-block buffer filled with
// 0xFF bytes (NaN) before the block starts. Threads really run concurrently, so a missing
// barrier shows up as a wrong result (or as a ThreadSanitizer report when built with
// -fsanitize=thread). Not emulated: inline PTX (the sparse tensor-core kernels), streams,
// timing. Found first on the include path ahead of the real header, it replaces it.
#pragma once

#include <array>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
using cudaStream_t = struct CUstream_st*;

namespace emu {

struct Block {
  explicit Block(unsigned threads, size_t smem)
      : bar(threads), dyn_smem(smem + 16, 0xFF), xchg((threads + 31) / 32) {
    for (unsigned w = 0; w < (threads + 31) / 32; ++w) {
      unsigned n = threads - 32 * w < 32 ? threads - 32 * w : 32;
      warp_bars.emplace_back(std::make_unique<std::barrier<>>(n));
    }
  }
  std::barrier<> bar;
  std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
  std::vector<unsigned char> dyn_smem;
  std::vector<std::array<uint64_t, 32>> xchg;
  std::atomic<int> all{1};
};

struct Ctx {
  uint3 tid{0, 0, 0}, bid{0, 0, 0};
  dim3 bdim, gdim;
  Block* blk = nullptr;
};
inline thread_local Ctx ctx;

inline std::atomic<int>& launch_error() {
  static std::atomic<int> e{0};
  return e;
}

template <class... P>
struct Launcher {
  dim3 grid, block;
  size_t smem;
  void (*fn)(P...);
  template <class... A>
  void operator()(A&&... args) const {
    const unsigned threads = block.x * block.y * block.z;
    if (threads == 0 || threads > 1024 || smem > 227 * 1024) {
      launch_error() = 1;
      return;
    }
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block blk(threads, smem);
        std::vector<std::thread> ts;
        ts.reserve(threads);
        for (unsigned t = 0; t < threads; ++t)
          ts.emplace_back([&, t] {
            ctx.tid = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
            ctx.bid = {bx, by, 0};
            ctx.bdim = block;
            ctx.gdim = grid;
            ctx.blk = &blk;
            fn(args...);
          });
        for (auto& th : ts) th.join();
      }
  }
};

template <class... P>
Launcher<P...> launcher(dim3 grid, dim3 block, size_t smem, void (*fn)(P...)) {
  return Launcher<P...>{grid, block, smem, fn};
}

}  // namespace emu

#define OVIT_LAUNCH(grid, block, smem, stream, ...) ::emu::launcher(grid, block, smem, &__VA_ARGS__)
#define OVIT_DYNAMIC_SMEM(name) unsigned char* name = ::emu::ctx.blk->dyn_smem.data()

#define threadIdx (::emu::ctx.tid)
#define blockIdx (::emu::ctx.bid)
#define blockDim (::emu::ctx.bdim)
#define gridDim (::emu::ctx.gdim)

inline void __syncthreads() { ::emu::ctx.blk->bar.arrive_and_wait(); }

inline int __syncthreads_and(int p) {
  ::emu::Block* b = ::emu::ctx.blk;
  b->bar.arrive_and_wait();  // every earlier reader of the flag is done
  if (threadIdx.x == 0) b->all = 1;
  b->bar.arrive_and_wait();
  if (!p) b->all = 0;
  b->bar.arrive_and_wait();
  return b->all.load();
}

template <class T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask, int = 32) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  ::emu::Block* b = ::emu::ctx.blk;
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  b->xchg[warp][lane] = bits;
  b->warp_bars[warp]->arrive_and_wait();
  const uint64_t other = b->xchg[warp][lane ^ static_cast<unsigned>(lane_mask)];
  b->warp_bars[warp]->arrive_and_wait();
  T r;
  std::memcpy(&r, &other, sizeof(T));
  return r;
}

inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

template <class F>
inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) {
  return cudaSuccess;
}

inline cudaError_t cudaGetLastError() {
  return ::emu::launch_error().exchange(0) ? cudaErrorInvalidValue : cudaSuccess;
}
