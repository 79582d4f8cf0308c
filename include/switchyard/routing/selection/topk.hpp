// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file topk.hpp
//! Classic top-k selection (spec §0.1): the first k experts of the stable descending order
//! of the softmax probabilities; weights raw (Switch) or renormalised over the k (GShard,
//! DeepSpeed top-2, Mixtral).

#include <cuda/std/span>

#include "switchyard/core/span.hpp"
#include "switchyard/core/config.hpp"
#include "switchyard/routing/concepts.hpp"
#include "switchyard/routing/ranking.hpp"

namespace switchyard::routing {

//! Top-k of one token's probabilities.
struct topk_rule {
  using policy_kind = selection_rule_tag;
  int k = 2;                 //!< experts per token, 1 <= k <= E
  bool renormalize = true;   //!< w_j = P_j / Σ_selected P (true) or raw P_j (false)

  [[nodiscard]] SWITCHYARD_HD int width(int /*num_experts*/) const { return k; }

  SWITCHYARD_HD int select(span<const float> probs, span<std::int32_t> ids,
                           span<float> weights) const {
    ranked_cursor order(probs);
    float sum = 0.0f;
    int n = 0;
    const int kk = k < static_cast<int>(probs.size()) ? k : static_cast<int>(probs.size());
    for (; n < kk; ++n) {
      const int e = order.next();
      ids[n] = e;
      weights[n] = probs[e];
      sum += probs[e];
    }
    for (int j = n; j < static_cast<int>(ids.size()); ++j) {
      ids[j] = -1;
      weights[j] = 0.0f;
    }
    if (renormalize && sum > 0.0f) {
      for (int j = 0; j < n; ++j) weights[j] /= sum;
    }
    return n;
  }
};

static_assert(check_selection_rule<topk_rule>());

}  // namespace switchyard::routing
