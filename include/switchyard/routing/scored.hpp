// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file scored.hpp
//! The vocabulary of the production routers (issue #12; ../shared/hf-cases/README.md, "The
//! routing schema", steps 1-8) and the scoring part that `routers::ScoredTopK` composes:
//!
//! 1. logits l = x · wᵀ (+ b, gpt-oss's trainable router bias)            -> plan.logits
//! 2. scores s = score(l): softmax, sigmoid, sqrt(softplus) or identity    -> plan.probs
//! 3.-5. selection (routing/selection/scored_topk.hpp): top-k of the logits or scores plus a
//!    selection bias, under a group limit, or a frozen hash table;
//! 6.-8. weights: the selected scores (or a softmax of the selected logits), normalised
//!    (sum, sum + ε, max(sum, ε), p-norm) and scaled.
//!
//! Per-row math (`apply_score`, `score_backward_row`) is `SWITCHYARD_HD`; `scored_linear` is the
//! scoring part the host's generic route runs (backend/host/route.hpp).

#include <cmath>
#include <cstdint>

#include <cuda/std/span>

#include "switchyard/core/config.hpp"
#include "switchyard/core/element_type.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/span.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/routing/linear_softmax.hpp"
#include "switchyard/routing/plan.hpp"
#include "switchyard/routing/softmax.hpp"
#include "switchyard/routing/loss_fields.hpp"

namespace switchyard::routing {

//! How scores are made from the logits (step 2).
enum class score_function {
  softmax,        //!< softmax over the E_router logits (Mixtral, Qwen, DeepSeek-V2, ERNIE, ...)
  sigmoid,        //!< 1 / (1 + exp(−l)) per expert (DeepSeek-V3, GLM-4.5, dots1, MiniMax-M2, Llama-4)
  sqrt_softplus,  //!< sqrt(log1p(exp(l))) per expert (DeepSeek-V4)
  identity        //!< the scores are the logits
};

//! How experts are chosen (step 5).
enum class selection_kind {
  topk,  //!< the k largest selection scores
  hash   //!< hash_table[token_ids[t]], in table order (DeepSeek-V4's hash layers)
};

//! The score of a group of experts under a group limit (step 4).
enum class group_score {
  top2_sum,  //!< the sum of the group's two largest selection scores (DeepSeek-V3)
  max        //!< the group's largest selection score (DeepSeek-V2)
};

//! Group-limited routing (step 4): the E experts form `n_group` consecutive groups of
//! E / n_group; only the `topk_group` best groups (ties to the lower group) keep their
//! selection scores, the others' become `excluded_fill`. `n_group == 1`: no group limit.
struct group_limit {
  int n_group = 1;                            //!< groups G (E must be a multiple of G)
  int topk_group = 1;                         //!< groups kept per token, 1 <= topk_group <= G
  group_score score = group_score::top2_sum;  //!< how a group is scored
  float excluded_fill = -INFINITY;            //!< selection score of an excluded expert (−inf, or 0: DeepSeek-V2)
};

//! How the selected weights are normalised (step 7).
enum class normalization {
  none,  //!< w_j unchanged
  sum,   //!< w_j / Σ w (with the epsilon of `epsilon_kind`)
  pnorm  //!< w_j / (Σ |w|^p)^(1/p) (DBRX)
};

//! Where the epsilon of a sum normalisation goes.
enum class epsilon_kind {
  none,      //!< w_j / Σ w
  add,       //!< w_j / (Σ w + ε) (DeepSeek-V3/V4: ε = 1e-20)
  clamp_min  //!< w_j / max(Σ w, ε) (ERNIE-4.5: ε = 1e-12)
};

//! Step 7's normalisation of the k selected weights.
struct weight_normalization {
  normalization kind = normalization::none;  //!< none, sum or p-norm
  float p = 2.0f;                            //!< the p of `pnorm` (> 0)
  epsilon_kind eps = epsilon_kind::none;     //!< the epsilon of `sum` (ignored otherwise: must be none)
  float eps_value = 0.0f;                    //!< ε (>= 0)
};

//! Parameters of a scored router (caller memory). `E = w.extent(0)` is the router width,
//! which counts the identity (zero-computation) experts of LongCat-Flash.
struct scored_router_params {
  matrix_view<const float> w{};                  //!< [E, d] router weight (logits = x · wᵀ)
  vector_view<const float> b{};                  //!< [E] router bias (gpt-oss; trainable) or empty
  vector_view<const float> selection_bias{};     //!< [E] added to the selection scores only (aux-loss-free balancing; not trained by gradient) or empty
  matrix_view<const std::int32_t> hash_table{};  //!< [vocab, k] (selection_kind::hash) or empty
  vector_view<const std::int32_t> token_ids{};   //!< [T] (selection_kind::hash) or empty
  //! MoE++ gating residual (Jin et al. 2024): the previous layer's router logits [T, E_prev]
  //! (both this and `residual_w`, or neither); logits += prev_logits · residual_wᵀ.
  matrix_view<const float> prev_logits{};
  matrix_view<const float> residual_w{};  //!< [E, E_prev] projection of the previous logits (W_g)
  //! [T] or empty: the per-token compute knob, token t uses the first min(k, token_max_k[t])
  //! of its k experts (in [1, k]; routing/compute.hpp). Empty: k for every token, bit for bit.
  vector_view<const std::int32_t> token_max_k{};
};

//! Gradients of a scored router, accumulated (+=); an empty view skips that gradient.
struct scored_router_grads {
  matrix_view<float> w{};  //!< [E, d]
  vector_view<float> b{};  //!< [E] (only with a router bias)
  matrix_view<float> residual_w{};   //!< [E, E_prev] (gating residual) or empty
  matrix_view<float> prev_logits{};  //!< [T, E_prev] (gating residual; the caller chains it into the previous layer's d_logits) or empty
};

//! Auxiliary losses of a scored router: their values in forward, their coefficients in
//! backward (0: no gradient).
struct scored_router_losses {
  float lb = 0.0f;                //!< E · Σ_e f_e · P̄_e over the plan's scores, f from every selected slot
  float sequence_balance = 0.0f;  //!< DeepSeek-V3's complementary sequence-wise balance loss
  float z = 0.0f;                 //!< mean_t logsumexp(logits_t)² (ST-MoE)
  //! The fields backward reads as coefficients (training/aux_loss.hpp).
  static constexpr auto coefficient_fields() {
    return std::tuple{loss_field<&scored_router_losses::lb>{"lb"},
                      loss_field<&scored_router_losses::sequence_balance>{"sequence_balance"},
                      loss_field<&scored_router_losses::z>{"z"}};
  }
};

// ---- rows: one token ----------------------------------------------------------------------

//! sqrt(softplus(l)) with PyTorch's softplus (threshold 20: l itself above it).
SWITCHYARD_HD inline float sqrt_softplus(float l) {
  return sqrtf(l > 20.0f ? l : log1pf(expf(l)));
}

//! The logistic function in float.
SWITCHYARD_HD inline float logistic(float l) { return 1.0f / (1.0f + expf(-l)); }

//! scores = fn(logits) for one token's row.
SWITCHYARD_HD inline void apply_score(score_function fn, span<const float> logits,
                                      span<float> scores) {
  const int n = static_cast<int>(logits.size());
  switch (fn) {
    case score_function::softmax:
      softmax(logits, scores);
      return;
    case score_function::sigmoid:
      for (int e = 0; e < n; ++e) scores[e] = logistic(logits[e]);
      return;
    case score_function::sqrt_softplus:
      for (int e = 0; e < n; ++e) scores[e] = sqrt_softplus(logits[e]);
      return;
    case score_function::identity:
      for (int e = 0; e < n; ++e) scores[e] = logits[e];
      return;
  }
}

//! d_logits += J_fnᵀ d_scores for one token's row: softmax's full-row Jacobian, sigmoid
//! s(1 − s), sqrt_softplus σ(l) / (2 s) (0 where s = 0, its limit), identity 1.
SWITCHYARD_HD inline void score_backward_row(score_function fn, span<const float> scores,
                                             span<const float> logits, span<const float> d_scores,
                                             span<float> d_logits) {
  const int n = static_cast<int>(scores.size());
  switch (fn) {
    case score_function::softmax:
      softmax_backward_accumulate(scores, d_scores, d_logits);
      return;
    case score_function::sigmoid:
      for (int e = 0; e < n; ++e) d_logits[e] += d_scores[e] * scores[e] * (1.0f - scores[e]);
      return;
    case score_function::sqrt_softplus:
      for (int e = 0; e < n; ++e) {
        const float s = scores[e];
        if (s > 0.0f) d_logits[e] += d_scores[e] * logistic(logits[e]) / (2.0f * s);
      }
      return;
    case score_function::identity:
      for (int e = 0; e < n; ++e) d_logits[e] += d_scores[e];
      return;
  }
}

// ---- the scoring part ---------------------------------------------------------------------

//! The scoring's own params: the router weight, its optional bias and gating residual.
struct scored_scoring_params {
  matrix_view<const float> w;            //!< [E, d]
  vector_view<const float> b;            //!< [E] or empty
  matrix_view<const float> prev_logits{};  //!< [T, E_prev] or empty (gating residual)
  matrix_view<const float> residual_w{};   //!< [E, E_prev] or empty (gating residual)
};

//! Scoring part of a scored router: logits = x · wᵀ (+ b) (+ prev_logits · residual_wᵀ) in
//! float (`linear_softmax_scores`'s fixed order, then the bias, then the gating residual, summed
//! in its own float accumulator over E_prev), scores = fn(logits) per row; backward from
//! d_logits to dx, grads.w, grads.b, grads.residual_w and grads.prev_logits. `scores_backward`
//! is the per-row hook of the generic route (d_scores -> d_logits). The gating residual is
//! MoE++'s (Jin et al. 2024, "MoE++: Accelerating Mixture-of-Experts Methods with
//! Zero-Computation Experts", eq. 7: G_j(x) = W_j x + W_g^j G_{j−1}(x)).
struct scored_linear {
  score_function fn = score_function::softmax;  //!< what plan.probs holds

  //! The scoring's params from a router's params.
  template <class P>
  [[nodiscard]] static scored_scoring_params params(const P& p) {
    return {p.w, p.b, p.prev_logits, p.residual_w};
  }
  //! E.
  [[nodiscard]] static index_t num_experts(const scored_scoring_params& p) { return p.w.extent(0); }

  //! Throws for x [T, d] that does not match w [E, d], or a bias that is not [E].
  template <ElementType T>
  static void check(const matrix_view<const T>& x, const scored_scoring_params& p) {
    detail::check_linear_router_inputs(x, linear_router_params{p.w});
    if (detail::present(p.b)) check_view("params.b", p.b, {p.w.extent(0)}, "[E] router bias");
    const bool prev = detail::present(p.prev_logits), proj = detail::present(p.residual_w);
    if (prev != proj) {
      throw shape_error(prev ? "params.residual_w" : "params.prev_logits",
                        "params.prev_logits [T, E_prev] and params.residual_w [E, E_prev] (the "
                        "gating residual) must be given together or not at all");
    }
    if (prev) {
      check_view("params.prev_logits", p.prev_logits, {x.extent(0), -1},
                 "[T, E_prev] with T = x.extent(0)");
      check_view("params.residual_w", p.residual_w, {p.w.extent(0), p.prev_logits.extent(1)},
                 "[E, E_prev] with E = params.w.extent(0), E_prev = params.prev_logits.extent(1)");
    }
  }

  //! plan.logits and plan.probs (= fn(logits)) of every token; non_finite_error naming x on a
  //! non-finite logit (NaN or Inf in x, params.w or params.b).
  template <ElementType T>
  void forward(const matrix_view<const T>& x, const scored_scoring_params& p,
               const plan_ref& plan) const {
    const index_t tokens = x.extent(0), d = x.extent(1), e_count = p.w.extent(0);
    const bool bias = detail::present(p.b);
    const bool residual = detail::present(p.residual_w);
    const index_t e_prev = residual ? p.residual_w.extent(1) : 0;
    detail::linear_logits(x, p.w, plan.logits.data());
#pragma omp parallel for schedule(static) if (tokens * e_count * d > (1 << 16))
    for (index_t t = 0; t < tokens; ++t) {
      float* lg = plan.logits.data() + t * e_count;
      if (bias) {
        for (index_t e = 0; e < e_count; ++e) lg[e] = lg[e] + p.b(e);
      }
      if (residual) {
        for (index_t e = 0; e < e_count; ++e) {
          float r = 0.0f;
          for (index_t j = 0; j < e_prev; ++j) r += p.prev_logits(t, j) * p.residual_w(e, j);
          lg[e] += r;
        }
      }
    }
    for (index_t i = 0; i < tokens * e_count; ++i) {
      if (!std::isfinite(plan.logits[i])) {
        throw non_finite_error(
            "x", detail::concat("x: router logits of token ", i / e_count,
                                " are not finite (NaN or Inf in x, params.w, params.b or the "
                                "gating residual); "
                                "Switchyard refuses to route non-finite tokens"));
      }
    }
#pragma omp parallel for schedule(static) if (tokens * e_count > (1 << 14))
    for (index_t t = 0; t < tokens; ++t) {
      apply_score(fn, span<const float>(plan.logits.data() + t * e_count, e_count),
                  span<float>(plan.probs.data() + t * e_count, e_count));
    }
  }

  //! d_logits += J_fnᵀ d_scores for one token (the generic route's per-row hook).
  SWITCHYARD_HD void scores_backward(span<const float> scores, span<const float> logits,
                                     span<const float> d_scores, span<float> d_logits) const {
    score_backward_row(fn, scores, logits, d_scores, d_logits);
  }

  //! Throws unless every present output of `backward` fits: dx [T, d], grads.w [E, d],
  //! grads.b [E], and grads.residual_w [E, E_prev] / grads.prev_logits [T, E_prev] only with
  //! the gating residual in the params (shape_error naming "dx" or "grads.<member>"). Writes
  //! nothing: `backward` runs it before its first write, and a caller (MoELayer) may run it
  //! before anything else.
  template <ElementType T>
  static void check_grads(const matrix_view<const T>& x, const scored_scoring_params& p,
                          const matrix_view<float>& dx, const scored_router_grads& g) {
    check_linear_backward(x, linear_router_params{p.w}, dx, linear_router_grads{g.w});
    if (detail::present(g.b)) check_view("grads.b", g.b, {p.w.extent(0)}, "[E]");
    check_residual_grads(p, g);
  }

  //! The gating residual's part of check_grads: grads.residual_w [E, E_prev] and
  //! grads.prev_logits [T, E_prev], each only with the residual in the params.
  static void check_residual_grads(const scored_scoring_params& p, const scored_router_grads& g) {
    if (!detail::present(p.residual_w)) {
      if (detail::present(g.residual_w) || detail::present(g.prev_logits)) {
        throw shape_error(detail::present(g.residual_w) ? "grads.residual_w" : "grads.prev_logits",
                          "grads.residual_w / grads.prev_logits need the gating residual "
                          "(params.prev_logits and params.residual_w) in the params");
      }
      return;
    }
    const index_t tokens = p.prev_logits.extent(0), e_prev = p.prev_logits.extent(1);
    if (detail::present(g.residual_w)) {
      check_view("grads.residual_w", g.residual_w, {p.w.extent(0), e_prev}, "[E, E_prev]");
    }
    if (detail::present(g.prev_logits)) {
      check_view("grads.prev_logits", g.prev_logits, {tokens, e_prev}, "[T, E_prev]");
    }
  }

  //! dx += d_logits · w, grads.w += d_logitsᵀ · x, grads.b += Σ_t d_logits, grads.residual_w
  //! += d_logitsᵀ · prev_logits, grads.prev_logits += d_logits · residual_w (each may be an
  //! empty view: skipped; the gating residual's only with it in the params). Every view is
  //! checked (check_grads) before the first is written.
  template <ElementType T>
  static void backward(const matrix_view<const T>& x, const scored_scoring_params& p,
                       const float* d_logits, const matrix_view<float>& dx,
                       const scored_router_grads& g) {
    check_grads(x, p, dx, g);
    linear_backward(x, linear_router_params{p.w}, d_logits, dx, linear_router_grads{g.w});
    if (detail::present(g.b)) {
      const index_t tokens = x.extent(0), e_count = p.w.extent(0);
      for (index_t e = 0; e < e_count; ++e) {
        float acc = 0.0f;
        for (index_t t = 0; t < tokens; ++t) acc += d_logits[t * e_count + e];
        g.b(e) += acc;
      }
    }
    residual_backward(p, d_logits, g);
  }

  //! The gating residual's gradients (see backward), each summed in float in a fixed order;
  //! both views are checked (check_residual_grads) before either is written.
  static void residual_backward(const scored_scoring_params& p, const float* d_logits,
                                const scored_router_grads& g) {
    check_residual_grads(p, g);
    if (!detail::present(p.residual_w)) return;
    const index_t tokens = p.prev_logits.extent(0), e_prev = p.prev_logits.extent(1),
                  e_count = p.w.extent(0);
    if (detail::present(g.residual_w)) {
#pragma omp parallel for schedule(static) if (e_count * e_prev * tokens > (1 << 16))
      for (index_t e = 0; e < e_count; ++e) {
        for (index_t j = 0; j < e_prev; ++j) {
          float acc = 0.0f;
          for (index_t t = 0; t < tokens; ++t) acc += d_logits[t * e_count + e] * p.prev_logits(t, j);
          g.residual_w(e, j) += acc;
        }
      }
    }
    if (detail::present(g.prev_logits)) {
#pragma omp parallel for schedule(static) if (e_count * e_prev * tokens > (1 << 16))
      for (index_t t = 0; t < tokens; ++t) {
        for (index_t j = 0; j < e_prev; ++j) {
          float acc = 0.0f;
          for (index_t e = 0; e < e_count; ++e) acc += d_logits[t * e_count + e] * p.residual_w(e, j);
          g.prev_logits(t, j) += acc;
        }
      }
    }
  }
};

}  // namespace switchyard::routing
