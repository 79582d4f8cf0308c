#pragma once
//! \file topk.hpp
//! `routers::TopK`: linear + softmax scoring, top-k selection (spec §0.1). Switch is
//! `TopK{.k = 1, .renormalize = false}`; GShard/DeepSpeed top-2 and Mixtral are
//! `TopK{.k = 2, .renormalize = true}`.

#include "switchyard/core/error.hpp"
#include "switchyard/core/workspace.hpp"
#include "switchyard/routing/concepts.hpp"
#include "switchyard/routing/linear_softmax.hpp"
#include "switchyard/routing/plan.hpp"
#include "switchyard/routing/selection/topk.hpp"

namespace switchyard::routers {

//! Top-k softmax router over a linear gate `w [E, d]`.
struct TopK {
  using policy_kind = router_tag;
  using params_type = routing::linear_router_params;
  using grads_type = routing::linear_router_grads;
  using losses_type = routing::softmax_router_losses;

  int k = 2;                //!< experts per token, 1 <= k <= E
  bool renormalize = true;  //!< renormalise the k weights to sum to 1

  [[nodiscard]] index_t num_experts(const params_type& p) const { return p.w.extent(0); }
  [[nodiscard]] index_t width(const params_type&) const { return k; }

  //! Throws range_error unless 1 <= k <= E.
  void validate(index_t experts) const {
    if (k < 1 || k > experts) {
      throw range_error("k", detail::concat("k must be in [1, E] = [1, ", experts, "], got ", k));
    }
  }

  //! The per-token rule, for backends that run the selection themselves.
  [[nodiscard]] routing::topk_rule rule() const { return {k, renormalize}; }

  //! Scores x [T, d], selects, and computes the aux losses. T = 0 is an empty batch.
  template <ElementType T>
  void forward(const matrix_view<const T>& x, const params_type& p, const routing::plan_ref& plan,
               losses_type& losses, [[maybe_unused]] workspace_arena& ws) const {
    routing::detail::check_linear_router_inputs(x, p);
    validate(p.w.extent(0));
    routing::detail::require_plan(plan, x.extent(0), k, p.w.extent(0));
    routing::linear_softmax_scores(x, p, plan);
    routing::select_all(rule(), plan);
    losses.lb_switch = routing::load_balance_loss(plan, false);
    losses.lb_topk = routing::load_balance_loss(plan, true);
    losses.z = routing::z_loss(plan);
  }

  //! d_logits [T, E] = ∂/∂logits of ( Σ d_weights ⊙ weights + Σ coeff · loss ).
  //! `d_weights` is [T, width] in plan-slot order.
  void backward_logits(const routing::plan_ref& plan, const float* d_weights,
                       const losses_type& coeff, float* d_logits) const {
    const index_t tokens = plan.num_tokens, e_count = plan.num_experts;
    auto d_probs = routing::combine_weights_backward_rows(plan, d_weights, renormalize);
    routing::load_balance_backward(plan, false, coeff.lb_switch, d_probs.data());
    routing::load_balance_backward(plan, true, coeff.lb_topk, d_probs.data());
    std::fill(d_logits, d_logits + tokens * e_count, 0.0f);
    routing::softmax_backward_rows(plan, d_probs.data(), d_logits);
    routing::z_loss_backward(plan, coeff.z, d_logits);
  }

  //! Full backward: dx += ∂/∂x, grads.w += ∂/∂w (either may be an empty view).
  template <ElementType T>
  void backward(const matrix_view<const T>& x, const params_type& p,
                const routing::plan_ref& plan, const float* d_weights,
                const losses_type& coeff, const matrix_view<float>& dx,
                const grads_type& grads, [[maybe_unused]] workspace_arena& ws) const {
    std::vector<float> d_logits(static_cast<std::size_t>(plan.num_tokens * plan.num_experts));
    backward_logits(plan, d_weights, coeff, d_logits.data());
    routing::linear_backward(x, p, d_logits.data(), dx, grads);
  }
};

static_assert(check_router<TopK>());

}  // namespace switchyard::routers
