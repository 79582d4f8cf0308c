#pragma once
//! \file linear_softmax.hpp
//! The scoring shared by the softmax routers (top-k, top-p, DA-MoE, Adaptive Gating,
//! HyperMoE): logits = x · Wᵀ with W [E, d] in nn.Linear layout, P = softmax(logits) in
//! float32, and its backward to x and W; host loops over the rows of softmax.hpp. Also the
//! plan-wide helpers `select_all`, `load_balance_loss`, `z_loss` and their backward (thin
//! wrappers over loss_terms.hpp, for one-struct routers; they allocate their scratch).
//!
//! NaN policy: a non-finite router logit (from NaN/Inf in `x` or `w`) throws
//! `non_finite_error` naming the token; routing such a token would be arbitrary.

#include <algorithm>
#include <cmath>
#include <vector>

#include "switchyard/core/element_type.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/routing/loss_terms.hpp"
#include "switchyard/routing/plan.hpp"
#include "switchyard/routing/softmax.hpp"

namespace switchyard::routing {

//! Parameters of a linear router: `w [E, d]` (nn.Linear layout: logits = x · wᵀ), plus the
//! optional per-token compute knob of TopK, TopP and AdaptiveGating
//! (docs/routers/dynamic_compute.md; routing/compute.hpp): empty views leave the router's
//! members in force, bit for bit.
struct linear_router_params {
  matrix_view<const float> w;  //!< [E, d]
  //! [T] or empty: token t uses at most token_max_k[t] experts, in [1, width] (TopK: k_t =
  //! min(k, cap); TopP: the cap after the top-p cut; AdaptiveGating: 1 forces top-1).
  vector_view<const std::int32_t> token_max_k{};
  //! [T] or empty: token t's threshold in place of the member: TopP's p (in (0, 1]),
  //! AdaptiveGating's threshold (>= 0). TopK has none (shape_error if given).
  vector_view<const float> token_threshold{};
};

//! Gradients of a linear router, accumulated (+=) into caller memory.
struct linear_router_grads {
  matrix_view<float> w;  //!< [E, d]; an empty view skips the weight gradient
};

//! Load-balance and z losses of a softmax router. Also used as the coefficient set in
//! backward (each field then multiplies the loss's gradient).
struct softmax_router_losses {
  float lb_switch = 0.0f;  //!< E · Σ_e f_e · P̄_e, f from the top-1 choice (Switch)
  float lb_topk = 0.0f;    //!< E · Σ_e f_e · P̄_e, f from every selected slot (Mixtral)
  float z = 0.0f;          //!< mean_t logsumexp(logits_t)²  (ST-MoE)
};

}  // namespace switchyard::routing

namespace switchyard::detail {
using namespace ::switchyard::routing;  // this block's helpers use switchyard::routing's names

//! Checks x [T, d] against w [E, d] and that w is usable.
template <class T>
void check_linear_router_inputs(const matrix_view<const T>& x, const linear_router_params& p) {
  check_view("params.w", p.w, {-1, -1}, "[E, d]");
  if (p.w.extent(0) < 1) {
    throw shape_error("params.w", detail::concat("params.w: expected at least one expert (extent 0 >= 1), got ",
                                         p.w.extent(0)));
  }
  check_view("x", x, {-1, p.w.extent(1)}, "[T, d] with d = params.w.extent(1)");
}

}  // namespace switchyard::detail

namespace switchyard::routing {

//! logits[t, e] = Σ_i x[t, i] · w[e, i] (float accumulation), probs = softmax(logits),
//! written to plan.logits / plan.probs (plan must be sized). Throws non_finite_error on a
//! non-finite logit.
template <ElementType T>
void linear_softmax_scores(const matrix_view<const T>& x, const linear_router_params& p,
                           const plan_ref& plan) {
  const index_t tokens = x.extent(0), d = x.extent(1), e_count = p.w.extent(0);
#pragma omp parallel for schedule(static) if (tokens * e_count * d > (1 << 16))
  for (index_t t = 0; t < tokens; ++t) {
    float* lg = plan.logits.data() + t * e_count;
    for (index_t e = 0; e < e_count; ++e) {
      float acc = 0.0f;
      for (index_t i = 0; i < d; ++i) acc += to_float(x(t, i)) * p.w(e, i);
      lg[e] = acc;
    }
    softmax(span<const float>(lg, e_count),
            span<float>(plan.probs.data() + t * e_count, e_count));
  }
  bool bad = false;
  index_t bad_t = 0;
  for (index_t i = 0; i < tokens * e_count && !bad; ++i) {
    if (!std::isfinite(plan.logits[i])) {
      bad = true;
      bad_t = i / e_count;
    }
  }
  if (bad) {
    throw non_finite_error("x", detail::concat("x: router logits of token ", bad_t,
                                               " are not finite (NaN or Inf in x or params.w); "
                                               "Switchyard refuses to route non-finite tokens"));
  }
}

//! Applies a selection rule to every token of a scored plan.
template <class Rule>
void select_all(const Rule& rule, const plan_ref& plan) {
  const index_t tokens = plan.num_tokens, e = plan.num_experts, w = plan.width;
#pragma omp parallel for schedule(static) if (tokens > 256)
  for (index_t t = 0; t < tokens; ++t) {
    plan.counts[t] = rule.select(span<const float>(plan.probs.data() + t * e, e),
                                 span<std::int32_t>(plan.expert_ids.data() + t * w, w),
                                 span<float>(plan.weights.data() + t * w, w));
  }
}

//! Switch load balance E·Σ_e f_e·P̄_e with f_e the share of tokens whose top-1 is e, or
//! (any_slot) the share of tokens that selected e in any slot. 0 for an empty batch.
//! Allocates its 2·E doubles of scratch; composed routers use `terms::load_balance`.
inline float load_balance_loss(const plan_ref& plan, bool any_slot) {
  const terms::load_balance term{any_slot};
  std::vector<double> scratch(static_cast<std::size_t>(term.scratch_doubles(plan.num_experts)));
  return term.value(plan, scratch.data());
}

//! ST-MoE z-loss mean_t logsumexp(logits_t)². 0 for an empty batch.
inline float z_loss(const plan_ref& plan) { return terms::z_loss{}.value(plan, nullptr); }

//! Accumulates coeff · ∂L_lb/∂P into d_probs [T, E] (f is piecewise constant). Allocates its
//! scratch; composed routers use `terms::load_balance`.
inline void load_balance_backward(const plan_ref& plan, bool any_slot, float coeff,
                                  float* d_probs) {
  const terms::load_balance term{any_slot};
  std::vector<double> scratch(static_cast<std::size_t>(term.scratch_doubles(plan.num_experts)));
  term.backward(plan, coeff, d_probs, scratch.data());
}

//! Accumulates coeff · ∂L_z/∂logits = coeff · 2·lse_t·P_t / T into d_logits [T, E].
inline void z_loss_backward(const plan_ref& plan, float coeff, float* d_logits) {
  terms::z_loss{}.backward(plan, coeff, d_logits, nullptr);
}

//! d_probs [T, E] = the gradient of Σ d_weights ⊙ weights w.r.t. the probabilities, for every
//! token of a softmax router's plan (overwritten): raw weights pass d_w through, renormalised
//! ones go through the normalisation (see combine_weights_backward_accumulate).
//! `d_weights` is [T, width].
inline void combine_weights_backward_rows(const plan_ref& plan, const float* d_weights,
                                          bool renormalized, float* d_probs) {
  const index_t tokens = plan.num_tokens, e_count = plan.num_experts, w = plan.width;
  std::fill(d_probs, d_probs + tokens * e_count, 0.0f);
  for (index_t t = 0; t < tokens; ++t) {
    combine_weights_backward_accumulate(
        span<const float>(plan.probs.data() + t * e_count, e_count),
        span<const std::int32_t>(plan.expert_ids.data() + t * w, w),
        span<const float>(plan.weights.data() + t * w, w),
        span<const float>(d_weights + t * w, w), plan.counts[t], renormalized,
        span<float>(d_probs + t * e_count, e_count));
  }
}

//! d_logits += softmax backward of d_probs, row by row.
inline void softmax_backward_rows(const plan_ref& plan, const float* d_probs, float* d_logits) {
  const index_t e_count = plan.num_experts;
  for (index_t t = 0; t < plan.num_tokens; ++t) {
    softmax_backward_accumulate(span<const float>(plan.probs.data() + t * e_count, e_count),
                                span<const float>(d_probs + t * e_count, e_count),
                                span<float>(d_logits + t * e_count, e_count));
  }
}

//! Backward of logits = x · wᵀ: dx [T, d] += d_logits · w, grads.w [E, d] += d_logitsᵀ · x.
//! Either output may be an empty view (skipped).
template <ElementType T>
void linear_backward(const matrix_view<const T>& x, const linear_router_params& p,
                     const float* d_logits, const matrix_view<float>& dx,
                     const linear_router_grads& g) {
  const index_t tokens = x.extent(0), d = x.extent(1), e_count = p.w.extent(0);
  if (detail::present(dx)) {
    check_view("dx", dx, {tokens, d}, "[T, d]");
#pragma omp parallel for schedule(static) if (tokens * e_count * d > (1 << 16))
    for (index_t t = 0; t < tokens; ++t)
      for (index_t i = 0; i < d; ++i) {
        float acc = 0.0f;
        for (index_t e = 0; e < e_count; ++e) acc += d_logits[t * e_count + e] * p.w(e, i);
        dx(t, i) += acc;
      }
  }
  if (detail::present(g.w)) {
    check_view("grads.w", g.w, {e_count, d}, "[E, d]");
#pragma omp parallel for schedule(static) if (tokens * e_count * d > (1 << 16))
    for (index_t e = 0; e < e_count; ++e)
      for (index_t i = 0; i < d; ++i) {
        float acc = 0.0f;
        for (index_t t = 0; t < tokens; ++t) acc += d_logits[t * e_count + e] * to_float(x(t, i));
        g.w(e, i) += acc;
      }
  }
}

}  // namespace switchyard::routing
