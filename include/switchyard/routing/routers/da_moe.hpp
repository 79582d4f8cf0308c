// SPDX-License-Identifier: Apache-2.0
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
//!
//! A composition: linear-softmax scoring, per-token `topk_rule`s (`token_rules`, K_t from the
//! importance, computed into the route's workspace), load balance and z-loss.

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "switchyard/core/error.hpp"
#include "switchyard/core/workspace.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/routing/composition.hpp"
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

}  // namespace switchyard::routing

namespace switchyard::detail {
using namespace ::switchyard::routing;  // this block's helpers use switchyard::routing's names

//! Checks `params.attention` is [H >= 1, T, T], finite, non-negative, rows summing to 1.
inline void check_attention(const tensor_view<const float, 3>& a, index_t tokens) {
  check_view("params.attention", a, {-1, tokens, tokens}, "[H, T, T] with T = x.extent(0)");
  if (tokens > 0 && a.extent(0) < 1) {
    throw shape_error("params.attention",
                      detail::concat("params.attention: expected at least one head "
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
                                 detail::concat("params.attention[", h, ", ", i, ", ",
                                                              j, "] must be finite, got ", v));
        }
        if (v < 0.0f) {
          throw range_error("params.attention", detail::concat(
                                                    "params.attention[", h, ", ", i, ", ", j,
                                                    "] must be >= 0 (a probability), got ", v));
        }
        s += v;
      }
      if (!(std::abs(s - 1.0) <= attention_row_tolerance)) {
        throw range_error("params.attention",
                          detail::concat("params.attention row [", h, ", ", i,
                                                       ", :] must sum to 1 (within ",
                                                       attention_row_tolerance, "), got ", s));
      }
    }
  }
}

}  // namespace switchyard::detail

namespace switchyard::routing {

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
                        detail::concat("k_rule.k_min must be >= 1, got ", k_min));
    }
    if (k_min > k_max) {
      throw range_error("k_rule.k_min",
                        detail::concat(
                            "k_rule.k_min must be <= k_rule.k_max = ", k_max, ", got ", k_min));
    }
    if (k_max > experts) {
      throw range_error("k_rule.k_max",
                        detail::concat("k_rule.k_max must be in [k_min, E] = [",
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

//! DA-MoE's per-token rules: token t takes its top K_t = k_rule(relative[t]) experts.
template <class KRule>
struct da_moe_rules {
  KRule k_rule{};
  bool renormalize = true;
  const float* relative = nullptr;  //!< [T] relative importance (caller / workspace memory)

  [[nodiscard]] SWITCHYARD_HD topk_rule rule(index_t t) const {
    return {k_rule(relative[t]), renormalize};
  }
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

  //! Writes I [T] to `imp` and r = I / max I [T] to `relative` (1 for every token when
  //! max I = 0); throws for bad attention / importance input.
  void token_importance(const params_type& p, index_t tokens, float* imp, float* relative) const {
    for (index_t j = 0; j < tokens; ++j) imp[j] = 0.0f;
    for (index_t j = 0; j < tokens; ++j) relative[j] = 1.0f;
    importance(p, tokens, imp);
    float peak = 0.0f;
    for (index_t j = 0; j < tokens; ++j) {
      const float v = imp[j];
      if (!std::isfinite(v)) {
        throw non_finite_error(
            "params.importance",
            detail::concat("params.importance[", j,
                                         "] (token importance) must be finite, got ", v));
      }
      if (v < 0.0f) {
        throw range_error("params.importance", detail::concat(
                                                   "params.importance[", j,
                                                   "] (token importance) must be >= 0, got ", v));
      }
      peak = std::max(peak, v);
    }
    if (peak > 0.0f)
      for (index_t j = 0; j < tokens; ++j) relative[j] = imp[j] / peak;
  }

  //! Diagnostics: I and r of T tokens into `out` (allocates its vectors).
  void token_importance(const params_type& p, index_t tokens,
                        routing::da_moe_importance& out) const {
    out.importance.assign(static_cast<std::size_t>(tokens), 0.0f);
    out.relative.assign(static_cast<std::size_t>(tokens), 1.0f);
    token_importance(p, tokens, out.importance.data(), out.relative.data());
  }

  // ---- the composition (run by a backend's generic route) ---------------------------------
  [[nodiscard]] routing::linear_softmax scoring() const { return {}; }
  [[nodiscard]] bool renormalized() const { return renormalize; }
  //! The rule of every token: I and r [T] from `ws` (computed, and the input validated, when
  //! `ws` carves; a measuring arena only counts them). Importance is stop-gradient.
  [[nodiscard]] routing::da_moe_rules<KRule> token_rules(const params_type& p, index_t tokens,
                                                         workspace_arena& ws) const {
    float* imp = ws.take<float>(tokens);
    float* relative = ws.take<float>(tokens);
    if (ws.carving()) token_importance(p, tokens, imp, relative);
    return {k_rule, renormalize, relative};
  }
  [[nodiscard]] auto loss_terms() const {
    return std::tuple{routing::bind_loss<&losses_type::lb_switch>(routing::terms::load_balance{}),
                      routing::bind_loss<&losses_type::lb_topk>(
                          routing::terms::load_balance{.any_slot = true}),
                      routing::bind_loss<&losses_type::z>(routing::terms::z_loss{})};
  }
};

static_assert(check_router<DAMoE<>>());
static_assert(routing::ComposedRouter<DAMoE<>>);

}  // namespace switchyard::routers
