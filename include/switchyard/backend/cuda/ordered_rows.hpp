// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file ordered_rows.hpp
//! Device layouts of the router's long fixed-order sums (`__host__ __device__`, host-testable,
//! no CUDA runtime): the same floating-point operations in the same order as the ops/ functors
//! they replace on the GPU — so the same bits — with the work laid out for the GPU:
//! - `router_logits_pipelined`, `linear_dw_pipelined`: ops::router_logits /
//!   ops::linear_dw_elements with their loads ahead of their sums (16 terms loaded, then added
//!   in order), so that a thread keeps 32 loads in flight rather than waiting for each before
//!   its add (one bfloat16 forward and backward at T = 4096, d = 1024, E = 8 on an H200: 67 µs
//!   and 498 µs as plain loops);
//! - `staged_column_sums`, `staged_mean`: the pieces of the one-block kernels of
//!   backend/cuda/route_reductions.cuh that run ops::expert_column_sums and ops::mean_of_rows
//!   (one thread per expert over T tokens in order: 1 ms and 264 µs per call there): a block's
//!   threads stage a chunk of the inputs in shared memory and count slots (integers: exact in
//!   any order), then one thread adds the staged values in token order, as the functor does;
//! - `staged_usage_column`, `staged_threshold_grad`: the same for DynMoE's two reductions of
//!   one thread per expert over T tokens (ops::dynmoe_usage_column, ops::dynmoe_threshold_grad;
//!   backend/cuda/dynmoe.cuh runs their kernels).

#include <cstdint>

#include "switchyard/backend/cuda/dynmoe_rows.hpp"
#include "switchyard/core/config.hpp"
#include "switchyard/core/element_type.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/ops/route_losses.hpp"
#include "switchyard/ops/route_rows.hpp"

namespace switchyard::cuda {

//! Terms of a pipelined sum loaded before they are added.
inline constexpr index_t pipelined_terms = 16;

//! ops::router_logits<T> (element i = t·E + e: Σ_k x[t, k] · w[e, k] in float, k in order)
//! with its loads ahead of its sum.
template <ElementType T>
struct router_logits_pipelined {
  ops::router_logits<T> f;  //!< the plain functor (its members)

  SWITCHYARD_HD void operator()(index_t i) const {
    constexpr index_t U = pipelined_terms;
    const matrix_view<const T> x = f.x;
    const matrix_view<const float> w = f.w;
    const index_t experts = w.extent(0), d = x.extent(1);
    const index_t t = i / experts, e = i % experts;
    float acc = 0.0f;
    index_t k = 0;
    for (; k + U <= d; k += U) {
      float a[U], b[U];
      for (index_t q = 0; q < U; ++q) {
        a[q] = to_float(x(t, k + q));
        b[q] = w(e, k + q);
      }
      for (index_t q = 0; q < U; ++q) acc += a[q] * b[q];
    }
    for (; k < d; ++k) acc += to_float(x(t, k)) * w(e, k);
    f.logits[i] = acc;
  }
};

//! ops::linear_dw_elements<T> (element i' = e·d + i: grad_w[e, i] += Σ_t d_logits[t, e] ·
//! x[t, i] in float, t in order) with its loads ahead of its sum.
template <ElementType T>
struct linear_dw_pipelined {
  ops::linear_dw_elements<T> f;  //!< the plain functor (its members)

  SWITCHYARD_HD void operator()(index_t flat) const {
    constexpr index_t U = pipelined_terms;
    const float* dl = f.d_logits;
    const matrix_view<const T> x = f.x;
    const matrix_view<float> grad_w = f.grad_w;
    const index_t experts = grad_w.extent(0), d = grad_w.extent(1), tokens = x.extent(0);
    const index_t e = flat / d, i = flat % d;
    float acc = 0.0f;
    index_t t = 0;
    for (; t + U <= tokens; t += U) {
      float a[U], b[U];
      for (index_t q = 0; q < U; ++q) {
        a[q] = dl[(t + q) * experts + e];
        b[q] = to_float(x(t + q, i));
      }
      for (index_t q = 0; q < U; ++q) acc += a[q] * b[q];
    }
    for (; t < tokens; ++t) acc += dl[t * experts + e] * to_float(x(t, i));
    grad_w(e, i) += acc;
  }
};

//! Tokens one chunk of the staged reductions holds.
inline constexpr index_t staged_chunk = 1024;

//! The pieces of the staged `ops::expert_column_sums` (see the file comment).
struct staged_column_sums {
  ops::expert_column_sums f;  //!< the plain functor (its members)

  //! Counted slots of token t naming expert e (the functor's count, one token).
  SWITCHYARD_HD index_t count(index_t e, index_t t) const { return f.count_of(e, t); }
  //! P̄'s term of token t for expert e.
  SWITCHYARD_HD float prob(index_t e, index_t t) const { return f.probs[t * f.experts + e]; }
  //! pe + the n staged terms, in order (the functor's double additions).
  SWITCHYARD_HD static double add(double pe, const float* staged, index_t n) {
    for (index_t k = 0; k < n; ++k) pe += staged[k];
    return pe;
  }
};

//! The pieces of the staged `ops::mean_of_rows`.
struct staged_mean {
  ops::mean_of_rows f;  //!< the plain functor (its members)

  //! s + the n staged rows, in order (the functor's double additions).
  SWITCHYARD_HD static double add(double s, const double* staged, index_t n) {
    for (index_t k = 0; k < n; ++k) s += staged[k];
    return s;
  }
  //! The value from the sum (the functor's division and rounding; 0 for T = 0).
  SWITCHYARD_HD float finish(double s) const {
    return f.tokens == 0 ? 0.0f : static_cast<float>(s / f.tokens);
  }
};

//! The pieces of the staged `ops::dynmoe_usage_column`: per token, its slots k and its hits of
//! expert e (integers, staged by any thread); the routed count T' and Σ k (integers, in any
//! order); then one thread adds 1/k once per hit, tokens in order (the functor's double
//! additions); ce = the hit count (the functor's sum of 1.0s: exact).
struct staged_usage_column {
  ops::dynmoe_usage_column f;  //!< the plain functor (its members)

  //! Token t's slots k.
  SWITCHYARD_HD std::int32_t slots(index_t t) const { return f.counts[t]; }
  //! Token t's slots naming expert e.
  SWITCHYARD_HD std::int32_t hits(index_t e, index_t t) const {
    const index_t k = f.counts[t];
    std::int32_t h = 0;
    for (index_t j = 0; j < k; ++j) h += f.ids[t * f.e_max + j] == e ? 1 : 0;
    return h;
  }
  //! m + 1/k once per hit, the n staged tokens in order (the functor's double additions).
  SWITCHYARD_HD static double add(double m, const std::int32_t* hits, const std::int32_t* k,
                                  index_t n) {
    for (index_t s = 0; s < n; ++s)
      for (std::int32_t h = 0; h < hits[s]; ++h) m += 1.0 / static_cast<double>(k[s]);
    return m;
  }
  //! Writes expert e's outputs from m, its hit count, T' (tokens with k != 0) and Σ k.
  SWITCHYARD_HD void finish(index_t e, double m, index_t hit_count, index_t r, index_t n) const {
    double c = static_cast<double>(hit_count);
    if (f.share) c /= r > 1 ? r : index_t{1};
    if (f.me != nullptr) f.me[e] = m;
    f.ce[e] = c;
    if (e == 0) {
      *f.routed = r;
      if (f.total != nullptr) *f.total = n;
    }
  }
};

//! The pieces of the staged `ops::dynmoe_threshold_grad`: g[t, e] staged, then one thread
//! subtracts them in token order (the functor's double subtractions) and adds the gradient.
struct staged_threshold_grad {
  ops::dynmoe_threshold_grad f;  //!< the plain functor (its members)

  //! The term of token t for expert e.
  SWITCHYARD_HD double term(index_t e, index_t t) const { return f.g[t * f.e_max + e]; }
  //! dtheta − the n staged terms, in order.
  SWITCHYARD_HD static double sub(double dtheta, const double* staged, index_t n) {
    for (index_t k = 0; k < n; ++k) dtheta -= staged[k];
    return dtheta;
  }
  //! grads.thresholds(e) += the functor's expression of dtheta.
  SWITCHYARD_HD void finish(index_t e, double dtheta) const {
    const double th = f.theta[e];
    f.grad(e) += static_cast<float>(dtheta * th * (1.0 - th) * f.s);
  }
};

}  // namespace switchyard::cuda
