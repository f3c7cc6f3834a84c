// Kernel launches and dynamic shared memory go through these macros, so that the kernel
// sources also compile as host C++ against the SIMT emulator the tests use
// (tests/emu/cuda_runtime.h defines both before this header is reached). Under nvcc they are
// the plain CUDA spellings.
#pragma once

#include <cuda_runtime.h>

#ifndef OVIT_LAUNCH
// OVIT_LAUNCH(grid, block, smem, stream, kernel<...>)(args...)
#define OVIT_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif

#ifndef OVIT_DYNAMIC_SMEM
#define OVIT_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif
