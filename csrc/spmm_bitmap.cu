// Unstructured sparse × dense with the weight in the bitmap format, for small batches (1–2
// images of 197 tokens, where the product is bound by memory and latency):
// out[t, o] = act(Σ_k x[t, k] W[o, k] + bias[o]), fp16/bf16 in and out, fp32 accumulation.
//
// bits (n_out, K/32) int32: bit j of word (o, c) is set when W[o, 32c + j] is kept;
// offsets (n_out, K/32) int32: where that chunk's kept values start in values (nnz,).
//
// A CTA computes BO outputs × 64 tokens over the whole K. It first stages the bitmap words and
// offsets of its rows (one contiguous run each) and the first two x stages with cp.async, then
// decompresses its BO × K weight tile into shared memory in one go: every thread owns 32-column
// chunks (consecutive threads, consecutive chunks of a row), two at a time, and issues their
// value gathers back to back — two dependent rounds of memory latency for the whole tile
// instead of two per k-step. The dense weight exists only in shared memory. Then dense mma.sync m16n8k16 runs over K with x
// streamed through three cp.async stages (64 k each), and the epilogue applies bias and GELU in
// fp32 and transposes outᵀ through shared memory into 16-byte row stores. BO (64, 32 or 16)
// is the largest whose tiles fit 128 KiB (two CTAs per Hopper SM): 64 up to K = 768, 32 up to
// 1600, 16 up to 3200, and 16 beyond as far as the card's shared memory goes (K ≤ 4288 on an
// A100, 6336 on an H100); past that the Triton kernel takes the layer.
// Shared-memory rows are padded by 16 bytes so each ldmatrix phase hits 8 bank groups.

#include "launch.cuh"
#include "mma.cuh"
#include "ovit_kernels.h"

namespace ovit {

namespace {

using namespace dev;

constexpr int kBT = 64;       // tokens per CTA
constexpr int kBK = 64;       // k per x stage
constexpr int kBStages = 3;
constexpr int kBThreads = 256;
constexpr int kXS = kBK + 8;  // x stage row stride, halves
constexpr int kXStage = kBT * kXS;

template <int BO>
struct BitmapTile {
  static constexpr int kWarpsO = BO / 16;           // warps along outputs: 4, 2, 1
  static constexpr int kWarpsT = 8 / kWarpsO;       // along tokens: 2, 4, 8
  static constexpr int kWarpT = kBT / kWarpsT;      // tokens per warp: 32, 16, 8
  static constexpr int kNT = kWarpT / 8;            // n-tiles per warp: 4, 2, 1
};

// [weight tile BO × (K+8) halves][x stages][bits BO × K/32][offsets BO × K/32]
size_t bitmap_smem_bytes(int BO, int K) {
  const size_t pipe = 2 * ((size_t)BO * (K + 8) + (size_t)kBStages * kXStage) + 8 * (size_t)BO * (K / 32);
  const size_t epi = 2 * (size_t)kBT * (BO + 8);
  return pipe > epi ? pipe : epi;
}

template <typename T, int BO>
__global__ void __launch_bounds__(kBThreads)
    spmm_bitmap_kernel(const T* __restrict__ x, const int32_t* __restrict__ bits, const int32_t* __restrict__ offs,
                       const T* __restrict__ vals, const T* __restrict__ bias, T* __restrict__ out, int tokens,
                       int n_out, int K, int gelu_on) {
  using Tile = BitmapTile<BO>;
  OVIT_DYNAMIC_SMEM(smem);
  const int ws = K + 8;  // weight-tile row stride, halves
  T* wt = reinterpret_cast<T*>(smem);
  T* xs = wt + BO * ws;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, c = lane % 4;
  const int wo = (warp / Tile::kWarpsT) * 16;        // warp's first output row in the tile
  const int wtk = (warp % Tile::kWarpsT) * Tile::kWarpT;  // warp's first token in the tile
  const int o0 = blockIdx.x * BO;
  const int t0 = blockIdx.y * kBT;
  const int num_kt = K / kBK;
  const int kc = K / 32;

  // x: 64 tokens × 8 chunks of 8 halves per stage; thread tid moves token tid/8 + 32i, chunk tid%8
  const T* xsrc = x + (int64_t)(t0 + tid / 8) * K + (tid % 8) * 8;
  const int x_rows = tokens - t0 - tid / 8;
  auto load_x = [&](int kt) {
    T* st = xs + (kt % kBStages) * kXStage;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const bool ok = 32 * i < x_rows;
      cp_async16(smem_addr(st + (tid / 8 + 32 * i) * kXS + (tid % 8) * 8),
                 ok ? xsrc + (int64_t)i * 32 * K + kt * kBK : x, ok);
    }
  };
  // bitmap words and offsets of the CTA's rows: one contiguous run of each, staged first
  int32_t* sbits = reinterpret_cast<int32_t*>(xs + kBStages * kXStage);
  int32_t* soffs = sbits + BO * kc;
  {
    const int words = BO * kc;
    const int live = (n_out - o0 < BO ? n_out - o0 : BO) * kc;
    const int32_t* gb = bits + (int64_t)o0 * kc;
    const int32_t* go = offs + (int64_t)o0 * kc;
    for (int i = 4 * tid; i < words; i += 4 * kBThreads) {
      const int n = live - i >= 4 ? 16 : (live - i > 0 ? 4 * (live - i) : 0);
      cp_async_bytes(smem_addr(sbits + i), n ? gb + i : bits, n);
      cp_async_bytes(smem_addr(soffs + i), n ? go + i : offs, n);
    }
    cp_async_commit();
  }
#pragma unroll
  for (int s = 0; s < kBStages - 1; ++s) {
    if (s < num_kt) load_x(s);
    cp_async_commit();
  }
  cp_async_wait<kBStages - 1>();  // the bitmap group (the oldest) has landed
  __syncthreads();

  // the whole BO × K weight tile, decompressed into shared memory, two chunks per thread at a
  // time so that both chunks' value gathers are in flight together
  const uint16_t* v16 = reinterpret_cast<const uint16_t*>(vals);
  for (int e0 = tid; e0 < BO * kc; e0 += 2 * kBThreads) {
    uint32_t w2[2][16];
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int e = e0 + u * kBThreads;
      const uint32_t bm = e < BO * kc ? static_cast<uint32_t>(sbits[e]) : 0u;  // rows past n_out: 0
      const int64_t start = e < BO * kc ? soffs[e] : 0;
#pragma unroll
      for (int j = 0; j < 32; j += 2) {
        const uint32_t lo = (bm >> j) & 1u ? v16[start + __popc(bm & ((1u << j) - 1u))] : 0u;
        const uint32_t hi = (bm >> (j + 1)) & 1u ? v16[start + __popc(bm & ((1u << (j + 1)) - 1u))] : 0u;
        w2[u][j / 2] = lo | (hi << 16);
      }
    }
#pragma unroll
    for (int u = 0; u < 2; ++u) {
      const int e = e0 + u * kBThreads;
      if (e >= BO * kc) continue;
      uint4* dst = reinterpret_cast<uint4*>(wt + (e / kc) * ws + (e % kc) * 32);
#pragma unroll
      for (int q = 0; q < 4; ++q)
        dst[q] = uint4{w2[u][4 * q], w2[u][4 * q + 1], w2[u][4 * q + 2], w2[u][4 * q + 3]};
    }
  }

  float acc[Tile::kNT][4];
#pragma unroll
  for (int j = 0; j < Tile::kNT; ++j)
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[j][r] = 0.f;

  const int a_row = (lane % 8) + ((lane / 8) & 1) * 8;  // matrices: rows 0-7 / 8-15, k 0-7 / 8-15
  const int a_col = (lane / 16) * 8;
  const int b_row = lane % 8;                            // matrices: k 0-7, 8-15 (lanes 0-15)
  const int b_col = ((lane / 8) & 1) * 8;

  for (int kt = 0; kt < num_kt; ++kt) {
    cp_async_wait<kBStages - 2>();
    __syncthreads();  // x stage kt landed; stage kt-1 is free; (kt = 0) the weight tile is complete
    if (kt + kBStages - 1 < num_kt) load_x(kt + kBStages - 1);
    cp_async_commit();
    const T* st = xs + (kt % kBStages) * kXStage;
#pragma unroll
    for (int s = 0; s < kBK / 16; ++s) {
      uint32_t a[4];
      ldmatrix_x4(a, smem_addr(wt + (wo + a_row) * ws + kt * kBK + s * 16 + a_col));
#pragma unroll
      for (int nt = 0; nt < Tile::kNT; ++nt) {
        uint32_t b[2];
        ldmatrix_x2(b, smem_addr(st + (wtk + nt * 8 + b_row) * kXS + s * 16 + b_col));
        Mma<T>::run(acc[nt], a, b);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the tiles become the epilogue tile

  T* tile = reinterpret_cast<T*>(smem);
  constexpr int kOS = BO + 8;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int ol = wo + g + 8 * h;
    const float bv = (bias != nullptr && o0 + ol < n_out) ? to_f(bias[o0 + ol]) : 0.f;
#pragma unroll
    for (int nt = 0; nt < Tile::kNT; ++nt)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        float v = acc[nt][2 * h + j] + bv;
        if (gelu_on) v = gelu(v);
        tile[(wtk + nt * 8 + 2 * c + j) * kOS + ol] = from_f<T>(v);
      }
  }
  __syncthreads();
  const bool vec = (n_out % 8 == 0) && (reinterpret_cast<uintptr_t>(out) % 16 == 0);
  for (int idx = tid; idx < kBT * (BO / 8); idx += kBThreads) {
    const int tl = idx / (BO / 8), ch = idx % (BO / 8);
    const int t = t0 + tl, o = o0 + ch * 8;
    if (t >= tokens || o >= n_out) continue;
    const T* src = tile + tl * kOS + ch * 8;
    T* dst = out + (int64_t)t * n_out + o;
    if (vec) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    } else {
      for (int j = 0; j < 8 && o + j < n_out; ++j) dst[j] = src[j];
    }
  }
}

template <typename T, int BO>
cudaError_t launch_bo(const void* x, const int32_t* bits, const int32_t* offs, const void* vals, const void* bias,
                      void* out, int tokens, int n_out, int K, int gelu_on, cudaStream_t stream) {
  const size_t smem = bitmap_smem_bytes(BO, K);
  cudaError_t err = set_dynamic_smem<spmm_bitmap_kernel<T, BO>>(smem);
  if (err != cudaSuccess) return err;
  dim3 grid((n_out + BO - 1) / BO, (tokens + kBT - 1) / kBT);
  OVIT_LAUNCH(grid, kBThreads, smem, stream, spmm_bitmap_kernel<T, BO>)(
      static_cast<const T*>(x), bits, offs, static_cast<const T*>(vals), static_cast<const T*>(bias),
      static_cast<T*>(out), tokens, n_out, K, gelu_on);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_typed(int bo, const void* x, const int32_t* bits, const int32_t* offs, const void* vals,
                         const void* bias, void* out, int tokens, int n_out, int K, int gelu_on, cudaStream_t stream) {
  switch (bo) {
    case 64: return launch_bo<T, 64>(x, bits, offs, vals, bias, out, tokens, n_out, K, gelu_on, stream);
    case 32: return launch_bo<T, 32>(x, bits, offs, vals, bias, out, tokens, n_out, K, gelu_on, stream);
    case 16: return launch_bo<T, 16>(x, bits, offs, vals, bias, out, tokens, n_out, K, gelu_on, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

int spmm_bitmap_tile(int K) {
  if (K <= 0 || K % kBK != 0) return 0;
  constexpr int kDevices = 64;
  static std::atomic<int> smem_of[kDevices] = {};  // the opt-in limit per device, queried once
  int dev = 0, max_smem = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 0;
  if (dev >= 0 && dev < kDevices) max_smem = smem_of[dev].load(std::memory_order_relaxed);
  if (max_smem == 0) {
    if (cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) return 0;
    if (dev >= 0 && dev < kDevices) smem_of[dev].store(max_smem, std::memory_order_relaxed);
  }
  const size_t prefer = 128 * 1024;  // leaves room for a second CTA per SM on Hopper
  for (int bo : {64, 32, 16})
    if (bitmap_smem_bytes(bo, K) <= prefer && bitmap_smem_bytes(bo, K) <= (size_t)max_smem) return bo;
  return bitmap_smem_bytes(16, K) <= (size_t)max_smem ? 16 : 0;
}

cudaError_t launch_spmm_bitmap(const void* x, const int32_t* bits, const int32_t* offsets, const void* vals,
                               const void* bias, void* out, int tokens, int n_out, int K, int gelu_on, int bf16,
                               cudaStream_t stream) {
  if (tokens < 0 || n_out < 0) return cudaErrorInvalidValue;
  const int bo = spmm_bitmap_tile(K);
  if (bo == 0) return cudaErrorInvalidValue;
  if (tokens == 0 || n_out == 0) return cudaSuccess;
  auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  if (!aligned(x) || !aligned(bits) || !aligned(offsets)) return cudaErrorInvalidValue;
  return bf16 ? launch_typed<__nv_bfloat16>(bo, x, bits, offsets, vals, bias, out, tokens, n_out, K, gelu_on, stream)
              : launch_typed<__half>(bo, x, bits, offsets, vals, bias, out, tokens, n_out, K, gelu_on, stream);
}

}  // namespace ovit
