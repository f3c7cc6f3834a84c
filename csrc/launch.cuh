// Kernel launches and dynamic shared memory go through these macros, so that the kernel
// sources also compile as host C++ against the SIMT emulator the tests use
// (tests/emu/cuda_runtime.h defines both before this header is reached). Under nvcc they are
// the plain CUDA spellings.
#pragma once

#include <atomic>

#include <cuda_runtime.h>

#ifndef OVIT_LAUNCH
// OVIT_LAUNCH(grid, block, smem, stream, kernel<...>)(args...)
#define OVIT_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif

#ifndef OVIT_DYNAMIC_SMEM
#define OVIT_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace ovit {

// Raise Kernel's dynamic shared-memory limit to at least `bytes` on the current device, once
// per device and size (the attribute persists), so launches — CUDA-graph captures included —
// do not repeat the call.
template <auto Kernel>
cudaError_t set_dynamic_smem(size_t bytes) {
  constexpr int kDevices = 64;
  static std::atomic<size_t> done[kDevices] = {};
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return err;
  if (dev >= 0 && dev < kDevices && done[dev].load(std::memory_order_relaxed) >= bytes) return cudaSuccess;
  err = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (err == cudaSuccess && dev >= 0 && dev < kDevices) done[dev].store(bytes, std::memory_order_relaxed);
  return err;
}

}  // namespace ovit
