// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file route.cuh
//! Device routing for any SelectionRule on precomputed logits or scores, one thread per
//! token, calling exactly the `__host__ __device__` functions the host backend calls (the
//! functors of ops/route_rows.hpp). Bitwise the host result for the same logits wherever the
//! device's expf matches the host's (same float operations in the same order). A layer's
//! router runs through router.cuh instead (logits, per-token rules, losses).

#include <cuda_runtime_api.h>

#include <cstdint>

#include "switchyard/backend/cuda/launch.cuh"
#include "switchyard/backend/cuda/tuning.hpp"
#include "switchyard/core/config.hpp"
#include "switchyard/ops/route_rows.hpp"
#include "switchyard/routing/composition.hpp"
#include "switchyard/routing/concepts.hpp"

namespace switchyard::cuda {

//! Launches the selection rule over precomputed scores of T tokens on `stream`:
//! rule.select(scores[t]) -> ids[t], weights[t], counts[t]. Device pointers; any span the
//! rule holds (e.g. top-any thresholds) must be device memory. Nothing for T = 0.
template <class Rule>
requires SelectionRule<Rule>
void select(const Rule& rule, const float* scores, std::int32_t* ids, float* weights,
            std::int32_t* counts, index_t tokens, int experts, cudaStream_t stream) {
  for_each<tuning::tokens_block>(
      stream, tokens,
      ops::select_token<routing::same_rule<Rule>>{
          {rule}, scores, ids, weights, counts, experts, rule.width(experts)},
      "switchyard::ops::select_token");
}

//! Launches softmax + selection over T tokens on `stream`: probs[t] = softmax(logits[t]),
//! rule.select(probs[t]) -> ids[t], weights[t], counts[t]. A token with a non-finite logit
//! routes to no expert (count 0, ids -1, weights 0, probs 0). All pointers are device memory.
template <class Rule>
requires SelectionRule<Rule>
void softmax_select(const Rule& rule, const float* logits, float* probs, std::int32_t* ids,
                    float* weights, std::int32_t* counts, index_t tokens, int experts,
                    cudaStream_t stream) {
  for_each<tuning::tokens_block>(
      stream, tokens,
      ops::route_token<routing::same_rule<Rule>>{
          {rule}, logits, probs, ids, weights, counts, experts, rule.width(experts)},
      "switchyard::ops::route_token");
}

}  // namespace switchyard::cuda
