// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file tuning.hpp
//! The CUDA backend's tuning values as data: block sizes, the decode threshold of the
//! permutation, the host scratch per expert. Launches name these, never a literal.

#include <cstddef>

#include "switchyard/core/config.hpp"

namespace switchyard::cuda::tuning {

//! Threads per block of the per-row and per-element functor launches (gather, activation,
//! combine, bias).
inline constexpr int rows_block = 256;
//! Threads per block of the per-token routing kernels (one thread per token).
inline constexpr int tokens_block = 128;
//! Most blocks a grid-stride launch asks for (the loop covers the rest).
inline constexpr unsigned max_grid = 65535u * 4u;
//! T·width at or below which the permutation sorts in one block (`cub::BlockRadixSort`,
//! decode) instead of `cub::DeviceRadixSort` (prefill).
inline constexpr index_t block_sort_max_pairs = 2048;
//! Host bytes (pinned when the context has them) the backend takes per expert for the
//! per-expert counts and the grouped GEMM's host argument arrays.
inline constexpr std::size_t host_bytes_per_expert = 256;
//! Tokens the router converts to float at a time for its float GEMMs when x is half,
//! bfloat16 or not row-major (router logits and grads.w on cuBLAS rather than a fixed-order
//! loop: 4.45 ms -> tens of µs at T = 4096, d = 2048, E = 128 on an H200): the route's
//! workspace holds min(T, this) · d floats.
inline constexpr index_t router_float_rows = 2048;
//! Host bytes taken besides the per-expert ones (status word, alignment).
inline constexpr std::size_t host_bytes_fixed = 4096;

}  // namespace switchyard::cuda::tuning
