#pragma once
//! \file adaptive_gating.hpp
//! `routers::AdaptiveGating`: linear + softmax scoring, top-1 or top-2 per token (spec §5, Li et
//! al., "Adaptive Gating in Mixture-of-Experts based Language Models", EMNLP 2023). The load
//! balance only constrains the top-1-only tokens (paper eq. 4).

#include <algorithm>
#include <vector>

#include "switchyard/core/error.hpp"
#include "switchyard/core/workspace.hpp"
#include "switchyard/routing/concepts.hpp"
#include "switchyard/routing/linear_softmax.hpp"
#include "switchyard/routing/plan.hpp"
#include "switchyard/routing/selection/adaptive.hpp"

namespace switchyard::routing {

//! Auxiliary losses of Adaptive Gating; also the coefficient set in backward.
struct adaptive_gating_losses {
  float lb_loss = 0.0f;  //!< E · Σ_e f¹_e · P̄_e: f¹ over top-1-only tokens, P̄ over all; 0 if none
  float z_loss = 0.0f;  //!< mean_t logsumexp(logits_t)²  (ST-MoE)
  //! Diagnostic, not a loss: share of tokens routed to two experts (ignored as a coefficient).
  float top2_fraction = 0.0f;
};

//! Paper eq. 4: E · Σ_e f¹_e · P̄_e with f¹ the expert shares among tokens that use one
//! expert and P̄ the mean probability over all tokens. 0 when no token uses one expert.
inline float top1_only_load_balance_loss(const plan_ref& plan) {
  const index_t tokens = plan.num_tokens, experts = plan.num_experts;
  std::vector<double> f(experts, 0.0), pbar(experts, 0.0);
  index_t singles = 0;
  for (index_t t = 0; t < tokens; ++t) {
    if (plan.counts[t] == 1) {
      f[plan.id(t, 0)] += 1.0;
      ++singles;
    }
    for (index_t e = 0; e < experts; ++e) pbar[e] += plan.probs[t * experts + e];
  }
  if (singles == 0) return 0.0f;
  double s = 0.0;
  for (index_t e = 0; e < experts; ++e) s += (f[e] / singles) * (pbar[e] / tokens);
  return static_cast<float>(s * experts);
}

//! Accumulates coeff · ∂(top1_only_load_balance_loss)/∂P = coeff · E · f¹_e / T into d_probs.
inline void top1_only_load_balance_backward(const plan_ref& plan, float coeff, float* d_probs) {
  const index_t tokens = plan.num_tokens, experts = plan.num_experts;
  if (tokens == 0 || coeff == 0.0f) return;
  std::vector<double> f(experts, 0.0);
  index_t singles = 0;
  for (index_t t = 0; t < tokens; ++t) {
    if (plan.counts[t] == 1) {
      f[plan.id(t, 0)] += 1.0;
      ++singles;
    }
  }
  if (singles == 0) return;
  const double scale =
      static_cast<double>(coeff) * experts / (static_cast<double>(singles) * tokens);
  for (index_t t = 0; t < tokens; ++t)
    for (index_t e = 0; e < experts; ++e)
      d_probs[t * experts + e] += static_cast<float>(scale * f[e]);
}

}  // namespace switchyard::routing

namespace switchyard::routers {

//! Adaptive Gating router over a linear gate `w [E, d]`: `AdaptiveGating{.threshold = 0.1f}`.
struct AdaptiveGating {
  using policy_kind = router_tag;
  using params_type = routing::linear_router_params;
  using grads_type = routing::linear_router_grads;
  using losses_type = routing::adaptive_gating_losses;

  float threshold = 0.1f;   //!< T >= 0: top-2 iff p1 − p2 <= T
  bool renormalize = true;  //!< renormalise the selected weights to sum to 1 (paper §4.3)

  [[nodiscard]] index_t num_experts(const params_type& p) const { return p.w.extent(0); }
  //! 2 (1 with a single expert).
  [[nodiscard]] index_t width(const params_type& p) const {
    return rule().width(static_cast<int>(p.w.extent(0)));
  }

  //! Throws range_error unless threshold >= 0 (and not NaN).
  void validate(index_t /*experts*/) const {
    if (!(threshold >= 0.0f)) {
      throw range_error(
          "threshold",
          ::switchyard::detail::concat(
              "threshold must be >= 0 (top-2 iff p1 - p2 <= threshold), got ", threshold));
    }
  }

  //! The per-token rule, for backends that run the selection themselves.
  [[nodiscard]] routing::adaptive_rule rule() const { return {threshold, renormalize}; }

  //! Scores x [T, d], selects, and computes the losses and top2_fraction. T = 0 is an empty batch.
  template <ElementType T>
  void forward(const matrix_view<const T>& x, const params_type& p, const routing::plan_ref& plan,
               losses_type& losses, [[maybe_unused]] workspace_arena& ws) const {
    routing::detail::check_linear_router_inputs(x, p);
    validate(p.w.extent(0));
    routing::detail::require_plan(plan, x.extent(0), width(p), p.w.extent(0));
    routing::linear_softmax_scores(x, p, plan);
    routing::select_all(rule(), plan);
    losses.lb_loss = routing::top1_only_load_balance_loss(plan);
    losses.z_loss = routing::z_loss(plan);
    index_t top2 = 0;
    for (auto c : plan.counts) top2 += c == 2 ? 1 : 0;
    losses.top2_fraction = plan.num_tokens == 0
                               ? 0.0f
                               : static_cast<float>(static_cast<double>(top2) / plan.num_tokens);
  }

  //! d_logits [T, E] = ∂/∂logits of ( Σ d_weights ⊙ weights + coeff.lb_loss·lb + coeff.z_loss·z );
  //! `coeff.top2_fraction` is ignored. `d_weights` is [T, width] in plan-slot order.
  void backward_logits(const routing::plan_ref& plan, const float* d_weights,
                       const losses_type& coeff, float* d_logits) const {
    const index_t tokens = plan.num_tokens, e_count = plan.num_experts;
    auto d_probs = routing::combine_weights_backward_rows(plan, d_weights, renormalize);
    routing::top1_only_load_balance_backward(plan, coeff.lb_loss, d_probs.data());
    std::fill(d_logits, d_logits + tokens * e_count, 0.0f);
    routing::softmax_backward_rows(plan, d_probs.data(), d_logits);
    routing::z_loss_backward(plan, coeff.z_loss, d_logits);
  }

  //! Full backward: dx += ∂/∂x, grads.w += ∂/∂w (either may be an empty view).
  template <ElementType T>
  void backward(const matrix_view<const T>& x, const params_type& p,
                const routing::plan_ref& plan, const float* d_weights, const losses_type& coeff,
                const matrix_view<float>& dx, const grads_type& grads, [[maybe_unused]] workspace_arena& ws) const {
    std::vector<float> d_logits(static_cast<std::size_t>(plan.num_tokens * plan.num_experts));
    backward_logits(plan, d_weights, coeff, d_logits.data());
    routing::linear_backward(x, p, d_logits.data(), dx, grads);
  }
};

static_assert(check_router<AdaptiveGating>());

}  // namespace switchyard::routers
