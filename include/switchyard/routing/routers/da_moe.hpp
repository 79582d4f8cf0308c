#pragma once
//! \file da_moe.hpp
//! `routers::DAMoE`: linear + softmax scoring; the number of experts K_t of each token comes
//! from its attention-derived importance (spec §2, Aghdam, Jin, Wu, "DA-MoE", arXiv
//! 2409.06669). The paper's exact rule is unpublished, so the importance and the K rule are
//! small pluggable policies; the defaults are the Switchyard rule the goldens pin:
//! `I_j` = mean attention token j receives, `K_j = clamp(ceil(k_max · I_j / max I), k_min, k_max)`.
//!
//! Extra input: the attention probabilities `A [H, T, T]` of the preceding attention sub-layer
//! (rows = queries, each row sums to 1 within `attention_row_tolerance`) travel in
//! `params_type::attention`; `importance::precomputed` reads `params_type::importance [T]`
//! instead. Importance is stop-gradient: gradients reach the router only through the weights.

#include <algorithm>
#include <cmath>
#include <vector>

#include "switchyard/core/error.hpp"
#include "switchyard/core/workspace.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/routing/concepts.hpp"
#include "switchyard/routing/linear_softmax.hpp"
#include "switchyard/routing/plan.hpp"
#include "switchyard/routing/selection/topk.hpp"

namespace switchyard::routing {

//! Largest |Σ_j A[h,i,j] − 1| accepted for an attention row.
inline constexpr double attention_row_tolerance = 1e-3;

//! Parameters and extra per-batch inputs of the DA-MoE router.
struct da_moe_params {
  matrix_view<const float> w;             //!< [E, d] router weight (logits = x · wᵀ)
  tensor_view<const float, 3> attention;  //!< [H, T, T] attention probabilities (rows = queries)
  vector_view<const float> importance;  //!< [T] caller importance (only `importance::precomputed`)
};

namespace detail {

//! Checks `params.attention` is [H >= 1, T, T], finite, non-negative, rows summing to 1.
inline void check_attention(const tensor_view<const float, 3>& a, index_t tokens) {
  check_view("params.attention", a, {-1, tokens, tokens}, "[H, T, T] with T = x.extent(0)");
  if (tokens > 0 && a.extent(0) < 1) {
    throw shape_error("params.attention",
                      ::switchyard::detail::concat("params.attention: expected at least one head "
                                                   "(extent 0 = H >= 1), got ",
                                                   a.extent(0)));
  }
  for (index_t h = 0; h < a.extent(0); ++h) {
    for (index_t i = 0; i < tokens; ++i) {
      double s = 0.0;
      for (index_t j = 0; j < tokens; ++j) {
        const float v = a(h, i, j);
        if (!std::isfinite(v)) {
          throw non_finite_error("params.attention",
                                 ::switchyard::detail::concat("params.attention[", h, ", ", i, ", ",
                                                              j, "] must be finite, got ", v));
        }
        if (v < 0.0f) {
          throw range_error("params.attention", ::switchyard::detail::concat(
                                                    "params.attention[", h, ", ", i, ", ", j,
                                                    "] must be >= 0 (a probability), got ", v));
        }
        s += v;
      }
      if (!(std::abs(s - 1.0) <= attention_row_tolerance)) {
        throw range_error("params.attention",
                          ::switchyard::detail::concat("params.attention row [", h, ", ", i,
                                                       ", :] must sum to 1 (within ",
                                                       attention_row_tolerance, "), got ", s));
      }
    }
  }
}

}  // namespace detail

//! Token-importance policies: `void operator()(const da_moe_params&, index_t T, float* out)`
//! writes I [T] (validating the input it reads).
namespace importance {

//! I_j = (1 / (H·T)) Σ_h Σ_i A[h, i, j]: the mean attention token j receives (default).
struct col_mean {
  //! Writes the column means of `p.attention` to out [T].
  void operator()(const da_moe_params& p, index_t tokens, float* out) const {
    detail::check_attention(p.attention, tokens);
    const index_t heads = p.attention.extent(0);
    for (index_t j = 0; j < tokens; ++j) {
      double s = 0.0;
      for (index_t h = 0; h < heads; ++h)
        for (index_t i = 0; i < tokens; ++i) s += p.attention(h, i, j);
      out[j] = static_cast<float>(s / (static_cast<double>(heads) * tokens));
    }
  }
};

//! I_j = (1 / H) Σ_h A[h, 0, j]: the attention the first ([CLS]) token pays to token j.
struct cls_row {
  //! Writes the head-mean of row 0 of `p.attention` to out [T].
  void operator()(const da_moe_params& p, index_t tokens, float* out) const {
    detail::check_attention(p.attention, tokens);
    const index_t heads = p.attention.extent(0);
    for (index_t j = 0; j < tokens; ++j) {
      double s = 0.0;
      for (index_t h = 0; h < heads; ++h) s += p.attention(h, 0, j);
      out[j] = static_cast<float>(s / static_cast<double>(heads));
    }
  }
};

//! I = `p.importance [T]`, supplied by the caller (finite, >= 0); `p.attention` is unused.
struct precomputed {
  //! Copies `p.importance` to out [T] after validating it.
  void operator()(const da_moe_params& p, index_t tokens, float* out) const {
    check_view("params.importance", p.importance, {tokens}, "[T] with T = x.extent(0)");
    for (index_t j = 0; j < tokens; ++j) out[j] = p.importance(j);
  }
};

}  // namespace importance

//! Rules mapping relative importance r = I / max I ∈ [0, 1] to a per-token expert count.
namespace k_rules {

//! K = clamp(ceil(r · k_max), k_min, k_max) in float32; the most important token gets k_max.
struct ceil_relative_to_max {
  int k_min = 1;  //!< fewest experts per token, >= 1
  int k_max = 2;  //!< most experts per token, k_min <= k_max <= E (the plan width)

  //! The plan width (most experts any token may get).
  [[nodiscard]] SWITCHYARD_HD int max_k() const { return k_max; }

  //! Throws range_error unless 1 <= k_min <= k_max <= E.
  void validate(index_t experts) const {
    if (k_min < 1) {
      throw range_error("k_rule.k_min",
                        ::switchyard::detail::concat("k_rule.k_min must be >= 1, got ", k_min));
    }
    if (k_min > k_max) {
      throw range_error("k_rule.k_min",
                        ::switchyard::detail::concat(
                            "k_rule.k_min must be <= k_rule.k_max = ", k_max, ", got ", k_min));
    }
    if (k_max > experts) {
      throw range_error("k_rule.k_max",
                        ::switchyard::detail::concat("k_rule.k_max must be in [k_min, E] = [",
                                                     k_min, ", ", experts, "], got ", k_max));
    }
  }

  //! K for one token of relative importance r.
  [[nodiscard]] SWITCHYARD_HD int operator()(float relative) const {
    const float k = ceilf(relative * static_cast<float>(k_max));
    return k < static_cast<float>(k_min)
               ? k_min
               : (k > static_cast<float>(k_max) ? k_max : static_cast<int>(k));
  }
};

}  // namespace k_rules

//! Per-token importance of one DA-MoE forward (diagnostics; `relative` decides K).
struct da_moe_importance {
  std::vector<float> importance;  //!< [T] I_j
  std::vector<float> relative;    //!< [T] r_j = I_j / max_i I_i (1 for every token when max I = 0)
};

}  // namespace switchyard::routing

namespace switchyard::routers {

//! DA-MoE router over a linear gate `w [E, d]`:
//! `DAMoE{.k_rule = {.k_min = 1, .k_max = 4}}` (or `.importance = routing::importance::cls_row{}`).
template <class Importance = routing::importance::col_mean,
          class KRule = routing::k_rules::ceil_relative_to_max>
struct DAMoE {
  using policy_kind = router_tag;
  using params_type = routing::da_moe_params;
  using grads_type = routing::linear_router_grads;
  using losses_type = routing::softmax_router_losses;

  Importance importance{};  //!< token-importance policy (stop-gradient)
  KRule k_rule{};           //!< relative importance -> experts per token
  bool renormalize = true;  //!< renormalise the K_t weights to sum to 1

  [[nodiscard]] index_t num_experts(const params_type& p) const { return p.w.extent(0); }
  //! k_max.
  [[nodiscard]] index_t width(const params_type&) const { return k_rule.max_k(); }

  //! Throws range_error for a K rule outside [1, E].
  void validate(index_t experts) const { k_rule.validate(experts); }

  //! Writes I [T] and r = I / max I [T]; throws for bad attention / importance input.
  void token_importance(const params_type& p, index_t tokens,
                        routing::da_moe_importance& out) const {
    out.importance.assign(static_cast<std::size_t>(tokens), 0.0f);
    out.relative.assign(static_cast<std::size_t>(tokens), 1.0f);
    importance(p, tokens, out.importance.data());
    float peak = 0.0f;
    for (index_t j = 0; j < tokens; ++j) {
      const float v = out.importance[j];
      if (!std::isfinite(v)) {
        throw non_finite_error(
            "params.importance",
            ::switchyard::detail::concat("params.importance[", j,
                                         "] (token importance) must be finite, got ", v));
      }
      if (v < 0.0f) {
        throw range_error("params.importance", ::switchyard::detail::concat(
                                                   "params.importance[", j,
                                                   "] (token importance) must be >= 0, got ", v));
      }
      peak = std::max(peak, v);
    }
    if (peak > 0.0f)
      for (index_t j = 0; j < tokens; ++j) out.relative[j] = out.importance[j] / peak;
  }

  //! Scores x [T, d], derives K_t from the importance, selects, and computes the losses
  //! (lb_switch, lb_topk, z); `stats` receives the importance. T = 0 is an empty batch.
  template <ElementType T>
  void forward(const matrix_view<const T>& x, const params_type& p, const routing::plan_ref& plan,
               losses_type& losses, routing::da_moe_importance& stats,
               [[maybe_unused]] workspace_arena& ws) const {
    const routing::linear_router_params lin{p.w};
    routing::detail::check_linear_router_inputs(x, lin);
    validate(p.w.extent(0));
    const index_t tokens = x.extent(0), experts = p.w.extent(0), w = width(p);
    token_importance(p, tokens, stats);
    routing::detail::require_plan(plan, tokens, w, experts);
    routing::linear_softmax_scores(x, lin, plan);
    for (index_t t = 0; t < tokens; ++t) {
      const routing::topk_rule rule{k_rule(stats.relative[t]), renormalize};
      plan.counts[t] =
          rule.select(::cuda::std::span<const float>(plan.probs.data() + t * experts, experts),
                      ::cuda::std::span<std::int32_t>(plan.expert_ids.data() + t * w, w),
                      ::cuda::std::span<float>(plan.weights.data() + t * w, w));
    }
    losses.lb_switch = routing::load_balance_loss(plan, false);
    losses.lb_topk = routing::load_balance_loss(plan, true);
    losses.z = routing::z_loss(plan);
  }

  //! As above, discarding the importance.
  template <ElementType T>
  void forward(const matrix_view<const T>& x, const params_type& p, const routing::plan_ref& plan,
               losses_type& losses, [[maybe_unused]] workspace_arena& ws) const {
    routing::da_moe_importance stats;
    forward(x, p, plan, losses, stats, ws);
  }

  //! d_logits [T, E] = ∂/∂logits of ( Σ d_weights ⊙ weights + Σ coeff · loss ); K_t and the
  //! importance carry no gradient. `d_weights` is [T, width] in plan-slot order.
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
                const routing::plan_ref& plan, const float* d_weights, const losses_type& coeff,
                const matrix_view<float>& dx, const grads_type& grads, [[maybe_unused]] workspace_arena& ws) const {
    std::vector<float> d_logits(static_cast<std::size_t>(plan.num_tokens * plan.num_experts));
    backward_logits(plan, d_weights, coeff, d_logits.data());
    routing::linear_backward(x, routing::linear_router_params{p.w}, d_logits.data(), dx, grads);
  }
};

static_assert(check_router<DAMoE<>>());

}  // namespace switchyard::routers
