// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file route_reductions.cuh
//! Block kernels for the route's two long fixed-order reductions, `ops::expert_column_sums`
//! (f and P̄ per expert) and `ops::mean_of_rows` (a loss term's mean over tokens), and its
//! token counts (`ops::count_tokens`, and `ops::load_balance_finish` /
//! `ops::two_expert_share_finish`, which count tokens before their one value), and
//! `cuda::route_step`, the launch the route's launcher (backend/cuda/router.cuh) runs for every
//! step: these functors go to their kernels, every other to `cuda::for_each`.
//!
//! Same bits as the functors: the block's threads load a chunk of the inputs into shared
//! memory (coalesced) and count slots (integers: exact in any order), then thread 0 adds the
//! staged values in token order into one double — the functor's very additions
//! (backend/cuda/ordered_rows.hpp holds these pieces; the host tests run them against the
//! functors). As plain one-thread loops they took 1 ms (E = 8 threads over T = 4096 tokens)
//! and 264 µs per call on an H200. The token counts have no floating-point sum: the block's
//! threads count (integers), then thread 0 writes the functor's value from the total.

#include <cuda_runtime_api.h>

#include <algorithm>
#include <type_traits>

#include "switchyard/backend/cuda/error.hpp"
#include "switchyard/backend/cuda/launch.cuh"
#include "switchyard/backend/cuda/ordered_rows.hpp"
#include "switchyard/backend/cuda/tuning.hpp"
#include "switchyard/core/config.hpp"
#include "switchyard/ops/route_losses.hpp"

namespace switchyard::cuda {

//! Threads of a staged reduction's block.
inline constexpr int staged_block = 256;

namespace kernels {

//! ops::expert_column_sums, one block of Block threads per expert e (grid-stride over the n
//! experts).
template <int Block>
__global__ void __launch_bounds__(Block)
    staged_expert_column_sums(staged_column_sums s, index_t n) {
  __shared__ float staged[staged_chunk];
  __shared__ unsigned long long count;
  const index_t tokens = s.f.tokens;
  const bool sums = s.f.pbar != nullptr;
  const index_t tid = threadIdx.x, threads = blockDim.x;
  for (index_t e = blockIdx.x; e < n; e += gridDim.x) {
    if (tid == 0) count = 0;
    __syncthreads();
    index_t mine = 0;
    double pe = 0.0;
    for (index_t t0 = 0; t0 < tokens; t0 += staged_chunk) {
      const index_t m = tokens - t0 < staged_chunk ? tokens - t0 : staged_chunk;
      for (index_t k = tid; k < m; k += threads) {
        mine += s.count(e, t0 + k);
        if (sums) staged[k] = s.prob(e, t0 + k);
      }
      __syncthreads();
      if (tid == 0 && sums) pe = staged_column_sums::add(pe, staged, m);
      __syncthreads();
    }
    atomicAdd(&count, static_cast<unsigned long long>(mine));
    __syncthreads();
    if (tid == 0) {
      s.f.f[e] = static_cast<double>(static_cast<index_t>(count));
      if (sums) s.f.pbar[e] = pe;
    }
    __syncthreads();  // `count` is reset for the next expert
  }
}

//! ops::mean_of_rows on one block of Block threads.
template <int Block>
__global__ void __launch_bounds__(Block) staged_mean_of_rows(staged_mean s) {
  __shared__ double staged[staged_chunk];
  const index_t tokens = s.f.tokens;
  const index_t tid = threadIdx.x, threads = blockDim.x;
  double sum = 0.0;
  for (index_t t0 = 0; t0 < tokens; t0 += staged_chunk) {
    const index_t m = tokens - t0 < staged_chunk ? tokens - t0 : staged_chunk;
    for (index_t k = tid; k < m; k += threads) staged[k] = s.f.rows[t0 + k];
    __syncthreads();
    if (tid == 0) sum = staged_mean::add(sum, staged, m);
    __syncthreads();
  }
  if (tid == 0) *s.f.out = s.finish(sum);
}

//! A token count and its finish (ops::count_tokens, ops::load_balance_finish,
//! ops::two_expert_share_finish) on one block of Block threads: each thread counts a strided
//! share of the tokens (integers: exact in any order), then thread 0 finishes with the total.
template <int Block, class F>
__global__ void __launch_bounds__(Block) staged_token_count(F f) {
  __shared__ unsigned long long count;
  const index_t tid = threadIdx.x, threads = blockDim.x;
  if (tid == 0) count = 0;
  __syncthreads();
  if (f.counts_tokens()) {
    index_t mine = 0;
    for (index_t t = tid; t < f.tokens; t += threads) mine += f.count_of(t);
    atomicAdd(&count, static_cast<unsigned long long>(mine));
  }
  __syncthreads();
  if (tid == 0) f.finish(static_cast<index_t>(count));
}

}  // namespace kernels

//! Whether F is a token count run by kernels::staged_token_count.
template <class F>
inline constexpr bool is_token_count_v =
    std::is_same_v<F, ops::count_tokens> || std::is_same_v<F, ops::load_balance_finish> ||
    std::is_same_v<F, ops::two_expert_share_finish>;

//! Runs f(i), i in [0, n), on `stream` like `for_each<Block>`, except ops::expert_column_sums,
//! ops::mean_of_rows and the token counts (`is_token_count_v`), which run on their block
//! kernels (same bits, see the file comment).
template <int Block, class F>
void route_step(cudaStream_t stream, index_t n, const F& f, const char* name) {
  if (n <= 0) return;
  if constexpr (std::is_same_v<F, ops::expert_column_sums>) {
    const auto grid = static_cast<unsigned>(std::min<index_t>(n, tuning::max_grid));
    kernels::staged_expert_column_sums<staged_block>
        <<<grid, staged_block, 0, stream>>>(staged_column_sums{f}, n);
    check_launch(name);
  } else if constexpr (std::is_same_v<F, ops::mean_of_rows>) {
    // One block for any n: every item writes the same value.
    kernels::staged_mean_of_rows<staged_block><<<1, staged_block, 0, stream>>>(staged_mean{f});
    check_launch(name);
  } else if constexpr (is_token_count_v<F>) {
    // One block for any n: every item writes the same value.
    kernels::staged_token_count<staged_block, F><<<1, staged_block, 0, stream>>>(f);
    check_launch(name);
  } else {
    for_each<Block>(stream, n, f, name);
  }
}

}  // namespace switchyard::cuda
