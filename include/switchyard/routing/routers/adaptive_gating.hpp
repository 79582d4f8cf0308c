// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file adaptive_gating.hpp
//! `routers::AdaptiveGating`: linear + softmax scoring, top-1 or top-2 per token (spec §5, Li et
//! al., "Adaptive Gating in Mixture-of-Experts based Language Models", EMNLP 2023). The load
//! balance only constrains the top-1-only tokens (paper eq. 4). A composition
//! (linear-softmax scoring, `adaptive_rule`, `terms::top1_only_load_balance`, z-loss).

#include <tuple>

#include "switchyard/core/error.hpp"
#include "switchyard/routing/composition.hpp"
#include "switchyard/routing/compute.hpp"
#include "switchyard/routing/concepts.hpp"
#include "switchyard/routing/linear_softmax.hpp"
#include "switchyard/routing/plan.hpp"
#include "switchyard/routing/selection/adaptive.hpp"
#include "switchyard/routing/loss_fields.hpp"

namespace switchyard::routing {

//! Auxiliary losses of Adaptive Gating; also the coefficient set in backward.
struct adaptive_gating_losses {
  float lb_loss = 0.0f;  //!< E · Σ_e f¹_e · P̄_e: f¹ over top-1-only tokens, P̄ over all; 0 if none
  float z_loss = 0.0f;  //!< mean_t logsumexp(logits_t)²  (ST-MoE)
  //! Diagnostic, not a loss: share of tokens routed to two experts (ignored as a coefficient).
  float top2_fraction = 0.0f;
  //! The fields backward reads as coefficients (training/aux_loss.hpp).
  static constexpr auto coefficient_fields() {
    return std::tuple{loss_field<&adaptive_gating_losses::lb_loss>{"lb_loss"},
                      loss_field<&adaptive_gating_losses::z_loss>{"z_loss"}};
  }
};

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
          detail::concat(
              "threshold must be >= 0 (top-2 iff p1 - p2 <= threshold), got ", threshold));
    }
  }

  //! The per-token rule, for backends that run the selection themselves.
  [[nodiscard]] routing::adaptive_rule rule() const { return {threshold, renormalize}; }

  //! The per-token rules: the member's rule, overridden per token by the compute knob of
  //! the params (token_max_k, token_threshold; routing/compute.hpp), checked when `ws`
  //! carves. Empty views: rule() for every token.
  [[nodiscard]] routing::knob_rules<routing::adaptive_rule> token_rules(const params_type& p, index_t tokens,
                                                       workspace_arena& ws) const {
    return routing::make_knob_rules(rule(), p, tokens, width(p),
                                    routing::knob_threshold::nonnegative, ws);
  }
  //! Takes the per-token compute knob of linear_router_params (host generic route).
  static constexpr bool token_knob = true;

  // ---- the composition (run by a backend's generic route) ---------------------------------
  [[nodiscard]] routing::linear_softmax scoring() const { return {}; }
  [[nodiscard]] bool renormalized() const { return renormalize; }
  //! Load balance over the top-1-only tokens (paper eq. 4), z-loss, and the top2_fraction
  //! diagnostic (no gradient: its coefficient is ignored).
  [[nodiscard]] auto loss_terms() const {
    return std::tuple{
        routing::bind_loss<&losses_type::lb_loss>(routing::terms::top1_only_load_balance{}),
        routing::bind_loss<&losses_type::z_loss>(routing::terms::z_loss{}),
        routing::bind_loss<&losses_type::top2_fraction>(routing::terms::two_expert_share{})};
  }
};

static_assert(check_router<AdaptiveGating>());
static_assert(routing::ComposedRouter<AdaptiveGating>);

}  // namespace switchyard::routers
