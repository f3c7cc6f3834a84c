// Packed-symmetric shared-memory kernels for blocks beyond the register tile: fp32 up to
// B = 256 (128.5 KiB), fp64 up to B = 192 (145 KiB). Internal to the launchers.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace ovit {

constexpr int kRegMaxFp32 = 192;   // register tile limit (tile.cuh, C = 48)
constexpr int kRegMaxFp64 = 128;   // register tile limit (C = 32)
constexpr int kPackedMaxFp32 = 256;
constexpr int kPackedMaxFp64 = 192;
constexpr int kPackedThreads = 512;  // threads per block of the packed kernels

template <typename T>
size_t packed_smem_bytes(int B);

template <typename T, typename G>
cudaError_t launch_woodbury_packed(T* finv, const G* grads, int64_t nb, int B, int64_t k, int64_t N, double m,
                                   cudaStream_t stream);

template <typename T, bool REPLAY>
cudaError_t launch_eliminate_packed(const T* w, const T* finv, const uint8_t* mask, const int64_t* order_in,
                                    const int64_t* counts, int64_t nb, int B, int steps, int nm_n, int nm_m,
                                    int64_t* order_out, T* loss, T* w_out, uint8_t* pruned, int32_t* bad,
                                    cudaStream_t stream);

template <typename T>
cudaError_t launch_damped_inverse_packed(const double* gram, int64_t nb, int B, double inv_m, double damp,
                                         int relative, T* out, int32_t* ok, cudaStream_t stream);

}  // namespace ovit
