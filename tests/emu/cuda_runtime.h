// A SIMT emulator of the small part of CUDA the Fisher/OBS kernels use, so that their sources
// (csrc/woodbury.cu, obs.cu, packed.cu) compile as host C++ and run on a CPU in the tests.
//
// Every CUDA thread of a block is an OS thread; blocks run one after another. __syncthreads
// is a barrier over the block, warp shuffles exchange through a per-warp buffer between two
// warp barriers, static __shared__ arrays are function-local statics (one copy, shared by the
// threads of the running block) and dynamic shared memory is a per-block buffer filled with
// 0xFF bytes (NaN) before the block starts. Threads really run concurrently, so a missing
// barrier shows up as a wrong result (or as a ThreadSanitizer report when built with
// -fsanitize=thread). The few PTX instructions of the 2:4 kernels have emulated versions here
// (the sources call them under OVIT_EMU instead of their inline assembly): mma.sp m16n8k32
// with ordered metadata (selector 0), ldmatrix .x4, and cp.async, whose copies are held per
// thread and done only at cp.async.wait_group — the latest a card may do them, so a read of a
// stage before its wait sees the poison. Not emulated: streams, timing. Found first on the
// include path ahead of the real header, it replaces it.
#pragma once

#define OVIT_EMU 1

#include <array>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
using cudaStream_t = struct CUstream_st*;

namespace emu {

struct Block {
  explicit Block(unsigned threads, size_t smem)
      : bar(threads), dyn_smem(smem + 16, 0xFF), xchg((threads + 31) / 32) {
    if (reinterpret_cast<uintptr_t>(dyn_smem.data()) % 16 != 0) std::abort();  // as a card's 16-byte alignment
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
  struct MmaFragments {
    uint32_t a[32][4], b[32][4], e[32];
  };
  std::vector<MmaFragments> mma = std::vector<MmaFragments>(xchg.size());
};

struct Copy {
  unsigned char* dst;
  const void* src;
  int bytes, src_bytes;
};

struct Ctx {
  uint3 tid{0, 0, 0}, bid{0, 0, 0};
  dim3 bdim, gdim;
  Block* blk = nullptr;
  std::vector<Copy> open_group;             // cp.async issued since the last commit
  std::deque<std::vector<Copy>> committed;  // committed groups, oldest first
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
            ctx.open_group.clear();
            ctx.committed.clear();
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

inline int __popc(unsigned v) { return __builtin_popcount(v); }

inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

template <class F>
inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) {
  return cudaSuccess;
}

enum cudaDeviceAttr { cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) {
  *v = 227 * 1024;  // as an H100
  return cudaSuccess;
}

inline cudaError_t cudaGetLastError() {
  return ::emu::launch_error().exchange(0) ? cudaErrorInvalidValue : cudaSuccess;
}

// ---- shared-memory addresses and the PTX instructions of the 2:4 kernels -------------------

// A "shared address" is the offset into the block's dynamic shared memory.
inline uint32_t __cvta_generic_to_shared(const void* p) {
  return static_cast<uint32_t>(static_cast<const unsigned char*>(p) - ::emu::ctx.blk->dyn_smem.data());
}

namespace emu {

inline unsigned char* smem_at(uint32_t addr) { return ctx.blk->dyn_smem.data() + addr; }

// What a card would fault on (misaligned shared or global addresses of these instructions) is
// reported on stderr and makes the launch return an error; the emulation itself goes on.
inline void fault(const char* what, uintptr_t addr) {
  std::fprintf(stderr, "emulated CUDA fault: %s at address %#zx\n", what, static_cast<size_t>(addr));
  launch_error() = 2;
}
inline void check_aligned(const char* what, uintptr_t addr, unsigned n) {
  if (addr % n != 0) fault(what, addr);
}

inline void cp_async(uint32_t dst, const void* src, int bytes, int src_bytes) {
  check_aligned("cp.async shared destination", dst, bytes);
  check_aligned("cp.async global source", reinterpret_cast<uintptr_t>(src), bytes);
  ctx.open_group.push_back(Copy{smem_at(dst), src, bytes, src_bytes});
}

inline void cp_async_commit() {
  ctx.committed.push_back(std::move(ctx.open_group));
  ctx.open_group.clear();
}

inline void cp_async_wait(int newest_pending) {
  while (static_cast<int>(ctx.committed.size()) > newest_pending) {
    for (const Copy& c : ctx.committed.front()) {
      std::memset(c.dst, 0, c.bytes);
      if (c.src_bytes > 0) std::memcpy(c.dst, c.src, c.src_bytes);
    }
    ctx.committed.pop_front();
  }
}

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lane t gives the row address of matrix t / 8, row
// t % 8; lane t receives, of every matrix j, the 32 bits at row t / 4, halves 2(t % 4), +1.
inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  check_aligned("ldmatrix row address", addr, 16);
  Block* b = ctx.blk;
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  b->xchg[warp][lane] = addr;
  b->warp_bars[warp]->arrive_and_wait();
  for (int j = 0; j < 4; ++j) {
    const uint32_t row = static_cast<uint32_t>(b->xchg[warp][8 * j + lane / 4]);
    std::memcpy(&r[j], smem_at(row) + 4 * (lane % 4), 4);
  }
  b->warp_bars[warp]->arrive_and_wait();
}

// ldmatrix .x2: lanes 0-15 give the row addresses of matrices 0 and 1.
inline void ldmatrix_x2(uint32_t (&r)[2], uint32_t addr) {
  if (threadIdx.x % 32 < 16) check_aligned("ldmatrix row address", addr, 16);
  Block* b = ctx.blk;
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  b->xchg[warp][lane] = addr;
  b->warp_bars[warp]->arrive_and_wait();
  for (int j = 0; j < 2; ++j) {
    const uint32_t row = static_cast<uint32_t>(b->xchg[warp][8 * j + lane / 4]);
    std::memcpy(&r[j], smem_at(row) + 4 * (lane % 4), 4);
  }
  b->warp_bars[warp]->arrive_and_wait();
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: D (16 × 8) += A (16 × 16) · B (16 × 8).
// Lane (g, c) holds A halves (g, 2c..), (g+8, 2c..), (g, 2c+8..), (g+8, 2c+8..), B halves
// k = 2c (+1) and 2c + 8 (+1) of column g, and D (g, 2c..2c+1), (g+8, 2c..2c+1).
template <class ToFloat>
void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&bf)[2], ToFloat to_float) {
  Block* b = ctx.blk;
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  auto& f = b->mma[warp];
  for (int i = 0; i < 4; ++i) f.a[lane][i] = a[i];
  f.b[lane][0] = bf[0];
  f.b[lane][1] = bf[1];
  b->warp_bars[warp]->arrive_and_wait();
  auto half_of = [&](uint32_t word, int which) { return to_float(static_cast<uint16_t>(word >> (16 * which))); };
  auto a_val = [&](int row, int k) {
    const int g = row % 8, reg = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0), kk = k % 8;
    return half_of(f.a[4 * g + kk / 2][reg], kk % 2);
  };
  auto b_val = [&](int k, int n) { return half_of(f.b[4 * n + (k % 8) / 2][k / 8], k % 2); };
  const int g = lane / 4, c = lane % 4;
  for (int q = 0; q < 4; ++q) {
    const int row = g + (q >= 2 ? 8 : 0), col = 2 * c + (q % 2);
    float acc = d[q];
    for (int k = 0; k < 16; ++k) acc += a_val(row, k) * b_val(k, col);
    d[q] = acc;
  }
  b->warp_bars[warp]->arrive_and_wait();
}

// mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.{f16,bf16}, sparsity selector 0:
// D (16 × 8) += A (16 × 32, 2:4, given as 16 × 16 kept values + 2-bit positions) · B (32 × 8).
// Lane (g, c) = (lane / 4, lane % 4) holds A halves (g, 2c..), (g+8, 2c..), (g, 2c+8..),
// (g+8, 2c+8..); B halves k = 2c + 8i (+1) of column g; D (g, 2c..2c+1), (g+8, 2c..2c+1).
// Lanes 4g and 4g+1 hold the metadata of rows g (low 16 bits) and g+8 (high 16 bits), for
// kept values 0-7 and 8-15 of the row, two bits each, lowest first.
template <class T, class ToFloat>
void mma_sp_16832(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&bf)[4], uint32_t e, ToFloat to_float) {
  Block* b = ctx.blk;
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  auto& f = b->mma[warp];
  for (int i = 0; i < 4; ++i) {
    f.a[lane][i] = a[i];
    f.b[lane][i] = bf[i];
  }
  f.e[lane] = e;
  b->warp_bars[warp]->arrive_and_wait();
  auto half_of = [&](uint32_t word, int which) { return to_float(static_cast<uint16_t>(word >> (16 * which))); };
  auto a_val = [&](int row, int j) {  // kept value j (0..15) of row (0..15)
    const int g = row % 8, reg = (row >= 8 ? 1 : 0) + (j >= 8 ? 2 : 0), jj = j % 8;
    return half_of(f.a[4 * g + jj / 2][reg], jj % 2);
  };
  auto a_pos = [&](int row, int j) {
    const uint32_t word = f.e[4 * (row % 8) + j / 8] >> (row >= 8 ? 16 : 0);
    return static_cast<int>((word >> (2 * (j % 8))) & 3u);
  };
  auto b_val = [&](int k, int n) {  // B[k][n]
    const int c = (k % 8) / 2, i = k / 8;
    return half_of(f.b[4 * n + c][i], k % 2);
  };
  const int g = lane / 4, c = lane % 4;
  for (int q = 0; q < 4; ++q) {
    const int row = g + (q >= 2 ? 8 : 0), col = 2 * c + (q % 2);
    float acc = d[q];
    for (int j = 0; j < 16; ++j) acc += a_val(row, j) * b_val(4 * (j / 2) + a_pos(row, j), col);
    d[q] = acc;
  }
  b->warp_bars[warp]->arrive_and_wait();
}

}  // namespace emu
