// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file switch_variant.hpp
//! Switch-Transformer variant of HyperMoE (spec §4.1): top-1 routing =
//! routers::TopK{.k = 1, .renormalize = false}; HF's capacity in token order, its
//! load-balance quirk and the router jitter (docs/routers/hypermoe.md).

#include <cstddef>
#include <cstdint>
#include <random>
#include <vector>

#include <cuda/std/span>

#include "switchyard/core/error.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/layer/hypermoe/owned_plan.hpp"
#include "switchyard/routing/plan.hpp"

namespace switchyard::layer {

//! HF Switch capacity in token order: for every used slot, in token order, the slot is
//! dropped once its expert already holds `expert_capacity` tokens. `dropped [T·width]`
//! (slot order, 0/1) is written; returns the number of dropped slots. A dropped Switch token
//! contributes `p*·x` (the layer passes the token through) instead of `p*·Expert(x)`; the plan
//! itself (ids, weights, counts) is left as the router made it. Throws range_error for a
//! negative capacity or a plan that fails routing::validate_plan, shape_error for `dropped`.
inline index_t switch_capacity_drop(const routing::routing_plan& plan, index_t expert_capacity,
                                    span<std::int32_t> dropped) {
  if (expert_capacity < 0) {
    throw range_error("expert_capacity", detail::concat(
                                             "expert_capacity must be >= 0, got ", expert_capacity));
  }
  const auto need = static_cast<std::size_t>(plan.num_tokens * plan.width);
  if (dropped.size() != need) {
    throw shape_error("dropped", detail::concat("dropped: expected ", need,
                                                              " elements [T·width], got ",
                                                              dropped.size()));
  }
  detail::validate_owned_plan(plan);
  std::vector<index_t> load(static_cast<std::size_t>(plan.num_experts), 0);
  index_t n = 0;
  for (index_t t = 0; t < plan.num_tokens; ++t) {
    for (index_t j = 0; j < plan.width; ++j) {
      const auto slot = static_cast<std::size_t>(t * plan.width + j);
      dropped[slot] = 0;
      if (j >= plan.counts[t]) continue;
      const auto e = plan.expert_ids[slot];
      if (load[e] >= expert_capacity) {
        dropped[slot] = 1;
        ++n;
      } else {
        ++load[e];
      }
    }
  }
  return n;
}

//! HF Switch load-balance loss `E·Σ_e f_e·P̄_e` as `HM-sw` computes it: `f` from the
//! capacity-masked top-1 one-hot through `argmax`, so a token whose slot 0 was dropped counts
//! as expert 0 (upstream quirk, reproduced). `dropped` as from `switch_capacity_drop`.
//! 0 for an empty batch. Throws shape_error when plan.probs is not [T·E] or `dropped` not
//! [T·width], range_error when the plan fails routing::validate_plan.
inline float switch_hf_load_balance_loss(const routing::routing_plan& plan,
                                         span<const std::int32_t> dropped) {
  detail::validate_owned_plan(plan);
  const index_t tokens = plan.num_tokens, e_count = plan.num_experts;
  const auto probs_need = static_cast<std::size_t>(tokens * e_count);
  if (plan.probs.size() != probs_need) {
    throw shape_error("plan.probs", detail::concat(
                                        "plan.probs: expected ", probs_need,
                                        " elements [T·E], got ", plan.probs.size()));
  }
  const auto dropped_need = static_cast<std::size_t>(tokens * plan.width);
  if (dropped.size() != dropped_need) {
    throw shape_error("dropped", detail::concat("dropped: expected ", dropped_need,
                                                              " elements [T·width], got ",
                                                              dropped.size()));
  }
  if (tokens == 0) return 0.0f;
  if (e_count == 0) {  // f[0] below needs an expert 0
    throw range_error("plan.num_experts",
                      "plan.num_experts must be >= 1 for a non-empty batch, got 0");
  }
  std::vector<double> f(static_cast<std::size_t>(e_count), 0.0), pbar(f);
  for (index_t t = 0; t < tokens; ++t) {
    const bool kept = plan.counts[t] > 0 && dropped[static_cast<std::size_t>(t * plan.width)] == 0;
    f[kept ? plan.id(t, 0) : 0] += 1.0;
    for (index_t e = 0; e < e_count; ++e) pbar[e] += plan.probs[t * e_count + e];
  }
  double s = 0.0;
  for (index_t e = 0; e < e_count; ++e) s += (f[e] / tokens) * (pbar[e] / tokens);
  return static_cast<float>(s * e_count);
}

//! Router jitter of HF Switch, `x ← x ⊙ U(1−ε, 1+ε)`, applied to the *router's copy* of the
//! input only and only when training [Switchyard choice; upstream HM-sw applies it in eval
//! too and in place, so experts and adapter see the jittered x]. No-op for ε = 0.
template <class Rng>
void switch_router_jitter(const matrix_view<float>& x_router_copy, float epsilon, Rng& rng) {
  if (!(epsilon >= 0.0f)) {
    throw range_error("epsilon", detail::concat("epsilon must be >= 0, got ", epsilon));
  }
  if (epsilon == 0.0f) return;
  std::uniform_real_distribution<float> u(1.0f - epsilon, 1.0f + epsilon);
  for (index_t t = 0; t < x_router_copy.extent(0); ++t)
    for (index_t i = 0; i < x_router_copy.extent(1); ++i) x_router_copy(t, i) *= u(rng);
}

}  // namespace switchyard::layer
