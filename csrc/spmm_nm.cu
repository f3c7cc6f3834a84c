// 2:4 sparse × dense on sparse tensor cores (mma.sp::ordered_metadata m16n8k32, sm_80+;
// runs on sm_90 too; the packing keeps the two positions of every group ascending):
// out[t, o] = act(Σ_k x[t, k] W[o, k] + bias[o]) with W 2:4-compressed.
//
// The sparse operand of mma.sp is the left one, so each warp computes a 16 (outputs) × 8
// (tokens) tile of outᵀ = W · xᵀ per instruction. Accumulation in fp32; bias and GELU fused.
// Two kernels use it:
//
// * simple (in_features % 32 == 0, small token counts): a CTA holds 128 outputs (8 warps ×
//   16) × 64 tokens (8 n-tiles per warp); the x tile (64 tokens × 32 k) is staged in shared
//   memory per k-step and shared by the 8 warps; W values and metadata are read straight from
//   global memory in the fragment layout. No pipelining.
// * pipelined (in_features % 64 == 0, the fast path): a 128 outputs × 128 tokens CTA tile,
//   64 logical k per stage, three cp.async stages of W values, metadata and x in shared
//   memory (rows padded by 16 bytes so every ldmatrix phase hits eight distinct bank groups),
//   fragments loaded with ldmatrix.x4, eight warps of 64 outputs × 32 tokens (16 mma.sp per
//   32 k), and an epilogue that applies bias and GELU in fp32 and transposes outᵀ through
//   shared memory into 16-byte row stores. A wide instance has 256-token tiles (64 × 64 warp
//   tiles, 32 mma.sp per 12 ldmatrix, 234 registers, one CTA per SM).
//
// Operand layouts (PTX ISA, "sparse mma metadata 16832 f16/bf16"): the compressed A tile is
// 16 × 16 halves, thread (g = lane/4, c = lane%4) holds halves (g, 2c..2c+1), (g+8, 2c..),
// (g, 2c+8..), (g+8, 2c+8..); B (32 × 8, column-major = x rows) holds k = 2c + {0,8,16,24}
// (+1) of token g; D holds rows g and g+8, columns 2c, 2c+1. Metadata: 2-bit positions,
// 8 per 16-bit half word, lowest bits first; with selector 0 lanes 0 and 1 of each quad
// supply rows g (low 16 bits) and g+8 (high 16 bits), half word (lane & 1) of the k-step.

#include "launch.cuh"
#include "mma.cuh"
#include "ovit_kernels.h"

namespace ovit {

namespace {

using namespace dev;

constexpr int kWarpsM = 8;          // warps per CTA, each 16 output rows
constexpr int kTileO = 16 * kWarpsM;  // 128 outputs per CTA
constexpr int kTileT = 64;          // tokens per CTA (8 n-tiles of 8)
constexpr int kNT = kTileT / 8;
constexpr int kStepK = 32;          // logical k per mma

// 32-bit load of two consecutive halves, zero outside [0, limit) rows.
__device__ __forceinline__ uint32_t ld32(const void* base, int64_t idx_halves, bool ok) {
  return ok ? *reinterpret_cast<const uint32_t*>(static_cast<const uint16_t*>(base) + idx_halves) : 0u;
}

template <typename T>
__global__ void __launch_bounds__(32 * kWarpsM)
    spmm24_kernel(const T* __restrict__ x, const T* __restrict__ vals, const uint16_t* __restrict__ meta,
                  const T* __restrict__ bias, T* __restrict__ out, int tokens, int n_out, int K, int gelu_on) {
  __shared__ __align__(16) uint16_t xs[kTileT][kStepK + 8];  // +8 halves of padding against bank conflicts
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, c = lane % 4;
  const int o0 = blockIdx.x * kTileO + warp * 16;
  const int t0 = blockIdx.y * kTileT;
  const int kc = K / 2;         // compressed values per row
  const int kmeta = K / 16;     // 16-bit metadata words per row
  const bool row_lo = o0 + g < n_out, row_hi = o0 + g + 8 < n_out;

  float acc[kNT][4];
#pragma unroll
  for (int j = 0; j < kNT; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[j][i] = 0.f;

  for (int k0 = 0; k0 < K; k0 += kStepK) {
    // stage x[t0 .. t0+64, k0 .. k0+32) in shared memory (each thread moves 32-bit pairs)
    for (int idx = threadIdx.x; idx < kTileT * (kStepK / 2); idx += blockDim.x) {
      const int t = idx / (kStepK / 2), kk = (idx % (kStepK / 2)) * 2;
      const bool ok = t0 + t < tokens;
      *reinterpret_cast<uint32_t*>(&xs[t][kk]) = ld32(x, (int64_t)(t0 + t) * K + k0 + kk, ok);
    }
    __syncthreads();
    // A fragment: compressed columns k0/2 .. k0/2 + 16
    const int cb = k0 / 2;
    uint32_t a[4];
    a[0] = ld32(vals, (int64_t)(o0 + g) * kc + cb + 2 * c, row_lo);
    a[1] = ld32(vals, (int64_t)(o0 + g + 8) * kc + cb + 2 * c, row_hi);
    a[2] = ld32(vals, (int64_t)(o0 + g) * kc + cb + 2 * c + 8, row_lo);
    a[3] = ld32(vals, (int64_t)(o0 + g + 8) * kc + cb + 2 * c + 8, row_hi);
    // metadata (lanes 0/1 of each quad matter; every lane loads for uniformity)
    const int half = lane & 1;
    const int mw = k0 / 16 + half;
    const uint32_t lo = row_lo ? meta[(int64_t)(o0 + g) * kmeta + mw] : 0x4444u;   // (0, 1) in every group
    const uint32_t hi = row_hi ? meta[(int64_t)(o0 + g + 8) * kmeta + mw] : 0x4444u;
    const uint32_t e = (lo & 0xffffu) | (hi << 16);
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
      const int t = j * 8 + g;
      uint32_t b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) b[i] = *reinterpret_cast<const uint32_t*>(&xs[t][2 * c + 8 * i]);
      MmaSp<T>::run(acc[j], a, b, e);
    }
    __syncthreads();
  }
  // epilogue: D rows are outputs (o0+g, o0+g+8), columns tokens (2c, 2c+1) of each n-tile
  const float b_lo = (bias != nullptr && row_lo) ? to_f(bias[o0 + g]) : 0.f;
  const float b_hi = (bias != nullptr && row_hi) ? to_f(bias[o0 + g + 8]) : 0.f;
#pragma unroll
  for (int j = 0; j < kNT; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int o = o0 + g + (i >= 2 ? 8 : 0);
      const int t = t0 + j * 8 + 2 * c + (i & 1);
      if (o < n_out && t < tokens) {
        float v = acc[j][i] + (i >= 2 ? b_hi : b_lo);
        if (gelu_on) v = gelu(v);
        out[(int64_t)t * n_out + o] = from_f<T>(v);
      }
    }
}

// ------------------------------------------------------------------------------------------
// Pipelined kernel
// ------------------------------------------------------------------------------------------

constexpr int kPO = 128;               // outputs per CTA
constexpr int kPK = 64;                // logical k per stage (32 compressed values per row)
constexpr int kStages = 3;
constexpr int kPWarpsT = 4;            // warps along tokens; 2 along outputs
constexpr int kWarpO = 64;             // outputs per warp: 4 m-tiles of 16
constexpr int kMT = kWarpO / 16;
constexpr int kPThreads = 256;
// shared-memory rows, in halves, padded by 8 halves (16 B): row strides of 80 B and 144 B put
// the eight rows of an ldmatrix phase in eight distinct 16-byte bank groups
constexpr int kWStride = kPK / 2 + 8;
constexpr int kXStride = kPK + 8;
constexpr int kMWords = kPK / 16;      // metadata words (uint16) per row per stage
constexpr int kOStride = kPO + 8;      // epilogue tile row (tokens × outputs)
constexpr int kStageW = kPO * kWStride;                      // halves
constexpr int kStageM = kPO * kMWords;                       // uint16

// The CTA's token count PT: 128 (warp tiles of 64 outputs × 32 tokens, two CTAs per Hopper SM)
// or 256 (64 × 64 warp tiles: 12 ldmatrix per 32 mma.sp instead of 8 per 16, one CTA per SM).
template <int PT>
struct PipeCfg {
  static constexpr int kPT = PT;
  static constexpr int kWarpT = PT / kPWarpsT;  // tokens per warp
  static constexpr int kNTP = kWarpT / 8;       // n-tiles per warp: 4 or 8
  static constexpr int kStageX = PT * kXStride;  // halves
  static constexpr int kStageBytes = 2 * (kStageW + kStageX + kStageM);
  static constexpr int kPipeSmem = kStages * kStageBytes;
  static constexpr int kEpiSmem = 2 * PT * kOStride;
  static constexpr int kSmem = kPipeSmem > kEpiSmem ? kPipeSmem : kEpiSmem;
  static constexpr int kMinBlocks = PT == 128 ? 2 : 1;
  static_assert(kStageBytes % 16 == 0 && (2 * kStageW) % 16 == 0 && (2 * kStageX) % 16 == 0, "16-byte stages");
};

// Per-thread source pointers of the stage loads, at stage 0, and how many of its rows exist.
// Thread tid moves W chunks (row tid/4 + 64i, chunk tid%4), x chunks (token tid/8 + 32i,
// chunk tid%8) and, for tid < 128, the 8 metadata bytes of row tid.
template <typename T>
struct StageSrc {
  const T* w;
  const T* x;
  const uint16_t* m;
  int w_rows;  // rows left from this thread's first W row: row i exists when 64i < w_rows
  int x_rows;  // same for x (32i < x_rows)
  int64_t w_step, x_step;  // 64 W rows, 32 x rows
};

template <typename T>
__device__ __forceinline__ StageSrc<T> stage_src(const T* x, const T* vals, const uint16_t* meta, int o0, int t0,
                                                 int tokens, int n_out, int K) {
  const int tid = threadIdx.x;
  StageSrc<T> s;
  s.w_rows = n_out - o0 - tid / 4;
  s.x_rows = tokens - t0 - tid / 8;
  s.w = vals + (int64_t)(o0 + tid / 4) * (K / 2) + (tid % 4) * 8;
  s.x = x + (int64_t)(t0 + tid / 8) * K + (tid % 8) * 8;
  s.m = meta + (int64_t)(o0 + tid) * (K / 16);
  s.w_step = (int64_t)64 * (K / 2);
  s.x_step = (int64_t)32 * K;
  return s;
}

// Stage kt of W values (128 rows × 32 compressed), metadata (128 rows × 4 words) and x
// (PT tokens × 64 k) into shared memory. Rows past n_out / tokens are zero-filled (the source
// address stays valid but nothing is read); their metadata is the valid pattern (0, 1) so the
// instruction never sees an unordered pair.
template <typename T, int PT>
__device__ __forceinline__ void load_stage(unsigned char* stage, const StageSrc<T>& src, const T* x, const T* vals,
                                           int kt) {
  T* ws = reinterpret_cast<T*>(stage);
  T* xs = ws + kStageW;
  uint16_t* ms = reinterpret_cast<uint16_t*>(xs + PipeCfg<PT>::kStageX);
  const int tid = threadIdx.x;
#pragma unroll
  for (int i = 0; i < (kPO * 4) / kPThreads; ++i) {
    const bool ok = 64 * i < src.w_rows;
    cp_async16(smem_addr(ws + (tid / 4 + 64 * i) * kWStride + (tid % 4) * 8),
               ok ? src.w + i * src.w_step + kt * (kPK / 2) : vals, ok);
  }
#pragma unroll
  for (int i = 0; i < (PT * 8) / kPThreads; ++i) {
    const bool ok = 32 * i < src.x_rows;
    cp_async16(smem_addr(xs + (tid / 8 + 32 * i) * kXStride + (tid % 8) * 8),
               ok ? src.x + i * src.x_step + kt * kPK : x, ok);
  }
  if (tid < kPO) {
    if (tid < src.w_rows + tid / 4) {  // row o0 + tid < n_out (w_rows counts from row tid / 4)
      cp_async8(smem_addr(ms + tid * kMWords), src.m + kt * kMWords, true);
    } else {
#pragma unroll
      for (int j = 0; j < kMWords; ++j) ms[tid * kMWords + j] = 0x4444u;
    }
  }
}

template <typename T, int PT>
__global__ void __launch_bounds__(kPThreads, PipeCfg<PT>::kMinBlocks)
    spmm24_pipelined_kernel(const T* __restrict__ x, const T* __restrict__ vals, const uint16_t* __restrict__ meta,
                            const T* __restrict__ bias, T* __restrict__ out, int tokens, int n_out, int K,
                            int gelu_on) {
  using Cfg = PipeCfg<PT>;
  constexpr int kPT = Cfg::kPT, kWarpT = Cfg::kWarpT, kNTP = Cfg::kNTP, kStageX = Cfg::kStageX;
  constexpr int kStageBytes = Cfg::kStageBytes;
  OVIT_DYNAMIC_SMEM(smem);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, c = lane % 4;
  const int wo = (warp / kPWarpsT) * kWarpO;  // warp's first output row within the CTA tile
  const int wt = (warp % kPWarpsT) * kWarpT;  // warp's first token within the CTA tile
  const int o0 = blockIdx.x * kPO;
  const int t0 = blockIdx.y * kPT;
  const int num_kt = K / kPK;

  float acc[kMT][kNTP][4];
#pragma unroll
  for (int i = 0; i < kMT; ++i)
#pragma unroll
    for (int j = 0; j < kNTP; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.f;

  const StageSrc<T> src = stage_src<T>(x, vals, meta, o0, t0, tokens, n_out, K);
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < num_kt) load_stage<T, PT>(smem + s * kStageBytes, src, x, vals, s);
    cp_async_commit();
  }

  // per-lane ldmatrix row/column offsets (see the operand layouts at the top of the file)
  const int a_row = (lane % 8) + ((lane / 8) & 1) * 8;  // matrices: rows 0-7 / 8-15, cols 0-7 / 8-15
  const int a_col = (lane / 16) * 8;
  const int b_row = lane % 8;                            // matrices: k 0-7, 8-15, 16-23, 24-31
  const int b_col = (lane / 8) * 8;
  const int mhalf = lane & 1;

  for (int kt = 0; kt < num_kt; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage kt landed for every thread; stage kt-1 is free to overwrite
    const int next = kt + kStages - 1;
    if (next < num_kt)
      load_stage<T, PT>(smem + (next % kStages) * kStageBytes, src, x, vals, next);
    cp_async_commit();

    const unsigned char* stage = smem + (kt % kStages) * kStageBytes;
    const T* ws = reinterpret_cast<const T*>(stage);
    const T* xs = ws + kStageW;
    const uint16_t* ms = reinterpret_cast<const uint16_t*>(xs + kStageX);
#pragma unroll
    for (int s = 0; s < kPK / kStepK; ++s) {
      uint32_t a[kMT][4], e[kMT];
#pragma unroll
      for (int mt = 0; mt < kMT; ++mt) {
        const int r0 = wo + mt * 16;
        ldmatrix_x4(a[mt], smem_addr(ws + (r0 + a_row) * kWStride + s * 16 + a_col));
        const uint32_t lo = ms[(r0 + g) * kMWords + 2 * s + mhalf];
        const uint32_t hi = ms[(r0 + g + 8) * kMWords + 2 * s + mhalf];
        e[mt] = lo | (hi << 16);
      }
#pragma unroll
      for (int nt = 0; nt < kNTP; ++nt) {
        uint32_t b[4];
        ldmatrix_x4(b, smem_addr(xs + (wt + nt * 8 + b_row) * kXStride + s * kStepK + b_col));
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt) MmaSp<T>::run(acc[mt][nt], a[mt], b, e[mt]);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline buffers become the epilogue tile

  // outᵀ fragments → tile[token][output] in shared memory, bias and GELU in fp32
  T* tile = reinterpret_cast<T*>(smem);
#pragma unroll
  for (int mt = 0; mt < kMT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int ol = wo + mt * 16 + g + 8 * h;
      const float bv = (bias != nullptr && o0 + ol < n_out) ? to_f(bias[o0 + ol]) : 0.f;
#pragma unroll
      for (int nt = 0; nt < kNTP; ++nt)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          float v = acc[mt][nt][2 * h + j] + bv;
          if (gelu_on) v = gelu(v);
          tile[(wt + nt * 8 + 2 * c + j) * kOStride + ol] = from_f<T>(v);
        }
    }
  }
  __syncthreads();
  const bool vec = (n_out % 8 == 0) && (reinterpret_cast<uintptr_t>(out) % 16 == 0);
  for (int idx = threadIdx.x; idx < kPT * (kPO / 8); idx += kPThreads) {
    const int tl = idx / (kPO / 8), ch = idx % (kPO / 8);
    const int t = t0 + tl, o = o0 + ch * 8;
    if (t >= tokens || o >= n_out) continue;
    const T* src = tile + tl * kOStride + ch * 8;
    T* dst = out + (int64_t)t * n_out + o;
    if (vec) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    } else {
      for (int j = 0; j < 8 && o + j < n_out; ++j) dst[j] = src[j];
    }
  }
}

template <typename T, int PT>
cudaError_t launch_pipelined(const void* x, const void* vals, const uint16_t* meta, const void* bias, void* out,
                             int tokens, int n_out, int K, int gelu_on, cudaStream_t stream) {
  constexpr int smem = PipeCfg<PT>::kSmem;
  cudaError_t err = set_dynamic_smem<spmm24_pipelined_kernel<T, PT>>(smem);
  if (err != cudaSuccess) return err;
  dim3 grid((n_out + kPO - 1) / kPO, (tokens + PT - 1) / PT);
  OVIT_LAUNCH(grid, kPThreads, smem, stream, spmm24_pipelined_kernel<T, PT>)(
      static_cast<const T*>(x), static_cast<const T*>(vals), meta, static_cast<const T*>(bias), static_cast<T*>(out),
      tokens, n_out, K, gelu_on);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_simple(const void* x, const void* vals, const uint16_t* meta, const void* bias, void* out,
                          int tokens, int n_out, int K, int gelu_on, cudaStream_t stream) {
  dim3 grid((n_out + kTileO - 1) / kTileO, (tokens + kTileT - 1) / kTileT);
  OVIT_LAUNCH(grid, 32 * kWarpsM, 0, stream, spmm24_kernel<T>)(static_cast<const T*>(x), static_cast<const T*>(vals), meta,
                                                      static_cast<const T*>(bias), static_cast<T*>(out), tokens,
                                                      n_out, K, gelu_on);
  return cudaGetLastError();
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

bool spmm_24_pipelined_ok(const void* x, const void* vals, const uint16_t* meta, int K) {
  return K % kPK == 0 && aligned16(x) && aligned16(vals) && reinterpret_cast<uintptr_t>(meta) % 8 == 0;
}

cudaError_t launch_spmm_24(const void* x, const void* vals, const uint16_t* meta, const void* bias, void* out,
                           int tokens, int n_out, int K, int gelu_on, int bf16, int variant, cudaStream_t stream) {
  if (K % kStepK != 0 || tokens < 0 || n_out < 0 || variant < 0 || variant > 3) return cudaErrorInvalidValue;
  if (tokens == 0 || n_out == 0) return cudaSuccess;
  const bool can_pipe = spmm_24_pipelined_ok(x, vals, meta, K);
  if (variant >= 2 && !can_pipe) return cudaErrorInvalidValue;
  // auto: the pipelined 128-token tile once there are enough tokens to fill the card
  const int v = variant != 0 ? variant : (can_pipe && tokens >= 256 ? 2 : 1);
  if (bf16) {
    using B = __nv_bfloat16;
    if (v == 3) return launch_pipelined<B, 256>(x, vals, meta, bias, out, tokens, n_out, K, gelu_on, stream);
    if (v == 2) return launch_pipelined<B, 128>(x, vals, meta, bias, out, tokens, n_out, K, gelu_on, stream);
    return launch_simple<B>(x, vals, meta, bias, out, tokens, n_out, K, gelu_on, stream);
  }
  if (v == 3) return launch_pipelined<__half, 256>(x, vals, meta, bias, out, tokens, n_out, K, gelu_on, stream);
  if (v == 2) return launch_pipelined<__half, 128>(x, vals, meta, bias, out, tokens, n_out, K, gelu_on, stream);
  return launch_simple<__half>(x, vals, meta, bias, out, tokens, n_out, K, gelu_on, stream);
}

}  // namespace ovit
