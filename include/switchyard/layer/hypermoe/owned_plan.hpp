// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file owned_plan.hpp
//! The check the HyperMoE variant functions (switch_variant.hpp, gpt2_variant.hpp) run on the
//! owning `routing::routing_plan` they take.

#include <cstddef>
#include <limits>

#include "switchyard/core/error.hpp"
#include "switchyard/routing/plan.hpp"

namespace switchyard::layer {}  // (declared for the using-directive below)

namespace switchyard::detail {
using namespace ::switchyard::layer;  // this block's helpers use switchyard::layer's names

//! Validates an owning plan passed to a public function: T, width and E non-negative, the
//! arrays the function reads sized for them (shape_error naming "plan.<array>"), then
//! routing::validate_plan (range_error on "plan.counts" / "plan.expert_ids" for a count
//! outside [0, width], an id outside [0, E) or a repeated expert).
inline void validate_owned_plan(const routing::routing_plan& plan) {
  detail::require_in_range<index_t>("plan.num_tokens", plan.num_tokens, 0,
                                                  std::numeric_limits<index_t>::max());
  detail::require_in_range<index_t>("plan.width", plan.width, 0,
                                                  std::numeric_limits<index_t>::max());
  detail::require_in_range<index_t>("plan.num_experts", plan.num_experts, 0,
                                                  std::numeric_limits<index_t>::max());
  const auto slots = static_cast<std::size_t>(plan.num_tokens * plan.width);
  const auto require_size = [](const char* name, std::size_t got, std::size_t want,
                               const char* meaning) {
    if (got != want) {
      throw shape_error(name, detail::concat(name, ": expected ", want,
                                                           " elements ", meaning, ", got ", got));
    }
  };
  require_size("plan.expert_ids", plan.expert_ids.size(), slots, "[T·width]");
  require_size("plan.weights", plan.weights.size(), slots, "[T·width]");
  require_size("plan.counts", plan.counts.size(), static_cast<std::size_t>(plan.num_tokens), "[T]");
  routing::validate_plan("plan", plan.view(), plan.num_tokens, plan.num_experts);
}

}  // namespace switchyard::detail
