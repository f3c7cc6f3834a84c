// C entry points over the kernel launchers, for ctypes: the tests build this file together
// with csrc/woodbury.cu, obs.cu and packed.cu as host C++ against the emulator in this folder.
// Every function returns the launcher's cudaError_t (0 = success).
#include <cstdint>

#include "ovit_kernels.h"
#include "packed.cuh"

using ovit::launch_damped_inverse;
using ovit::launch_obs_prune_order;
using ovit::launch_obs_reconstruct;
using ovit::launch_woodbury_update;

#define OVIT_EMU_API extern "C" __attribute__((visibility("default")))

// packed != 0 runs the packed shared-memory kernel whatever B is (they are dispatched only past
// the register tile on a real card, where B is too large for the emulator to be quick).
#define OVIT_EMU_TYPED(T, S)                                                                                       \
  OVIT_EMU_API int emu_woodbury_##S(T* finv, const T* grads, int64_t nb, int B, int64_t k, int64_t N, double m,  \
                                    int packed) {                                                                \
    return packed ? ovit::launch_woodbury_packed<T, T>(finv, grads, nb, B, k, N, m, nullptr)                      \
                  : launch_woodbury_update<T, T>(finv, grads, nb, B, k, N, m, nullptr);                          \
  }                                                                                                              \
  OVIT_EMU_API int emu_prune_order_##S(const T* w, const T* finv, const uint8_t* mask, int64_t nb, int B,        \
                                       int steps, int nm_n, int nm_m, int64_t* order, T* loss, int32_t* bad,     \
                                       int packed) {                                                             \
    return packed ? ovit::launch_eliminate_packed<T, false>(w, finv, mask, nullptr, nullptr, nb, B, steps, nm_n, \
                                                            nm_m, order, loss, nullptr, nullptr, bad, nullptr)   \
                  : launch_obs_prune_order<T>(w, finv, mask, nb, B, steps, nm_n, nm_m, order, loss, bad,         \
                                              nullptr);                                                          \
  }                                                                                                              \
  OVIT_EMU_API int emu_reconstruct_##S(const T* w, const T* finv, const int64_t* order, const int64_t* counts,   \
                                       int64_t nb, int B, int steps, T* w_out, uint8_t* pruned, int32_t* bad,    \
                                       int packed) {                                                             \
    return packed ? ovit::launch_eliminate_packed<T, true>(w, finv, nullptr, order, counts, nb, B, steps, 0, 0,  \
                                                           nullptr, nullptr, w_out, pruned, bad, nullptr)        \
                  : launch_obs_reconstruct<T>(w, finv, order, counts, nb, B, steps, w_out, pruned, bad, nullptr); \
  }                                                                                                              \
  OVIT_EMU_API int emu_damped_inverse_##S(const double* gram, int64_t nb, int B, double inv_m, double damp,      \
                                          int relative, T* out, int32_t* ok, int packed) {                       \
    return packed ? ovit::launch_damped_inverse_packed<T>(gram, nb, B, inv_m, damp, relative, out, ok, nullptr)  \
                  : launch_damped_inverse<T>(gram, nb, B, inv_m, damp, relative, out, ok, nullptr);             \
  }

OVIT_EMU_TYPED(float, f32)
OVIT_EMU_TYPED(double, f64)

// A float64 state updated with float32 gradients (the launcher's mixed instance).
OVIT_EMU_API int emu_woodbury_f64_g32(double* finv, const float* grads, int64_t nb, int B, int64_t k, int64_t N,
                                      double m) {
  return launch_woodbury_update<double, float>(finv, grads, nb, B, k, N, m, nullptr);
}

OVIT_EMU_API int emu_max_block_size(int fp64) { return ovit::max_block_size(fp64 != 0); }

OVIT_EMU_API int emu_block_layout(int B, int fp64, int* threads) { return ovit::block_layout(B, fp64 != 0, threads); }

// 2:4 sparse x dense; variant 0 = auto, 1 = simple, 2 = pipelined (see launch_spmm_24).
OVIT_EMU_API int emu_spmm24(const void* x, const void* vals, const uint16_t* meta, const void* bias, void* out,
                            int tokens, int n_out, int K, int gelu, int bf16, int variant) {
  return ovit::launch_spmm_24(x, vals, meta, bias, out, tokens, n_out, K, gelu, bf16, variant, nullptr);
}

// Unstructured (bitmap) sparse x dense; returns the launcher's error (0 = success).
OVIT_EMU_API int emu_spmm_bitmap(const void* x, const int32_t* bits, const int32_t* offsets, const void* vals,
                                 const void* bias, void* out, int tokens, int n_out, int K, int gelu, int bf16) {
  return ovit::launch_spmm_bitmap(x, bits, offsets, vals, bias, out, tokens, n_out, K, gelu, bf16, nullptr);
}

OVIT_EMU_API int emu_spmm_bitmap_tile(int K) { return ovit::spmm_bitmap_tile(K); }
