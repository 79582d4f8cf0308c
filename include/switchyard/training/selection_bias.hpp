// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file selection_bias.hpp
//! DeepSeek-V3's auxiliary-loss-free load balancing (arXiv 2412.19437, §2.1.2; Wang et al.,
//! arXiv 2408.15664): each expert has a selection bias b_e that is added to its selection
//! score only (`scored_router_params::selection_bias`; it never enters the combine weights
//! and gets no gradient). After each training step, b_e += γ · sign(mean load − load_e): an
//! overloaded expert's bias decreases by γ, an underloaded one's increases by γ (γ, the "bias
//! update speed", 0.001 in DeepSeek-V3), an expert at the mean load keeps it.
//!
//! - `count_expert_load(plan, load)`: the (token, expert) pairs the plan routes to each expert;
//! - `update_selection_bias(load, bias, gamma)`: the rule from a load (summed over the
//!   micro-batches of a step, or over data-parallel ranks, as the caller decides);
//! - `update_selection_bias(plan, bias, gamma)`: both at once for one plan.
//! No allocation.

#include <cmath>
#include <cstdint>

#include "switchyard/core/error.hpp"
#include "switchyard/core/span.hpp"
#include "switchyard/routing/plan.hpp"

namespace switchyard::training {

//! load[e] = the pairs of `plan` routed to expert e (its used slots; overwritten). `load`
//! must hold E = plan.num_experts counts (shape_error naming "load").
inline void count_expert_load(const routing::plan_ref& plan, span<index_t> load) {
  if (static_cast<index_t>(load.size()) != plan.num_experts) {
    throw shape_error("load", detail::concat("load: expected E = ", plan.num_experts,
                                             " counts (plan.num_experts), got ", load.size()));
  }
  for (auto& v : load) v = 0;
  for (index_t t = 0; t < plan.num_tokens; ++t) {
    for (index_t j = 0; j < plan.counts[t]; ++j) {
      const std::int32_t e = plan.id(t, j);
      if (e < 0 || e >= plan.num_experts) {
        throw range_error("plan.expert_ids",
                          detail::concat("plan.expert_ids[", t, ", ", j, "] must be in [0, E) = [0, ",
                                         plan.num_experts, "), got ", e));
      }
      ++load[static_cast<std::size_t>(e)];
    }
  }
}

//! bias[e] += gamma · sign(mean(load) − load[e]) for every expert (sign(0) = 0; the mean in
//! double). Throws shape_error unless load and bias have the same size, range_error unless
//! gamma is finite and >= 0.
inline void update_selection_bias(span<const index_t> load, span<float> bias, float gamma) {
  if (load.size() != bias.size()) {
    throw shape_error("bias", detail::concat("bias: expected one entry per expert (",
                                             load.size(), ", the size of load), got ",
                                             bias.size()));
  }
  if (!(gamma >= 0.0f) || !std::isfinite(gamma)) {
    throw range_error("gamma", detail::concat("gamma must be finite and >= 0, got ", gamma));
  }
  if (load.empty()) return;
  double total = 0.0;
  for (const index_t v : load) total += static_cast<double>(v);
  const double mean = total / static_cast<double>(load.size());
  for (std::size_t e = 0; e < load.size(); ++e) {
    const double gap = mean - static_cast<double>(load[e]);
    if (gap > 0.0) bias[e] += gamma;
    else if (gap < 0.0) bias[e] -= gamma;
  }
}

//! The update from one plan: counts each expert's load (O(E · T · width) time, no scratch)
//! and applies `update_selection_bias`. bias must hold plan.num_experts entries.
inline void update_selection_bias(const routing::plan_ref& plan, span<float> bias, float gamma) {
  if (static_cast<index_t>(bias.size()) != plan.num_experts) {
    throw shape_error("bias", detail::concat("bias: expected E = ", plan.num_experts,
                                             " entries (plan.num_experts), got ", bias.size()));
  }
  if (!(gamma >= 0.0f) || !std::isfinite(gamma)) {
    throw range_error("gamma", detail::concat("gamma must be finite and >= 0, got ", gamma));
  }
  const index_t experts = plan.num_experts;
  if (experts == 0) return;
  const auto load_of = [&](index_t e) {
    index_t n = 0;
    for (index_t t = 0; t < plan.num_tokens; ++t)
      for (index_t j = 0; j < plan.counts[t]; ++j) n += plan.id(t, j) == e ? 1 : 0;
    return n;
  };
  const double mean =
      static_cast<double>(plan.total_assignments()) / static_cast<double>(experts);
  for (index_t e = 0; e < experts; ++e) {
    const double gap = mean - static_cast<double>(load_of(e));
    if (gap > 0.0) bias[static_cast<std::size_t>(e)] += gamma;
    else if (gap < 0.0) bias[static_cast<std::size_t>(e)] -= gamma;
  }
}

}  // namespace switchyard::training
