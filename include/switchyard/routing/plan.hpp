// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file plan.hpp
//! The RoutingPlan: the one data structure between router and dispatch. Padded to a fixed
//! width per token so that dynamic routers (1, k or any experts per token) flow through the
//! same dispatch as top-k.

#include <cstdint>
#include <string_view>
#include <vector>

#include "switchyard/core/checked.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/view.hpp"

namespace switchyard::detail {
//! a · b for the plan sizes `a_name` = a and `b_name` = b: range_error naming the negative one,
//! or the larger one when the product does not fit in index_t (core/checked.hpp).
inline index_t plan_size_product(std::string_view a_name, index_t a, std::string_view b_name,
                                 index_t b) {
  const bool blame_a = a < 0 || (b >= 0 && a >= b);
  return blame_a ? checked_mul(a_name, a, b) : checked_mul(b_name, a, b);
}
}  // namespace switchyard::detail

namespace switchyard::routing {

//! Sentinel expert id of an unused slot in `expert_ids`.
inline constexpr std::int32_t unused_slot = -1;

//! Non-owning view of a routing plan (host or device memory).
template <class Id = std::int32_t, class W = float>
struct plan_view {
  matrix_view<Id> expert_ids;  //!< [T, width], descending score, ties to the lower id, -1 pad
  matrix_view<W> weights;      //!< [T, width], combine weights, 0 pad
  vector_view<Id> counts;      //!< [T], slots used by each token
  index_t num_experts = 0;     //!< E: ids lie in [0, E)

  [[nodiscard]] index_t num_tokens() const { return counts.extent(0); }
  [[nodiscard]] index_t width() const { return expert_ids.extent(1); }
};

//! A routing plan in caller memory (host or device): the selection (ids, weights, counts)
//! with what backward and statistics need besides it (the router's logits and the scores the
//! selection rule saw). Non-owning, like `std::string_view` to `routing_plan`'s string: the
//! layer's forward writes one, its backward reads one. Routers and backends take a plan_ref.
struct plan_ref {
  index_t num_tokens = 0;   //!< T
  index_t width = 0;        //!< max experts per token (max_k)
  index_t num_experts = 0;  //!< E (DynMoE: E_max slots)

  span<std::int32_t> expert_ids;  //!< [T, width]
  span<float> weights;            //!< [T, width]
  span<std::int32_t> counts;      //!< [T]
  span<float> logits;             //!< [T, E] router pre-activation scores
  span<float> probs;              //!< [T, E] the scores the selection rule saw

  //! Elements each array must hold for T tokens, `width` slots and E experts.
  struct sizes {
    index_t slots, tokens, scores;
  };
  //! Throws range_error naming "tokens", "width" or "E" when one is negative or a product
  //! does not fit in index_t.
  [[nodiscard]] static sizes required(index_t t, index_t w, index_t e) {
    return {detail::plan_size_product("tokens", t, "width", w), t,
            detail::plan_size_product("tokens", t, "E", e)};
  }

  //! Throws shape_error naming `argument.<array>` unless every array holds its size.
  void check(std::string_view argument) const {
    const sizes n = required(num_tokens, width, num_experts);
    // Names are built only on failure: a valid plan costs no allocation.
    auto need = [&](std::string_view name, const void* data, std::size_t got, index_t want) {
      if (static_cast<index_t>(got) != want) {
        const std::string arg = detail::concat(argument, ".", name);
        throw shape_error(arg, detail::concat(arg, ": expected ", want, " elements (T = ",
                                                            num_tokens, ", width = ", width, ", E = ",
                                                            num_experts, "), got ", got));
      }
      if (data == nullptr && want != 0) {
        detail::require_data(detail::concat(argument, ".", name), data,
                                           want);
      }
    };
    need("expert_ids", expert_ids.data(), expert_ids.size(), n.slots);
    need("weights", weights.data(), weights.size(), n.slots);
    need("counts", counts.data(), counts.size(), n.tokens);
    need("logits", logits.data(), logits.size(), n.scores);
    need("probs", probs.data(), probs.size(), n.scores);
  }

  //! Marks every slot unused (id -1, weight 0, count 0); logits and probs are left as they are.
  void reset_selection() const {
    for (auto& v : expert_ids) v = unused_slot;
    for (auto& v : weights) v = 0.0f;
    for (auto& v : counts) v = 0;
  }

  [[nodiscard]] plan_view<std::int32_t, float> view() const {
    return {make_view(expert_ids.data(), num_tokens, width),
            make_view(weights.data(), num_tokens, width), make_view(counts.data(), num_tokens),
            num_experts};
  }
  [[nodiscard]] plan_view<const std::int32_t, const float> const_view() const {
    return {make_view<const std::int32_t>(expert_ids.data(), num_tokens, width),
            make_view<const float>(weights.data(), num_tokens, width),
            make_view<const std::int32_t>(counts.data(), num_tokens), num_experts};
  }
  [[nodiscard]] std::int32_t id(index_t t, index_t j) const {
    return expert_ids[static_cast<std::size_t>(t * width + j)];
  }
  [[nodiscard]] float weight(index_t t, index_t j) const {
    return weights[static_cast<std::size_t>(t * width + j)];
  }
  //! Total (token, expert) pairs the plan routes: Σ_t counts[t].
  [[nodiscard]] index_t total_assignments() const {
    index_t n = 0;
    for (auto c : counts) n += c;
    return n;
  }
};

}  // namespace switchyard::routing

namespace switchyard::detail {
using namespace ::switchyard::routing;  // this block's helpers use switchyard::routing's names
//! A router's forward entry check: `plan` is sized for T tokens, `width` slots and E experts
//! (shape_error naming "plan" otherwise); its selection is reset to unused slots.
inline void require_plan(const plan_ref& plan, index_t t, index_t width, index_t e) {
  if (plan.num_tokens != t || plan.width != width || plan.num_experts != e) {
    throw shape_error("plan", detail::concat(
                                  "plan: expected T = ", t, ", width = ", width, ", E = ", e,
                                  " (from x and the router's params), got T = ", plan.num_tokens,
                                  ", width = ", plan.width, ", E = ", plan.num_experts));
  }
  plan.check("plan");
  plan.reset_selection();
}
}  // namespace switchyard::detail

namespace switchyard::routing {

//! Host-owning routing plan (the convenience owner of a plan_ref's arrays).
struct routing_plan {
  index_t num_tokens = 0;   //!< T
  index_t width = 0;        //!< max experts per token (max_k)
  index_t num_experts = 0;  //!< E (DynMoE: E_max slots)

  std::vector<std::int32_t> expert_ids;  //!< [T, width]
  std::vector<float> weights;            //!< [T, width]
  std::vector<std::int32_t> counts;      //!< [T]
  std::vector<float> logits;             //!< [T, E] router pre-activation scores
  std::vector<float> probs;              //!< [T, E] the scores the selection rule saw

  //! Sizes every array for T tokens, `width` slots and E experts; slots are reset to unused.
  //! Allocates only when an array grows past its capacity. Throws range_error naming
  //! "tokens", "width" or "E" (plan_ref::required), leaving the plan as it was, when a size is
  //! negative or a product does not fit in index_t.
  void resize(index_t t, index_t w, index_t e) {
    const plan_ref::sizes n = plan_ref::required(t, w, e);
    expert_ids.assign(static_cast<std::size_t>(n.slots), unused_slot);
    weights.assign(static_cast<std::size_t>(n.slots), 0.0f);
    counts.assign(static_cast<std::size_t>(n.tokens), 0);
    logits.assign(static_cast<std::size_t>(n.scores), 0.0f);
    probs.assign(static_cast<std::size_t>(n.scores), 0.0f);
    num_tokens = t;
    width = w;
    num_experts = e;
  }

  //! The arrays as a plan_ref (what routers and backends take).
  [[nodiscard]] plan_ref ref() {
    return {num_tokens, width, num_experts,
            {expert_ids.data(), expert_ids.size()}, {weights.data(), weights.size()},
            {counts.data(), counts.size()}, {logits.data(), logits.size()},
            {probs.data(), probs.size()}};
  }
  //! Read-only use of a const owner (backward, statistics): the spans are not written through.
  [[nodiscard]] plan_ref ref() const { return const_cast<routing_plan*>(this)->ref(); }
  // NOLINTNEXTLINE(google-explicit-constructor): an owner is usable wherever its view is.
  operator plan_ref() { return ref(); }
  // NOLINTNEXTLINE(google-explicit-constructor)
  operator plan_ref() const { return ref(); }

  [[nodiscard]] plan_view<std::int32_t, float> view() {
    return {make_view(expert_ids.data(), num_tokens, width),
            make_view(weights.data(), num_tokens, width), make_view(counts.data(), num_tokens),
            num_experts};
  }
  [[nodiscard]] plan_view<const std::int32_t, const float> view() const {
    return {make_view(expert_ids.data(), num_tokens, width),
            make_view(weights.data(), num_tokens, width), make_view(counts.data(), num_tokens),
            num_experts};
  }
  [[nodiscard]] std::int32_t id(index_t t, index_t j) const {
    return expert_ids[static_cast<std::size_t>(t * width + j)];
  }
  [[nodiscard]] float weight(index_t t, index_t j) const {
    return weights[static_cast<std::size_t>(t * width + j)];
  }
  //! Total (token, expert) pairs the plan routes: Σ_t counts[t].
  [[nodiscard]] index_t total_assignments() const {
    index_t n = 0;
    for (auto c : counts) n += c;
    return n;
  }
  //! Mean experts per token (0 for an empty batch).
  [[nodiscard]] double mean_k() const {
    return num_tokens == 0 ? 0.0 : static_cast<double>(total_assignments()) / num_tokens;
  }
};

//! Converts a dense cotangent `d_dense [T, E]` of the combine weights to the plan's slots
//! `d_slots [T, width]` (unused slots get 0).
inline void dense_to_slot_cotangent(const plan_ref& plan, const float* d_dense,
                                    float* d_slots) {
  for (index_t t = 0; t < plan.num_tokens; ++t) {
    for (index_t j = 0; j < plan.width; ++j) {
      const auto e = plan.id(t, j);
      d_slots[t * plan.width + j] = e < 0 ? 0.0f : d_dense[t * plan.num_experts + e];
    }
  }
}

//! Validates a plan view against T and E: ids in [-1, E), counts in [0, width], used slots
//! first, and no expert twice among one token's used slots (a repeat would run that expert
//! twice for the token and, with `dense` dispatch, add its dx twice in backward). Throws
//! shape_error / range_error naming `argument`. O(T · width²) time, no allocation.
template <class Id, class W>
void validate_plan(std::string_view argument, const plan_view<Id, W>& plan, index_t t,
                   index_t e) {
  // Argument names are built only when a check fails (a valid plan costs no allocation).
  const auto name = [&](std::string_view part) {
    return detail::concat(argument, part);
  };
  const bool null_data = (plan.expert_ids.data_handle() == nullptr && plan.expert_ids.size() != 0) ||
                         (plan.weights.data_handle() == nullptr && plan.weights.size() != 0) ||
                         (plan.counts.data_handle() == nullptr && plan.counts.size() != 0);
  if (null_data || plan.expert_ids.extent(0) != t || plan.weights.extent(0) != t ||
      plan.weights.extent(1) != plan.width() || plan.counts.extent(0) != t) {
    check_view(name(".expert_ids"), plan.expert_ids, {t, -1});
    check_view(name(".weights"), plan.weights, {t, plan.width()});
    check_view(name(".counts"), plan.counts, {t});
  }
  for (index_t i = 0; i < t; ++i) {
    const index_t c = plan.counts(i);
    if (c < 0 || c > plan.width()) {
      throw range_error(detail::concat(argument, ".counts"),
                        detail::concat(argument, ".counts[", i, "] must be in [0, ", plan.width(),
                               "], got ", c));
    }
    for (index_t j = 0; j < plan.width(); ++j) {
      const index_t id = plan.expert_ids(i, j);
      const bool used = j < c;
      if ((used && (id < 0 || id >= e)) || (!used && id != unused_slot)) {
        throw range_error(detail::concat(argument, ".expert_ids"),
                          detail::concat(argument, ".expert_ids[", i, ", ", j, "] must be ",
                                 used ? detail::concat("in [0, ", e, ")") : std::string("-1 (unused)"),
                                 ", got ", id));
      }
      for (index_t first = 0; used && first < j; ++first) {
        if (static_cast<index_t>(plan.expert_ids(i, first)) != id) continue;
        throw range_error(detail::concat(argument, ".expert_ids"),
                          detail::concat(argument, ".expert_ids[", i, ", ", j,
                                                       "] repeats expert ", id, " (also in slot ",
                                                       first, "); a token's used slots must name "
                                                       "distinct experts"));
      }
    }
  }
}

}  // namespace switchyard::routing
