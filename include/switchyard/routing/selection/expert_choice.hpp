// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file expert_choice.hpp
//! Expert-choice selection (Zhou et al., "Mixture-of-Experts with Expert Choice Routing",
//! NeurIPS 2022): each expert e takes the c tokens with the highest score S[:, e] (ties to the
//! lower token index), c = ceil(T · capacity_factor / E) capped at T; a token then lists the
//! experts that took it in descending S[t, :] (ties to the lower expert id), with weights S.
//!
//! The per-token and per-expert pieces are `SWITCHYARD_HD` functions over plain arrays, so a
//! device backend can run the same code (one expert's column per block, one token's row per
//! thread). The choice of one expert reads the whole batch: it is not causal (docs/routers/
//! expert_choice.md).

#include <cstdint>

#include <cuda/std/span>

#include "switchyard/core/config.hpp"
#include "switchyard/core/span.hpp"
#include "switchyard/routing/ranking.hpp"

namespace switchyard::routing {

//! Tokens each expert takes: c = ceil(T · capacity_factor / E), capped at T (0 when T = 0).
//! The product is formed in double; one within a relative 2⁻²² of an integer (the float
//! factor's rounding) counts as that integer.
//! `capacity_factor` must be finite and > 0 (the router checks it).
SWITCHYARD_HD inline index_t expert_choice_capacity(index_t tokens, index_t experts,
                                                    float capacity_factor) {
  if (tokens <= 0 || experts <= 0) return 0;
  const double want = static_cast<double>(tokens) * static_cast<double>(capacity_factor) /
                      static_cast<double>(experts);
  if (want >= static_cast<double>(tokens)) return tokens;
  // ceil, except that a product within float rounding of an integer is that integer: the
  // factor is a float (0.4f is 0.4000000060), and T·0.4/E = 1 must give 1, not 2
  index_t c = static_cast<index_t>(want);  // floor (want >= 0)
  if (static_cast<double>(c) < want - want * 0x1p-22) ++c;
  return c;
}

}  // namespace switchyard::routing

namespace switchyard::detail {

//! Token t ranks before token u for expert e: larger S[·, e] first, then the lower token.
SWITCHYARD_HD SWITCHYARD_FORCEINLINE bool expert_choice_ranks_before(const float* scores,
                                                                     index_t experts, index_t e,
                                                                     index_t t, index_t u) {
  const float a = scores[t * experts + e], b = scores[u * experts + e];
  return a > b || (a == b && t < u);
}

//! One token's row of the plan from the choice mask: the experts with chosen[t, e] != 0 in
//! descending S (ties to the lower id), weights S. `scores`, `chosen` hold the token's E
//! values; ids/weights its `width` slots (-1 / 0 padded). Returns the count.
SWITCHYARD_HD inline int expert_choice_token_row(span<const float> scores,
                                                 const std::uint8_t* chosen,
                                                 span<std::int32_t> ids, span<float> weights) {
  const int e_count = static_cast<int>(scores.size());
  const int w = static_cast<int>(ids.size());
  int n = 0;
  for (int e = 0; e < e_count && n < w; ++e) {
    if (chosen[e] == 0) continue;
    // insertion into the sorted prefix [0, n): larger score first, then lower id
    int j = n;
    while (j > 0 && routing::ranks_before(scores[e], e, scores[ids[j - 1]], ids[j - 1])) {
      ids[j] = ids[j - 1];
      --j;
    }
    ids[j] = e;
    ++n;
  }
  for (int j = 0; j < n; ++j) weights[j] = scores[ids[j]];
  for (int j = n; j < w; ++j) {
    ids[j] = -1;
    weights[j] = 0.0f;
  }
  return n;
}

}  // namespace switchyard::detail
