// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file linear_softmax.hpp
//! The scoring shared by the softmax routers (top-k, top-p, DA-MoE, Adaptive Gating,
//! HyperMoE): logits = x · Wᵀ with W [E, d] in nn.Linear layout, P = softmax(logits) in
//! float32, and its backward to x and W on the host. Also the
//! plan-wide helpers `select_all`, `load_balance_loss`, `z_loss` and their backward (thin
//! wrappers over loss_terms.hpp, for one-struct routers; they allocate their scratch).
//!
//! The host products (`detail::linear_logits`, `linear_backward`):
//! - logits: every element is one float sum in increasing i of rounded products (the plain
//!   loop's sequence, and ops::router_logits' on a device), whatever the row count, the row's
//!   position or the thread count: a token's logits, and so its routing, depend on its row
//!   alone (batch- and thread-invariant on every CPU and BLAS). Tiles of 2 tokens × 8 experts
//!   keep 16 independent sums in flight; blocks of `router_row_block` tokens run on OpenMP
//!   threads.
//! - dx += d_logits · W: `host::gemm_nn_fixed` over the same token blocks (one sum per element
//!   in increasing e, then added to dx): a token's dx depends on its row alone.
//! - grads.w += d_logitsᵀ · x: one float sum per element over t in increasing order, then
//!   added (the plain loop's sequence), in tiles of 4 experts × 16 columns of d with 64 sums in
//!   flight, column blocks on OpenMP threads: the result does not depend on the thread count.
//! A strided w or dx takes a plain loop for dx (the same order).
//!
//! NaN policy: a non-finite router logit (from NaN/Inf in `x` or `w`) throws
//! `non_finite_error` naming the token; routing such a token would be arbitrary.

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "switchyard/backend/host/fixed_gemm.hpp"
#include "switchyard/core/element_type.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/parallel.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/routing/loss_terms.hpp"
#include "switchyard/routing/plan.hpp"
#include "switchyard/routing/softmax.hpp"
#include "switchyard/routing/loss_fields.hpp"

namespace switchyard::routing {

//! Parameters of a linear router: `w [E, d]` (nn.Linear layout: logits = x · wᵀ), plus the
//! optional per-token compute knob of TopK, TopP and AdaptiveGating
//! (docs/routers/dynamic_compute.md; routing/compute.hpp): empty views leave the router's
//! members in force, bit for bit.
struct linear_router_params {
  matrix_view<const float> w;  //!< [E, d]
  //! [T] or empty: token t uses at most token_max_k[t] experts, in [1, width] (TopK: k_t =
  //! min(k, cap); TopP: the cap after the top-p cut; AdaptiveGating: 1 forces top-1).
  vector_view<const std::int32_t> token_max_k{};
  //! [T] or empty: token t's threshold in place of the member: TopP's p (in (0, 1]),
  //! AdaptiveGating's threshold (>= 0). TopK has none (shape_error if given).
  vector_view<const float> token_threshold{};
};

//! Gradients of a linear router, accumulated (+=) into caller memory.
struct linear_router_grads {
  matrix_view<float> w;  //!< [E, d]; an empty view skips the weight gradient
};

//! Load-balance and z losses of a softmax router. Also used as the coefficient set in
//! backward (each field then multiplies the loss's gradient).
struct softmax_router_losses {
  float lb_switch = 0.0f;  //!< E · Σ_e f_e · P̄_e, f from the top-1 choice (Switch)
  float lb_topk = 0.0f;    //!< E · Σ_e f_e · P̄_e, f from every selected slot (Mixtral)
  float z = 0.0f;          //!< mean_t logsumexp(logits_t)²  (ST-MoE)
  //! The fields backward reads as coefficients (training/aux_loss.hpp).
  static constexpr auto coefficient_fields() {
    return std::tuple{loss_field<&softmax_router_losses::lb_switch>{"lb_switch"},
                      loss_field<&softmax_router_losses::lb_topk>{"lb_topk"},
                      loss_field<&softmax_router_losses::z>{"z"}};
  }
};

}  // namespace switchyard::routing

namespace switchyard::detail {
using namespace ::switchyard::routing;  // this block's helpers use switchyard::routing's names

//! Checks x [T, d] against w [E, d] and that w is usable.
template <class T>
void check_linear_router_inputs(const matrix_view<const T>& x, const linear_router_params& p) {
  check_view("params.w", p.w, {-1, -1}, "[E, d]");
  if (p.w.extent(0) < 1) {
    throw shape_error("params.w", detail::concat("params.w: expected at least one expert (extent 0 >= 1), got ",
                                         p.w.extent(0)));
  }
  check_view("x", x, {-1, p.w.extent(1)}, "[T, d] with d = params.w.extent(1)");
}

//! Tokens per work item of the router's token-row products (logits, dx); even.
inline constexpr index_t router_row_block = 32;

//! Experts whose logits one pass over a token row computes at once (independent sums).
inline constexpr index_t router_expert_group = 8;

//! logits of tokens [t0, t0 + m) (m <= 2) for experts [e0, e0 + g) (g <= router_expert_group):
//! each element one float sum in increasing i of rounded products, starting from +0 — the
//! sequence of ops::router_logits — with 2·8 independent sums in flight (the plain loop waits
//! on one addition at a time).
template <class T>
SWITCHYARD_NO_CONTRACT_ATTR void linear_logits_tile(const matrix_view<const T>& x,
                                                    const matrix_view<const float>& w,
                                                    index_t t0, index_t m, index_t e0, index_t g,
                                                    float* logits) {
  SWITCHYARD_NO_CONTRACT_BEGIN
  constexpr index_t G = router_expert_group;
  const index_t d = x.extent(1), e_count = w.extent(0), xs = x.stride(1), ws = w.stride(1);
  const T* x0 = &x(t0, 0);
  const T* x1 = m > 1 ? &x(t0 + 1, 0) : x0;
  const float* wr[G];
  for (index_t q = 0; q < G; ++q) wr[q] = &w(e0 + (q < g ? q : 0), 0);
  float a0[G] = {}, a1[G] = {};
  for (index_t i = 0; i < d; ++i) {
    const float u = to_float(x0[i * xs]), v = to_float(x1[i * xs]);
    for (index_t q = 0; q < G; ++q) {
      const float wq = wr[q][i * ws];
      const float p0 = u * wq, p1 = v * wq;
      a0[q] = a0[q] + p0;
      a1[q] = a1[q] + p1;
    }
  }
  for (index_t q = 0; q < g; ++q) {
    logits[t0 * e_count + e0 + q] = a0[q];
    if (m > 1) logits[(t0 + 1) * e_count + e0 + q] = a1[q];
  }
}

//! logits [T, E] (row-major, overwritten) = x [T, d] · w [E, d]ᵀ, every element one float sum
//! in increasing i (see the file comment): tiles of 2 tokens × router_expert_group experts,
//! blocks of router_row_block tokens on OpenMP threads. Any strides, any storage type of x.
template <class T>
void linear_logits(const matrix_view<const T>& x, const matrix_view<const float>& w,
                   float* logits) {
  const index_t tokens = x.extent(0), d = x.extent(1), e_count = w.extent(0);
  if (tokens == 0 || e_count == 0) return;
  if (d == 0) {
    std::fill(logits, logits + tokens * e_count, 0.0f);
    return;
  }
  const bool parallel = tokens * e_count * d > (1 << 16) && detail::openmp_parallel_available();
  const index_t blocks = (tokens + router_row_block - 1) / router_row_block;
  detail::parallel_for(blocks, parallel, [&](index_t b) {
    const index_t t_end = std::min(tokens, (b + 1) * router_row_block);
    for (index_t t = b * router_row_block; t < t_end; t += 2)
      for (index_t e0 = 0; e0 < e_count; e0 += router_expert_group)
        linear_logits_tile(x, w, t, std::min<index_t>(2, t_end - t), e0,
                           std::min(router_expert_group, e_count - e0), logits);
  });
}

//! dx [T, d] += d_logits [T, E] · w [E, d]: `host::gemm_nn_fixed` over blocks of
//! router_row_block tokens (one sum per element in increasing e, then added), a plain loop
//! with that order for strided views.
inline void linear_backward_dx(const float* d_logits, const matrix_view<const float>& w,
                               const matrix_view<float>& dx) {
  const index_t tokens = dx.extent(0), d = dx.extent(1), e_count = w.extent(0);
  if (tokens == 0 || d == 0) return;
  const bool parallel = tokens * e_count * d > (1 << 16) && detail::openmp_parallel_available();
  if (dx.stride(1) == 1 && w.stride(1) == 1) {
    const index_t blocks = (tokens + router_row_block - 1) / router_row_block;
    detail::parallel_for(blocks, parallel, [&](index_t b) {
      const index_t t0 = b * router_row_block, m = std::min(router_row_block, tokens - t0);
      host::gemm_nn_fixed(m, d, e_count, d_logits + t0 * e_count, e_count, w.data_handle(),
                          w.stride(0), &dx(t0, 0), dx.stride(0), true);
    });
    return;
  }
  detail::parallel_for(tokens, parallel, [&](index_t t) {
    for (index_t i = 0; i < d; ++i) {
      float acc = 0.0f;
      for (index_t e = 0; e < e_count; ++e) acc += d_logits[t * e_count + e] * w(e, i);
      dx(t, i) += acc;
    }
  });
}

//! gw[e, c] for e in [e0, e0 + ge) (ge <= 4), c in [c0, c0 + nc) (nc <= 16): one float sum over
//! t in increasing order of rounded products d_logits[t, e]·x[t, c], then added to gw — the
//! plain loop's sequence — 64 independent sums per pass over the tokens.
template <class T>
SWITCHYARD_NO_CONTRACT_ATTR void linear_backward_w_tile(const matrix_view<const T>& x,
                                                        const float* d_logits,
                                                        const matrix_view<float>& gw, index_t e0,
                                                        index_t ge, index_t c0, index_t nc) {
  SWITCHYARD_NO_CONTRACT_BEGIN
  const index_t tokens = x.extent(0), e_count = gw.extent(0);
  float acc[4][16] = {};
  for (index_t t = 0; t < tokens; ++t) {
    float xv[16] = {};
    for (index_t j = 0; j < nc; ++j) xv[j] = to_float(x(t, c0 + j));
    for (index_t q = 0; q < 4; ++q) {
      const float l = d_logits[t * e_count + e0 + (q < ge ? q : 0)];
      for (index_t j = 0; j < 16; ++j) {
        const float pr = l * xv[j];
        acc[q][j] = acc[q][j] + pr;
      }
    }
  }
  for (index_t q = 0; q < ge; ++q)
    for (index_t j = 0; j < nc; ++j) gw(e0 + q, c0 + j) += acc[q][j];
}

//! gw [E, d] += d_logits [T, E]ᵀ · x [T, d]: every element one float sum over t in increasing
//! order, then added (the plain loop's bits, whatever the thread count): tiles of 4 experts ×
//! 16 columns, blocks of 16 columns on OpenMP threads.
template <class T>
void linear_backward_w(const matrix_view<const T>& x, const float* d_logits,
                       const matrix_view<float>& gw) {
  const index_t d = x.extent(1), e_count = gw.extent(0);
  if (d == 0 || e_count == 0) return;
  const bool parallel =
      x.extent(0) * e_count * d > (1 << 16) && detail::openmp_parallel_available();
  const index_t blocks = (d + 15) / 16;
  detail::parallel_for(blocks, parallel, [&](index_t b) {
    const index_t c0 = b * 16, nc = std::min<index_t>(16, d - c0);
    for (index_t e0 = 0; e0 < e_count; e0 += 4)
      linear_backward_w_tile(x, d_logits, gw, e0, std::min<index_t>(4, e_count - e0), c0, nc);
  });
}

}  // namespace switchyard::detail

namespace switchyard::routing {

//! logits[t, e] = Σ_i x[t, i] · w[e, i] (float, i in increasing order), probs =
//! softmax(logits), written to plan.logits / plan.probs (plan must be sized). Throws
//! non_finite_error on a non-finite logit.
template <ElementType T>
void linear_softmax_scores(const matrix_view<const T>& x, const linear_router_params& p,
                           const plan_ref& plan) {
  const index_t tokens = x.extent(0), e_count = p.w.extent(0);
  detail::linear_logits(x, p.w, plan.logits.data());
#pragma omp parallel for schedule(static) if (tokens * e_count > (1 << 14))
  for (index_t t = 0; t < tokens; ++t) {
    softmax(span<const float>(plan.logits.data() + t * e_count, e_count),
            span<float>(plan.probs.data() + t * e_count, e_count));
  }
  bool bad = false;
  index_t bad_t = 0;
  for (index_t i = 0; i < tokens * e_count && !bad; ++i) {
    if (!std::isfinite(plan.logits[i])) {
      bad = true;
      bad_t = i / e_count;
    }
  }
  if (bad) {
    throw non_finite_error("x", detail::concat("x: router logits of token ", bad_t,
                                               " are not finite (NaN or Inf in x or params.w); "
                                               "Switchyard refuses to route non-finite tokens"));
  }
}

//! Applies a selection rule to every token of a scored plan.
template <class Rule>
void select_all(const Rule& rule, const plan_ref& plan) {
  const index_t tokens = plan.num_tokens, e = plan.num_experts, w = plan.width;
#pragma omp parallel for schedule(static) if (tokens > 256)
  for (index_t t = 0; t < tokens; ++t) {
    plan.counts[t] = rule.select(span<const float>(plan.probs.data() + t * e, e),
                                 span<std::int32_t>(plan.expert_ids.data() + t * w, w),
                                 span<float>(plan.weights.data() + t * w, w));
  }
}

//! Switch load balance E·Σ_e f_e·P̄_e with f_e the share of tokens whose top-1 is e, or
//! (any_slot) the share of tokens that selected e in any slot. 0 for an empty batch.
//! Allocates its 2·E doubles of scratch; composed routers use `terms::load_balance`.
inline float load_balance_loss(const plan_ref& plan, bool any_slot) {
  const terms::load_balance term{any_slot};
  std::vector<double> scratch(static_cast<std::size_t>(term.scratch_doubles(plan.num_experts)));
  return term.value(plan, scratch.data());
}

//! ST-MoE z-loss mean_t logsumexp(logits_t)². 0 for an empty batch.
inline float z_loss(const plan_ref& plan) { return terms::z_loss{}.value(plan, nullptr); }

//! Accumulates coeff · ∂L_lb/∂P into d_probs [T, E] (f is piecewise constant). Allocates its
//! scratch; composed routers use `terms::load_balance`.
inline void load_balance_backward(const plan_ref& plan, bool any_slot, float coeff,
                                  float* d_probs) {
  const terms::load_balance term{any_slot};
  std::vector<double> scratch(static_cast<std::size_t>(term.scratch_doubles(plan.num_experts)));
  term.backward(plan, coeff, d_probs, scratch.data());
}

//! Accumulates coeff · ∂L_z/∂logits = coeff · 2·lse_t·P_t / T into d_logits [T, E].
inline void z_loss_backward(const plan_ref& plan, float coeff, float* d_logits) {
  terms::z_loss{}.backward(plan, coeff, d_logits, nullptr);
}

//! d_probs [T, E] = the gradient of Σ d_weights ⊙ weights w.r.t. the probabilities, for every
//! token of a softmax router's plan (overwritten): raw weights pass d_w through, renormalised
//! ones go through the normalisation (see combine_weights_backward_accumulate).
//! `d_weights` is [T, width].
inline void combine_weights_backward_rows(const plan_ref& plan, const float* d_weights,
                                          bool renormalized, float* d_probs) {
  const index_t tokens = plan.num_tokens, e_count = plan.num_experts, w = plan.width;
  std::fill(d_probs, d_probs + tokens * e_count, 0.0f);
  for (index_t t = 0; t < tokens; ++t) {
    combine_weights_backward_accumulate(
        span<const float>(plan.probs.data() + t * e_count, e_count),
        span<const std::int32_t>(plan.expert_ids.data() + t * w, w),
        span<const float>(plan.weights.data() + t * w, w),
        span<const float>(d_weights + t * w, w), plan.counts[t], renormalized,
        span<float>(d_probs + t * e_count, e_count));
  }
}

//! d_logits += softmax backward of d_probs, row by row.
inline void softmax_backward_rows(const plan_ref& plan, const float* d_probs, float* d_logits) {
  const index_t e_count = plan.num_experts;
  for (index_t t = 0; t < plan.num_tokens; ++t) {
    softmax_backward_accumulate(span<const float>(plan.probs.data() + t * e_count, e_count),
                                span<const float>(d_probs + t * e_count, e_count),
                                span<float>(d_logits + t * e_count, e_count));
  }
}

//! linear_backward's output checks, made before it writes anything: a present dx must be
//! [T, d] and a present grads.w [E, d] for x [T, d] and params.w [E, d] (shape_error naming
//! "dx" / "grads.w" otherwise). Writes nothing.
template <ElementType T>
void check_linear_backward(const matrix_view<const T>& x, const linear_router_params& p,
                           const matrix_view<float>& dx, const linear_router_grads& g) {
  const index_t tokens = x.extent(0), d = x.extent(1), e_count = p.w.extent(0);
  if (detail::present(dx)) check_view("dx", dx, {tokens, d}, "[T, d]");
  if (detail::present(g.w)) check_view("grads.w", g.w, {e_count, d}, "[E, d]");
}

//! Backward of logits = x · wᵀ: dx [T, d] += d_logits · w, grads.w [E, d] += d_logitsᵀ · x
//! (the host products of the file comment). Either output may be an empty view (skipped).
//! Both are checked (check_linear_backward) before either is written.
template <ElementType T>
void linear_backward(const matrix_view<const T>& x, const linear_router_params& p,
                     const float* d_logits, const matrix_view<float>& dx,
                     const linear_router_grads& g) {
  check_linear_backward(x, p, dx, g);
  if (detail::present(dx)) detail::linear_backward_dx(d_logits, p.w, dx);
  if (detail::present(g.w)) detail::linear_backward_w(x, d_logits, g.w);
}

}  // namespace switchyard::routing
