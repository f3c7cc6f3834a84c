// OBS kernels on the register tile: greedy correlation-aware elimination (order + cumulative
// loss, nothing else written per step), replay of a prefix (reconstruction), and the damped
// Gauss–Jordan inverse of the Gram path. One thread block per Fisher block; every elimination
// step is O(B²) register work and one __syncthreads (see eliminate_kernel). Blocks beyond the
// register tile go to the packed-symmetric shared-memory kernels (packed.cu).

#include "launch.cuh"
#include "ovit_kernels.h"
#include "packed.cuh"
#include "tile.cuh"

namespace ovit {

namespace {

template <typename T>
__device__ __forceinline__ T inf_of() {
  return T(__int_as_float(0x7f800000));
}

// REPLAY = false: greedy elimination writing order/loss.
// REPLAY = true : replay of order[0, counts[blk]) writing w_out and pruned.
//
// One __syncthreads per step. Each warp reduces its own candidate (the argmin of its rows'
// scores, or, when the step's weight is known — a masked weight or a replayed step — the
// weight itself), and the four lanes holding the candidate's row publish that row (= its
// column: H is symmetric) and its weight in the warp's slot before the barrier. After it,
// every thread reduces the warps' candidates and reads the winner's row from its slot. N:M
// group counts live in registers (each thread counts its own row's group).
// fp32 tiles up to C = 32 fit two blocks per SM in registers (≤ 64 per thread at 512 threads).
template <typename T, int C>
constexpr int elim_min_blocks() {
  return sizeof(T) == 4 && C <= 32 ? 2 : 1;
}

template <typename T, int C, bool REPLAY>
__global__ void __launch_bounds__(16 * C, elim_min_blocks<T, C>())
    eliminate_kernel(const T* __restrict__ w_in, const T* __restrict__ finv, const uint8_t* __restrict__ mask,
                     const int64_t* __restrict__ order_in, const int64_t* __restrict__ counts, int B, int steps,
                     int nm_n, int nm_m, int64_t* __restrict__ order_out, T* __restrict__ loss,
                     T* __restrict__ w_out, uint8_t* __restrict__ pruned, int32_t* __restrict__ bad) {
  constexpr int W = kLanesPerRow * C;
  constexpr int kWarps = 16 * C / 32;  // warps of the largest block this C serves
  __shared__ T slot[2][kWarps][W];
  __shared__ T slot_w[2][kWarps];
  __shared__ T pv[2][kWarps];
  __shared__ int pi[2][kWarps];
  __shared__ int pending[W];
  __shared__ int npend_s;

  const int tid = threadIdx.x;
  const int r = tid / kLanesPerRow;
  const int p = tid % kLanesPerRow;
  const int warp = tid / 32, lane = tid % 32, nwarps = blockDim.x / 32;
  const int64_t blk = blockIdx.x;
  const bool row_ok = r < B;
  const bool owns_diag = row_ok && (r % kLanesPerRow) == p;
  const int cdiag = r / kLanesPerRow;

  T h[C];
  load_tile<T, C>(h, finv + blk * B * (int64_t)B, B, r, p);
  T wr = row_ok ? w_in[blk * B + r] : T(0);
  bool elim = !row_ok;
  int lost_mine = 0;  // weights eliminated so far in this row's N:M group

  if (!REPLAY && tid == 0) {
    int np = 0;
    if (mask != nullptr)
      for (int j = 0; j < B; ++j)
        if (mask[blk * B + j]) pending[np++] = j;
    npend_s = np;
  }
  __syncthreads();
  int npend = 0;
  if (!REPLAY) {
    npend = npend_s;
    if (mask != nullptr && row_ok && mask[blk * B + r]) wr = T(0);
  }
  const int nsteps = REPLAY ? (int)counts[blk] : steps;

  T cum = T(0);
  int flag = 0;
  int parity = 0;
  for (int t = 0; t < nsteps; ++t) {
    const bool known = REPLAY || t < npend;
    int cand;
    if (REPLAY) {
      cand = (int)order_in[blk * steps + t];
    } else if (t < npend) {
      cand = pending[t];
    } else {
      T s = inf_of<T>();
      if (owns_diag && !elim) {
        T d = T(0);
#pragma unroll
        for (int c = 0; c < C; ++c)
          if (c == cdiag) d = h[c];
        const bool full = nm_m > 0 && lost_mine >= nm_m - nm_n;
        if (!full) s = wr * wr / d;
      }
      cand = owns_diag ? r : 0x7fffffff;
      warp_argmin(s, cand);
      if (lane == 0) {
        pv[parity][warp] = s;
        pi[parity][warp] = cand;
      }
    }
    if (r == cand) {  // the candidate's four lanes publish its row and weight
#pragma unroll
      for (int c = 0; c < C; ++c) slot[parity][warp][p + kLanesPerRow * c] = h[c];
      if (p == 0) slot_w[parity][warp] = wr;
    }
    __syncthreads();
    int q, ww;
    T sq = T(0);
    if (known) {
      q = cand;
      ww = q / kRowsPerWarp;
    } else {
      // every warp reduces the warps' candidates (one per lane, nwarps <= 32) by shuffles
      sq = lane < nwarps ? pv[parity][lane] : inf_of<T>();
      q = lane < nwarps ? pi[parity][lane] : 0x7fffffff;
      warp_argmin(sq, q);
      ww = q / kRowsPerWarp;  // the warp holding row q published it
    }
    if (q < 0 || q >= B) {  // no candidate left (uniform across the block)
      flag = 1;
      break;
    }
    const T* hq = slot[parity][ww];
    const T hqq = hq[q];
    const T wq = slot_w[parity][ww];
    if (!(hqq > T(0)) || sq != sq || sq == inf_of<T>()) flag = 1;
    if (!REPLAY) {
      cum += T(0.5) * sq;
      if (tid == 0) {
        order_out[blk * steps + t] = q;
        loss[blk * steps + t] = cum;
      }
    }
    const T hr = row_ok ? hq[r] : T(0);
    wr -= hr * (wq / hqq);
    if (r == q) elim = true;
    if (elim) wr = T(0);
    if (nm_m > 0 && row_ok && q / nm_m == r / nm_m) ++lost_mine;
    const T a = hr / hqq;
    rank_one_sub<T, C>(h, a, hq, p);
    parity ^= 1;
  }
  if (REPLAY && row_ok && p == 0) {
    w_out[blk * B + r] = wr;
    pruned[blk * B + r] = elim ? 1 : 0;
  }
  if (tid == 0) bad[blk] = flag;
}

// out = -(sweep of all pivots of A), A = λ'I + G/m: the Gauss–Jordan inverse, float64 on chip.
template <typename T, int C>
__global__ void __launch_bounds__(16 * C, 1) damped_inverse_kernel(const double* __restrict__ gram, int B, double inv_m,
                                                                double damp, int relative, T* __restrict__ out,
                                                                int32_t* __restrict__ ok) {
  constexpr int W = kLanesPerRow * C;
  __shared__ double colbuf[2][W];
  __shared__ double part[kMaxWarps];
  const int tid = threadIdx.x;
  const int r = tid / kLanesPerRow;
  const int p = tid % kLanesPerRow;
  const int64_t blk = blockIdx.x;
  const int warp = tid / 32, lane = tid % 32, nwarps = blockDim.x / 32;

  double a[C];
  load_tile<double, C>(a, gram + blk * B * (int64_t)B, B, r, p);
  const int cdiag = r / kLanesPerRow;
  const bool owns_diag = r < B && (r % kLanesPerRow) == p;
  double dsum = 0.0;
#pragma unroll
  for (int c = 0; c < C; ++c) {
    a[c] *= inv_m;
    if (owns_diag && c == cdiag) dsum = a[c];
  }
  double lam = damp;
  if (relative) {
    dsum = warp_sum(dsum);
    if (lane == 0) part[warp] = dsum;
    __syncthreads();
    double tot = 0.0;
    for (int w = 0; w < nwarps; ++w) tot += part[w];
    double mean = tot / B;
    lam = mean > 0.0 ? damp * mean : damp;
  }
#pragma unroll
  for (int c = 0; c < C; ++c)
    if (owns_diag && c == cdiag) a[c] += lam;
  for (int i = tid; i < 2 * W; i += blockDim.x) colbuf[i / W][i % W] = 0.0;
  __syncthreads();

  int good = 1;
  int parity = 0;
  for (int k = 0; k < B; ++k) {
    publish_column<double, C>(a, colbuf[parity], k, r, p);
    __syncthreads();
    const double* ck = colbuf[parity];
    const double d = ck[k];
    if (!(d > 0.0)) good = 0;
    const double cr = r < B ? ck[r] : 0.0;
    const double inv_d = 1.0 / d;
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int j = p + kLanesPerRow * c;
      const double cj = ck[j];
      double v = a[c] - cr * cj * inv_d;
      if (r == k && j == k) v = -inv_d;
      else if (r == k) v = cj * inv_d;
      else if (j == k) v = cr * inv_d;
      a[c] = v;
    }
    parity ^= 1;
  }
  T* ob = out + blk * B * (int64_t)B;
#pragma unroll
  for (int c = 0; c < C; ++c) {
    const int j = p + kLanesPerRow * c;
    const double v = -a[c];
    if (r < B && j < B) {
      const T o = T(v);  // checked as stored: float may not hold a double entry
      if (!(o == o) || o == inf_of<T>() || o == -inf_of<T>()) good = 0;
      ob[(int64_t)r * B + j] = o;
    }
  }
  // every thread's verdict counts
  good = __syncthreads_and(good);
  if (tid == 0) ok[blk] = good;
}

#define OVIT_DISPATCH_C(B, FP64, ...)                    \
  switch (cols_per_lane(B)) {                             \
    case 4: { constexpr int C = 4; __VA_ARGS__; }                \
    case 8: { constexpr int C = 8; __VA_ARGS__; }                \
    case 16: { constexpr int C = 16; __VA_ARGS__; }              \
    case 24: { constexpr int C = 24; __VA_ARGS__; }              \
    case 32: { constexpr int C = 32; __VA_ARGS__; }              \
    case 48: {                                            \
      if constexpr (!(FP64)) { constexpr int C = 48; __VA_ARGS__; } \
      return cudaErrorInvalidValue;                       \
    }                                                     \
    default: return cudaErrorInvalidValue;                \
  }

}  // namespace

template <typename T>
cudaError_t launch_obs_prune_order(const T* w, const T* finv, const uint8_t* mask, int64_t nb, int B, int steps,
                                   int nm_n, int nm_m, int64_t* order, T* loss, int32_t* bad, cudaStream_t stream) {
  if (nb == 0) return cudaSuccess;
  if (B < 1 || B > max_block_size(sizeof(T) == 8) || steps > B) return cudaErrorInvalidValue;
  if (B > (sizeof(T) == 8 ? kRegMaxFp64 : kRegMaxFp32))
    return launch_eliminate_packed<T, false>(w, finv, mask, nullptr, nullptr, nb, B, steps, nm_n, nm_m, order, loss,
                                             nullptr, nullptr, bad, stream);
  OVIT_DISPATCH_C(B, sizeof(T) == 8, {
    OVIT_LAUNCH((unsigned)nb, threads_for(B), 0, stream, eliminate_kernel<T, C, false>)(
        w, finv, mask, nullptr, nullptr, B, steps, nm_n, nm_m, order, loss, nullptr, nullptr, bad);
    return cudaGetLastError();
  })
}

template <typename T>
cudaError_t launch_obs_reconstruct(const T* w, const T* finv, const int64_t* order, const int64_t* counts,
                                   int64_t nb, int B, int steps, T* w_out, uint8_t* pruned, int32_t* bad,
                                   cudaStream_t stream) {
  if (nb == 0) return cudaSuccess;
  if (B < 1 || B > max_block_size(sizeof(T) == 8) || steps > B) return cudaErrorInvalidValue;
  if (B > (sizeof(T) == 8 ? kRegMaxFp64 : kRegMaxFp32))
    return launch_eliminate_packed<T, true>(w, finv, nullptr, order, counts, nb, B, steps, 0, 0, nullptr, nullptr,
                                            w_out, pruned, bad, stream);
  OVIT_DISPATCH_C(B, sizeof(T) == 8, {
    OVIT_LAUNCH((unsigned)nb, threads_for(B), 0, stream, eliminate_kernel<T, C, true>)(
        w, finv, nullptr, order, counts, B, steps, 0, 0, nullptr, nullptr, w_out, pruned, bad);
    return cudaGetLastError();
  })
}

template <typename T>
cudaError_t launch_damped_inverse(const double* gram, int64_t nb, int B, double inv_m, double damp, int relative,
                                  T* out, int32_t* ok, cudaStream_t stream) {
  if (nb == 0) return cudaSuccess;
  if (B < 1 || B > max_block_size(true)) return cudaErrorInvalidValue;
  if (B > kRegMaxFp64) return launch_damped_inverse_packed<T>(gram, nb, B, inv_m, damp, relative, out, ok, stream);
  OVIT_DISPATCH_C(B, true, {
    OVIT_LAUNCH((unsigned)nb, threads_for(B), 0, stream, damped_inverse_kernel<T, C>)(gram, B, inv_m, damp, relative, out,
                                                                              ok);
    return cudaGetLastError();
  })
}

#define OVIT_INSTANTIATE(T)                                                                                       \
  template cudaError_t launch_obs_prune_order<T>(const T*, const T*, const uint8_t*, int64_t, int, int, int, int, \
                                                 int64_t*, T*, int32_t*, cudaStream_t);                           \
  template cudaError_t launch_obs_reconstruct<T>(const T*, const T*, const int64_t*, const int64_t*, int64_t,    \
                                                 int, int, T*, uint8_t*, int32_t*, cudaStream_t);                 \
  template cudaError_t launch_damped_inverse<T>(const double*, int64_t, int, double, double, int, T*, int32_t*,   \
                                                cudaStream_t);
OVIT_INSTANTIATE(float)
OVIT_INSTANTIATE(double)

}  // namespace ovit
