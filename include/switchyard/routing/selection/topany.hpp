// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file topany.hpp
//! DynMoE top-any selection (spec §3.2): every expert whose score beats its own threshold is
//! on, and all the experts that are on share the token equally (weight 1/k).
//!
//! The rule needs one threshold per expert besides the token's scores. It holds them as a
//! span (`thresholds`, the threshold *probabilities* θ_e = σ(s·G_e), not the logits G), plus
//! an optional span over the expert mask, so it stays a trivially copyable value that a CUDA
//! kernel receives by value; the spans must point to memory the executing side can read
//! (host memory for the host backend, device memory in a kernel).

#include <cstdint>

#include <cuda/std/span>

#include "switchyard/core/span.hpp"
#include "switchyard/core/config.hpp"
#include "switchyard/routing/concepts.hpp"
#include "switchyard/routing/ranking.hpp"

namespace switchyard::routing {

//! Top-any rule of one token: given scores S_e (already multiplied by the expert mask) and
//! per-expert thresholds θ_e, expert e is on iff S_e > θ_e (strict).
//!
//! - Training: a token with no expert on gets none (count 0, the residual carries it).
//! - Eval: a token with no expert on goes to argmax_e S_e (first maximum, among active
//!   experts when `experts_mask` is given) with count 1.
//! - Weights: uniform 1/k for the k experts that are on.
//! - Order: descending S_e, ties to the lower expert index; unused slots hold -1 / 0.
struct topany_rule {
  using policy_kind = selection_rule_tag;

  //! θ_e = σ(s·G_e) for every expert, length E (the scores' length).
  span<const float> thresholds{};
  //! Optional expert mask (0 = inactive), length E; empty means every expert is active.
  //! Only consulted by the eval fallback: masked scores are already 0 and can never beat a
  //! threshold σ(·) > 0, but an all-zero score row must not fall back to a masked expert.
  span<const std::int32_t> experts_mask{};
  //! Training (no expert for an empty token) or eval (argmax fallback).
  bool training = true;

  //! Width of the plan: every expert may be on, so E (= E_max).
  [[nodiscard]] SWITCHYARD_HD int width(int num_experts) const { return num_experts; }

  //! True when expert e may be chosen by the eval fallback.
  [[nodiscard]] SWITCHYARD_HD bool active(int e) const {
    return experts_mask.empty() || experts_mask[e] != 0;
  }

  //! Selects the experts of one token. `scores` and `thresholds` have length E; `ids` and
  //! `weights` have length >= the number selected (normally E). Returns the count.
  SWITCHYARD_HD int select(span<const float> scores, span<std::int32_t> ids,
                           span<float> weights) const {
    const int n = static_cast<int>(scores.size());
    int k = 0;
    for (int e = 0; e < n; ++e) k += scores[e] > thresholds[e] ? 1 : 0;
    int used = 0;
    if (k > 0) {
      const float w = 1.0f / static_cast<float>(k);
      ranked_cursor order(scores);
      while (used < k) {
        const int e = order.next();
        if (e < 0) break;
        if (!(scores[e] > thresholds[e])) continue;
        ids[used] = e;
        weights[used] = w;
        ++used;
      }
    } else if (!training) {
      int best = -1;
      for (int e = 0; e < n; ++e) {
        if (!active(e)) continue;
        if (best < 0 || scores[e] > scores[best]) best = e;
      }
      if (best < 0) best = 0;  // no active expert at all: the router rejects this earlier
      ids[0] = best;
      weights[0] = 1.0f;
      used = 1;
    }
    for (int j = used; j < static_cast<int>(ids.size()); ++j) {
      ids[j] = -1;
      weights[j] = 0.0f;
    }
    return used;
  }
};

static_assert(check_selection_rule<topany_rule>());

}  // namespace switchyard::routing
