// Fused streaming Woodbury (Sherman–Morrison) updates of the blockwise inverse Fisher.
// One thread block per Fisher block: the block stays in registers while a chunk of k gradients
// is applied in order, u = H g, v = u / √(m + gᵀ u), H -= v vᵀ; it is written back once per call.
// Per gradient and block: 5·B² flops and one __syncthreads; gradients are staged through
// shared memory kChunk rows at a time. Blocks beyond the register tile (fp32 B > 192, fp64
// B > 128) go to the packed-symmetric shared-memory kernel (packed.cu).

#include "launch.cuh"
#include "ovit_kernels.h"
#include "packed.cuh"
#include "tile.cuh"

namespace ovit {

namespace {

constexpr int kChunk = 16;  // gradients staged in shared memory at once

// fp32 tiles up to C = 32 fit two blocks per SM in registers (≤ 64 per thread at 512 threads).
template <typename T, int C>
constexpr int woodbury_min_blocks() {
  return sizeof(T) == 4 && C <= 32 ? 2 : 1;
}

template <typename T, typename G, int C>
__global__ void __launch_bounds__(16 * C, woodbury_min_blocks<T, C>()) woodbury_kernel(T* __restrict__ finv, const G* __restrict__ grads,
                                                          int B, int64_t k, int64_t N, T m) {
  constexpr int W = kLanesPerRow * C;
  __shared__ T gs[kChunk][W];
  __shared__ T us[2][W];
  __shared__ T part[2][kMaxWarps];

  const int tid = threadIdx.x;
  const int r = tid / kLanesPerRow;
  const int p = tid % kLanesPerRow;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int nwarps = blockDim.x / 32;
  const int64_t blk = blockIdx.x;
  T* hb = finv + blk * B * (int64_t)B;

  T h[C];
  load_tile<T, C>(h, hb, B, r, p);
  for (int i = tid; i < 2 * W; i += blockDim.x) us[i / W][i % W] = T(0);

  int parity = 0;
  for (int64_t i0 = 0; i0 < k; i0 += kChunk) {
    const int kc = (int)((k - i0) < kChunk ? (k - i0) : kChunk);
    __syncthreads();  // previous chunk fully consumed
    for (int idx = tid; idx < kChunk * W; idx += blockDim.x) {
      int j = idx / W, col = idx % W;
      gs[j][col] = (j < kc && col < B) ? T(grads[(i0 + j) * N + blk * B + col]) : T(0);
    }
    __syncthreads();
    for (int j = 0; j < kc; ++j) {
      const T* g = gs[j];
      T acc = T(0);
#pragma unroll
      for (int c = 0; c < C; ++c) acc += h[c] * g[p + kLanesPerRow * c];
      const T u = quad_sum(acc);  // u[r] in all four lanes of the row
      T gu = (p == 0 && r < B) ? g[r] * u : T(0);
      gu = warp_sum(gu);
      if (p == 0 && r < W) us[parity][r] = (r < B) ? u : T(0);
      if (lane == 0) part[parity][warp] = gu;
      __syncthreads();
      const T denom = m + warp_sum(lane < nwarps ? part[parity][lane] : T(0));  // nwarps <= 32
      // H -= v vᵀ with v = u / √denom: entries (r, c) and (c, r) get the same product, so the
      // block stays exactly symmetric (u (u/denom)ᵀ would round the two sides differently).
      const T s = T(1) / sqrt(denom);
      rank_one_sub_scaled<T, C>(h, u * s, us[parity], s, p);
      parity ^= 1;
    }
  }
  store_tile<T, C>(h, hb, B, r, p);
}

template <typename T, typename G, int C>
cudaError_t launch_c(T* finv, const G* grads, int64_t nb, int B, int64_t k, int64_t N, double m, cudaStream_t s) {
  OVIT_LAUNCH((unsigned)nb, threads_for(B), 0, s, woodbury_kernel<T, G, C>)(finv, grads, B, k, N, T(m));
  return cudaGetLastError();
}

}  // namespace

int max_block_size(bool fp64) { return fp64 ? kPackedMaxFp64 : kPackedMaxFp32; }

int block_layout(int B, bool fp64, int* threads) {
  int c = -1, t = 0;
  if (B >= 1 && B <= (fp64 ? kRegMaxFp64 : kRegMaxFp32)) {
    c = cols_per_lane(B);
    t = threads_for(B);
  } else if (B >= 1 && B <= max_block_size(fp64)) {
    c = 0;
    t = kPackedThreads;
  }
  if (threads != nullptr) *threads = t;
  return c;
}

template <typename T, typename G>
cudaError_t launch_woodbury_update(T* finv, const G* grads, int64_t nb, int B, int64_t k, int64_t N,
                                   double num_grads, cudaStream_t stream) {
  if (nb == 0 || k == 0) return cudaSuccess;
  if (B < 1 || B > max_block_size(sizeof(T) == 8)) return cudaErrorInvalidValue;
  if (B > (sizeof(T) == 8 ? kRegMaxFp64 : kRegMaxFp32))
    return launch_woodbury_packed<T, G>(finv, grads, nb, B, k, N, num_grads, stream);
  switch (cols_per_lane(B)) {
    case 4: return launch_c<T, G, 4>(finv, grads, nb, B, k, N, num_grads, stream);
    case 8: return launch_c<T, G, 8>(finv, grads, nb, B, k, N, num_grads, stream);
    case 16: return launch_c<T, G, 16>(finv, grads, nb, B, k, N, num_grads, stream);
    case 24: return launch_c<T, G, 24>(finv, grads, nb, B, k, N, num_grads, stream);
    case 32: return launch_c<T, G, 32>(finv, grads, nb, B, k, N, num_grads, stream);
    case 48:
      if constexpr (sizeof(T) == 4) return launch_c<T, G, 48>(finv, grads, nb, B, k, N, num_grads, stream);
      return cudaErrorInvalidValue;
    default: return cudaErrorInvalidValue;
  }
}

template cudaError_t launch_woodbury_update<float, float>(float*, const float*, int64_t, int, int64_t, int64_t,
                                                          double, cudaStream_t);
template cudaError_t launch_woodbury_update<double, double>(double*, const double*, int64_t, int, int64_t,
                                                            int64_t, double, cudaStream_t);
template cudaError_t launch_woodbury_update<double, float>(double*, const float*, int64_t, int, int64_t, int64_t,
                                                           double, cudaStream_t);

}  // namespace ovit
