// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file route_rows.hpp
//! The generic route of a composed router as per-row functors (backend-neutral; see
//! gather.hpp for the convention): the linear logits when no GEMM library runs them, softmax
//! and the router's own selection rule per token, the fused per-token d_logits of the
//! backward, and the linear backward's elements. The host backend runs the same routing
//! functions in loops (backend/host/route.hpp); the CUDA backend launches these functors
//! (backend/cuda/router.cuh), and host tests run them against the host route bit for bit.

#include <cstdint>

#include <cuda/std/cmath>
#include <cuda/std/span>

#include "switchyard/core/config.hpp"
#include "switchyard/core/element_type.hpp"
#include "switchyard/core/span.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/routing/loss_terms.hpp"
#include "switchyard/routing/softmax.hpp"

namespace switchyard::ops {

//! Keeps the smallest `index` seen in `*slot` (an integer atomicMin on the device; the order
//! threads arrive in does not change the result). `*slot` starts at ULLONG_MAX.
SWITCHYARD_HD inline void record_first(unsigned long long* slot, index_t index) {
  const auto v = static_cast<unsigned long long>(index);
#if defined(__CUDA_ARCH__)
  atomicMin(slot, v);
#else
  if (v < *slot) *slot = v;
#endif
}

//! Slots of a plan row that may be read: counts[t] clamped to [0, width] (a plan from the
//! route is always in range; a caller's corrupt plan must not make a kernel read out of it).
SWITCHYARD_HD inline int readable_slots(std::int32_t count, index_t width) {
  return count < 0 ? 0 : (count > width ? static_cast<int>(width) : static_cast<int>(count));
}

// ---- forward --------------------------------------------------------------------------------

//! logits[t, e] = Σ_i x[t, i] · w[e, i] in float, i in order (the host's
//! `linear_softmax_scores` loop): the logits when no GEMM library runs them (half or bfloat16
//! tokens, strided operands). One element i = t·E + e.
template <ElementType T>
struct router_logits {
  matrix_view<const T> x;      //!< [T, d] tokens
  matrix_view<const float> w;  //!< [E, d] router weight
  float* logits = nullptr;     //!< [T, E] output

  SWITCHYARD_HD void operator()(index_t i) const {
    const index_t experts = w.extent(0), d = x.extent(1);
    const index_t t = i / experts, e = i % experts;
    float acc = 0.0f;
    for (index_t k = 0; k < d; ++k) acc += to_float(x(t, k)) * w(e, k);
    logits[i] = acc;
  }
};

//! Softmax and selection of one token: probs[t] = softmax(logits[t]), then
//! `rules.rule(t).select(probs[t])` -> ids[t], weights[t], counts[t], exactly the host's
//! `select_tokens`. A token with a non-finite logit routes to no expert (count 0, ids -1,
//! weights 0, probs 0) so that nothing downstream reads garbage; `route` returns the first
//! such logit's column (the host throws non_finite_error for it).
template <class Rules>
struct route_token {
  Rules rules;                     //!< `rule(t)`: token t's SelectionRule
  const float* logits = nullptr;   //!< [T, E]
  float* probs = nullptr;          //!< [T, E] output
  std::int32_t* ids = nullptr;     //!< [T, width] output
  float* weights = nullptr;        //!< [T, width] output
  std::int32_t* counts = nullptr;  //!< [T] output
  index_t experts = 0;             //!< E
  index_t width = 0;               //!< plan slots per token

  //! Routes token t; the column of its first non-finite logit, or -1.
  SWITCHYARD_HD index_t route(index_t t) const {
    const index_t n = experts, w = width;
    const float* lg = logits + t * n;
    float* pr = probs + t * n;
    std::int32_t* id = ids + t * w;
    float* wt = weights + t * w;
    for (index_t e = 0; e < n; ++e) {
      if (::cuda::std::isfinite(lg[e])) continue;
      for (index_t q = 0; q < n; ++q) pr[q] = 0.0f;
      for (index_t j = 0; j < w; ++j) {
        id[j] = routing::unused_slot;
        wt[j] = 0.0f;
      }
      counts[t] = 0;
      return e;
    }
    routing::softmax(span<const float>(lg, static_cast<std::size_t>(n)),
                     span<float>(pr, static_cast<std::size_t>(n)));
    counts[t] = rules.rule(t).select(span<const float>(pr, static_cast<std::size_t>(n)),
                                     span<std::int32_t>(id, static_cast<std::size_t>(w)),
                                     span<float>(wt, static_cast<std::size_t>(w)));
    return -1;
  }
  SWITCHYARD_HD void operator()(index_t t) const { (void)route(t); }
};

//! `route_token` that reports the flat index t·E + e of a non-finite logit to `faults`
//! (see route_steps.hpp: the CUDA backend's status word, a host test's capture).
template <class Rules, class Faults>
struct route_token_recorded {
  route_token<Rules> row;
  Faults faults;  //!< `non_finite_logit(index_t flat) const`

  SWITCHYARD_HD void operator()(index_t t) const {
    const index_t e = row.route(t);
    if (e >= 0) faults.non_finite_logit(t * row.experts + e);
  }
};

//! Selection alone over scores computed elsewhere (DynMoE's cosine scores, a user's
//! scoring): `rules.rule(t).select(scores[t])` -> ids[t], weights[t], counts[t].
template <class Rules>
struct select_token {
  Rules rules;                     //!< `rule(t)`: token t's SelectionRule
  const float* scores = nullptr;   //!< [T, E]
  std::int32_t* ids = nullptr;     //!< [T, width] output
  float* weights = nullptr;        //!< [T, width] output
  std::int32_t* counts = nullptr;  //!< [T] output
  index_t experts = 0;             //!< E
  index_t width = 0;               //!< plan slots per token

  SWITCHYARD_HD void operator()(index_t t) const {
    const index_t n = experts, w = width;
    counts[t] = rules.rule(t).select(span<const float>(scores + t * n, static_cast<std::size_t>(n)),
                                     span<std::int32_t>(ids + t * w, static_cast<std::size_t>(w)),
                                     span<float>(weights + t * w, static_cast<std::size_t>(w)));
  }
};

// ---- backward -------------------------------------------------------------------------------

//! One token's rows as a loss term's backward row sees them.
struct token_rows {
  span<const float> logits;  //!< [E] the token's logits
  span<const float> probs;   //!< [E] the token's probabilities
  span<float> d;             //!< [E] the row the term adds to (d_probs or d_logits)
};

//! A compile-time list of loss-term backward rows (an aggregate, so trivially copyable when
//! its rows are: a kernel receives it by value). `apply<Target>` runs, in list order, the
//! rows whose `target` is Target.
template <class... Rows>
struct row_list;

template <>
struct row_list<> {
  template <routing::loss_target Target>
  SWITCHYARD_HD void apply(const token_rows&) const {}
};

template <class Head, class... Rest>
struct row_list<Head, Rest...> {
  Head head;
  row_list<Rest...> rest;

  template <routing::loss_target Target>
  SWITCHYARD_HD void apply(const token_rows& r) const {
    if constexpr (Head::target == Target) head(r);
    rest.template apply<Target>(r);
  }
};

//! A row_list of `rows` in order.
inline row_list<> make_row_list() {
  return {};
}
template <class Head, class... Rest>
row_list<Head, Rest...> make_row_list(const Head& head, const Rest&... rest) {
  return {head, make_row_list(rest...)};
}

//! The d_logits of one token of a composed router, fused (the host's
//! `composed_backward_logits`, row t, element by element the same float operations in the
//! same order): d_probs[t] = the combine-weights backward of d_weights[t] (through the
//! renormalisation when `renormalized`), + the probability terms' rows in router order;
//! d_logits[t] = the softmax backward of d_probs[t], + the logit terms' rows in router order.
//! A plan row whose count or ids are out of range contributes no combine gradient.
template <class Rows>
struct router_d_logits {
  const float* logits = nullptr;         //!< [T, E]
  const float* probs = nullptr;          //!< [T, E]
  const std::int32_t* ids = nullptr;     //!< [T, width]
  const float* weights = nullptr;        //!< [T, width]
  const std::int32_t* counts = nullptr;  //!< [T]
  const float* d_weights = nullptr;      //!< [T, width]
  index_t experts = 0;                   //!< E
  index_t width = 0;                     //!< plan slots per token
  bool renormalized = false;             //!< the router renormalises its selected weights
  Rows rows;                             //!< the loss terms' backward rows, router order
  float* d_probs = nullptr;              //!< [T, E] scratch
  float* d_logits = nullptr;             //!< [T, E] output (overwritten)

  SWITCHYARD_HD void operator()(index_t t) const {
    const index_t n = experts, w = width;
    const span<const float> lg(logits + t * n, static_cast<std::size_t>(n));
    const span<const float> pr(probs + t * n, static_cast<std::size_t>(n));
    const span<float> dp(d_probs + t * n, static_cast<std::size_t>(n));
    const span<float> dl(d_logits + t * n, static_cast<std::size_t>(n));
    for (index_t e = 0; e < n; ++e) dp[e] = 0.0f;
    const std::int32_t c = counts[t];
    bool valid = c >= 0 && c <= w;
    for (index_t j = 0; valid && j < c; ++j) valid = ids[t * w + j] >= 0 && ids[t * w + j] < n;
    if (valid) {
      routing::combine_weights_backward_accumulate(
          pr, span<const std::int32_t>(ids + t * w, static_cast<std::size_t>(w)),
          span<const float>(weights + t * w, static_cast<std::size_t>(w)),
          span<const float>(d_weights + t * w, static_cast<std::size_t>(w)), c, renormalized, dp);
    }
    rows.template apply<routing::loss_target::probs>(token_rows{lg, pr, dp});
    for (index_t e = 0; e < n; ++e) dl[e] = 0.0f;
    routing::softmax_backward_accumulate(pr, span<const float>(dp.data(), dp.size()), dl);
    rows.template apply<routing::loss_target::logits>(token_rows{lg, pr, dl});
  }
};

//! dx[t, i] += Σ_e d_logits[t, e] · w[e, i] in float, e in order (the host's
//! `linear_backward`): one element i' = t·d + i.
struct linear_dx_elements {
  const float* d_logits = nullptr;  //!< [T, E]
  matrix_view<const float> w;       //!< [E, d]
  matrix_view<float> dx;            //!< [T, d] accumulated

  SWITCHYARD_HD void operator()(index_t flat) const {
    const index_t experts = w.extent(0), d = dx.extent(1);
    const index_t t = flat / d, i = flat % d;
    const float* dl = d_logits + t * experts;
    float acc = 0.0f;
    for (index_t e = 0; e < experts; ++e) acc += dl[e] * w(e, i);
    dx(t, i) += acc;
  }
};

//! grad_w[e, i] += Σ_t d_logits[t, e] · x[t, i] in float, t in order (the host's
//! `linear_backward`): one element i' = e·d + i.
template <ElementType T>
struct linear_dw_elements {
  const float* d_logits = nullptr;  //!< [T, E]
  matrix_view<const T> x;           //!< [T, d]
  matrix_view<float> grad_w;        //!< [E, d] accumulated

  SWITCHYARD_HD void operator()(index_t flat) const {
    const index_t experts = grad_w.extent(0), d = grad_w.extent(1), tokens = x.extent(0);
    const index_t e = flat / d, i = flat % d;
    float acc = 0.0f;
    for (index_t t = 0; t < tokens; ++t) acc += d_logits[t * experts + e] * to_float(x(t, i));
    grad_w(e, i) += acc;
  }
};

// ---- GEMM operands -----------------------------------------------------------------------------

//! Token rows [t0, t0 + n) of x (any storage type and strides) as contiguous float rows
//! (exact), element i = r·d + c of out [n, d]: the router's float GEMM operand when x is half,
//! bfloat16 or not row-major.
template <ElementType T>
struct rows_as_float {
  matrix_view<const T> x;  //!< [T, d] tokens
  index_t t0 = 0;          //!< first token
  float* out = nullptr;    //!< [n, d] output

  SWITCHYARD_HD void operator()(index_t i) const {
    const index_t d = x.extent(1), r = i / d, c = i - r * d;
    out[i] = to_float(x(t0 + r, c));
  }
};

//! Leading dimension of a row-major [rows, cols] view usable as a GEMM operand (unit stride
//! along a row, rows not overlapping), or -1 when it is not (the element functors above run
//! instead).
template <class V>
[[nodiscard]] index_t row_major_ld(const V& v) {
  const index_t rows = v.extent(0), cols = v.extent(1);
  if (cols > 1 && v.stride(1) != 1) return -1;
  if (rows > 1 && v.stride(0) < cols) return -1;
  return rows > 1 ? v.stride(0) : (cols > 1 ? cols : 1);
}

}  // namespace switchyard::ops
