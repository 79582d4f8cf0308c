// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file compute.hpp
//! The per-request compute knob and what a plan costs (issue #13; docs/routers/dynamic_compute.md).
//!
//! - Per call: a router is a value; serve a request with a copy whose member is changed
//!   (`TopP{.p = 0.3f}`, `AdaptiveGating{.threshold = 0.05f}`, `TopK{.k = 1}`). The plan width
//!   is the member's, so one workspace size serves every setting up to it.
//! - Per token: `linear_router_params::token_max_k` [T] and `token_threshold` [T] override the
//!   member for each token (`knob_rules`, the per-token rules TopK, TopP and AdaptiveGating
//!   give the generic route). Empty views: the member's rule for every token, bit for bit.
//! - What it bought: `plan_compute(plan, ffn_experts)` counts the slots that reach an FFN
//!   expert (ids below `ffn_experts`; null, zero and identity experts cost no GEMM row),
//!   the achieved mean k, and `ffn_flops_per_slot(d, d_ff, gated)` the FLOPs of one slot.

#include <cmath>
#include <cstdint>

#include "switchyard/core/config.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/core/workspace.hpp"
#include "switchyard/routing/linear_softmax.hpp"
#include "switchyard/routing/plan.hpp"
#include "switchyard/routing/selection/adaptive.hpp"
#include "switchyard/routing/selection/topk.hpp"
#include "switchyard/routing/selection/topp.hpp"

namespace switchyard::routing {

// ---- the knob applied to one rule (SWITCHYARD_HD: a backend runs it per token) ------------

//! top-k with a cap: k_t = min(k, cap) (cap <= 0: no cap). TopK has no threshold.
SWITCHYARD_HD inline topk_rule with_knob(topk_rule r, int cap, const float* /*threshold*/) {
  if (cap > 0 && cap < r.k) r.k = cap;
  return r;
}

//! top-p with the token's p (when given) and a cap: max_k_t = min(max_k, cap) (0: none).
SWITCHYARD_HD inline topp_rule with_knob(topp_rule r, int cap, const float* threshold) {
  if (threshold != nullptr) r.p = *threshold;
  if (cap > 0 && (r.max_k == 0 || cap < r.max_k)) r.max_k = cap;
  return r;
}

//! Adaptive Gating with the token's threshold (when given); a cap of 1 forces top-1 (the
//! threshold becomes −inf: p1 − p2 <= −inf never holds).
SWITCHYARD_HD inline adaptive_rule with_knob(adaptive_rule r, int cap, const float* threshold) {
  if (threshold != nullptr) r.threshold = *threshold;
  if (cap == 1) r.threshold = -INFINITY;
  return r;
}

//! Per-token rules of a router with a compute knob: `rule(t)` is the member's rule with token
//! t's cap and threshold (each from its view, when given).
template <class Rule>
struct knob_rules {
  Rule base{};
  const std::int32_t* max_k = nullptr;  //!< [T] (stride max_k_stride) or null
  index_t max_k_stride = 1;
  const float* threshold = nullptr;  //!< [T] (stride threshold_stride) or null
  index_t threshold_stride = 1;

  [[nodiscard]] SWITCHYARD_HD Rule rule(index_t t) const {
    const int cap = max_k != nullptr ? static_cast<int>(max_k[t * max_k_stride]) : 0;
    return with_knob(base, cap, threshold != nullptr ? threshold + t * threshold_stride : nullptr);
  }
};

//! Which threshold a router's `token_threshold` holds, for its checks.
enum class knob_threshold {
  none,         //!< TopK: no threshold (a given token_threshold is a shape_error)
  probability,  //!< TopP's p: in (0, 1]
  nonnegative   //!< AdaptiveGating's threshold: >= 0
};

//! The per-token rules for T tokens from `p`'s knob views, checked when `ws` carves (a run,
//! not a size query): token_max_k [T] in [1, width], token_threshold [T] in the range of
//! `kind`; each error names the view, the token and the value.
template <class Rule>
knob_rules<Rule> make_knob_rules(Rule base, const linear_router_params& p, index_t tokens,
                                 index_t width, knob_threshold kind, workspace_arena& ws) {
  knob_rules<Rule> rules{.base = base};
  if (!ws.carving()) return rules;
  if (detail::present(p.token_max_k)) {
    check_view("params.token_max_k", p.token_max_k, {tokens}, "[T] with T = x.extent(0)");
    for (index_t t = 0; t < tokens; ++t) {
      const index_t c = p.token_max_k(t);
      if (c < 1 || c > width) {
        throw range_error("params.token_max_k",
                          detail::concat("params.token_max_k[", t, "] must be in [1, width] = [1, ",
                                         width, "], got ", c));
      }
    }
    rules.max_k = p.token_max_k.data_handle();
    rules.max_k_stride = p.token_max_k.stride(0);
  }
  if (detail::present(p.token_threshold)) {
    if (kind == knob_threshold::none) {
      throw shape_error("params.token_threshold",
                        "params.token_threshold: this router has no threshold (TopK); cap its "
                        "experts per token with params.token_max_k");
    }
    check_view("params.token_threshold", p.token_threshold, {tokens}, "[T] with T = x.extent(0)");
    for (index_t t = 0; t < tokens; ++t) {
      const float v = p.token_threshold(t);
      const bool ok = kind == knob_threshold::probability ? (v > 0.0f && v <= 1.0f) : v >= 0.0f;
      if (!ok) {
        throw range_error("params.token_threshold",
                          detail::concat("params.token_threshold[", t, "] must be in ",
                                         kind == knob_threshold::probability ? "(0, 1] (top-p's p)"
                                                                             : "[0, inf) (Adaptive "
                                                                               "Gating's threshold)",
                                         ", got ", v));
      }
    }
    rules.threshold = p.token_threshold.data_handle();
    rules.threshold_stride = p.token_threshold.stride(0);
  }
  return rules;
}

// ---- what a plan costs -------------------------------------------------------------------

//! The compute a plan asks for.
struct plan_compute_report {
  index_t tokens = 0;            //!< T
  index_t assignments = 0;       //!< Σ_t counts[t]: every used slot (FFN or not)
  index_t ffn_assignments = 0;   //!< used slots naming an FFN expert (id < ffn_experts)
  double mean_k = 0.0;           //!< assignments / T (0 for T = 0)
  double mean_ffn_k = 0.0;       //!< ffn_assignments / T: AdaMoE's true experts per token

  //! Expert FLOPs of the plan: ffn_assignments · flops_per_slot (ffn_flops_per_slot).
  [[nodiscard]] double expert_flops(double flops_per_slot) const {
    return static_cast<double>(ffn_assignments) * flops_per_slot;
  }
  //! Expert FLOPs relative to top-k routing of every token to k FFN experts: mean_ffn_k / k.
  [[nodiscard]] double relative_to_topk(int k) const {
    return k > 0 ? mean_ffn_k / k : 0.0;
  }
};

//! FLOPs of one (token, FFN expert) slot: 2·d·d_ff per matrix product, three products for a
//! gated (SwiGLU/GeGLU) expert, two otherwise.
[[nodiscard]] inline double ffn_flops_per_slot(index_t d, index_t d_ff, bool gated) {
  return (gated ? 6.0 : 4.0) * static_cast<double>(d) * static_cast<double>(d_ff);
}

//! What `plan` costs: its slots, those naming one of the first `ffn_experts` experts (the
//! FFN experts; ids past them are null/zero/identity experts), and the means per token.
//! `ffn_experts` < 0 counts every id as an FFN expert.
[[nodiscard]] inline plan_compute_report plan_compute(const plan_ref& plan,
                                                      index_t ffn_experts = -1) {
  plan_compute_report r{};
  r.tokens = plan.num_tokens;
  for (index_t t = 0; t < plan.num_tokens; ++t) {
    const index_t c = plan.counts[t];
    r.assignments += c;
    for (index_t j = 0; j < c; ++j) {
      const auto e = plan.id(t, j);
      if (e >= 0 && (ffn_experts < 0 || e < ffn_experts)) ++r.ffn_assignments;
    }
  }
  if (r.tokens > 0) {
    r.mean_k = static_cast<double>(r.assignments) / static_cast<double>(r.tokens);
    r.mean_ffn_k = static_cast<double>(r.ffn_assignments) / static_cast<double>(r.tokens);
  }
  return r;
}

}  // namespace switchyard::routing
