// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file composition.hpp
//! Routers as compositions (docs/design.md, "Routers are compositions"): a composed router
//! names its parts and a backend's generic route runs them; it has no forward or backward of
//! its own. The parts:
//!
//! - `scoring()` (or `scoring_part()`, routing::scoring_of): how scores are made, e.g. `linear_softmax` (logits = x·Wᵀ, probs = softmax);
//!   it maps the router's params to its own (`params(p)`), checks the input, scores a plan
//!   and runs its backward from d_logits to dx and the weight gradient.
//! - the selection: `rule()`, one SelectionRule for every token, or
//!   `token_rules(params, T, workspace_arena&)`, an object whose `rule(t)` is token t's rule
//!   (DA-MoE: K_t from the token's importance), computed into workspace memory.
//! - the weights: `renormalized()`, whether the selected weights are P / Σ_selected P
//!   (backward goes through that normalisation) or the raw probabilities; or
//!   `weights_backward()`, an object whose per-row `accumulate` maps d_weights to d_probs
//!   (and d_logits) for weights of the router's own making (routers::ScoredTopK). Either's
//!   per-row `apply(probs, logits, ids, count, weights)` is the rule's weight formula for
//!   given ids (routing replay: host::route_replay).
//! - a scoring's per-row `scores_backward(probs, logits, d_probs, d_logits)`: d_probs to
//!   d_logits (linear_softmax: the softmax Jacobian; scored_linear: its score function's).
//! - a rule's `select` sees the token's scores (`select(probs, ids, weights)`, a
//!   SelectionRule) or its scores and logits (`select(probs, logits, ids, weights)`,
//!   routing::scored_selection).
//! - `loss_terms()`: a tuple of `bound_loss<&losses_type::field, Term>` (loss_terms.hpp).
//! - `validate(E)`: the checks of the router's own options.
//!
//! A router that is not a composition (DynMoE, a user's one-struct router) has
//! `forward`/`backward` (and optionally `workspace_size`) instead; backends call those.

#include <concepts>
#include <cstdint>

#include <cuda/std/span>

#include "switchyard/core/config.hpp"
#include "switchyard/core/workspace.hpp"
#include "switchyard/routing/concepts.hpp"
#include "switchyard/routing/linear_softmax.hpp"
#include "switchyard/routing/loss_terms.hpp"
#include "switchyard/routing/plan.hpp"

namespace switchyard::routing {

//! Scoring part: logits = x · Wᵀ (W [E, d], nn.Linear layout, float accumulation) and
//! probs = softmax(logits) in float32. Any params with a `w [E, d]` member score this way.
struct linear_softmax {
  //! The scoring's own params from a router's params.
  template <class P>
  [[nodiscard]] static linear_router_params params(const P& p) {
    return {p.w};
  }
  //! E.
  [[nodiscard]] static index_t num_experts(const linear_router_params& p) { return p.w.extent(0); }
  //! Throws for x [T, d] that does not match w [E, d] (or an unusable w).
  template <ElementType T>
  static void check(const matrix_view<const T>& x, const linear_router_params& p) {
    detail::check_linear_router_inputs(x, p);
  }
  //! plan.logits, plan.probs of every token (non_finite_error on a non-finite logit).
  template <ElementType T>
  static void forward(const matrix_view<const T>& x, const linear_router_params& p,
                      const plan_ref& plan) {
    linear_softmax_scores(x, p, plan);
  }
  //! d_logits += J_softmaxᵀ d_probs for one token (the generic route's per-row hook: the
  //! row of `softmax_backward_rows`).
  SWITCHYARD_HD static void scores_backward(span<const float> probs, span<const float> /*logits*/,
                                            span<const float> d_probs, span<float> d_logits) {
    softmax_backward_accumulate(probs, d_probs, d_logits);
  }
  //! dx += d_logits · W, grads.w += d_logitsᵀ · x (either may be an empty view).
  template <ElementType T>
  static void backward(const matrix_view<const T>& x, const linear_router_params& p,
                       const float* d_logits, const matrix_view<float>& dx,
                       const linear_router_grads& g) {
    linear_backward(x, p, d_logits, dx, g);
  }
};

//! Weights part of the softmax routers: the combine weights are the selected probabilities,
//! raw or renormalised over the selection (`combine_weights_backward_accumulate` per row).
struct selected_probs_weights {
  bool renormalized = false;  //!< w_j = P_j / Σ_selected P

  //! weights[j] for the first `count` slots of `ids` (the rest untouched): P_{id_j}, divided
  //! by their float sum in slot order when renormalised and the sum is > 0 (the arithmetic of
  //! topk_rule, topp_rule and adaptive_rule, so a replay of a rule's own choice gives its
  //! weights bit for bit).
  SWITCHYARD_HD void apply(span<const float> probs, span<const float> /*logits*/,
                           span<const std::int32_t> ids, int count, span<float> weights) const {
    float sum = 0.0f;
    for (int j = 0; j < count; ++j) {
      weights[j] = probs[ids[j]];
      sum += weights[j];
    }
    if (renormalized && sum > 0.0f) {
      for (int j = 0; j < count; ++j) weights[j] /= sum;
    }
  }

  //! d_probs [E] += ∂(Σ_j d_weights[j] · weights[j]) / ∂P for one token (d_logits untouched).
  SWITCHYARD_HD void accumulate(span<const float> probs, span<const float> /*logits*/,
                                span<const std::int32_t> ids, span<const float> weights,
                                span<const float> d_weights, int count, span<float> d_probs,
                                span<float> /*d_logits*/) const {
    combine_weights_backward_accumulate(probs, ids, weights, d_weights, count, renormalized,
                                        d_probs);
  }
};

//! Per-token rules of a router with one rule for every token.
template <SelectionRule Rule>
struct same_rule {
  Rule r;
  [[nodiscard]] SWITCHYARD_HD Rule rule(index_t /*token*/) const { return r; }
};

}  // namespace switchyard::routing

namespace switchyard::detail {
using namespace ::switchyard::routing;  // this block's helpers use switchyard::routing's names
template <class R>
concept has_fixed_rule = requires(const R& r) {
  { r.rule() } -> SelectionRule;
};
template <class R>
concept has_token_rules = requires(const R& r, const typename R::params_type& p, index_t t,
                                   workspace_arena& ws) { r.token_rules(p, t, ws).rule(t); };
template <class R>
concept has_scoring_part = requires(const R& r) { r.scoring_part(); };
template <class R>
concept has_scoring = requires(const R& r) { r.scoring(); };
template <class R>
concept has_renormalized = requires(const R& r) {
  { r.renormalized() } -> std::convertible_to<bool>;
};
template <class R>
concept has_weights_backward = requires(const R& r) { r.weights_backward(); };
}  // namespace switchyard::detail

namespace switchyard::routing {

//! A router made of parts (see the file comment): the generic route of a backend runs it.
template <class R>
concept ComposedRouter = Router<R> && requires(const R& r) {
  r.loss_terms();
} && (detail::has_scoring<R> || detail::has_scoring_part<R>) &&
                         (detail::has_renormalized<R> || detail::has_weights_backward<R>) &&
                         (detail::has_fixed_rule<R> || detail::has_token_rules<R>);

//! The scoring part of a composed router: `r.scoring_part()` when it has one (a router whose
//! `scoring` names a hyperparameter, routers::ScoredTopK), else `r.scoring()`.
template <class R>
auto scoring_of(const R& r) {
  if constexpr (detail::has_scoring_part<R>) {
    return r.scoring_part();
  } else {
    return r.scoring();
  }
}

//! The weights part of a composed router: `r.weights_backward()` when it has one (an object
//! with the per-row `accumulate(probs, logits, ids, weights, d_weights, count, d_probs,
//! d_logits)`), else `selected_probs_weights{r.renormalized()}`.
template <class R>
auto weights_backward(const R& r) {
  if constexpr (detail::has_weights_backward<R>) {
    return r.weights_backward();
  } else {
    return selected_probs_weights{static_cast<bool>(r.renormalized())};
  }
}

//! The per-token rules of a composed router for T tokens: `r.token_rules(p, T, ws)` when it
//! has one (it takes its arrays from `ws`, and fills them only when `ws` carves), else
//! `same_rule{r.rule()}`.
template <class R>
auto token_rules(const R& r, const typename R::params_type& p, index_t tokens,
                 workspace_arena& ws) {
  if constexpr (detail::has_token_rules<R>) {
    return r.token_rules(p, tokens, ws);
  } else {
    return same_rule<decltype(r.rule())>{r.rule()};
  }
}

}  // namespace switchyard::routing
