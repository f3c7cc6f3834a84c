// Launchers of the ovit-kernels CUDA kernels. Torch-free: raw device pointers, sizes and a
// stream, so nvcc alone compiles every .cu in seconds. The one binding file that includes
// torch (bindings.cpp) validates tensors and calls these.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace ovit {

// Largest block size the kernels hold on chip: register tiles (4 lanes per row) up to 192
// (fp32) / 128 (fp64), packed-symmetric shared memory beyond, up to 256 (fp32) / 192 (fp64).
int max_block_size(bool fp64);

// How the Fisher/OBS kernels hold a block of size B in a state of this precision: the columns
// per lane C of the register tile (tile.cuh), 0 for the packed shared-memory kernels
// (packed.cu), -1 beyond both. *threads (if not null) gets the thread-block size. The damped
// inverse computes in float64 whatever its output: ask with fp64 = true for it.
int block_layout(int B, bool fp64, int* threads);

// finv (nb, B, B) in place; grads (k, N) row-major with N = nb * B; num_grads = m.
template <typename T, typename G>
cudaError_t launch_woodbury_update(T* finv, const G* grads, int64_t nb, int B, int64_t k, int64_t N,
                                   double num_grads, cudaStream_t stream);

// Greedy OBS elimination. w (nb, B) weights in T; finv (nb, B, B); mask (nb, B) uint8 or null;
// nm_n/nm_m = 0 for unstructured. Writes order (nb, steps) int64, loss (nb, steps), bad (nb) int32.
template <typename T>
cudaError_t launch_obs_prune_order(const T* w, const T* finv, const uint8_t* mask, int64_t nb, int B,
                                   int steps, int nm_n, int nm_m, int64_t* order, T* loss, int32_t* bad,
                                   cudaStream_t stream);

// Replay of the first counts[b] entries of order (nb, steps). Writes w_out (nb, B), pruned (nb, B)
// uint8 and bad (nb) int32.
template <typename T>
cudaError_t launch_obs_reconstruct(const T* w, const T* finv, const int64_t* order, const int64_t* counts,
                                   int64_t nb, int B, int steps, T* w_out, uint8_t* pruned, int32_t* bad,
                                   cudaStream_t stream);

// out = (λ'I + G/m)^-1 per block by a Gauss–Jordan sweep in float64; gram (nb, B, B) float64;
// relative != 0 uses λ' = λ·mean(diag(G/m)) (λ where that mean is 0). ok (nb) int32.
template <typename T>
cudaError_t launch_damped_inverse(const double* gram, int64_t nb, int B, double inv_m, double damp, int relative,
                                  T* out, int32_t* ok, cudaStream_t stream);

}  // namespace ovit

namespace ovit {

// 2:4 sparse × dense on sparse tensor cores: out (tokens, n_out) = act(x (tokens, K) · Wᵀ + bias).
// vals (n_out, K/2) and x, bias, out are fp16 (bf16 != 0: bf16); meta (n_out, K/16) uint16 holds
// the 2-bit in-group positions of the kept values, 8 per word, lowest bits first. K % 32 == 0.
// variant: 0 = auto, 1 = the simple kernel, 2 = the pipelined kernel with 128-token tiles,
// 3 = with 256-token tiles (2 and 3 need spmm_24_pipelined_ok: K % 64 == 0, x and vals
// 16-byte aligned, meta 8-byte aligned).
cudaError_t launch_spmm_24(const void* x, const void* vals, const uint16_t* meta, const void* bias, void* out,
                           int tokens, int n_out, int K, int gelu_on, int bf16, int variant, cudaStream_t stream);
bool spmm_24_pipelined_ok(const void* x, const void* vals, const uint16_t* meta, int K);

// Unstructured sparse × dense, bitmap format: bits and offsets (n_out, K/32) int32, vals (nnz,),
// x (tokens, K), bias (n_out) or null, out (tokens, n_out); fp16 (bf16 != 0: bf16). Needs
// K % 64 == 0 and a 16-byte aligned x. spmm_bitmap_tile(K) is the output tile the kernel uses
// on the current device (64, 32 or 16), 0 where the weight tile does not fit shared memory.
int spmm_bitmap_tile(int K);
cudaError_t launch_spmm_bitmap(const void* x, const int32_t* bits, const int32_t* offsets, const void* vals,
                               const void* bias, void* out, int tokens, int n_out, int K, int gelu_on, int bf16,
                               cudaStream_t stream);

}  // namespace ovit
