// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file adaptive.hpp
//! Adaptive Gating selection (spec §5, Li et al., EMNLP 2023): a token uses its top-2 experts
//! when the two largest probabilities are within the threshold (p1 − p2 <= T, float32), else
//! only its top-1 expert.

#include <cstdint>

#include <cuda/std/span>

#include "switchyard/core/span.hpp"
#include "switchyard/core/config.hpp"
#include "switchyard/routing/concepts.hpp"
#include "switchyard/routing/ranking.hpp"

namespace switchyard::routing {

//! Top-1 or top-2 of one token's probabilities, decided by p1 − p2 <= threshold.
struct adaptive_rule {
  using policy_kind = selection_rule_tag;
  float threshold = 0.1f;  //!< T >= 0; top-2 iff p1 − p2 <= T (exact ties -> top-2 even at T = 0)
  bool renormalize = true;  //!< w_j = P_j / Σ_selected P (top-1 -> 1.0) or raw P_j

  //! Plan width: 2 (1 when there is a single expert).
  [[nodiscard]] SWITCHYARD_HD int width(int num_experts) const {
    return num_experts < 2 ? num_experts : 2;
  }

  //! Writes 1 or 2 experts (descending P, ties to the lower id) and their weights; pads -1/0.
  SWITCHYARD_HD int select(span<const float> probs,
                           span<std::int32_t> ids,
                           span<float> weights) const {
    ranked_cursor order(probs);
    const int e1 = order.next();
    const int e2 = order.next();
    const float p1 = probs[e1];
    int n = 1;
    ids[0] = e1;
    weights[0] = p1;
    if (e2 >= 0 && ids.size() >= 2) {
      const float p2 = probs[e2];
      if (p1 - p2 <= threshold) {
        ids[1] = e2;
        weights[1] = p2;
        n = 2;
      }
    }
    for (int j = n; j < static_cast<int>(ids.size()); ++j) {
      ids[j] = -1;
      weights[j] = 0.0f;
    }
    if (renormalize) {
      const float s = n == 2 ? weights[0] + weights[1] : weights[0];
      if (s > 0.0f)
        for (int j = 0; j < n; ++j) weights[j] /= s;
    }
    return n;
  }
};

static_assert(check_selection_rule<adaptive_rule>());

}  // namespace switchyard::routing
