// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file dynmoe.hpp
//! `routers::DynMoE`: DynMoE top-any gating, DeepSpeed variant (spec §3; Guo et al., "Dynamic
//! Mixture of Experts", ICLR 2025, `DeepSpeed-0.9.5/deepspeed/moe/sharded_moe.py::GAMoEGateT`,
//! `topanygating_opt`, `loss.py`).
//!
//! Scores are sigmoid cosines between the token and one gate column per expert; every expert
//! whose score beats its own trainable threshold is on, and the token is shared equally
//! between them. Forward fills the plan and the four auxiliary losses; backward is the
//! straight-through estimator of upstream (only entries that are on pass gradient).
//!
//! Plan fields: `logits [T, E_max]` = s·cos(x, w_e) (pre-sigmoid), `probs [T, E_max]` = the
//! masked scores S the rule saw.
//!
//! The pieces: routing/dynmoe/params.hpp (params, grads, losses), routing/dynmoe/kernels.hpp
//! (per-token rows, SWITCHYARD_HD, and the scratch layouts), routing/dynmoe/losses.hpp (the
//! losses and the weight-side backward). Forward and backward take their scratch from the
//! workspace (`workspace_size`) and allocate nothing.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include <cuda/std/span>

#include "switchyard/core/element_type.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/core/workspace.hpp"
#include "switchyard/routing/concepts.hpp"
#include "switchyard/routing/dynmoe/kernels.hpp"
#include "switchyard/routing/dynmoe/losses.hpp"
#include "switchyard/routing/dynmoe/params.hpp"
#include "switchyard/routing/plan.hpp"
#include "switchyard/routing/selection/topany.hpp"

namespace switchyard::routers {

//! DynMoE top-any router (DeepSpeed variant, spec §3). Width of the plan is E_max.
struct DynMoE {
  using policy_kind = router_tag;
  using params_type = routing::dynmoe_params;
  using grads_type = routing::dynmoe_grads;
  using losses_type = routing::dynmoe_losses;

  //! Training (a token with no expert gets none) or eval (it goes to argmax S with weight 1).
  bool training = true;

  //! E_max: the number of expert slots (active or not).
  [[nodiscard]] index_t num_experts(const params_type& p) const { return p.w_gate.extent(1); }
  //! The plan's width: E_max (every slot may be on).
  [[nodiscard]] index_t width(const params_type& p) const { return p.w_gate.extent(1); }

  //! Checks the parameters alone: shapes (shape_error), a finite temperature, finite gate
  //! weights and thresholds (non_finite_error), a 0/1 mask with at least one active expert
  //! (range_error).
  void validate(const params_type& p) const {
    check_view("params.w_gate", p.w_gate, {-1, -1}, "[d, E_max]");
    const index_t d = p.w_gate.extent(0), e_max = p.w_gate.extent(1);
    if (e_max < 1) {
      throw shape_error("params.w_gate",
                        detail::concat(
                            "params.w_gate: expected [d, E_max] with E_max >= 1, got [", d, ", ",
                            e_max, "]"));
    }
    check_view("params.thresholds", p.thresholds, {e_max}, "[E_max] with E_max = params.w_gate.extent(1)");
    check_view("params.experts_mask", p.experts_mask, {e_max},
               "[E_max] with E_max = params.w_gate.extent(1)");
    if (!std::isfinite(p.log_temperature)) {
      throw non_finite_error("params.log_temperature",
                             detail::concat(
                                 "params.log_temperature must be finite, got ", p.log_temperature));
    }
    for (index_t e = 0; e < e_max; ++e)
      for (index_t i = 0; i < d; ++i)
        if (!std::isfinite(p.w_gate(i, e))) {
          throw non_finite_error("params.w_gate",
                                 detail::concat("params.w_gate[", i, ", ", e,
                                                              "] must be finite, got ",
                                                              p.w_gate(i, e)));
        }
    index_t active = 0;
    for (index_t e = 0; e < e_max; ++e) {
      if (!std::isfinite(p.thresholds(e))) {
        throw non_finite_error("params.thresholds",
                               detail::concat("params.thresholds[", e,
                                                            "] must be finite, got ",
                                                            p.thresholds(e)));
      }
      const std::int32_t m = p.experts_mask(e);
      if (m != 0 && m != 1) {
        throw range_error("params.experts_mask",
                          detail::concat("params.experts_mask[", e,
                                                       "] must be 0 or 1, got ", m));
      }
      active += m;
    }
    if (active == 0) {
      throw range_error("params.experts_mask",
                        detail::concat(
                            "params.experts_mask must have at least one active expert (a 1) in "
                            "[1, E_max = ",
                            e_max, "] active, got 0 of ", e_max));
    }
  }

  //! Scale s = exp(min(log τ, log 100)).
  [[nodiscard]] static float scale(const params_type& p) {
    return detail::dynmoe_scale(p.log_temperature);
  }

  //! Threshold probabilities θ_e = σ(s·G_e), E_max values (allocates; forward uses scratch).
  [[nodiscard]] static std::vector<float> threshold_probs(const params_type& p) {
    std::vector<float> theta(static_cast<std::size_t>(p.thresholds.extent(0)));
    detail::dynmoe_threshold_probs(p.thresholds, scale(p), theta.data());
    return theta;
  }

  //! The per-token rule over `theta` (θ_e = σ(s·G_e), see threshold_probs) and `mask`, for
  //! backends that run the selection themselves. The spans must outlive the rule's use.
  [[nodiscard]] routing::topany_rule rule(span<const float> theta,
                                          span<const std::int32_t> mask) const {
    return {theta, mask, training};
  }

  //! Bytes forward or backward take from the workspace for T tokens (the most of the two):
  //! backward's dz [T, E_max], dŴ [d, E_max] and A [E_max, E_max] in double, plus rows.
  [[nodiscard]] std::size_t workspace_size(index_t tokens, const params_type& p) const {
    const index_t d = p.w_gate.extent(0), e_max = p.w_gate.extent(1);
    workspace_arena fwd, bwd;
    (void)detail::dynmoe_forward_scratch::take(fwd, e_max);
    (void)detail::dynmoe_backward_scratch::take(bwd, tokens, d, e_max);
    return std::max(fwd.required(), bwd.required());
  }

  //! Scores x [T, d] (cosine against every gate column), selects top-any, computes the four
  //! losses, with scratch from `ws` (workspace_size bytes). T = 0 is an empty batch (empty
  //! plan, all losses 0). Throws shape_error, range_error or non_finite_error (see validate;
  //! non-finite x names the first bad token).
  template <ElementType T>
  void forward(const matrix_view<const T>& x, const params_type& p, const routing::plan_ref& plan,
               losses_type& losses, workspace_arena& ws) const {
    validate(p);
    const index_t d = p.w_gate.extent(0), e_max = p.w_gate.extent(1);
    check_view("x", x, {-1, d}, "[T, d] with d = params.w_gate.extent(0)");
    const index_t tokens = x.extent(0);
    for (index_t t = 0; t < tokens; ++t)
      for (index_t i = 0; i < d; ++i)
        if (!std::isfinite(to_float(x(t, i)))) {
          throw non_finite_error(
              "x", detail::concat("x: token ", t, " has a non-finite value at x[", t,
                                                ", ", i, "] = ", to_float(x(t, i)),
                                                "; Switchyard refuses to route non-finite tokens"));
        }
    detail::require_plan(plan, tokens, e_max, e_max);
    losses = {};
    if (tokens == 0) return;

    const auto sc = detail::dynmoe_forward_scratch::take(ws, e_max);
    const float s = scale(p);
    detail::dynmoe_threshold_probs(p.thresholds, s, sc.theta);
    detail::dynmoe_column_norms(p.w_gate, sc.wn);
    for (index_t e = 0; e < e_max; ++e) sc.mask[e] = p.experts_mask(e);

#pragma omp parallel for schedule(static) if (tokens * e_max * d > (1 << 16))
    for (index_t t = 0; t < tokens; ++t) {
      detail::dynmoe_score_row(x, t, p.w_gate, sc.wn, sc.mask, s,
                                        plan.logits.data() + t * e_max,
                                        plan.probs.data() + t * e_max);
    }
    const routing::topany_rule r = rule(span<const float>(sc.theta, e_max),
                                        span<const std::int32_t>(sc.mask, e_max));
#pragma omp parallel for schedule(static) if (tokens > 256)
    for (index_t t = 0; t < tokens; ++t) {
      plan.counts[t] = r.select(span<const float>(plan.probs.data() + t * e_max, e_max),
                                span<std::int32_t>(plan.expert_ids.data() + t * e_max, e_max),
                                span<float>(plan.weights.data() + t * e_max, e_max));
    }

    detail::dynmoe_plan_losses(plan, sc.me, sc.ce, losses);
    losses.sim_loss = static_cast<float>(
        detail::dynmoe_sim_loss(p.w_gate, p.experts_mask, sc.wn, nullptr));
    losses.simple_loss = detail::dynmoe_simple_loss(sc.wn, e_max);
  }

  //! Dense gates b [T, E_max] of a plan (1 where an expert is used, eval fallbacks included).
  //! Allocates (a convenience for tests and tools; forward and backward do not use it).
  [[nodiscard]] static std::vector<float> dense_gates(const routing::plan_ref& plan) {
    std::vector<float> b(static_cast<std::size_t>(plan.num_tokens * plan.num_experts), 0.0f);
    for (index_t t = 0; t < plan.num_tokens; ++t)
      for (index_t j = 0; j < plan.counts[t]; ++j) b[t * plan.num_experts + plan.id(t, j)] = 1.0f;
    return b;
  }

  //! Full backward of Σ d_weights ⊙ weights + Σ coeff · loss (straight-through, spec §3.4):
  //! dx [T, d] += ∂/∂x, grads.w_gate [d, E_max] += ∂/∂W, grads.thresholds [E_max] += ∂/∂G,
  //! with scratch from `ws` (workspace_size bytes). `d_weights` is the cotangent of the combine
  //! weights in plan-slot order [T, E_max] (routing::dense_to_slot_cotangent converts a dense
  //! one). Any output may be an empty view.
  //!
  //! Only entries that are on (S > θ) pass gradient; an eval fallback slot passes none. The
  //! combine weight b/k divides by an integer k (no gradient through k), the load-balance
  //! loss divides by k = Σ_e b_e differentiably.
  template <ElementType T>
  void backward(const matrix_view<const T>& x, const params_type& p,
                const routing::plan_ref& plan, const float* d_weights, const losses_type& coeff,
                const matrix_view<float>& dx, const grads_type& grads, workspace_arena& ws) const {
    validate(p);
    const index_t d = p.w_gate.extent(0), e_max = p.w_gate.extent(1);
    check_view("x", x, {-1, d}, "[T, d] with d = params.w_gate.extent(0)");
    const index_t tokens = x.extent(0);
    if (plan.num_tokens != tokens || plan.num_experts != e_max || plan.width != e_max) {
      throw shape_error("plan", detail::concat(
                                    "plan: expected ", tokens, " tokens and width = E = ", e_max,
                                    " (the forward of this x and params), got T = ",
                                    plan.num_tokens, ", width ", plan.width, ", E ",
                                    plan.num_experts));
    }
    const bool want_dx = detail::present(dx);
    const bool want_w = detail::present(grads.w_gate);
    const bool want_g = detail::present(grads.thresholds);
    if (want_dx) check_view("dx", dx, {tokens, d}, "[T, d]");
    if (want_w) check_view("grads.w_gate", grads.w_gate, {d, e_max}, "[d, E_max]");
    if (want_g) check_view("grads.thresholds", grads.thresholds, {e_max}, "[E_max]");
    if (tokens > 0 && d_weights == nullptr) {
      throw null_pointer_error("d_weights", detail::concat(
                                                "d_weights: null, expected [T, E_max] = [", tokens,
                                                ", ", e_max, "] cotangents"));
    }
    if (tokens == 0) return;  // empty batch: zero losses, zero gradients

    const auto sc = detail::dynmoe_backward_scratch::take(ws, tokens, d, e_max);
    const float s = scale(p);
    detail::dynmoe_threshold_probs(p.thresholds, s, sc.theta);
    detail::dynmoe_column_norms(p.w_gate, sc.wn);

    // ---- ∂/∂b on entries that are on, then ∂/∂(S − θ) (straight-through) -----------------
    const index_t routed = detail::dynmoe_routed_share(plan, sc.ce);
    const double lb_factor =
        routed > 0 ? coeff.load_balance_loss * (static_cast<double>(e_max) / routed) : 0.0;
    const double c_eff = coeff.efficiency_loss / (static_cast<double>(tokens) * e_max);
    for (index_t e = 0; e < e_max; ++e) sc.dtheta[e] = 0.0;
    for (index_t t = 0; t < tokens; ++t) {  // in token order: dθ sums over tokens
      detail::dynmoe_straight_through_row(
          e_max, plan.counts[t], plan.expert_ids.data() + t * e_max, d_weights + t * e_max,
          plan.probs.data() + t * e_max, sc.theta, sc.ce, lb_factor, c_eff, sc.dz + t * e_max,
          sc.g);
      for (index_t e = 0; e < e_max; ++e) sc.dtheta[e] -= sc.g[e];  // g = 0 where off
    }
    if (want_g) {
      for (index_t e = 0; e < e_max; ++e) {
        const double th = sc.theta[e];
        grads.thresholds(e) += static_cast<float>(sc.dtheta[e] * th * (1.0 - th) * s);
      }
    }

    // ---- through cos = ⟨x̂, ŵ⟩ (dcos = s·dz), in token order: dŴ sums over tokens ---------
    for (index_t i = 0; i < d * e_max; ++i) sc.dwhat[i] = 0.0;
    const matrix_view<float> dx_or_none = want_dx ? dx : matrix_view<float>{};
    for (index_t t = 0; t < tokens; ++t) {
      const double* dz = sc.dz + t * e_max;
      if (!detail::dynmoe_cosine_backward_row(x, t, p.w_gate, sc.wn, dz, s, sc.xhat,
                                                       sc.dxhat, dx_or_none))
        continue;
      detail::dynmoe_cosine_weight_row(d, e_max, dz, s, sc.xhat, sc.dwhat);
    }
    if (!want_w) return;
    detail::dynmoe_weight_backward(p, coeff, sc, grads.w_gate);
  }
};

static_assert(check_router<DynMoE>());

}  // namespace switchyard::routers
