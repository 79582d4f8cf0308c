// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file topp.hpp
//! Top-p selection (spec §1, Huang et al. 2024 "Harder Tasks Need More Experts"): the shortest
//! prefix of the stable descending order whose float32 running sum is strictly greater than
//! p; all experts when no prefix is. Weights are the raw probabilities (no renormalisation).

#include <cstdint>

#include <cuda/std/span>

#include "switchyard/core/span.hpp"
#include "switchyard/core/config.hpp"
#include "switchyard/routing/concepts.hpp"
#include "switchyard/routing/ranking.hpp"

namespace switchyard::routing {

//! Top-p of one token's probabilities, optionally capped at `max_k` experts.
struct topp_rule {
  using policy_kind = selection_rule_tag;
  float p = 0.4f;  //!< cumulative-probability threshold, 0 < p <= 1 (strict `>` test)
  int max_k = 0;   //!< cap on experts per token after the top-p cut; 0 = no cap (up to E)

  //! Plan width: E, or min(max_k, E) when capped.
  [[nodiscard]] SWITCHYARD_HD int width(int num_experts) const {
    return max_k > 0 && max_k < num_experts ? max_k : num_experts;
  }

  //! Writes the kept experts (descending P, ties to the lower id) and their raw P; pads -1/0.
  SWITCHYARD_HD int select(span<const float> probs,
                           span<std::int32_t> ids,
                           span<float> weights) const {
    const int experts = static_cast<int>(probs.size());
    int cap = width(experts);
    if (cap > static_cast<int>(ids.size())) cap = static_cast<int>(ids.size());
    ranked_cursor order(probs);
    float cumulative = 0.0f;  // sequential float32 sum in sorted order, as torch.cumsum
    int n = 0;
    while (n < cap) {
      const int e = order.next();
      if (e < 0) break;
      ids[n] = e;
      weights[n] = probs[e];
      ++n;
      cumulative += probs[e];
      if (cumulative > p) break;  // strict: a prefix equal to p is not enough
    }
    // No prefix exceeding p: every expert has been taken (keep-all fallback), up to the cap.
    for (int j = n; j < static_cast<int>(ids.size()); ++j) {
      ids[j] = -1;
      weights[j] = 0.0f;
    }
    return n;
  }
};

static_assert(check_selection_rule<topp_rule>());

}  // namespace switchyard::routing
