#pragma once
//! \file route.cuh
//! Device routing: softmax of the router logits and any SelectionRule, one thread per token,
//! calling exactly the `__host__ __device__` functions the host backend calls. Bitwise the
//! host result for the same logits (same float operations in the same order).

#include <cuda_runtime_api.h>

#include <cuda/std/span>

#include "switchyard/core/span.hpp"
#include "switchyard/backend/cuda/error.hpp"
#include "switchyard/routing/concepts.hpp"
#include "switchyard/routing/softmax.hpp"

namespace switchyard::cuda {

namespace kernels {

//! probs[t] = softmax(logits[t]); rule.select(probs[t]) -> ids[t], weights[t], counts[t].
template <class Rule>
__global__ void softmax_select(Rule rule, const float* __restrict__ logits,  // [T, E]
                               float* __restrict__ probs,                     // [T, E]
                               std::int32_t* __restrict__ ids,                // [T, width]
                               float* __restrict__ weights,                   // [T, width]
                               std::int32_t* __restrict__ counts,             // [T]
                               index_t tokens, int experts, int width) {
  const index_t t = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= tokens) return;
  const float* lg = logits + t * experts;
  float* p = probs + t * experts;
  routing::softmax(span<const float>(lg, experts), span<float>(p, experts));
  counts[t] = rule.select(span<const float>(p, experts),
                          span<std::int32_t>(ids + t * width, width),
                          span<float>(weights + t * width, width));
}

//! rule.select(scores[t]) -> ids[t], weights[t], counts[t] over scores computed elsewhere
//! (DynMoE's cosine-sigmoid scores, or any user scoring).
template <class Rule>
__global__ void select(Rule rule, const float* __restrict__ scores,  // [T, E]
                       std::int32_t* __restrict__ ids,               // [T, width]
                       float* __restrict__ weights,                  // [T, width]
                       std::int32_t* __restrict__ counts,            // [T]
                       index_t tokens, int experts, int width) {
  const index_t t = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= tokens) return;
  counts[t] = rule.select(span<const float>(scores + t * experts, experts),
                          span<std::int32_t>(ids + t * width, width),
                          span<float>(weights + t * width, width));
}

}  // namespace kernels

}  // namespace switchyard::cuda

namespace switchyard::detail {
using namespace ::switchyard::cuda;  // this block's helpers use switchyard::cuda's names
inline unsigned grid_for(index_t tokens, int block) {
  return static_cast<unsigned>((tokens + block - 1) / block);
}
}  // namespace switchyard::detail

namespace switchyard::cuda {

//! Launches the selection rule over precomputed scores of T tokens on `stream`. Device
//! pointers; any span the rule holds (e.g. top-any thresholds) must be device memory.
template <class Rule>
  requires SelectionRule<Rule>
void select(const Rule& rule, const float* scores, std::int32_t* ids, float* weights,
            std::int32_t* counts, index_t tokens, int experts, cudaStream_t stream) {
  if (tokens == 0) return;
  constexpr int block = 128;
  kernels::select<<<detail::grid_for(tokens, block), block, 0, stream>>>(
      rule, scores, ids, weights, counts, tokens, experts, rule.width(experts));
  check_launch("switchyard::cuda::kernels::select");
}

//! Launches softmax + selection over T tokens on `stream`. All pointers are device memory.
template <class Rule>
  requires SelectionRule<Rule>
void softmax_select(const Rule& rule, const float* logits, float* probs, std::int32_t* ids,
                    float* weights, std::int32_t* counts, index_t tokens, int experts,
                    cudaStream_t stream) {
  if (tokens == 0) return;
  constexpr int block = 128;
  kernels::softmax_select<<<detail::grid_for(tokens, block), block, 0, stream>>>(rule, logits, probs, ids, weights, counts,
                                                      tokens, experts, rule.width(experts));
  check_launch("switchyard::cuda::kernels::softmax_select");
}

}  // namespace switchyard::cuda
