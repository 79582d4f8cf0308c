// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file remoe.hpp
//! `routers::ReMoE`: ReLU routing (Wang et al., "ReMoE: Fully Differentiable Mixture-of-Experts
//! with ReLU Routing", ICLR 2025; code: thu-ml/ReMoE). Gates g = ReLU(x · Wᵀ); a token uses
//! every expert whose gate is positive, in descending g (ties to the lower id), at most
//! `max_k` (the plan's width); the combine weights are g, not normalised. The cap is not in
//! the paper (a ReLU router may light up all E experts): the pairs and tokens it cuts are
//! counted in the losses struct (`capped_pairs`, `capped_tokens`), never silently dropped.
//!
//! Sparsity is trained by an L1 penalty on the gates whose coefficient λ is adapted between
//! steps by `training::remoe_controller` (training/remoe_controller.hpp). Two forms, each a
//! field of `routing::remoe_losses` (the value in forward, the coefficient in backward):
//! - `l1` = (1/T) Σ_t Σ_e g_te, the paper's L_reg (its eq. for one layer: the mean over tokens
//!   of ‖g_t‖₁);
//! - `l1_balanced` = (E / T²) Σ_e n_e Σ_t g_te with n_e = #{t : g_te > 0} (no gradient through
//!   n_e): the load-balanced L1 of ReMoE's code (`switch_load_balancing_loss_func` over the
//!   ReLU output), which additionally divides by its nominal top-k; that constant is left to λ.
//!
//! Plan fields: `logits [T, E]` = x · Wᵀ, `probs [T, E]` = g = ReLU(logits).
//! Backward: d_logits = 1[l > 0] ⊙ (d_w at the selected slots + λ_l1 / T + λ_bal · E·n_e/T²),
//! then dx += d_logits · W, dW += d_logitsᵀ · x. The experts cut by the cap get only the L1
//! terms' gradient (they are not in the output). Scratch from the workspace, no allocation.

#include <cmath>
#include <cstddef>
#include <cstdint>

#include <cuda/std/span>

#include "switchyard/core/element_type.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/span.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/core/workspace.hpp"
#include "switchyard/routing/concepts.hpp"
#include "switchyard/routing/linear_softmax.hpp"
#include "switchyard/routing/plan.hpp"
#include "switchyard/routing/selection/relu.hpp"
#include "switchyard/routing/loss_fields.hpp"

namespace switchyard::routing {

//! ReMoE's losses (forward: values; backward: `l1` and `l1_balanced` are the coefficients λ,
//! the diagnostics are ignored) and what the forward measured.
struct remoe_losses {
  float l1 = 0.0f;           //!< (1/T) Σ_t Σ_e g_te (ReMoE's L_reg); coefficient λ in backward
  float l1_balanced = 0.0f;  //!< (E/T²) Σ_e n_e Σ_t g_te (ReMoE code's load-balanced L1)
  // ---- diagnostics of the forward (not coefficients) ---------------------------------------
  index_t scored_pairs = 0;   //!< T · E, the pairs the router scored
  index_t active_pairs = 0;   //!< pairs with g > 0, before the max_k cap
  index_t capped_pairs = 0;   //!< active pairs the max_k cap cut (not in the plan)
  index_t capped_tokens = 0;  //!< tokens with more than max_k positive gates
  float sparsity = 0.0f;      //!< 1 − active_pairs / (T · E) (ReMoE's measure; 0 when T = 0)
  //! The fields backward reads as coefficients (training/aux_loss.hpp).
  static constexpr auto coefficient_fields() {
    return std::tuple{loss_field<&remoe_losses::l1>{"l1"},
                      loss_field<&remoe_losses::l1_balanced>{"l1_balanced"}};
  }
};

}  // namespace switchyard::routing

namespace switchyard::routers {

//! ReLU router (ReMoE). Parameters: `w [E, d]` (routing::linear_router_params).
struct ReMoE {
  using policy_kind = router_tag;
  using params_type = routing::linear_router_params;
  using grads_type = routing::linear_router_grads;
  using losses_type = routing::remoe_losses;

  //! Most experts one token may use, 1 <= max_k <= E: the plan's width. `max_k = E` never cuts.
  int max_k = 2;

  [[nodiscard]] index_t num_experts(const params_type& p) const { return p.w.extent(0); }
  [[nodiscard]] index_t width(const params_type&) const { return max_k; }

  //! The per-token rule (gates in, plan row out), for backends that run the selection.
  [[nodiscard]] routing::relu_rule rule() const { return {max_k}; }

  //! Checks max_k against E (range_error naming "max_k").
  void validate(index_t experts) const {
    if (max_k < 1 || max_k > experts) {
      throw range_error("max_k", detail::concat("max_k must be in [1, E] = [1, ", experts,
                                                "], got ", max_k));
    }
  }

  //! Bytes forward or backward take from the workspace (the larger).
  [[nodiscard]] std::size_t workspace_size(index_t tokens, const params_type& p) const {
    workspace_arena fwd, bwd;
    (void)take_forward(fwd, p.w.extent(0));
    (void)take_backward(bwd, tokens, p.w.extent(0));
    return fwd.required() > bwd.required() ? fwd.required() : bwd.required();
  }

  //! Scores x [T, d], selects every positive gate (capped), fills the losses and diagnostics.
  //! Throws shape_error (x, params.w, plan), range_error (max_k), non_finite_error (x).
  template <ElementType T>
  void forward(const matrix_view<const T>& x, const params_type& p, const routing::plan_ref& plan,
               losses_type& losses, workspace_arena& ws) const {
    detail::check_linear_router_inputs(x, p);
    const index_t tokens = x.extent(0), e_count = p.w.extent(0);
    validate(e_count);
    detail::require_plan(plan, tokens, max_k, e_count);
    const forward_scratch s = take_forward(ws, e_count);
    if (!ws.carving()) return;  // measuring arena: sizes only
    losses = {};
    losses.scored_pairs = tokens * e_count;
    if (tokens == 0) return;
    routing::linear_softmax_scores(x, p, plan);  // logits (and the finite check); probs replaced
    for (index_t i = 0; i < tokens * e_count; ++i) plan.probs[i] = routing::relu_gate(plan.logits[i]);
    const routing::relu_rule r = rule();
    routing::select_all(r, plan);
    // measurements and losses, in token order (fixed: no reduction across threads)
    for (index_t e = 0; e < e_count; ++e) {
      s.counts[e] = 0;
      s.gate_sums[e] = 0.0;
    }
    double l1 = 0.0;
    for (index_t t = 0; t < tokens; ++t) {
      const float* g = plan.probs.data() + t * e_count;
      const int active = routing::relu_active_count(span<const float>(g, e_count));
      losses.active_pairs += active;
      if (active > plan.counts[t]) {
        ++losses.capped_tokens;
        losses.capped_pairs += active - plan.counts[t];
      }
      for (index_t e = 0; e < e_count; ++e) {
        l1 += g[e];
        s.gate_sums[e] += g[e];
        s.counts[e] += g[e] > 0.0f ? 1 : 0;
      }
    }
    const double t_d = static_cast<double>(tokens);
    losses.l1 = static_cast<float>(l1 / t_d);
    double bal = 0.0;
    for (index_t e = 0; e < e_count; ++e) bal += static_cast<double>(s.counts[e]) * s.gate_sums[e];
    losses.l1_balanced = static_cast<float>(bal * static_cast<double>(e_count) / (t_d * t_d));
    losses.sparsity = static_cast<float>(
        1.0 - static_cast<double>(losses.active_pairs) / static_cast<double>(losses.scored_pairs));
  }

  //! Backward of Σ d_weights ⊙ weights + coeffs.l1 · l1 + coeffs.l1_balanced · l1_balanced:
  //! dx [T, d] += ∂/∂x, grads.w [E, d] += ∂/∂W (either may be an empty view). `d_weights` is
  //! [T, max_k] in slot order. Throws shape_error (plan, x, dx, grads.w), null_pointer_error
  //! (d_weights), range_error (a coefficient not finite or negative).
  template <ElementType T>
  void backward(const matrix_view<const T>& x, const params_type& p, const routing::plan_ref& plan,
                const float* d_weights, const losses_type& coeffs, const matrix_view<float>& dx,
                const grads_type& grads, workspace_arena& ws) const {
    detail::check_linear_router_inputs(x, p);
    const index_t tokens = x.extent(0), e_count = p.w.extent(0);
    validate(e_count);
    if (plan.num_tokens != tokens || plan.num_experts != e_count || plan.width != max_k) {
      throw shape_error("plan", detail::concat("plan: expected T = ", tokens, ", width = max_k = ",
                                               max_k, ", E = ", e_count,
                                               " (the forward of this x and params), got T = ",
                                               plan.num_tokens, ", width = ", plan.width,
                                               ", E = ", plan.num_experts));
    }
    plan.check("plan");
    check_coefficient("coeffs.l1", coeffs.l1);
    check_coefficient("coeffs.l1_balanced", coeffs.l1_balanced);
    if (detail::present(dx)) check_view("dx", dx, {tokens, x.extent(1)}, "[T, d]");
    if (detail::present(grads.w)) check_view("grads.w", grads.w, {e_count, x.extent(1)}, "[E, d]");
    if (tokens > 0 && d_weights == nullptr) {
      throw null_pointer_error("d_weights", detail::concat("d_weights: null, expected [T, max_k] = [",
                                                           tokens, ", ", max_k, "] cotangents"));
    }
    const backward_scratch s = take_backward(ws, tokens, e_count);
    if (!ws.carving() || tokens == 0) return;  // measuring arena, or an empty batch
    for (index_t e = 0; e < e_count; ++e) s.counts[e] = 0;
    for (index_t t = 0; t < tokens; ++t)
      for (index_t e = 0; e < e_count; ++e) s.counts[e] += plan.logits[t * e_count + e] > 0.0f ? 1 : 0;
    const double t_d = static_cast<double>(tokens);
    const double c_l1 = static_cast<double>(coeffs.l1) / t_d;
    const double c_bal = static_cast<double>(coeffs.l1_balanced) * static_cast<double>(e_count) / (t_d * t_d);
#pragma omp parallel for schedule(static) if (tokens * e_count > (1 << 16))
    for (index_t t = 0; t < tokens; ++t) {
      float* dl = s.d_logits + t * e_count;
      const float* lg = plan.logits.data() + t * e_count;
      for (index_t e = 0; e < e_count; ++e) {
        dl[e] = lg[e] > 0.0f
                    ? static_cast<float>(c_l1 + c_bal * static_cast<double>(s.counts[e]))
                    : 0.0f;
      }
      for (index_t j = 0; j < plan.counts[t]; ++j) {
        const std::int32_t e = plan.id(t, j);
        if (e >= 0 && e < e_count && lg[e] > 0.0f) dl[e] += d_weights[t * max_k + j];
      }
    }
    routing::linear_backward(x, p, s.d_logits, dx, grads);
  }

 private:
  struct forward_scratch {
    index_t* counts;    // [E] n_e
    double* gate_sums;  // [E] Σ_t g_te
  };
  struct backward_scratch {
    float* d_logits;  // [T, E]
    index_t* counts;  // [E] n_e
  };
  static forward_scratch take_forward(workspace_arena& ws, index_t e_count) {
    forward_scratch s{};
    s.counts = ws.take<index_t>(e_count);
    s.gate_sums = ws.take<double>(e_count);
    return s;
  }
  static backward_scratch take_backward(workspace_arena& ws, index_t tokens, index_t e_count) {
    backward_scratch s{};
    s.d_logits = ws.take<float>(tokens * e_count);
    s.counts = ws.take<index_t>(e_count);
    return s;
  }
  static void check_coefficient(const char* name, float c) {
    if (!std::isfinite(c) || c < 0.0f) {
      throw range_error(name, detail::concat(name, " (an L1 coefficient λ) must be finite and >= 0, got ", c));
    }
  }
};

static_assert(check_router<ReMoE>());

}  // namespace switchyard::routers
