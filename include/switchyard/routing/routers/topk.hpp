// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file topk.hpp
//! `routers::TopK`: linear + softmax scoring, top-k selection (spec §0.1). Switch is
//! `TopK{.k = 1, .renormalize = false}`; GShard/DeepSpeed top-2 and Mixtral are
//! `TopK{.k = 2, .renormalize = true}`. A composition: linear-softmax scoring, `topk_rule`,
//! load balance (Switch top-1 and any-slot) and z-loss; `host::route` runs it.

#include <tuple>

#include "switchyard/core/error.hpp"
#include "switchyard/routing/composition.hpp"
#include "switchyard/routing/compute.hpp"
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
  //! AdaMoE null experts: the last N of the E router ids compute nothing (the layer's zero
  //! experts); the load-balance terms then balance the E − N true experts only
  //! (terms::load_balance::null_experts; docs/routers/dynamic_compute.md). 0 <= N < E.
  index_t null_experts = 0;

  [[nodiscard]] index_t num_experts(const params_type& p) const { return p.w.extent(0); }
  [[nodiscard]] index_t width(const params_type&) const { return k; }

  //! Throws range_error unless 1 <= k <= E and 0 <= null_experts < E.
  void validate(index_t experts) const {
    if (k < 1 || k > experts) {
      throw range_error("k", detail::concat("k must be in [1, E] = [1, ", experts, "], got ", k));
    }
    (void)routing::terms::load_balance{.null_experts = null_experts}.true_experts(experts);
  }

  //! The per-token rule, for backends that run the selection themselves.
  [[nodiscard]] routing::topk_rule rule() const { return {k, renormalize}; }

  //! The per-token rules: the member's rule, overridden per token by the compute knob of
  //! the params (token_max_k, token_threshold; routing/compute.hpp), checked when `ws`
  //! carves. Empty views: rule() for every token.
  [[nodiscard]] routing::knob_rules<routing::topk_rule> token_rules(const params_type& p, index_t tokens,
                                                       workspace_arena& ws) const {
    return routing::make_knob_rules(rule(), p, tokens, width(p),
                                    routing::knob_threshold::none, ws);
  }
  //! Takes the per-token compute knob of linear_router_params (host generic route).
  static constexpr bool token_knob = true;

  // ---- the composition (run by a backend's generic route) ---------------------------------
  [[nodiscard]] routing::linear_softmax scoring() const { return {}; }
  [[nodiscard]] bool renormalized() const { return renormalize; }
  [[nodiscard]] auto loss_terms() const {
    return std::tuple{routing::bind_loss<&losses_type::lb_switch>(
                          routing::terms::load_balance{.null_experts = null_experts}),
                      routing::bind_loss<&losses_type::lb_topk>(routing::terms::load_balance{
                          .any_slot = true, .null_experts = null_experts}),
                      routing::bind_loss<&losses_type::z>(routing::terms::z_loss{})};
  }
};

static_assert(check_router<TopK>());
static_assert(routing::ComposedRouter<TopK>);

}  // namespace switchyard::routers
