// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file route.hpp
//! How the host backend runs a router: its forward into a caller's plan_ref with scratch from
//! a workspace arena, its backward, and the bytes both take. A composed router (TopK, TopP,
//! Adaptive Gating, DA-MoE, ScoredTopK: routing::ComposedRouter) runs through the one generic
//! route below (scoring, selection of every token, loss terms; backward through the same
//! parts: weights, probability terms, the scoring's per-row scores backward, logit terms); any
//! other router (DynMoE, a user's one-struct router) through its own forward/backward.
//! Plus conveniences for direct use of a router on the host (tests, tools, a plan made
//! outside a layer): `host::route`, `host::route_backward` and `host::route_backward_logits`,
//! which size an owning `routing_plan` and allocate the scratch.
//!
//! Routing replay (docs/routers/dynamic_compute.md): `host::router_replay` /
//! `host::route_replay` score x like forward but take the selection (ids, counts) from the
//! caller (an RL rollout's routing, a plan a forward returned), validated like any plan; the
//! combine weights are the router's weight formula for those ids (its weights part's `apply`)
//! and the loss terms see the replayed plan, so `router_backward` on the result gives the
//! router its gradients.

#include <algorithm>
#include <array>
#include <cstddef>
#include <concepts>
#include <tuple>
#include <type_traits>
#include <vector>

#include "switchyard/core/element_type.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/core/workspace.hpp"
#include "switchyard/routing/composition.hpp"
#include "switchyard/routing/concepts.hpp"
#include "switchyard/routing/plan.hpp"

namespace switchyard::host {

}  // namespace switchyard::host

namespace switchyard::detail {
using namespace ::switchyard::host;  // this block's helpers use switchyard::host's names

//! Calls f(bound_loss) for every loss term of a composed router, in the router's order.
template <class Terms, class F>
void for_each_term(const Terms& terms, F&& f) {
  std::apply([&](const auto&... t) { (f(t), ...); }, terms);
}

//! Scratch of every loss term, carved in the router's order (the same code measures it).
template <class Terms>
auto carve_term_scratch(const Terms& terms, index_t experts, workspace_arena& ws) {
  std::array<double*, std::tuple_size_v<Terms>> out{};
  std::size_t i = 0;
  for_each_term(terms, [&](const auto& b) { out[i++] = ws.take<double>(b.term.scratch_doubles(experts)); });
  return out;
}

//! The selection of every token: rules.rule(t).select(probs_t) -> ids, weights, counts (or
//! select(probs_t, logits_t, ...) for a rule that reads the logits too).
template <class Rules>
void select_tokens(const Rules& rules, const routing::plan_ref& plan) {
  const index_t tokens = plan.num_tokens, e = plan.num_experts, w = plan.width;
  using rule_type = decltype(rules.rule(index_t{0}));
  constexpr bool reads_logits =
      requires(const rule_type& r, span<const float> s, span<std::int32_t> i, span<float> o) {
        r.select(s, s, i, o);
      };
#pragma omp parallel for schedule(static) if (tokens > 256)
  for (index_t t = 0; t < tokens; ++t) {
    const auto probs = span<const float>(plan.probs.data() + t * e, e);
    const auto ids = span<std::int32_t>(plan.expert_ids.data() + t * w, w);
    const auto weights = span<float>(plan.weights.data() + t * w, w);
    if constexpr (reads_logits) {
      plan.counts[t] = rules.rule(t).select(
          probs, span<const float>(plan.logits.data() + t * e, e), ids, weights);
    } else {
      plan.counts[t] = rules.rule(t).select(probs, ids, weights);
    }
  }
}

//! Throws unsupported_error when `p` carries the per-token compute knob
//! (linear_router_params::token_max_k / token_threshold) and router R does not take it
//! (only routers with `token_knob`: TopK, TopP, AdaptiveGating).
template <class R, class P>
void refuse_token_knob(const R& /*r*/, const P& p) {
  if constexpr (requires { p.token_max_k; p.token_threshold; } && !requires { R::token_knob; }) {
    if (detail::present(p.token_max_k) || detail::present(p.token_threshold)) {
      throw unsupported_error(
          "switchyard: params.token_max_k / params.token_threshold (the per-token compute "
          "knob) are taken by TopK, TopP and AdaptiveGating only; this router would ignore "
          "them");
    }
  }
}

//! Generic forward of a composed router: checks the input and the router's options, the
//! per-token rules (from `ws`), scores into `plan`, selects every token, and writes each loss
//! term's value to its field of `losses`.
template <routing::ComposedRouter R, ElementType T>
void composed_forward(const R& r, const matrix_view<const T>& x, const typename R::params_type& p,
                      const routing::plan_ref& plan, typename R::losses_type& losses,
                      workspace_arena& ws) {
  const auto scoring = routing::scoring_of(r);
  const auto sp = scoring.params(p);
  scoring.check(x, sp);
  r.validate(scoring.num_experts(sp));
  refuse_token_knob(r, p);
  const index_t tokens = x.extent(0), experts = r.num_experts(p);
  const auto rules = routing::token_rules(r, p, tokens, ws);
  const auto terms = r.loss_terms();
  const auto scratch = carve_term_scratch(terms, experts, ws);
  detail::require_plan(plan, tokens, r.width(p), experts);
  scoring.forward(x, sp, plan);
  select_tokens(rules, plan);
  std::size_t i = 0;
  for_each_term(terms, [&](const auto& b) { losses.*(b.field) = b.term.value(plan, scratch[i++]); });
}

//! Generic d_logits [T, E] of a composed router (overwritten): d_probs [T, E] (from `ws`) =
//! the weights part's backward of d_weights (routing::weights_backward: through the
//! renormalisation when the router renormalises; a part may also write d_logits directly) +
//! the probability loss terms' gradients, the scoring's per-row `scores_backward` to
//! d_logits (softmax for linear_softmax), + the logit loss terms' gradients; each term in the
//! router's order, scaled by its field of `coeff`.
template <routing::ComposedRouter R>
void composed_backward_logits(const R& r, const routing::plan_ref& plan, const float* d_weights,
                              const typename R::losses_type& coeff, float* d_logits,
                              workspace_arena& ws) {
  const index_t tokens = plan.num_tokens, e_count = plan.num_experts;
  float* d_probs = ws.take<float>(tokens * e_count);
  const auto terms = r.loss_terms();
  const auto scratch = carve_term_scratch(terms, e_count, ws);
  if (!ws.carving()) return;
  const index_t w = plan.width;
  std::fill(d_probs, d_probs + tokens * e_count, 0.0f);
  std::fill(d_logits, d_logits + tokens * e_count, 0.0f);
  const auto weights_part = routing::weights_backward(r);
  const auto row = [&](const float* a, index_t t) {
    return span<const float>(a + t * e_count, static_cast<std::size_t>(e_count));
  };
  for (index_t t = 0; t < tokens; ++t) {
    weights_part.accumulate(row(plan.probs.data(), t), row(plan.logits.data(), t),
                            span<const std::int32_t>(plan.expert_ids.data() + t * w, w),
                            span<const float>(plan.weights.data() + t * w, w),
                            span<const float>(d_weights + t * w, w), plan.counts[t],
                            span<float>(d_probs + t * e_count, e_count),
                            span<float>(d_logits + t * e_count, e_count));
  }
  std::size_t i = 0;
  for_each_term(terms, [&](const auto& b) {
    if constexpr (std::remove_cvref_t<decltype(b.term)>::target == routing::loss_target::probs)
      b.term.backward(plan, coeff.*(b.field), d_probs, scratch[i]);
    ++i;
  });
  const auto scoring = routing::scoring_of(r);
  for (index_t t = 0; t < tokens; ++t) {
    scoring.scores_backward(row(plan.probs.data(), t), row(plan.logits.data(), t),
                            row(d_probs, t), span<float>(d_logits + t * e_count, e_count));
  }
  i = 0;
  for_each_term(terms, [&](const auto& b) {
    if constexpr (std::remove_cvref_t<decltype(b.term)>::target == routing::loss_target::logits)
      b.term.backward(plan, coeff.*(b.field), d_logits, scratch[i]);
    ++i;
  });
}

//! Bytes composed_backward_logits takes for T tokens and E experts (its carving, measured).
template <routing::ComposedRouter R>
std::size_t backward_logits_workspace_size(const R& r, index_t tokens, index_t experts) {
  workspace_arena ws;
  routing::plan_ref shape{};
  shape.num_tokens = tokens;
  shape.num_experts = experts;
  composed_backward_logits(r, shape, nullptr, typename R::losses_type{}, nullptr, ws);
  return ws.required();
}

//! Generic backward of a composed router: d_logits (from `ws`), then the scoring's backward
//! to dx and grads.
template <routing::ComposedRouter R, ElementType T>
void composed_backward(const R& r, const matrix_view<const T>& x, const typename R::params_type& p,
                       const routing::plan_ref& plan, const float* d_weights,
                       const typename R::losses_type& coeff, const matrix_view<float>& dx,
                       const typename R::grads_type& grads, workspace_arena& ws) {
  float* d_logits = ws.take<float>(plan.num_tokens * plan.num_experts);
  composed_backward_logits(r, plan, d_weights, coeff, d_logits, ws);
  if (!ws.carving()) return;
  const auto scoring = routing::scoring_of(r);
  scoring.backward(x, scoring.params(p), d_logits, dx, grads);
}

//! Bytes of the generic route for T tokens: the most of forward's and backward's carving,
//! run on measuring arenas (the same code as the runs, which return before any arithmetic).
template <routing::ComposedRouter R>
std::size_t composed_workspace_size(const R& r, index_t tokens, const typename R::params_type& p) {
  const index_t experts = r.num_experts(p);
  workspace_arena fwd;
  (void)routing::token_rules(r, p, tokens, fwd);
  (void)carve_term_scratch(r.loss_terms(), experts, fwd);
  workspace_arena bwd;
  routing::plan_ref shape{};
  shape.num_tokens = tokens;
  shape.num_experts = experts;
  composed_backward(r, matrix_view<const float>{}, p, shape, nullptr, typename R::losses_type{},
                    matrix_view<float>{}, typename R::grads_type{}, bwd);
  return std::max(fwd.required(), bwd.required());
}

}  // namespace switchyard::detail

namespace switchyard::host {

//! Bytes router `r` takes from its workspace in forward or backward for T tokens (the most
//! of the two); 0 for a custom router that declares no `workspace_size`.
template <class R>
std::size_t router_workspace_size(const R& r, index_t tokens, const typename R::params_type& p) {
  if constexpr (routing::ComposedRouter<R>) {
    return detail::composed_workspace_size(r, tokens, p);
  } else if constexpr (requires {
                  { r.workspace_size(tokens, p) } -> std::convertible_to<std::size_t>;
                }) {
    return r.workspace_size(tokens, p);
  } else {
    return 0;
  }
}

//! Forward of router `r` over x [T, d]: overwrites `plan` (sized T × r.width(p) × E) and
//! `losses`, with scratch from `ws` (at least router_workspace_size bytes).
template <class R, ElementType T>
void router_forward(const R& r, const matrix_view<const T>& x, const typename R::params_type& p,
                    const routing::plan_ref& plan, typename R::losses_type& losses,
                    workspace_arena& ws) {
  if constexpr (routing::ComposedRouter<R>) {
    detail::composed_forward(r, x, p, plan, losses, ws);
  } else {
  static_assert(requires { r.forward(x, p, plan, losses, ws); },
                "switchyard: the host backend needs the router's `template <ElementType T> void "
                "forward(const matrix_view<const T>& x, const params_type&, const "
                "routing::plan_ref& plan, losses_type&, workspace_arena&) const` (docs/design.md, "
                "router contract)");
  r.forward(x, p, plan, losses, ws);
  }
}

//! Backward of router `r`: dx += ∂/∂x and grads += ∂/∂params of Σ d_weights ⊙ weights +
//! Σ coeff · loss, with scratch from `ws`.
template <class R, ElementType T>
void router_backward(const R& r, const matrix_view<const T>& x, const typename R::params_type& p,
                     const routing::plan_ref& plan, const float* d_weights,
                     const typename R::losses_type& coeff, const matrix_view<float>& dx,
                     const typename R::grads_type& grads, workspace_arena& ws) {
  if constexpr (routing::ComposedRouter<R>) {
    detail::composed_backward(r, x, p, plan, d_weights, coeff, dx, grads, ws);
  } else {
  static_assert(requires { r.backward(x, p, plan, d_weights, coeff, dx, grads, ws); },
                "switchyard: the host backend needs the router's `template <ElementType T> void "
                "backward(x, params, const routing::plan_ref& plan, const float* d_weights, const "
                "losses_type& coeffs, const matrix_view<float>& dx, const grads_type&, "
                "workspace_arena&) const` (docs/design.md, router contract)");
  r.backward(x, p, plan, d_weights, coeff, dx, grads, ws);
  }
}

//! d_logits [T, E] (overwritten) = ∂/∂logits of Σ d_weights ⊙ weights + Σ coeff · loss for a
//! composed router, with scratch from `ws` (at least router_workspace_size bytes).
template <routing::ComposedRouter R>
void router_backward_logits(const R& r, const routing::plan_ref& plan, const float* d_weights,
                            const typename R::losses_type& coeff, float* d_logits,
                            workspace_arena& ws) {
  detail::composed_backward_logits(r, plan, d_weights, coeff, d_logits, ws);
}

//! Convenience: routes x with `r` into an owning plan (sized here) and `losses`; allocates
//! the scratch. The layer uses router_forward with caller memory instead.
template <class R, ElementType T>
void route(const R& r, const matrix_view<const T>& x, const typename R::params_type& p,
           routing::routing_plan& plan, typename R::losses_type& losses) {
  const auto clamp = [](index_t v) { return v < 0 ? index_t{0} : v; };
  plan.resize(x.extent(0), clamp(r.width(p)), clamp(r.num_experts(p)));
  // At least one byte: the arena then carves (a router that takes more than it declared
  // gets a shape_error naming the workspace, never a null array).
  std::vector<std::byte> scratch(std::max<std::size_t>(1, router_workspace_size(r, x.extent(0), p)));
  workspace_arena ws({scratch.data(), scratch.size()});
  router_forward(r, x, p, plan.ref(), losses, ws);
}

//! Convenience: the backward of `route` (allocates the scratch).
template <class R, ElementType T>
void route_backward(const R& r, const matrix_view<const T>& x, const typename R::params_type& p,
                    const routing::routing_plan& plan, const float* d_weights,
                    const typename R::losses_type& coeff, const matrix_view<float>& dx,
                    const typename R::grads_type& grads) {
  // At least one byte: the arena then carves (a router that takes more than it declared
  // gets a shape_error naming the workspace, never a null array).
  std::vector<std::byte> scratch(std::max<std::size_t>(1, router_workspace_size(r, x.extent(0), p)));
  workspace_arena ws({scratch.data(), scratch.size()});
  router_backward(r, x, p, plan.ref(), d_weights, coeff, dx, grads, ws);
}

//! Convenience: route_backward's d_logits [T, E] of a composed router, with no dx or grads
//! (allocates the scratch).
template <routing::ComposedRouter R>
void route_backward_logits(const R& r, const routing::routing_plan& plan, const float* d_weights,
                           const typename R::losses_type& coeff, float* d_logits) {
  std::vector<std::byte> scratch(
      detail::backward_logits_workspace_size(r, plan.num_tokens, plan.num_experts));
  workspace_arena ws({scratch.data(), scratch.size()});
  router_backward_logits(r, plan.ref(), d_weights, coeff, d_logits, ws);
}

//! Convenience: `route`, plus the router's diagnostics (DA-MoE: `r.token_importance(p, T,
//! stats)`, the per-token importance that decided K).
template <class R, ElementType T, class Stats>
  requires requires(const R& r, const typename R::params_type& p, index_t t, Stats& s) {
    r.token_importance(p, t, s);
  }
void route(const R& r, const matrix_view<const T>& x, const typename R::params_type& p,
           routing::routing_plan& plan, typename R::losses_type& losses, Stats& stats) {
  route(r, x, p, plan, losses);
  r.token_importance(p, x.extent(0), stats);
}

//! Replay of a composed router (see the file comment): overwrites `plan` (sized T ×
//! r.width(p) × E) with the router's logits and scores of x, the selection `ids` [T, W] /
//! `counts` [T] (token t's first counts[t] entries of its row of ids; W may differ from the
//! plan width), the router's combine weights for those ids, and `losses` with each term's
//! value over the replayed plan. Scratch from `ws` (router_workspace_size bytes). Throws
//! range_error naming `ids` / `counts` for a count outside [0, min(W, width)], an id outside
//! [0, E) or an expert twice in a token's used slots (then routing::validate_plan checks the
//! plan it wrote).
template <routing::ComposedRouter R, ElementType T>
void router_replay(const R& r, const matrix_view<const T>& x, const typename R::params_type& p,
                   matrix_view<const std::int32_t> ids, vector_view<const std::int32_t> counts,
                   const routing::plan_ref& plan, typename R::losses_type& losses,
                   workspace_arena& ws) {
  const auto scoring = routing::scoring_of(r);
  const auto sp = scoring.params(p);
  scoring.check(x, sp);
  r.validate(scoring.num_experts(sp));
  const index_t tokens = x.extent(0), experts = r.num_experts(p), width = r.width(p);
  const auto terms = r.loss_terms();
  const auto scratch = detail::carve_term_scratch(terms, experts, ws);
  detail::require_plan(plan, tokens, width, experts);
  check_view("counts", counts, {tokens}, "[T] with T = x.extent(0)");
  check_view("ids", ids, {tokens, -1}, "[T, W] with T = x.extent(0)");
  const index_t cols = ids.extent(1), cap = std::min(cols, width);
  for (index_t t = 0; t < tokens; ++t) {
    const index_t c = counts(t);
    if (c < 0 || c > cap) {
      throw range_error("counts", detail::concat("counts[", t, "] must be in [0, min(W, width)] = [0, ",
                                                 cap, "] (W = ids.extent(1) = ", cols,
                                                 ", width = r.width(params) = ", width, "), got ", c));
    }
    for (index_t j = 0; j < c; ++j) {
      const index_t e = ids(t, j);
      if (e < 0 || e >= experts) {
        throw range_error("ids", detail::concat("ids[", t, ", ", j, "] must be in [0, E) = [0, ",
                                                experts, "), got ", e));
      }
      for (index_t i = 0; i < j; ++i) {
        if (ids(t, i) == ids(t, j)) {
          throw range_error("ids", detail::concat("ids[", t, ", ", j, "] repeats expert ", e,
                                                  " (also at [", t, ", ", i,
                                                  "]); a token's used slots must name distinct "
                                                  "experts"));
        }
      }
    }
  }
  scoring.forward(x, sp, plan);
  const auto weights_part = routing::weights_backward(r);
  for (index_t t = 0; t < tokens; ++t) {
    const int c = counts(t);
    plan.counts[t] = c;
    for (index_t j = 0; j < c; ++j) plan.expert_ids[t * width + j] = ids(t, j);
    weights_part.apply(span<const float>(plan.probs.data() + t * experts, experts),
                       span<const float>(plan.logits.data() + t * experts, experts),
                       span<const std::int32_t>(plan.expert_ids.data() + t * width, width), c,
                       span<float>(plan.weights.data() + t * width, width));
  }
  routing::validate_plan("plan", plan.const_view(), tokens, experts);
  std::size_t i = 0;
  detail::for_each_term(terms,
                        [&](const auto& b) { losses.*(b.field) = b.term.value(plan, scratch[i++]); });
}

//! Convenience: `router_replay` into an owning plan (sized here), allocating the scratch.
//! Backward: `host::route_backward(r, x, p, plan, d_weights, coeffs, dx, grads)`.
template <routing::ComposedRouter R, ElementType T>
void route_replay(const R& r, const matrix_view<const T>& x, const typename R::params_type& p,
                  matrix_view<const std::int32_t> ids, vector_view<const std::int32_t> counts,
                  routing::routing_plan& plan, typename R::losses_type& losses) {
  const auto clamp = [](index_t v) { return v < 0 ? index_t{0} : v; };
  plan.resize(x.extent(0), clamp(r.width(p)), clamp(r.num_experts(p)));
  std::vector<std::byte> scratch(std::max<std::size_t>(1, router_workspace_size(r, x.extent(0), p)));
  workspace_arena ws({scratch.data(), scratch.size()});
  router_replay(r, x, p, ids, counts, plan.ref(), losses, ws);
}

}  // namespace switchyard::host
