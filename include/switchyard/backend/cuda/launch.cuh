// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file launch.cuh
//! The one launch adapter of the CUDA backend: `cuda::for_each(stream, n, f, name)` runs a
//! functor with a `__host__ __device__ void operator()(index_t) const` for i in [0, n) (the
//! per-row and per-element functors of `switchyard/ops/`, which the host backend runs in a
//! loop), grid-stride, 64-bit indices, block size from tuning.hpp, launch checked.

#include <cuda_runtime_api.h>

#include <algorithm>

#include "switchyard/backend/cuda/error.hpp"
#include "switchyard/backend/cuda/tuning.hpp"
#include "switchyard/core/config.hpp"

namespace switchyard::cuda {

namespace kernels {

//! f(i) for every i in [0, n), grid-stride.
template <class F>
__global__ void for_each(F f, index_t n) {
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride)
    f(i);
}

}  // namespace kernels

//! Blocks of `block` threads covering n items (at most tuning::max_grid; the loop does the rest).
inline unsigned grid_for(index_t n, int block) {
  const index_t blocks = (n + block - 1) / block;
  return static_cast<unsigned>(std::min<index_t>(std::max<index_t>(blocks, 1), tuning::max_grid));
}

//! Runs f(i), i in [0, n), on `stream`; nothing for n == 0. `name` names the launch in errors.
template <int Block = tuning::rows_block, class F>
void for_each(cudaStream_t stream, index_t n, const F& f, const char* name) {
  if (n <= 0) return;
  kernels::for_each<F><<<grid_for(n, Block), Block, 0, stream>>>(f, n);
  check_launch(name);
}

}  // namespace switchyard::cuda
