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

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <cuda/std/span>

#include "switchyard/core/element_type.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/workspace.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/routing/concepts.hpp"
#include "switchyard/routing/linear_softmax.hpp"
#include "switchyard/routing/plan.hpp"
#include "switchyard/routing/selection/topany.hpp"

namespace switchyard::routing {

//! Parameters of a DynMoE gate (views of caller memory). `E_max` slots, of which the experts
//! with `experts_mask[e] != 0` are active.
struct dynmoe_params {
  matrix_view<const float> w_gate;                   //!< [d, E_max], one column per expert
  vector_view<const float> thresholds;               //!< [E_max], threshold logits G
  vector_view<const std::int32_t> experts_mask;      //!< [E_max], 1 = active, 0 = masked
  float log_temperature = 0.0f;                      //!< log τ; scale s = exp(min(log τ, log 100))
};

//! Gradients of a DynMoE gate, accumulated (+=) into caller memory; an empty view skips it.
//! (The temperature is not trainable in the DeepSpeed variant, so it has no gradient.)
struct dynmoe_grads {
  matrix_view<float> w_gate;      //!< [d, E_max]
  vector_view<float> thresholds;  //!< [E_max]
};

//! The four auxiliary losses of DynMoE (DeepSpeed variant). Also the coefficient set of
//! backward: each field multiplies the gradient of its loss (upstream uses 0.01 for all four,
//! see `deepspeed()`; the golden files differentiate with 1 for each).
struct dynmoe_losses {
  float sim_loss = 0.0f;           //!< ‖(ŴᵀŴ − I) ⊙ m mᵀ‖_F (diversity of the active columns)
  float simple_loss = 0.0f;        //!< mean_e ‖W[:, e]‖₂ over all E_max columns
  float load_balance_loss = 0.0f;  //!< E_max · Σ_e me_e·ce_e over tokens with k > 0
  float efficiency_loss = 0.0f;    //!< mean_{t,e} b_{t,e}

  //! l_aux = the sum of the four parts (what upstream returns as `l_aux`).
  [[nodiscard]] float aux_loss() const {
    return sim_loss + simple_loss + load_balance_loss + efficiency_loss;
  }
  //! The same coefficient `c` for every part (as upstream: `loss = task + c·l_aux`).
  [[nodiscard]] static dynmoe_losses uniform(float c) { return {c, c, c, c}; }
  //! Upstream's coefficients: 0.01 for every part (`DY: Examples/DeepSpeed-MoE/train.py`).
  [[nodiscard]] static dynmoe_losses deepspeed() { return uniform(0.01f); }
};

namespace detail {

//! Normalisation floor of F.normalize (upstream eps).
inline constexpr double dynmoe_norm_eps = 1e-12;

//! Logistic sigmoid in float32, 1/(1+e^{-z}) as torch's CPU kernel computes it.
inline float dynmoe_sigmoid(float z) { return 1.0f / (1.0f + std::exp(-z)); }

//! Scale s = exp(min(log τ, log 100)).
inline float dynmoe_scale(float log_temperature) {
  return std::exp(std::min(log_temperature, std::log(100.0f)));
}

//! Column norms ‖W[:, e]‖ in double.
inline std::vector<double> dynmoe_column_norms(const matrix_view<const float>& w) {
  const index_t d = w.extent(0), e_count = w.extent(1);
  std::vector<double> n(static_cast<std::size_t>(e_count), 0.0);
  for (index_t e = 0; e < e_count; ++e) {
    double s = 0.0;
    for (index_t i = 0; i < d; ++i) s += static_cast<double>(w(i, e)) * w(i, e);
    n[e] = std::sqrt(s);
  }
  return n;
}

//! Backward of u = v / max(‖v‖, eps) for one vector: given û (the normalised vector), the norm
//! ‖v‖ and the cotangent du, returns dv into `out` (accumulated): (du − û⟨û, du⟩)/‖v‖, or
//! du/eps when ‖v‖ <= eps (the clamp is then the active branch).
template <class Get, class Add>
void dynmoe_normalize_backward(index_t n, double norm, Get uhat, const double* du, Add add) {
  if (norm > dynmoe_norm_eps) {
    double dot = 0.0;
    for (index_t i = 0; i < n; ++i) dot += uhat(i) * du[i];
    for (index_t i = 0; i < n; ++i) add(i, (du[i] - uhat(i) * dot) / norm);
  } else {
    for (index_t i = 0; i < n; ++i) add(i, du[i] / dynmoe_norm_eps);
  }
}

}  // namespace detail
}  // namespace switchyard::routing

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
                        ::switchyard::detail::concat(
                            "params.w_gate: expected [d, E_max] with E_max >= 1, got [", d, ", ",
                            e_max, "]"));
    }
    check_view("params.thresholds", p.thresholds, {e_max}, "[E_max] with E_max = params.w_gate.extent(1)");
    check_view("params.experts_mask", p.experts_mask, {e_max},
               "[E_max] with E_max = params.w_gate.extent(1)");
    if (!std::isfinite(p.log_temperature)) {
      throw non_finite_error("params.log_temperature",
                             ::switchyard::detail::concat(
                                 "params.log_temperature must be finite, got ", p.log_temperature));
    }
    for (index_t e = 0; e < e_max; ++e)
      for (index_t i = 0; i < d; ++i)
        if (!std::isfinite(p.w_gate(i, e))) {
          throw non_finite_error("params.w_gate",
                                 ::switchyard::detail::concat("params.w_gate[", i, ", ", e,
                                                              "] must be finite, got ",
                                                              p.w_gate(i, e)));
        }
    index_t active = 0;
    for (index_t e = 0; e < e_max; ++e) {
      if (!std::isfinite(p.thresholds(e))) {
        throw non_finite_error("params.thresholds",
                               ::switchyard::detail::concat("params.thresholds[", e,
                                                            "] must be finite, got ",
                                                            p.thresholds(e)));
      }
      const std::int32_t m = p.experts_mask(e);
      if (m != 0 && m != 1) {
        throw range_error("params.experts_mask",
                          ::switchyard::detail::concat("params.experts_mask[", e,
                                                       "] must be 0 or 1, got ", m));
      }
      active += m;
    }
    if (active == 0) {
      throw range_error("params.experts_mask",
                        ::switchyard::detail::concat(
                            "params.experts_mask must have at least one active expert (a 1) in "
                            "[1, E_max = ",
                            e_max, "] active, got 0 of ", e_max));
    }
  }

  //! Scale s = exp(min(log τ, log 100)).
  [[nodiscard]] static float scale(const params_type& p) {
    return routing::detail::dynmoe_scale(p.log_temperature);
  }

  //! Threshold probabilities θ_e = σ(s·G_e), E_max values.
  [[nodiscard]] static std::vector<float> threshold_probs(const params_type& p) {
    const float s = scale(p);
    std::vector<float> theta(static_cast<std::size_t>(p.thresholds.extent(0)));
    for (index_t e = 0; e < p.thresholds.extent(0); ++e)
      theta[e] = routing::detail::dynmoe_sigmoid(s * p.thresholds(e));
    return theta;
  }

  //! The per-token rule over `theta` (θ_e = σ(s·G_e), see threshold_probs) and `mask`, for
  //! backends that run the selection themselves. The spans must outlive the rule's use.
  [[nodiscard]] routing::topany_rule rule(::cuda::std::span<const float> theta,
                                          ::cuda::std::span<const std::int32_t> mask) const {
    return {theta, mask, training};
  }

  //! Scores x [T, d] (cosine against every gate column), selects top-any, computes the four
  //! losses. T = 0 is an empty batch (empty plan, all losses 0). Throws shape_error,
  //! range_error or non_finite_error (see validate; non-finite x names the first bad token).
  template <ElementType T>
  void forward(const matrix_view<const T>& x, const params_type& p, const routing::plan_ref& plan,
               losses_type& losses, [[maybe_unused]] workspace_arena& ws) const {
    validate(p);
    const index_t d = p.w_gate.extent(0), e_max = p.w_gate.extent(1);
    check_view("x", x, {-1, d}, "[T, d] with d = params.w_gate.extent(0)");
    const index_t tokens = x.extent(0);
    for (index_t t = 0; t < tokens; ++t)
      for (index_t i = 0; i < d; ++i)
        if (!std::isfinite(to_float(x(t, i)))) {
          throw non_finite_error(
              "x", ::switchyard::detail::concat("x: token ", t, " has a non-finite value at x[", t,
                                                ", ", i, "] = ", to_float(x(t, i)),
                                                "; Switchyard refuses to route non-finite tokens"));
        }
    routing::detail::require_plan(plan, tokens, e_max, e_max);
    losses = {};
    if (tokens == 0) return;

    const float s = scale(p);
    const std::vector<float> theta = threshold_probs(p);
    const std::vector<double> wn = routing::detail::dynmoe_column_norms(p.w_gate);
    std::vector<std::int32_t> mask(static_cast<std::size_t>(e_max));
    for (index_t e = 0; e < e_max; ++e) mask[e] = p.experts_mask(e);

#pragma omp parallel for schedule(static) if (tokens * e_max * d > (1 << 16))
    for (index_t t = 0; t < tokens; ++t) {
      double xn = 0.0;
      for (index_t i = 0; i < d; ++i) xn += static_cast<double>(to_float(x(t, i))) * to_float(x(t, i));
      xn = std::max(std::sqrt(xn), routing::detail::dynmoe_norm_eps);
      for (index_t e = 0; e < e_max; ++e) {
        double dot = 0.0;
        for (index_t i = 0; i < d; ++i) dot += static_cast<double>(to_float(x(t, i))) * p.w_gate(i, e);
        const float cos = static_cast<float>(dot / (xn * std::max(wn[e], routing::detail::dynmoe_norm_eps)));
        const float z = cos * s;
        plan.logits[t * e_max + e] = z;
        plan.probs[t * e_max + e] =
            routing::detail::dynmoe_sigmoid(z) * static_cast<float>(mask[e]);
      }
    }
    routing::select_all(rule(::cuda::std::span<const float>(theta.data(), theta.size()),
                             ::cuda::std::span<const std::int32_t>(mask.data(), mask.size())),
                        plan);

    // Load balance over tokens with k > 0; efficiency over all T·E_max entries.
    std::vector<double> me(static_cast<std::size_t>(e_max), 0.0), ce(static_cast<std::size_t>(e_max), 0.0);
    index_t routed = 0, total = 0;
    for (index_t t = 0; t < tokens; ++t) {
      const index_t k = plan.counts[t];
      total += k;
      if (k == 0) continue;
      ++routed;
      for (index_t j = 0; j < k; ++j) {
        me[plan.id(t, j)] += 1.0 / static_cast<double>(k);
        ce[plan.id(t, j)] += 1.0;
      }
    }
    if (routed > 0) {
      double lb = 0.0;
      for (index_t e = 0; e < e_max; ++e) lb += (me[e] / routed) * (ce[e] / routed);
      losses.load_balance_loss = static_cast<float>(lb * static_cast<double>(e_max));
    }
    losses.efficiency_loss = static_cast<float>(static_cast<double>(total) / (static_cast<double>(tokens) * e_max));
    losses.sim_loss = static_cast<float>(sim_loss(p, nullptr));
    double simple = 0.0;
    for (index_t e = 0; e < e_max; ++e) simple += wn[e];
    losses.simple_loss = static_cast<float>(simple / static_cast<double>(e_max));
  }

  //! Dense gates b [T, E_max] of a plan (1 where an expert is used, eval fallbacks included).
  [[nodiscard]] static std::vector<float> dense_gates(const routing::plan_ref& plan) {
    std::vector<float> b(static_cast<std::size_t>(plan.num_tokens * plan.num_experts), 0.0f);
    for (index_t t = 0; t < plan.num_tokens; ++t)
      for (index_t j = 0; j < plan.counts[t]; ++j) b[t * plan.num_experts + plan.id(t, j)] = 1.0f;
    return b;
  }

  //! Full backward of Σ d_weights ⊙ weights + Σ coeff · loss (straight-through, spec §3.4):
  //! dx [T, d] += ∂/∂x, grads.w_gate [d, E_max] += ∂/∂W, grads.thresholds [E_max] += ∂/∂G.
  //! `d_weights` is the cotangent of the combine weights in plan-slot order [T, E_max]
  //! (routing::dense_to_slot_cotangent converts a dense one). Any output may be an empty view.
  //!
  //! Only entries that are on (S > θ) pass gradient; an eval fallback slot passes none. The
  //! combine weight b/k divides by an integer k (no gradient through k), the load-balance
  //! loss divides by k = Σ_e b_e differentiably.
  template <ElementType T>
  void backward(const matrix_view<const T>& x, const params_type& p,
                const routing::plan_ref& plan, const float* d_weights, const losses_type& coeff,
                const matrix_view<float>& dx, const grads_type& grads, [[maybe_unused]] workspace_arena& ws) const {
    validate(p);
    const index_t d = p.w_gate.extent(0), e_max = p.w_gate.extent(1);
    check_view("x", x, {-1, d}, "[T, d] with d = params.w_gate.extent(0)");
    const index_t tokens = x.extent(0);
    if (plan.num_tokens != tokens || plan.num_experts != e_max || plan.width != e_max) {
      throw shape_error("plan", ::switchyard::detail::concat(
                                    "plan: expected ", tokens, " tokens and width = E = ", e_max,
                                    " (the forward of this x and params), got T = ",
                                    plan.num_tokens, ", width ", plan.width, ", E ",
                                    plan.num_experts));
    }
    const bool want_dx = dx.data_handle() != nullptr || element_count(dx) != 0;
    const bool want_w = grads.w_gate.data_handle() != nullptr || element_count(grads.w_gate) != 0;
    const bool want_g = grads.thresholds.data_handle() != nullptr || element_count(grads.thresholds) != 0;
    if (want_dx) check_view("dx", dx, {tokens, d}, "[T, d]");
    if (want_w) check_view("grads.w_gate", grads.w_gate, {d, e_max}, "[d, E_max]");
    if (want_g) check_view("grads.thresholds", grads.thresholds, {e_max}, "[E_max]");
    if (tokens > 0 && d_weights == nullptr) {
      throw null_pointer_error("d_weights", ::switchyard::detail::concat(
                                                "d_weights: null, expected [T, E_max] = [", tokens,
                                                ", ", e_max, "] cotangents"));
    }
    if (tokens == 0) return;  // empty batch: zero losses, zero gradients

    const float s = scale(p);
    const std::vector<float> theta = threshold_probs(p);
    const std::vector<double> wn = routing::detail::dynmoe_column_norms(p.w_gate);
    auto what = [&](index_t i, index_t e) {
      return static_cast<double>(p.w_gate(i, e)) / std::max(wn[e], routing::detail::dynmoe_norm_eps);
    };

    // ---- ∂/∂b on entries that are on, then ∂/∂(S − θ) (straight-through) -----------------
    auto on = [&](index_t t, index_t e) { return plan.probs[t * e_max + e] > theta[e]; };
    std::vector<double> ce(static_cast<std::size_t>(e_max), 0.0);
    index_t routed = 0;
    for (index_t t = 0; t < tokens; ++t) {
      if (plan.counts[t] == 0) continue;
      ++routed;
      for (index_t j = 0; j < plan.counts[t]; ++j) ce[plan.id(t, j)] += 1.0;
    }
    for (auto& c : ce) c /= std::max<index_t>(routed, 1);

    std::vector<double> dz(static_cast<std::size_t>(tokens * e_max), 0.0);  // ∂/∂(s·cos)
    std::vector<double> dtheta(static_cast<std::size_t>(e_max), 0.0);
    const double c_eff = coeff.efficiency_loss / (static_cast<double>(tokens) * e_max);
    for (index_t t = 0; t < tokens; ++t) {
      const index_t k = plan.counts[t];
      if (k == 0) continue;
      double ce_dot_b = 0.0;  // Σ_e ce_e b_{t,e} (fallback entries count: b is 1 there)
      for (index_t j = 0; j < k; ++j) ce_dot_b += ce[plan.id(t, j)];
      const double kd = static_cast<double>(k);
      for (index_t j = 0; j < k; ++j) {
        const index_t e = plan.id(t, j);
        if (!on(t, e)) continue;
        double g = static_cast<double>(d_weights[t * e_max + j]) / kd;
        g += coeff.load_balance_loss * (static_cast<double>(e_max) / routed) *
             (ce[e] / kd - ce_dot_b / (kd * kd));
        g += c_eff;
        // S_e = σ(z)·m_e (m_e = 1 since e is on); b = sign(relu(S − θ)), identity backward.
        const double sig = plan.probs[t * e_max + e];
        dz[t * e_max + e] = g * sig * (1.0 - sig);
        dtheta[e] -= g;
      }
    }

    if (want_g) {
      for (index_t e = 0; e < e_max; ++e) {
        const double th = theta[e];
        grads.thresholds(e) += static_cast<float>(dtheta[e] * th * (1.0 - th) * s);
      }
    }

    // ---- through cos = ⟨x̂, ŵ⟩ ---------------------------------------------------------------
    // dcos = s · dz.
    std::vector<double> dwhat(static_cast<std::size_t>(d * e_max), 0.0);  // [d, E]
    std::vector<double> xhat(static_cast<std::size_t>(d)), dxhat(static_cast<std::size_t>(d));
    for (index_t t = 0; t < tokens; ++t) {
      double xn = 0.0;
      for (index_t i = 0; i < d; ++i) xn += static_cast<double>(to_float(x(t, i))) * to_float(x(t, i));
      xn = std::sqrt(xn);
      const double xden = std::max(xn, routing::detail::dynmoe_norm_eps);
      for (index_t i = 0; i < d; ++i) xhat[i] = to_float(x(t, i)) / xden;
      bool any = false;
      for (index_t e = 0; e < e_max; ++e) any |= dz[t * e_max + e] != 0.0;
      if (!any) continue;
      std::fill(dxhat.begin(), dxhat.end(), 0.0);
      for (index_t e = 0; e < e_max; ++e) {
        const double dc = dz[t * e_max + e] * s;
        if (dc == 0.0) continue;
        for (index_t i = 0; i < d; ++i) {
          dwhat[i * e_max + e] += dc * xhat[i];
          dxhat[i] += dc * what(i, e);
        }
      }
      if (want_dx) {
        routing::detail::dynmoe_normalize_backward(
            d, xn, [&](index_t i) { return xhat[i]; }, dxhat.data(),
            [&](index_t i, double v) { dx(t, i) += static_cast<float>(v); });
      }
    }
    if (!want_w) return;

    // ---- L_sim: ∂‖A‖/∂ŵ_e = (2/‖A‖) Σ_f A_ef ŵ_f, A = (ŴᵀŴ − I) ⊙ m mᵀ ----------------------
    if (coeff.sim_loss != 0.0f) {
      std::vector<double> a(static_cast<std::size_t>(e_max * e_max), 0.0);
      const double norm_a = sim_loss(p, &a);
      if (norm_a > 0.0) {
        for (index_t e = 0; e < e_max; ++e)
          for (index_t f = 0; f < e_max; ++f) {
            const double af = a[e * e_max + f];
            if (af == 0.0) continue;
            const double c = coeff.sim_loss * 2.0 * af / norm_a;
            for (index_t i = 0; i < d; ++i) dwhat[i * e_max + e] += c * what(i, f);
          }
      }
    }
    // Through ŵ_e = w_e / max(‖w_e‖, eps), then L_simple = mean_e ‖w_e‖ on the raw columns.
    std::vector<double> col(static_cast<std::size_t>(d)), dcol(static_cast<std::size_t>(d));
    for (index_t e = 0; e < e_max; ++e) {
      for (index_t i = 0; i < d; ++i) col[i] = dwhat[i * e_max + e];
      std::fill(dcol.begin(), dcol.end(), 0.0);
      routing::detail::dynmoe_normalize_backward(
          d, wn[e], [&](index_t i) { return what(i, e); }, col.data(),
          [&](index_t i, double v) { dcol[i] += v; });
      if (coeff.simple_loss != 0.0f && wn[e] > 0.0) {
        const double c = coeff.simple_loss / (static_cast<double>(e_max) * wn[e]);
        for (index_t i = 0; i < d; ++i) dcol[i] += c * p.w_gate(i, e);
      }
      for (index_t i = 0; i < d; ++i) grads.w_gate(i, e) += static_cast<float>(dcol[i]);  // one +=
    }
  }

  //! L_sim = ‖(ŴᵀŴ − I) ⊙ m mᵀ‖_F in double; writes A [E_max, E_max] when `a` is given.
  [[nodiscard]] static double sim_loss(const params_type& p, std::vector<double>* a) {
    const index_t d = p.w_gate.extent(0), e_max = p.w_gate.extent(1);
    const std::vector<double> wn = routing::detail::dynmoe_column_norms(p.w_gate);
    double sum = 0.0;
    for (index_t e = 0; e < e_max; ++e) {
      if (p.experts_mask(e) == 0) continue;
      const double ne = std::max(wn[e], routing::detail::dynmoe_norm_eps);
      for (index_t f = 0; f < e_max; ++f) {
        if (p.experts_mask(f) == 0) continue;
        const double nf = std::max(wn[f], routing::detail::dynmoe_norm_eps);
        double dot = 0.0;
        for (index_t i = 0; i < d; ++i) dot += static_cast<double>(p.w_gate(i, e)) * p.w_gate(i, f);
        const double v = dot / (ne * nf) - (e == f ? 1.0 : 0.0);
        if (a) (*a)[e * e_max + f] = v;
        sum += v * v;
      }
    }
    return std::sqrt(sum);
  }
};

static_assert(check_router<DynMoE>());

}  // namespace switchyard::routers
