// Packed-symmetric kernels: one thread block per Fisher block, the upper triangle of the
// block in shared memory (row i holds columns i..B-1 at rowoff(i) = i·B − i(i−1)/2). They
// take over where the register tile runs out (fp32 B > 192, fp64 B > 128). Every update
// here keeps the block symmetric, so the triangle is all that is stored.

#include "launch.cuh"
#include "ovit_kernels.h"
#include "packed.cuh"
#include "tile.cuh"

namespace ovit {

namespace {

constexpr int kThreads = kPackedThreads;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ int rowoff(int i, int B) { return i * B - (i * (i - 1)) / 2; }

template <typename T>
__device__ __forceinline__ T& sym(T* P, int i, int j, int B) {
  return i <= j ? P[rowoff(i, B) + (j - i)] : P[rowoff(j, B) + (i - j)];
}

template <typename T>
__device__ __forceinline__ T inf_val() {
  return T(__int_as_float(0x7f800000));
}

// Shared-memory carve-up: [packed B(B+1)/2][vec0 B][vec1 B][partials kWarps] of T, then ints.
template <typename T>
struct Smem {
  T* P;
  T* v0;
  T* v1;
  T* part;
  int* ipart;
  int* ints;  // B ints (pending list / lost counts)
  __device__ Smem(unsigned char* raw, int B) {
    P = reinterpret_cast<T*>(raw);
    v0 = P + (size_t)B * (B + 1) / 2;
    v1 = v0 + B;
    part = v1 + B;
    ipart = reinterpret_cast<int*>(part + kWarps);
    ints = ipart + kWarps;
  }
};

template <typename T>
__device__ void load_packed(T* P, const T* src, int B) {
  const int total = B * (B + 1) / 2;
  // walk rows so that global reads are contiguous within a row
  for (int i = threadIdx.x / 32; i < B; i += kWarps)
    for (int j = i + threadIdx.x % 32; j < B; j += 32) P[rowoff(i, B) + (j - i)] = src[(int64_t)i * B + j];
  (void)total;
}

template <typename T>
__device__ void store_packed(const T* P, T* dst, int B, T sign) {
  for (int i = threadIdx.x / 32; i < B; i += kWarps)
    for (int j = threadIdx.x % 32; j < B; j += 32) {
      T v = i <= j ? P[rowoff(i, B) + (j - i)] : P[rowoff(j, B) + (i - j)];
      dst[(int64_t)i * B + j] = sign * v;
    }
}

// y[i] = Σ_j H(i, j) x[j], one warp per row.
template <typename T>
__device__ void symv(T* P, const T* x, T* y, int B) {
  const int lane = threadIdx.x % 32;
  for (int i = threadIdx.x / 32; i < B; i += kWarps) {
    T acc = T(0);
    for (int j = lane; j < B; j += 32) acc += sym(P, i, j, B) * x[j];
    acc = warp_sum(acc);
    if (lane == 0) y[i] = acc;
  }
}

// P -= a bᵀ on the upper triangle (a, b in shared memory; the caller keeps a bᵀ symmetric).
// Rows flagged in `skip` (other than `pivot`) are left alone: in the elimination a row is
// zeroed (to rounding) by its own pivot step, and every later update would only add
// a[i]·b[j] with a[i] = H(i, q) ≈ 0 there, so the work shrinks with the active set.
template <typename T>
__device__ void rank_one_packed(T* P, const T* a, const T* b, T scale, int B, const unsigned char* skip = nullptr,
                                int pivot = -1) {
  const int lane = threadIdx.x % 32;
  for (int i = threadIdx.x / 32; i < B; i += kWarps) {
    if (skip != nullptr && i != pivot && skip[i]) continue;  // skip[pivot] is being set meanwhile
    const T ai = a[i] * scale;
    T* row = P + rowoff(i, B) - i;
    for (int j = i + lane; j < B; j += 32) row[j] -= ai * b[j];
  }
}

template <typename T>
__device__ T block_sum(T v, T* part) {
  v = warp_sum(v);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = v;
  __syncthreads();
  T s = T(0);
  for (int w = 0; w < kWarps; ++w) s += part[w];
  __syncthreads();  // part may be reused right after
  return s;
}

template <typename T, typename G>
__global__ void __launch_bounds__(kThreads) woodbury_packed_kernel(T* __restrict__ finv, const G* __restrict__ grads,
                                                                   int B, int64_t k, int64_t N, T m) {
  OVIT_DYNAMIC_SMEM(raw);
  Smem<T> s(raw, B);
  const int64_t blk = blockIdx.x;
  T* hb = finv + blk * B * (int64_t)B;
  load_packed(s.P, hb, B);
  for (int64_t i = 0; i < k; ++i) {
    for (int j = threadIdx.x; j < B; j += kThreads) s.v0[j] = T(grads[i * N + blk * B + j]);
    __syncthreads();
    symv(s.P, s.v0, s.v1, B);  // u = H g
    __syncthreads();
    T gu = T(0);
    for (int j = threadIdx.x; j < B; j += kThreads) gu += s.v0[j] * s.v1[j];
    const T denom = m + block_sum(gu, s.part);
    const T sc = T(1) / sqrt(denom);
    for (int j = threadIdx.x; j < B; j += kThreads) s.v1[j] *= sc;  // v = u / √denom: H -= v vᵀ
    __syncthreads();
    rank_one_packed(s.P, s.v1, s.v1, T(1), B);
    __syncthreads();
  }
  store_packed(s.P, hb, B, T(1));
}

template <typename T, bool REPLAY>
__global__ void __launch_bounds__(kThreads)
    eliminate_packed_kernel(const T* __restrict__ w_in, const T* __restrict__ finv, const uint8_t* __restrict__ mask,
                            const int64_t* __restrict__ order_in, const int64_t* __restrict__ counts, int B, int steps,
                            int nm_n, int nm_m, int64_t* __restrict__ order_out, T* __restrict__ loss,
                            T* __restrict__ w_out, uint8_t* __restrict__ pruned, int32_t* __restrict__ bad) {
  OVIT_DYNAMIC_SMEM(raw);
  Smem<T> s(raw, B);
  __shared__ int npend_s, q_s;
  __shared__ T sq_s;
  const int64_t blk = blockIdx.x;
  const int tid = threadIdx.x;
  load_packed(s.P, finv + blk * B * (int64_t)B, B);
  T* w = s.v0;    // weights
  T* hq = s.v1;   // pivot column
  int* lost = s.ints;  // N:M group counts (B / nm_m entries); the pending list reuses part of it in order
  __shared__ int pending[kPackedMaxFp32];
  __shared__ unsigned char elim[kPackedMaxFp32];
  for (int j = tid; j < B; j += kThreads) {
    bool pre = !REPLAY && mask != nullptr && mask[blk * B + j];
    w[j] = pre ? T(0) : w_in[blk * B + j];
    elim[j] = 0;
    lost[j] = 0;
  }
  if (tid == 0) {
    int np = 0;
    if (!REPLAY && mask != nullptr)
      for (int j = 0; j < B; ++j)
        if (mask[blk * B + j]) pending[np++] = j;
    npend_s = np;
  }
  __syncthreads();
  const int npend = npend_s;
  const int nsteps = REPLAY ? (int)counts[blk] : steps;
  T cum = T(0);
  int flag = 0;
  for (int t = 0; t < nsteps; ++t) {
    if (REPLAY) {
      if (tid == 0) {
        q_s = (int)order_in[blk * steps + t];
        sq_s = T(0);
      }
    } else if (t < npend) {
      if (tid == 0) {
        q_s = pending[t];
        sq_s = T(0);
      }
    } else {
      T v = inf_val<T>();
      int idx = 0x7fffffff;
      if (tid < B && !elim[tid]) {
        bool full = nm_m > 0 && lost[tid / nm_m] >= nm_m - nm_n;
        if (!full) {
          v = w[tid] * w[tid] / s.P[rowoff(tid, B)];
          idx = tid;
        }
      }
      warp_argmin(v, idx);
      if (tid % 32 == 0) {
        s.part[tid / 32] = v;
        s.ipart[tid / 32] = idx;
      }
      __syncthreads();
      if (tid == 0) {
        T bv = s.part[0];
        int bi = s.ipart[0];
        for (int k2 = 1; k2 < kWarps; ++k2) {
          T ov = s.part[k2];
          int oi = s.ipart[k2];
          if (ov < bv || (ov == bv && oi < bi) || (bv != bv && ov == ov)) {
            bv = ov;
            bi = oi;
          }
        }
        q_s = bi;
        sq_s = bv;
      }
    }
    __syncthreads();
    const int q = q_s;
    const T sq = sq_s;
    if (q < 0 || q >= B) {
      flag = 1;
      break;
    }
    for (int j = tid; j < B; j += kThreads) hq[j] = sym(s.P, j, q, B);
    __syncthreads();
    const T hqq = hq[q];
    const T wq = w[q];
    if (!(hqq > T(0)) || sq != sq || sq == inf_val<T>()) flag = 1;
    if (!REPLAY && tid == 0) {
      cum += T(0.5) * sq;
      order_out[blk * steps + t] = q;
      loss[blk * steps + t] = cum;
    }
    __syncthreads();  // every thread has read w[q] before it changes
    for (int j = tid; j < B; j += kThreads) {
      if (j == q) elim[j] = 1;
      w[j] = elim[j] ? T(0) : w[j] - hq[j] * (wq / hqq);
    }
    if (nm_m > 0 && tid == 0) lost[q / nm_m] += 1;
    rank_one_packed(s.P, hq, hq, T(1) / hqq, B, elim, q);
    __syncthreads();
  }
  if (REPLAY)
    for (int j = tid; j < B; j += kThreads) {
      w_out[blk * B + j] = w[j];
      pruned[blk * B + j] = elim[j];
    }
  if (tid == 0) bad[blk] = flag;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) damped_inverse_packed_kernel(const double* __restrict__ gram, int B,
                                                                         double inv_m, double damp, int relative,
                                                                         T* __restrict__ out, int32_t* __restrict__ ok) {
  OVIT_DYNAMIC_SMEM(raw);
  Smem<double> s(raw, B);
  const int64_t blk = blockIdx.x;
  const int tid = threadIdx.x;
  load_packed(s.P, gram + blk * B * (int64_t)B, B);
  __syncthreads();
  const int total = B * (B + 1) / 2;
  for (int e = tid; e < total; e += kThreads) s.P[e] *= inv_m;
  __syncthreads();
  double dsum = 0.0;
  for (int j = tid; j < B; j += kThreads) dsum += s.P[rowoff(j, B)];
  const double mean = block_sum(dsum, s.part) / B;
  const double lam = relative ? (mean > 0.0 ? damp * mean : damp) : damp;
  for (int j = tid; j < B; j += kThreads) s.P[rowoff(j, B)] += lam;
  __syncthreads();
  int good = 1;
  double* c = s.v0;
  for (int k = 0; k < B; ++k) {
    for (int j = tid; j < B; j += kThreads) c[j] = sym(s.P, j, k, B);
    __syncthreads();
    const double d = c[k];
    if (!(d > 0.0)) good = 0;
    const double inv_d = 1.0 / d;
    const int lane = tid % 32;
    for (int i = tid / 32; i < B; i += kWarps) {
      double* row = s.P + rowoff(i, B) - i;
      for (int j = i + lane; j < B; j += 32) {
        double v;
        if (i == k && j == k) v = -inv_d;
        else if (i == k) v = c[j] * inv_d;
        else if (j == k) v = c[i] * inv_d;
        else v = row[j] - c[i] * c[j] * inv_d;
        row[j] = v;
      }
    }
    __syncthreads();
  }
  T* ob = out + blk * B * (int64_t)B;
  for (int i = tid / 32; i < B; i += kWarps)
    for (int j = tid % 32; j < B; j += 32) {
      const double v = -sym(s.P, i, j, B);
      const T o = T(v);  // checked as stored: float may not hold a double entry
      if (!(o == o) || o == inf_val<T>() || o == -inf_val<T>()) good = 0;
      ob[(int64_t)i * B + j] = o;
    }
  good = __syncthreads_and(good);
  if (tid == 0) ok[blk] = good;
}


}  // namespace

template <typename T>
size_t packed_smem_bytes(int B) {
  return sizeof(T) * ((size_t)B * (B + 1) / 2 + 2 * (size_t)B + kWarps) + sizeof(int) * (kWarps + (size_t)B) + 16;
}

template <typename T, typename G>
cudaError_t launch_woodbury_packed(T* finv, const G* grads, int64_t nb, int B, int64_t k, int64_t N, double m,
                                   cudaStream_t stream) {
  const size_t smem = packed_smem_bytes<T>(B);
  cudaError_t err = set_dynamic_smem<woodbury_packed_kernel<T, G>>(smem);
  if (err != cudaSuccess) return err;
  OVIT_LAUNCH((unsigned)nb, kThreads, smem, stream, woodbury_packed_kernel<T, G>)(finv, grads, B, k, N, T(m));
  return cudaGetLastError();
}

template <typename T, bool REPLAY>
cudaError_t launch_eliminate_packed(const T* w, const T* finv, const uint8_t* mask, const int64_t* order_in,
                                    const int64_t* counts, int64_t nb, int B, int steps, int nm_n, int nm_m,
                                    int64_t* order_out, T* loss, T* w_out, uint8_t* pruned, int32_t* bad,
                                    cudaStream_t stream) {
  const size_t smem = packed_smem_bytes<T>(B);
  cudaError_t err = set_dynamic_smem<eliminate_packed_kernel<T, REPLAY>>(smem);
  if (err != cudaSuccess) return err;
  OVIT_LAUNCH((unsigned)nb, kThreads, smem, stream, eliminate_packed_kernel<T, REPLAY>)(
      w, finv, mask, order_in, counts, B, steps, nm_n, nm_m, order_out, loss, w_out, pruned, bad);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_damped_inverse_packed(const double* gram, int64_t nb, int B, double inv_m, double damp,
                                         int relative, T* out, int32_t* ok, cudaStream_t stream) {
  const size_t smem = packed_smem_bytes<double>(B);
  cudaError_t err = set_dynamic_smem<damped_inverse_packed_kernel<T>>(smem);
  if (err != cudaSuccess) return err;
  OVIT_LAUNCH((unsigned)nb, kThreads, smem, stream, damped_inverse_packed_kernel<T>)(gram, B, inv_m, damp, relative, out, ok);
  return cudaGetLastError();
}

template size_t packed_smem_bytes<float>(int);
template size_t packed_smem_bytes<double>(int);
template cudaError_t launch_woodbury_packed<float, float>(float*, const float*, int64_t, int, int64_t, int64_t, double,
                                                          cudaStream_t);
template cudaError_t launch_woodbury_packed<double, double>(double*, const double*, int64_t, int, int64_t, int64_t,
                                                            double, cudaStream_t);
template cudaError_t launch_woodbury_packed<double, float>(double*, const float*, int64_t, int, int64_t, int64_t,
                                                           double, cudaStream_t);
#define OVIT_INST_ELIM(T, R)                                                                                          \
  template cudaError_t launch_eliminate_packed<T, R>(const T*, const T*, const uint8_t*, const int64_t*,             \
                                                     const int64_t*, int64_t, int, int, int, int, int64_t*, T*, T*, \
                                                     uint8_t*, int32_t*, cudaStream_t);
OVIT_INST_ELIM(float, false)
OVIT_INST_ELIM(float, true)
OVIT_INST_ELIM(double, false)
OVIT_INST_ELIM(double, true)
template cudaError_t launch_damped_inverse_packed<float>(const double*, int64_t, int, double, double, int, float*,
                                                         int32_t*, cudaStream_t);
template cudaError_t launch_damped_inverse_packed<double>(const double*, int64_t, int, double, double, int, double*,
                                                          int32_t*, cudaStream_t);

}  // namespace ovit
