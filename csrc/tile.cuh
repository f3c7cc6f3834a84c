// Register-tile layout shared by the kernels: one thread block per Fisher block; row r of the
// (padded) B×B block is held by 4 consecutive lanes, lane p holding columns p, p+4, ..., p+4(C-1)
// in registers (interleaved columns make the shared-memory reads of a warp conflict-free).
// Eight rows per warp; rows beyond B and columns beyond B are zero and never selected.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace ovit {

constexpr int kLanesPerRow = 4;
constexpr int kRowsPerWarp = 32 / kLanesPerRow;
constexpr int kMaxWarps = 32;

// C (columns per lane) used for a block size B: the smallest instantiated width with 4C >= B.
inline int cols_per_lane(int B) {
  const int choices[] = {4, 8, 16, 24, 32, 48};
  for (int c : choices)
    if (4 * c >= B) return c;
  return -1;
}

inline int threads_for(int B) {
  int rows = (B + kRowsPerWarp - 1) / kRowsPerWarp * kRowsPerWarp;
  return rows * kLanesPerRow;
}

template <typename T>
__device__ __forceinline__ T quad_sum(T v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  v += __shfl_xor_sync(0xffffffffu, v, 2);
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// (value, index) argmin over a warp; ties go to the lower index. NaN never wins over a number.
template <typename T>
__device__ __forceinline__ void warp_argmin(T& v, int& i) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    T ov = __shfl_xor_sync(0xffffffffu, v, o);
    int oi = __shfl_xor_sync(0xffffffffu, i, o);
    if (ov < v || (ov == v && oi < i) || (v != v && ov == ov)) {
      v = ov;
      i = oi;
    }
  }
}

// Load a B×B block into the register tile (zeros outside B).
template <typename T, int C>
__device__ __forceinline__ void load_tile(T (&h)[C], const T* src, int B, int r, int p) {
#pragma unroll
  for (int c = 0; c < C; ++c) {
    int col = p + kLanesPerRow * c;
    h[c] = (r < B && col < B) ? src[(int64_t)r * B + col] : T(0);
  }
}

template <typename T, int C>
__device__ __forceinline__ void store_tile(const T (&h)[C], T* dst, int B, int r, int p) {
#pragma unroll
  for (int c = 0; c < C; ++c) {
    int col = p + kLanesPerRow * c;
    if (r < B && col < B) dst[(int64_t)r * B + col] = h[c];
  }
}

// Column q of the tile (= row q, by symmetry) published to shared memory: the lane that holds
// (r, q) writes col[r]. Caller synchronises before reading.
template <typename T, int C>
__device__ __forceinline__ void publish_column(const T (&h)[C], T* col, int q, int r, int p) {
  if ((q & (kLanesPerRow - 1)) == p) {
    int cq = q / kLanesPerRow;
#pragma unroll
    for (int c = 0; c < C; ++c)
      if (c == cq) col[r] = h[c];
  }
}

// h -= a[r] * b[col] for the owned entries (rank-one update with b read from shared memory).
template <typename T, int C>
__device__ __forceinline__ void rank_one_sub(T (&h)[C], T ar, const T* b, int p) {
#pragma unroll
  for (int c = 0; c < C; ++c) h[c] -= ar * b[p + kLanesPerRow * c];
}

// h -= a[r] * (b[col] * s): the symmetric rank-one update v vᵀ with v = s·b, where b (shared
// memory) is unscaled and a = s·b[r]; both factors are rounded the same way on either side of
// the diagonal.
template <typename T, int C>
__device__ __forceinline__ void rank_one_sub_scaled(T (&h)[C], T ar, const T* b, T s, int p) {
#pragma unroll
  for (int c = 0; c < C; ++c) h[c] -= ar * (b[p + kLanesPerRow * c] * s);
}

}  // namespace ovit
