// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file topp.hpp
//! `routers::TopP`: linear + softmax scoring, top-p selection (spec §1, Huang et al., ACL 2024
//! "Harder Tasks Need More Experts"). Raw (not renormalised) weights, as upstream; losses are
//! the paper's dynamic (entropy) loss and the any-slot load balance, plus the ST-MoE z-loss.
//! A composition (linear-softmax scoring, `topp_rule`, those three loss terms).

#include <tuple>

#include "switchyard/core/error.hpp"
#include "switchyard/routing/composition.hpp"
#include "switchyard/routing/compute.hpp"
#include "switchyard/routing/concepts.hpp"
#include "switchyard/routing/linear_softmax.hpp"
#include "switchyard/routing/plan.hpp"
#include "switchyard/routing/selection/topp.hpp"
#include "switchyard/routing/loss_fields.hpp"

namespace switchyard::routing {

//! Auxiliary losses of the top-p router; also the coefficient set in backward.
struct topp_losses {
  float dynamic_loss = 0.0f;  //!< mean_t −Σ_e P_te log P_te (router entropy, "dynamic loss")
  float lb_loss = 0.0f;  //!< E · Σ_e f_e · P̄_e, f_e = share of tokens selecting e in any slot
  float z_loss = 0.0f;   //!< mean_t logsumexp(logits_t)²  (ST-MoE)
  //! The fields backward reads as coefficients (training/aux_loss.hpp).
  static constexpr auto coefficient_fields() {
    return std::tuple{loss_field<&topp_losses::dynamic_loss>{"dynamic_loss"},
                      loss_field<&topp_losses::lb_loss>{"lb_loss"},
                      loss_field<&topp_losses::z_loss>{"z_loss"}};
  }
};

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
  //! AdaMoE null experts: the last N router ids compute nothing; lb_loss balances the E − N
  //! true experts only (terms::load_balance::null_experts). 0 <= N < E.
  index_t null_experts = 0;

  [[nodiscard]] index_t num_experts(const params_type& prm) const { return prm.w.extent(0); }
  //! E, or max_k when capped.
  [[nodiscard]] index_t width(const params_type& prm) const {
    return rule().width(static_cast<int>(prm.w.extent(0)));
  }

  //! Throws range_error unless 0 < p <= 1 and 0 <= max_k <= E.
  void validate(index_t experts) const {
    if (!(p > 0.0f && p <= 1.0f)) {
      throw range_error("p", detail::concat("p must be in (0, 1], got ", p));
    }
    if (max_k < 0 || max_k > experts) {
      throw range_error("max_k",
                        detail::concat("max_k must be 0 (no cap) or in [1, E] = [1, ",
                                                     experts, "], got ", max_k));
    }
    (void)routing::terms::load_balance{.null_experts = null_experts}.true_experts(experts);
  }

  //! The per-token rule, for backends that run the selection themselves.
  [[nodiscard]] routing::topp_rule rule() const { return {p, max_k}; }

  //! The per-token rules: the member's rule, overridden per token by the compute knob of
  //! the params (token_max_k, token_threshold; routing/compute.hpp), checked when `ws`
  //! carves. Empty views: rule() for every token.
  [[nodiscard]] routing::knob_rules<routing::topp_rule> token_rules(const params_type& p, index_t tokens,
                                                       workspace_arena& ws) const {
    return routing::make_knob_rules(rule(), p, tokens, width(p),
                                    routing::knob_threshold::probability, ws);
  }
  //! Takes the per-token compute knob of linear_router_params (host generic route).
  static constexpr bool token_knob = true;

  // ---- the composition (run by a backend's generic route) ---------------------------------
  [[nodiscard]] routing::linear_softmax scoring() const { return {}; }
  //! Raw probabilities as weights, as upstream.
  [[nodiscard]] bool renormalized() const { return false; }
  //! Entropy before z: the order their gradients add into d_logits.
  [[nodiscard]] auto loss_terms() const {
    return std::tuple{routing::bind_loss<&losses_type::dynamic_loss>(routing::terms::entropy{}),
                      routing::bind_loss<&losses_type::lb_loss>(routing::terms::load_balance{
                          .any_slot = true, .null_experts = null_experts}),
                      routing::bind_loss<&losses_type::z_loss>(routing::terms::z_loss{})};
  }
};

static_assert(check_router<TopP>());
static_assert(routing::ComposedRouter<TopP>);

}  // namespace switchyard::routers
