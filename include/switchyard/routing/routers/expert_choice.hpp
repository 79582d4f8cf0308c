// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file expert_choice.hpp
//! `routers::ExpertChoice`: expert-choice routing (Zhou et al., "Mixture-of-Experts with
//! Expert Choice Routing", NeurIPS 2022). Scores S = softmax(x · Wᵀ) over the experts of each
//! token; each expert takes its c tokens of highest S[:, e] (ties to the lower token index),
//! c = ceil(T · capacity_factor / E) capped at T (routing::expert_choice_capacity), so every
//! expert gets exactly c tokens and a token gets 0…E experts. The plan (width E) lists a
//! token's experts in descending S[t, :] (ties to the lower id) with weights S[t, e]; a token
//! no expert took has count 0 (its output is 0, as in the paper).
//!
//! Batch-dependent and not causal: whether token t is routed depends on every other token of
//! the call (docs/routers/expert_choice.md), so it cannot serve autoregressive decoding as is.
//!
//! Plan fields: `logits [T, E]` = x · Wᵀ, `probs [T, E]` = S. There is no trainable loss (the
//! paper needs none: the load is balanced by construction); `routing::expert_choice_losses`
//! reports the capacity and the tokens left without an expert.
//! Backward: d_S at the chosen entries = d_w, softmax backward, then dx and dW.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include <cuda/std/span>

#include "switchyard/core/element_type.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/span.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/core/workspace.hpp"
#include "switchyard/routing/concepts.hpp"
#include "switchyard/routing/linear_softmax.hpp"
#include "switchyard/routing/plan.hpp"
#include "switchyard/routing/selection/expert_choice.hpp"
#include "switchyard/routing/loss_fields.hpp"

namespace switchyard::routing {

//! What an expert-choice forward measured (no trainable loss: as coefficients in backward
//! these fields are ignored).
struct expert_choice_losses {
  index_t capacity = 0;         //!< c: tokens each expert took
  index_t routed_pairs = 0;     //!< E · c, the plan's (token, expert) pairs
  index_t unrouted_tokens = 0;  //!< tokens no expert took (count 0, output 0)
  //! None: backward reads no coefficient (training/aux_loss.hpp).
  static constexpr auto coefficient_fields() {
    return std::tuple<>{};
  }
};

}  // namespace switchyard::routing

namespace switchyard::routers {

//! Expert-choice router. Parameters: `w [E, d]` (routing::linear_router_params). Width E.
struct ExpertChoice {
  using policy_kind = router_tag;
  using params_type = routing::linear_router_params;
  using grads_type = routing::linear_router_grads;
  using losses_type = routing::expert_choice_losses;

  //! Capacity factor: each expert takes c = ceil(T · capacity_factor / E) tokens (capped at T);
  //! finite and > 0. 1 gives one expert per token on average; the paper uses 2.
  float capacity_factor = 2.0f;

  [[nodiscard]] index_t num_experts(const params_type& p) const { return p.w.extent(0); }
  //! The plan's width: E (a token may be taken by every expert).
  [[nodiscard]] index_t width(const params_type& p) const { return p.w.extent(0); }

  //! Checks capacity_factor (range_error naming "capacity_factor").
  void validate(index_t /*experts*/) const {
    if (!std::isfinite(capacity_factor) || !(capacity_factor > 0.0f)) {
      throw range_error("capacity_factor",
                        detail::concat("capacity_factor must be finite and > 0, got ", capacity_factor));
    }
  }

  //! c for a batch of T tokens and E experts.
  [[nodiscard]] index_t capacity(index_t tokens, index_t experts) const {
    return routing::expert_choice_capacity(tokens, experts, capacity_factor);
  }

  //! Bytes forward or backward take from the workspace (the larger).
  [[nodiscard]] std::size_t workspace_size(index_t tokens, const params_type& p) const {
    workspace_arena fwd, bwd;
    (void)take_forward(fwd, tokens, p.w.extent(0));
    (void)take_backward(bwd, tokens, p.w.extent(0));
    return fwd.required() > bwd.required() ? fwd.required() : bwd.required();
  }

  //! Scores x [T, d], lets every expert choose its c tokens, writes the plan and the counts.
  //! Throws shape_error (x, params.w, plan), range_error (capacity_factor), non_finite_error.
  template <ElementType T>
  void forward(const matrix_view<const T>& x, const params_type& p, const routing::plan_ref& plan,
               losses_type& losses, workspace_arena& ws) const {
    detail::check_linear_router_inputs(x, p);
    const index_t tokens = x.extent(0), e_count = p.w.extent(0);
    validate(e_count);
    detail::require_plan(plan, tokens, e_count, e_count);
    const forward_scratch s = take_forward(ws, tokens, e_count);
    if (!ws.carving()) return;  // measuring arena: sizes only
    losses = {};
    if (tokens == 0) return;
    routing::linear_softmax_scores(x, p, plan);
    const index_t c = capacity(tokens, e_count);
    const float* scores = plan.probs.data();
    std::fill(s.chosen, s.chosen + tokens * e_count, std::uint8_t{0});
    // each expert's column: its c best tokens (a total order, so any thread count agrees)
#pragma omp parallel for schedule(static) if (tokens * e_count > (1 << 14))
    for (index_t e = 0; e < e_count; ++e) {
      std::int32_t* order = s.order + e * tokens;
      for (index_t t = 0; t < tokens; ++t) order[t] = static_cast<std::int32_t>(t);
      std::partial_sort(order, order + c, order + tokens, [&](std::int32_t a, std::int32_t b) {
        return detail::expert_choice_ranks_before(scores, e_count, e, a, b);
      });
      for (index_t j = 0; j < c; ++j) s.chosen[static_cast<index_t>(order[j]) * e_count + e] = 1;
    }
#pragma omp parallel for schedule(static) if (tokens > 256)
    for (index_t t = 0; t < tokens; ++t) {
      plan.counts[t] = detail::expert_choice_token_row(
          span<const float>(scores + t * e_count, e_count), s.chosen + t * e_count,
          span<std::int32_t>(plan.expert_ids.data() + t * e_count, e_count),
          span<float>(plan.weights.data() + t * e_count, e_count));
    }
    losses.capacity = c;
    losses.routed_pairs = c * e_count;
    for (index_t t = 0; t < tokens; ++t) losses.unrouted_tokens += plan.counts[t] == 0 ? 1 : 0;
  }

  //! Backward of Σ d_weights ⊙ weights (weights = S at the chosen entries): dx [T, d] += ∂/∂x,
  //! grads.w [E, d] += ∂/∂W (either may be an empty view). `d_weights` is [T, E] in slot
  //! order. `coeffs` is unused (no trainable loss). Throws shape_error, null_pointer_error.
  template <ElementType T>
  void backward(const matrix_view<const T>& x, const params_type& p, const routing::plan_ref& plan,
                const float* d_weights, const losses_type& /*coeffs*/, const matrix_view<float>& dx,
                const grads_type& grads, workspace_arena& ws) const {
    detail::check_linear_router_inputs(x, p);
    const index_t tokens = x.extent(0), e_count = p.w.extent(0);
    validate(e_count);
    if (plan.num_tokens != tokens || plan.num_experts != e_count || plan.width != e_count) {
      throw shape_error("plan", detail::concat("plan: expected T = ", tokens, ", width = E = ", e_count,
                                               ", E = ", e_count,
                                               " (the forward of this x and params), got T = ",
                                               plan.num_tokens, ", width = ", plan.width,
                                               ", E = ", plan.num_experts));
    }
    plan.check("plan");
    if (detail::present(dx)) check_view("dx", dx, {tokens, x.extent(1)}, "[T, d]");
    if (detail::present(grads.w)) check_view("grads.w", grads.w, {e_count, x.extent(1)}, "[E, d]");
    if (tokens > 0 && d_weights == nullptr) {
      throw null_pointer_error("d_weights", detail::concat("d_weights: null, expected [T, E] = [",
                                                           tokens, ", ", e_count, "] cotangents"));
    }
    const backward_scratch s = take_backward(ws, tokens, e_count);
    if (!ws.carving() || tokens == 0) return;  // measuring arena, or an empty batch
#pragma omp parallel for schedule(static) if (tokens * e_count > (1 << 16))
    for (index_t t = 0; t < tokens; ++t) {
      float* dp = s.d_probs + t * e_count;
      for (index_t e = 0; e < e_count; ++e) {
        dp[e] = 0.0f;
        s.d_logits[t * e_count + e] = 0.0f;
      }
      for (index_t j = 0; j < plan.counts[t]; ++j) {
        const std::int32_t e = plan.id(t, j);
        if (e >= 0 && e < e_count) dp[e] += d_weights[t * e_count + j];
      }
    }
    routing::softmax_backward_rows(plan, s.d_probs, s.d_logits);
    routing::linear_backward(x, p, s.d_logits, dx, grads);
  }

 private:
  struct forward_scratch {
    std::int32_t* order;   // [E, T] each expert's token ranking
    std::uint8_t* chosen;  // [T, E] 1 where expert e took token t
  };
  struct backward_scratch {
    float* d_probs;   // [T, E]
    float* d_logits;  // [T, E]
  };
  static forward_scratch take_forward(workspace_arena& ws, index_t tokens, index_t e_count) {
    forward_scratch s{};
    s.order = ws.take<std::int32_t>(e_count * tokens);
    s.chosen = ws.take<std::uint8_t>(tokens * e_count);
    return s;
  }
  static backward_scratch take_backward(workspace_arena& ws, index_t tokens, index_t e_count) {
    backward_scratch s{};
    s.d_probs = ws.take<float>(tokens * e_count);
    s.d_logits = ws.take<float>(tokens * e_count);
    return s;
  }
};

static_assert(check_router<ExpertChoice>());

}  // namespace switchyard::routers
