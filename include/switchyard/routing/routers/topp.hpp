#pragma once
//! \file topp.hpp
//! `routers::TopP`: linear + softmax scoring, top-p selection (spec §1, Huang et al., ACL 2024
//! "Harder Tasks Need More Experts"). Raw (not renormalised) weights, as upstream; losses are
//! the paper's dynamic (entropy) loss and the any-slot load balance, plus the ST-MoE z-loss.

#include <algorithm>
#include <cmath>
#include <vector>

#include "switchyard/core/error.hpp"
#include "switchyard/core/workspace.hpp"
#include "switchyard/routing/concepts.hpp"
#include "switchyard/routing/linear_softmax.hpp"
#include "switchyard/routing/plan.hpp"
#include "switchyard/routing/selection/topp.hpp"

namespace switchyard::routing {

//! Auxiliary losses of the top-p router; also the coefficient set in backward.
struct topp_losses {
  float dynamic_loss = 0.0f;  //!< mean_t −Σ_e P_te log P_te (router entropy, "dynamic loss")
  float lb_loss = 0.0f;  //!< E · Σ_e f_e · P̄_e, f_e = share of tokens selecting e in any slot
  float z_loss = 0.0f;   //!< mean_t logsumexp(logits_t)²  (ST-MoE)
};

//! Log-sum-exp of one token's logits, in double.
inline double logsumexp_row(const float* logits, index_t experts) {
  float m = logits[0];
  for (index_t e = 1; e < experts; ++e) m = std::max(m, logits[e]);
  double z = 0.0;
  for (index_t e = 0; e < experts; ++e) z += std::exp(static_cast<double>(logits[e] - m));
  return m + std::log(z);
}

//! Mean router entropy mean_t −Σ_e P log P (log P = logit − lse, so P = 0 adds 0). 0 if T = 0.
inline float entropy_loss(const plan_ref& plan) {
  const index_t tokens = plan.num_tokens, experts = plan.num_experts;
  if (tokens == 0) return 0.0f;
  double s = 0.0;
  for (index_t t = 0; t < tokens; ++t) {
    const float* lg = plan.logits.data() + t * experts;
    const float* pr = plan.probs.data() + t * experts;
    const double lse = logsumexp_row(lg, experts);
    for (index_t e = 0; e < experts; ++e) s -= pr[e] * (lg[e] - lse);
  }
  return static_cast<float>(s / tokens);
}

//! Accumulates coeff · ∂(mean entropy)/∂logits = −coeff/T · P_e (log P_e + H_t) into d_logits.
inline void entropy_backward(const plan_ref& plan, float coeff, float* d_logits) {
  const index_t tokens = plan.num_tokens, experts = plan.num_experts;
  if (tokens == 0 || coeff == 0.0f) return;
  for (index_t t = 0; t < tokens; ++t) {
    const float* lg = plan.logits.data() + t * experts;
    const float* pr = plan.probs.data() + t * experts;
    const double lse = logsumexp_row(lg, experts);
    double h = 0.0;
    for (index_t e = 0; e < experts; ++e) h -= pr[e] * (lg[e] - lse);
    for (index_t e = 0; e < experts; ++e) {
      d_logits[t * experts + e] +=
          static_cast<float>(-static_cast<double>(coeff) / tokens * pr[e] * ((lg[e] - lse) + h));
    }
  }
}

}  // namespace switchyard::routing

namespace switchyard::routers {

//! Top-p softmax router over a linear gate `w [E, d]`: `TopP{.p = 0.4f}`.
struct TopP {
  using policy_kind = router_tag;
  using params_type = routing::linear_router_params;
  using grads_type = routing::linear_router_grads;
  using losses_type = routing::topp_losses;

  float p = 0.4f;  //!< cumulative-probability threshold, 0 < p <= 1
  int max_k = 0;   //!< optional cap on experts per token (Switchyard extension); 0 = no cap

  [[nodiscard]] index_t num_experts(const params_type& prm) const { return prm.w.extent(0); }
  //! E, or max_k when capped.
  [[nodiscard]] index_t width(const params_type& prm) const {
    return rule().width(static_cast<int>(prm.w.extent(0)));
  }

  //! Throws range_error unless 0 < p <= 1 and 0 <= max_k <= E.
  void validate(index_t experts) const {
    if (!(p > 0.0f && p <= 1.0f)) {
      throw range_error("p", ::switchyard::detail::concat("p must be in (0, 1], got ", p));
    }
    if (max_k < 0 || max_k > experts) {
      throw range_error("max_k",
                        ::switchyard::detail::concat("max_k must be 0 (no cap) or in [1, E] = [1, ",
                                                     experts, "], got ", max_k));
    }
  }

  //! The per-token rule, for backends that run the selection themselves.
  [[nodiscard]] routing::topp_rule rule() const { return {p, max_k}; }

  //! Scores x [T, d], selects, and computes the aux losses. T = 0 is an empty batch.
  template <ElementType T>
  void forward(const matrix_view<const T>& x, const params_type& prm, const routing::plan_ref& plan,
               losses_type& losses, [[maybe_unused]] workspace_arena& ws) const {
    routing::detail::check_linear_router_inputs(x, prm);
    validate(prm.w.extent(0));
    routing::detail::require_plan(plan, x.extent(0), width(prm), prm.w.extent(0));
    routing::linear_softmax_scores(x, prm, plan);
    routing::select_all(rule(), plan);
    losses.dynamic_loss = routing::entropy_loss(plan);
    losses.lb_loss = routing::load_balance_loss(plan, true);
    losses.z_loss = routing::z_loss(plan);
  }

  //! d_logits [T, E] = ∂/∂logits of ( Σ d_weights ⊙ weights + Σ coeff · loss ).
  //! `d_weights` is [T, width] in plan-slot order; the weights are raw probabilities.
  void backward_logits(const routing::plan_ref& plan, const float* d_weights,
                       const losses_type& coeff, float* d_logits) const {
    const index_t tokens = plan.num_tokens, e_count = plan.num_experts;
    auto d_probs = routing::combine_weights_backward_rows(plan, d_weights, /*renormalized=*/false);
    routing::load_balance_backward(plan, true, coeff.lb_loss, d_probs.data());
    std::fill(d_logits, d_logits + tokens * e_count, 0.0f);
    routing::softmax_backward_rows(plan, d_probs.data(), d_logits);
    routing::entropy_backward(plan, coeff.dynamic_loss, d_logits);
    routing::z_loss_backward(plan, coeff.z_loss, d_logits);
  }

  //! Full backward: dx += ∂/∂x, grads.w += ∂/∂w (either may be an empty view).
  template <ElementType T>
  void backward(const matrix_view<const T>& x, const params_type& prm,
                const routing::plan_ref& plan, const float* d_weights, const losses_type& coeff,
                const matrix_view<float>& dx, const grads_type& grads, [[maybe_unused]] workspace_arena& ws) const {
    std::vector<float> d_logits(static_cast<std::size_t>(plan.num_tokens * plan.num_experts));
    backward_logits(plan, d_weights, coeff, d_logits.data());
    routing::linear_backward(x, prm, d_logits.data(), dx, grads);
  }
};

static_assert(check_router<TopP>());

}  // namespace switchyard::routers
