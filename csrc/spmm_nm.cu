// 2:4 sparse × dense on sparse tensor cores (mma.sp::ordered_metadata m16n8k32, sm_80+;
// runs on sm_90 too; the packing keeps the two positions of every group ascending):
// out[t, o] = act(Σ_k x[t, k] W[o, k] + bias[o]) with W 2:4-compressed.
//
// The sparse operand of mma.sp is the left one, so each warp computes a 16 (outputs) × 8
// (tokens) tile of outᵀ = W · xᵀ per instruction. A CTA holds 128 outputs (8 warps × 16) ×
// 64 tokens (8 n-tiles per warp); the x tile (64 tokens × 32 k) is staged in shared memory
// per k-step and shared by the 8 warps; W values and metadata are read straight from global
// memory in the fragment layout. Accumulation in fp32; bias and GELU fused.
//
// Operand layouts (PTX ISA, "sparse mma metadata 16832 f16/bf16"): the compressed A tile is
// 16 × 16 halves, thread (g = lane/4, c = lane%4) holds halves (g, 2c..2c+1), (g+8, 2c..),
// (g, 2c+8..), (g+8, 2c+8..); B (32 × 8, column-major = x rows) holds k = 2c + {0,8,16,24}
// (+1) of token g; D holds rows g and g+8, columns 2c, 2c+1. Metadata: 2-bit positions,
// 8 per 16-bit half word, lowest bits first; with selector 0 lanes 0 and 1 of each quad
// supply rows g (low 16 bits) and g+8 (high 16 bits), half word (lane & 1) of the k-step.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "ovit_kernels.h"

namespace ovit {

namespace {

constexpr int kWarpsM = 8;          // warps per CTA, each 16 output rows
constexpr int kTileO = 16 * kWarpsM;  // 128 outputs per CTA
constexpr int kTileT = 64;          // tokens per CTA (8 n-tiles of 8)
constexpr int kNT = kTileT / 8;
constexpr int kStepK = 32;          // logical k per mma

template <typename T>
struct MmaSp;

template <>
struct MmaSp<__half> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4],
                                             uint32_t e) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, "
        "{%0,%1,%2,%3}, %12, 0x0;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
#endif
  }
};

template <>
struct MmaSp<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4],
                                             uint32_t e) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, "
        "{%0,%1,%2,%3}, %12, 0x0;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e));
#endif
  }
};

template <typename T>
__device__ __forceinline__ float to_f(T v);
template <>
__device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float gelu(float v) { return 0.5f * v * (1.f + erff(v * 0.70710678118654752f)); }

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

}  // namespace

cudaError_t launch_spmm_24(const void* x, const void* vals, const uint16_t* meta, const void* bias, void* out,
                           int tokens, int n_out, int K, int gelu_on, int bf16, cudaStream_t stream) {
  if (K % kStepK != 0 || tokens < 0 || n_out < 0) return cudaErrorInvalidValue;
  if (tokens == 0 || n_out == 0) return cudaSuccess;
  dim3 grid((n_out + kTileO - 1) / kTileO, (tokens + kTileT - 1) / kTileT);
  if (bf16)
    spmm24_kernel<__nv_bfloat16><<<grid, 32 * kWarpsM, 0, stream>>>(
        static_cast<const __nv_bfloat16*>(x), static_cast<const __nv_bfloat16*>(vals), meta,
        static_cast<const __nv_bfloat16*>(bias), static_cast<__nv_bfloat16*>(out), tokens, n_out, K, gelu_on);
  else
    spmm24_kernel<__half><<<grid, 32 * kWarpsM, 0, stream>>>(
        static_cast<const __half*>(x), static_cast<const __half*>(vals), meta, static_cast<const __half*>(bias),
        static_cast<__half*>(out), tokens, n_out, K, gelu_on);
  return cudaGetLastError();
}

}  // namespace ovit
