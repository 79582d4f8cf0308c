// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file relu.hpp
//! ReLU routing's per-token selection (ReMoE, Wang et al., ICLR 2025): the scores are the
//! gates g = ReLU(logits); a token uses every expert with g > 0, in descending g (ties to the
//! lower id), at most `max_k` of them; the weights are g itself (no normalisation). The
//! experts past the cap are counted by `relu_active_count` so the router can report them.

#include <cstdint>

#include <cuda/std/span>

#include "switchyard/core/config.hpp"
#include "switchyard/core/span.hpp"
#include "switchyard/routing/concepts.hpp"
#include "switchyard/routing/ranking.hpp"

namespace switchyard::routing {

//! ReLU gate of one logit: max(l, 0) (NaN stays NaN; the router refuses non-finite logits).
SWITCHYARD_HD SWITCHYARD_FORCEINLINE float relu_gate(float l) { return l > 0.0f ? l : 0.0f; }

//! The experts of one token whose gate is positive (before any cap).
SWITCHYARD_HD inline int relu_active_count(span<const float> gates) {
  int n = 0;
  for (float g : gates) n += g > 0.0f ? 1 : 0;
  return n;
}

//! Every expert with g > 0, descending g (ties to the lower id), at most `max_k`; weights = g.
struct relu_rule {
  using policy_kind = selection_rule_tag;
  int max_k = 2;  //!< the cap on experts per token, 1 <= max_k <= E (the plan's width)

  [[nodiscard]] SWITCHYARD_HD int width(int /*num_experts*/) const { return max_k; }

  //! `gates` are ReLU(logits) (all >= 0). Returns the slots used (<= max_k).
  SWITCHYARD_HD int select(span<const float> gates, span<std::int32_t> ids,
                           span<float> weights) const {
    ranked_cursor order(gates);
    const int active = relu_active_count(gates);
    const int cap = max_k < static_cast<int>(ids.size()) ? max_k : static_cast<int>(ids.size());
    const int n = active < cap ? active : cap;
    for (int j = 0; j < n; ++j) {  // the positive gates rank before every zero one
      const int e = order.next();
      ids[j] = e;
      weights[j] = gates[e];
    }
    for (int j = n; j < static_cast<int>(ids.size()); ++j) {
      ids[j] = -1;
      weights[j] = 0.0f;
    }
    return n;
  }
};

static_assert(check_selection_rule<relu_rule>());

}  // namespace switchyard::routing
