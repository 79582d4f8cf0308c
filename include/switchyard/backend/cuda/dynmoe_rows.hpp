// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file dynmoe_rows.hpp
//! `routers::DynMoE` as backend-neutral per-index functors and the two pipelines that run
//! them (forward: scores, top-any selection, the four losses; backward: straight-through
//! gates, threshold, input and gate gradients). The CUDA backend launches each functor with
//! `cuda::for_each` (backend/cuda/dynmoe.cuh); the host tests run the very same pipelines with
//! a serial loop and compare with `routers::DynMoE::forward/backward` bit for bit.
//!
//! Arithmetic: every output element is computed by one index with the host's expressions in
//! the host's order (double accumulation, the same casts). The reductions over tokens (the
//! experts' usage, dθ, dŴ) run one index per output element looping over the tokens in token
//! order: deterministic, no atomics, and the host's bits. The scores are split per (t, e)
//! after a per-token norm for parallelism; their bits do not change.
//!
//! Routing records (the statistics `training::dynmoe_recorder::record` gathers for the
//! adaptive expert update) have their functors here too; the host forward writes none.
//!
//! Bad data: a token whose logits are not all finite (a non-finite x, or gate weights) is
//! recorded in the status word (`status_kind::non_finite_logits`, index t·E + e of its first
//! bad logit) and routed to no expert.

#include <cstddef>
#include <cstdint>

#include <cuda/std/cmath>
#include <cuda/std/span>

#include "switchyard/backend/cuda/status.hpp"
#include "switchyard/core/config.hpp"
#include "switchyard/core/element_type.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/core/workspace.hpp"
#include "switchyard/routing/dynmoe/kernels.hpp"
#include "switchyard/routing/dynmoe/params.hpp"
#include "switchyard/routing/plan.hpp"
#include "switchyard/routing/selection/topany.hpp"

namespace switchyard::ops {

// ---- per expert ---------------------------------------------------------------------------

//! θ_e = σ(s·G_e), the column norm ‖W[:, e]‖ (double, row order) and a contiguous copy of the
//! mask, for expert e (dynmoe_threshold_probs / dynmoe_column_norms, one column each).
struct dynmoe_prepare_expert {
  matrix_view<const float> w;            //!< [d, E]
  vector_view<const float> thresholds;   //!< [E] G
  vector_view<const std::int32_t> mask;  //!< [E]
  float s;                               //!< scale
  float* theta;                          //!< [E] out
  double* wn;                            //!< [E] out
  std::int32_t* mask_out;                //!< [E] out

  SWITCHYARD_HD void operator()(index_t e) const {
    theta[e] = detail::dynmoe_sigmoid(s * thresholds(e));
    const index_t d = w.extent(0);
    double acc = 0.0;
    for (index_t i = 0; i < d; ++i) acc += static_cast<double>(w(i, e)) * w(i, e);
    wn[e] = sqrt(acc);
    mask_out[e] = mask(e);
  }
};

//! One entry of A = (ŴᵀŴ − I) ⊙ m mᵀ (0 outside the active block), index e·E + f
//! (dynmoe_sim_loss's expression).
struct dynmoe_sim_entry {
  matrix_view<const float> w;  //!< [d, E]
  const std::int32_t* mask;    //!< [E]
  const double* wn;            //!< [E]
  double* a;                   //!< [E, E] out

  SWITCHYARD_HD void operator()(index_t idx) const {
    const index_t d = w.extent(0), e_max = w.extent(1);
    const index_t e = idx / e_max, f = idx % e_max;
    if (mask[e] == 0 || mask[f] == 0) {
      a[idx] = 0.0;
      return;
    }
    const double ne = detail::dynmoe_clamp_norm(wn[e]);
    const double nf = detail::dynmoe_clamp_norm(wn[f]);
    double dot = 0.0;
    for (index_t i = 0; i < d; ++i) dot += static_cast<double>(w(i, e)) * w(i, f);
    a[idx] = dot / (ne * nf) - (e == f ? 1.0 : 0.0);
  }
};

//! ‖A‖_F = sqrt(Σ A²) in row-major order (one index; dynmoe_sim_loss's sum).
struct dynmoe_sim_norm {
  const double* a;  //!< [E, E]
  index_t e_max;
  double* out;  //!< [1]

  SWITCHYARD_HD void operator()(index_t) const {
    double sum = 0.0;
    for (index_t i = 0; i < e_max * e_max; ++i) sum += a[i] * a[i];
    *out = sqrt(sum);
  }
};

// ---- forward: scores and selection --------------------------------------------------------

//! max(‖x_t‖, eps) in double (dynmoe_score_row's norm) for token t.
template <ElementType T>
struct dynmoe_token_norm {
  matrix_view<const T> x;  //!< [T, d]
  double* xden;            //!< [T] out

  SWITCHYARD_HD void operator()(index_t t) const {
    const index_t d = x.extent(1);
    double xn = 0.0;
    for (index_t i = 0; i < d; ++i)
      xn += static_cast<double>(to_float(x(t, i))) * to_float(x(t, i));
    xden[t] = detail::dynmoe_clamp_norm(sqrt(xn));
  }
};

//! logits[t, e] = s·cos(x_t, w_e) and probs[t, e] = σ(logit)·mask[e], index t·E + e
//! (dynmoe_score_row's expressions for one slot).
template <ElementType T>
struct dynmoe_score_entry {
  matrix_view<const T> x;      //!< [T, d]
  matrix_view<const float> w;  //!< [d, E]
  const double* xden;          //!< [T]
  const double* wn;            //!< [E]
  const std::int32_t* mask;    //!< [E]
  float s;
  float* logits;  //!< [T, E] out
  float* probs;   //!< [T, E] out

  SWITCHYARD_HD void operator()(index_t idx) const {
    const index_t d = w.extent(0), e_max = w.extent(1);
    const index_t t = idx / e_max, e = idx % e_max;
    double dot = 0.0;
    for (index_t i = 0; i < d; ++i) dot += static_cast<double>(to_float(x(t, i))) * w(i, e);
    const float cos = static_cast<float>(dot / (xden[t] * detail::dynmoe_clamp_norm(wn[e])));
    const float z = cos * s;
    logits[idx] = z;
    probs[idx] = detail::dynmoe_sigmoid(z) * static_cast<float>(mask[e]);
  }
};

//! Token t's top-any selection over its scores (the router's rule); a token with a
//! non-finite logit is recorded (status_kind::non_finite_logits) and routed to no expert.
struct dynmoe_select_token {
  routing::topany_rule rule;  //!< over θ and the mask (spans the executing side can read)
  index_t e_max;
  const float* logits;          //!< [T, E]
  const float* probs;           //!< [T, E]
  std::int32_t* ids;            //!< [T, E] out
  float* weights;               //!< [T, E] out
  std::int32_t* counts;         //!< [T] out
  cuda::device_status* status;  //!< may be null (nothing recorded)

  SWITCHYARD_HD void operator()(index_t t) const {
    std::int32_t* id_row = ids + t * e_max;
    float* w_row = weights + t * e_max;
    for (index_t e = 0; e < e_max; ++e) {
      if (!::cuda::std::isfinite(logits[t * e_max + e])) {
        if (status != nullptr) status->record(cuda::status_kind::non_finite_logits, t * e_max + e);
        for (index_t j = 0; j < e_max; ++j) {
          id_row[j] = routing::unused_slot;
          w_row[j] = 0.0f;
        }
        counts[t] = 0;
        return;
      }
    }
    counts[t] = rule.select(span<const float>(probs + t * e_max, static_cast<std::size_t>(e_max)),
                            span<std::int32_t>(id_row, static_cast<std::size_t>(e_max)),
                            span<float>(w_row, static_cast<std::size_t>(e_max)));
  }
};

// ---- usage over tokens (forward losses, backward's routed share) --------------------------

//! Expert e's usage over the tokens with k > 0, in token order: me_e = Σ 1/k, ce_e = Σ 1
//! (dynmoe_plan_losses); every index also counts the routed tokens T' and Σ k, which index 0
//! writes. `share` (backward): ce_e is divided by max(T', 1) (dynmoe_routed_share).
struct dynmoe_usage_column {
  index_t tokens, e_max;
  const std::int32_t* ids;     //!< [T, E]
  const std::int32_t* counts;  //!< [T]
  double* me;                  //!< [E] out (may be null)
  double* ce;                  //!< [E] out
  index_t* routed;             //!< [1] out: T'
  index_t* total;              //!< [1] out: Σ_t k_t (may be null)
  bool share = false;

  SWITCHYARD_HD void operator()(index_t e) const {
    double m = 0.0, c = 0.0;
    index_t r = 0, n = 0;
    for (index_t t = 0; t < tokens; ++t) {
      const index_t k = counts[t];
      n += k;
      if (k == 0) continue;
      ++r;
      for (index_t j = 0; j < k; ++j) {
        if (ids[t * e_max + j] != e) continue;
        m += 1.0 / static_cast<double>(k);
        c += 1.0;
      }
    }
    if (share) c /= r > 1 ? r : index_t{1};
    if (me != nullptr) me[e] = m;
    ce[e] = c;
    if (e == 0) {
      *routed = r;
      if (total != nullptr) *total = n;
    }
  }
};

//! The four losses from the usage, A and the column norms (one index; T > 0), in the host's
//! order (dynmoe_plan_losses, dynmoe_sim_loss, dynmoe_simple_loss).
struct dynmoe_losses_finish {
  index_t tokens, e_max;
  const double* me;
  const double* ce;
  const index_t* routed;
  const index_t* total;
  const double* a;                 //!< [E, E]
  const double* wn;                //!< [E]
  routing::dynmoe_losses* losses;  //!< out

  SWITCHYARD_HD void operator()(index_t) const {
    routing::dynmoe_losses l{};
    const index_t r = *routed;
    if (r > 0) {
      double lb = 0.0;
      for (index_t e = 0; e < e_max; ++e) lb += (me[e] / r) * (ce[e] / r);
      l.load_balance_loss = static_cast<float>(lb * static_cast<double>(e_max));
    }
    l.efficiency_loss =
        static_cast<float>(static_cast<double>(*total) / (static_cast<double>(tokens) * e_max));
    double sum = 0.0;
    for (index_t i = 0; i < e_max * e_max; ++i) sum += a[i] * a[i];
    l.sim_loss = static_cast<float>(sqrt(sum));
    double simple = 0.0;
    for (index_t e = 0; e < e_max; ++e) simple += wn[e];
    l.simple_loss = static_cast<float>(simple / static_cast<double>(e_max));
    *losses = l;
  }
};

//! Writes all-zero losses (the empty batch).
struct dynmoe_losses_zero {
  routing::dynmoe_losses* losses;
  SWITCHYARD_HD void operator()(index_t) const { *losses = routing::dynmoe_losses{}; }
};

// ---- backward -----------------------------------------------------------------------------

//! Token t's straight-through row (dynmoe_straight_through_row) into dz [T, E] and g [T, E];
//! lb_factor = c_lb·E/T' from the device's T'.
struct dynmoe_straight_through_token {
  index_t e_max;
  const std::int32_t* ids;     //!< [T, E]
  const std::int32_t* counts;  //!< [T]
  const float* d_weights;      //!< [T, E]
  const float* probs;          //!< [T, E]
  const float* theta;          //!< [E]
  const double* ce;            //!< [E] routed share
  const index_t* routed;       //!< [1]
  float c_lb;                  //!< coeff.load_balance_loss
  double c_eff;                //!< coeff.efficiency_loss / (T·E)
  double* dz;                  //!< [T, E] out
  double* g;                   //!< [T, E] out

  SWITCHYARD_HD void operator()(index_t t) const {
    const index_t r = *routed;
    const double lb_factor = r > 0 ? c_lb * (static_cast<double>(e_max) / r) : 0.0;
    detail::dynmoe_straight_through_row(e_max, counts[t], ids + t * e_max, d_weights + t * e_max,
                                        probs + t * e_max, theta, ce, lb_factor, c_eff,
                                        dz + t * e_max, g + t * e_max);
  }
};

//! grads.thresholds(e) += (−Σ_t g[t, e])·θ(1 − θ)·s, the sum in token order.
struct dynmoe_threshold_grad {
  index_t tokens, e_max;
  const double* g;     //!< [T, E]
  const float* theta;  //!< [E]
  float s;
  vector_view<float> grad;  //!< [E] (+=)

  SWITCHYARD_HD void operator()(index_t e) const {
    double dtheta = 0.0;
    for (index_t t = 0; t < tokens; ++t) dtheta -= g[t * e_max + e];
    const double th = theta[e];
    grad(e) += static_cast<float>(dtheta * th * (1.0 - th) * s);
  }
};

//! Token t's part of the cosine backward (dynmoe_cosine_backward_row): ‖x_t‖ (unclamped),
//! whether any dz[t, ·] is non-zero and, when `want_dx` and ‖x_t‖ > eps, ⟨x̂_t, dx̂_t⟩.
template <ElementType T>
struct dynmoe_cosine_token {
  matrix_view<const T> x;      //!< [T, d]
  matrix_view<const float> w;  //!< [d, E]
  const double* wn;            //!< [E]
  const double* dz;            //!< [T, E]
  float s;
  bool want_dx;
  double* xn;         //!< [T] out
  double* dot;        //!< [T] out
  std::int32_t* any;  //!< [T] out

  //! dx̂_i of token t (the host's sum over e in order, zero cotangents skipped).
  SWITCHYARD_HD static double dxhat(const matrix_view<const float>& w, const double* wn,
                                    const double* dz_row, float s, index_t i) {
    double acc = 0.0;
    for (index_t e = 0; e < w.extent(1); ++e) {
      const double dc = dz_row[e] * s;
      if (dc == 0.0) continue;
      const double wden = detail::dynmoe_clamp_norm(wn[e]);
      acc += dc * (static_cast<double>(w(i, e)) / wden);
    }
    return acc;
  }

  SWITCHYARD_HD void operator()(index_t t) const {
    const index_t d = w.extent(0), e_max = w.extent(1);
    double n = 0.0;
    for (index_t i = 0; i < d; ++i) n += static_cast<double>(to_float(x(t, i))) * to_float(x(t, i));
    n = sqrt(n);
    xn[t] = n;
    const double* dz_row = dz + t * e_max;
    bool a = false;
    for (index_t e = 0; e < e_max; ++e) a |= dz_row[e] != 0.0;
    any[t] = a ? 1 : 0;
    dot[t] = 0.0;
    if (!a || !want_dx || !(n > detail::dynmoe_norm_eps)) return;
    const double xden = detail::dynmoe_clamp_norm(n);
    double acc = 0.0;
    for (index_t i = 0; i < d; ++i) acc += (to_float(x(t, i)) / xden) * dxhat(w, wn, dz_row, s, i);
    dot[t] = acc;
  }
};

//! dx(t, i) += ∂/∂x_ti of the cosines (dynmoe_normalize_backward's entry), index t·d + i.
template <ElementType T>
struct dynmoe_input_grad {
  matrix_view<const T> x;      //!< [T, d]
  matrix_view<const float> w;  //!< [d, E]
  const double* wn;            //!< [E]
  const double* dz;            //!< [T, E]
  float s;
  const double* xn;         //!< [T]
  const double* dot;        //!< [T]
  const std::int32_t* any;  //!< [T]
  matrix_view<float> dx;    //!< [T, d] (+=)

  SWITCHYARD_HD void operator()(index_t idx) const {
    const index_t d = w.extent(0), e_max = w.extent(1);
    const index_t t = idx / d, i = idx % d;
    if (any[t] == 0) return;
    const double du = dynmoe_cosine_token<T>::dxhat(w, wn, dz + t * e_max, s, i);
    const double n = xn[t];
    double v;
    if (n > detail::dynmoe_norm_eps) {
      const double uhat = to_float(x(t, i)) / detail::dynmoe_clamp_norm(n);
      v = (du - uhat * dot[t]) / n;
    } else {
      v = du / detail::dynmoe_norm_eps;
    }
    dx(t, i) += static_cast<float>(v);
  }
};

//! dŴ[i, e] = Σ_t dcos_te·x̂_ti (token order, zero cotangents skipped), plus L_sim's
//! Σ_f (c_sim·2·A_ef/‖A‖)·ŵ_f when c_sim ≠ 0 and ‖A‖ > 0; index i·E + e.
template <ElementType T>
struct dynmoe_gate_dwhat {
  matrix_view<const T> x;      //!< [T, d]
  matrix_view<const float> w;  //!< [d, E]
  const double* wn;            //!< [E]
  const double* dz;            //!< [T, E]
  float s;
  const double* xn;      //!< [T]
  const double* a;       //!< [E, E] (read when c_sim ≠ 0)
  const double* norm_a;  //!< [1]
  float c_sim;
  double* dwhat;  //!< [d, E] out

  SWITCHYARD_HD void operator()(index_t idx) const {
    const index_t e_max = w.extent(1), tokens = x.extent(0);
    const index_t i = idx / e_max, e = idx % e_max;
    double acc = 0.0;
    for (index_t t = 0; t < tokens; ++t) {
      const double dc = dz[t * e_max + e] * s;
      if (dc == 0.0) continue;
      const double xhat = to_float(x(t, i)) / detail::dynmoe_clamp_norm(xn[t]);
      acc += dc * xhat;
    }
    if (c_sim != 0.0f && *norm_a > 0.0) {
      for (index_t f = 0; f < e_max; ++f) {
        const double af = a[e * e_max + f];
        if (af == 0.0) continue;
        const double c = c_sim * 2.0 * af / *norm_a;
        acc += c * (static_cast<double>(w(i, f)) / detail::dynmoe_clamp_norm(wn[f]));
      }
    }
    dwhat[idx] = acc;
  }
};

//! ⟨ŵ_e, dŵ_e⟩ for column e (when ‖w_e‖ > eps; 0 otherwise).
struct dynmoe_gate_column_dot {
  matrix_view<const float> w;  //!< [d, E]
  const double* wn;            //!< [E]
  const double* dwhat;         //!< [d, E]
  double* dot;                 //!< [E] out

  SWITCHYARD_HD void operator()(index_t e) const {
    const index_t d = w.extent(0), e_max = w.extent(1);
    double acc = 0.0;
    if (wn[e] > detail::dynmoe_norm_eps) {
      const double den = detail::dynmoe_clamp_norm(wn[e]);
      for (index_t i = 0; i < d; ++i)
        acc += (static_cast<double>(w(i, e)) / den) * dwhat[i * e_max + e];
    }
    dot[e] = acc;
  }
};

//! grads.w_gate(i, e) += ∂/∂W through ŵ_e = w_e / max(‖w_e‖, eps), plus L_simple's share
//! (dynmoe_weight_backward's column pass), index i·E + e.
struct dynmoe_gate_grad {
  matrix_view<const float> w;  //!< [d, E]
  const double* wn;            //!< [E]
  const double* dwhat;         //!< [d, E]
  const double* dot;           //!< [E]
  float c_simple;
  matrix_view<float> grad;  //!< [d, E] (+=)

  SWITCHYARD_HD void operator()(index_t idx) const {
    const index_t e_max = w.extent(1);
    const index_t i = idx / e_max, e = idx % e_max;
    const double n = wn[e];
    const double col = dwhat[idx];
    double dcol = 0.0;
    if (n > detail::dynmoe_norm_eps) {
      const double what = static_cast<double>(w(i, e)) / detail::dynmoe_clamp_norm(n);
      dcol += (col - what * dot[e]) / n;
    } else {
      dcol += col / detail::dynmoe_norm_eps;
    }
    if (c_simple != 0.0f && n > 0.0) {
      const double c = c_simple / (static_cast<double>(e_max) * n);
      dcol += c * w(i, e);
    }
    grad(i, e) += static_cast<float>(dcol);
  }
};

// ---- routing records (training/dynmoe_update.hpp's dynmoe_recorder::record) --------------

//! routing_records[e] += 1 for every token using e, in token order (eval fallbacks count).
struct dynmoe_record_experts {
  index_t tokens, width;
  const std::int32_t* ids;     //!< [T, width]
  const std::int32_t* counts;  //!< [T]
  float* records;              //!< [E] (+=)

  SWITCHYARD_HD void operator()(index_t e) const {
    float acc = records[e];
    for (index_t t = 0; t < tokens; ++t) {
      index_t k = counts[t];
      k = k < 0 ? 0 : (k > width ? width : k);
      for (index_t j = 0; j < k; ++j)
        if (ids[t * width + j] == e) acc += 1.0f;
    }
    records[e] = acc;
  }
};

//! sample_records[i] += x[t, i] over the tokens routed to no expert, in token order.
template <ElementType T>
struct dynmoe_record_samples {
  matrix_view<const T> x;      //!< [T, d]
  const std::int32_t* counts;  //!< [T]
  float* records;              //!< [d] (+=)

  SWITCHYARD_HD void operator()(index_t i) const {
    float acc = records[i];
    for (index_t t = 0; t < x.extent(0); ++t)
      if (counts[t] == 0) acc += to_float(x(t, i));
    records[i] = acc;
  }
};

}  // namespace switchyard::ops

// No using-directive for switchyard::ops here (docs/design.md: detail blocks of the two
// backends share one namespace): the functors are named ops::.
namespace switchyard::detail {

//! The device route's scratch (null arrays while the arena measures); forward takes the
//! first block, backward all of it.
struct dynmoe_device_scratch {
  float* theta = nullptr;        //!< [E]
  std::int32_t* mask = nullptr;  //!< [E]
  double* wn = nullptr;          //!< [E]
  double* me = nullptr;          //!< [E]
  double* ce = nullptr;          //!< [E]
  index_t* counters = nullptr;   //!< [2] T', Σ k
  double* a = nullptr;           //!< [E, E]
  double* norm_a = nullptr;      //!< [1]
  double* xn = nullptr;          //!< [T] (forward: max(‖x‖, eps); backward: ‖x‖)
  // backward only
  double* dz = nullptr;         //!< [T, E]
  double* g = nullptr;          //!< [T, E]
  double* dot = nullptr;        //!< [T]
  std::int32_t* any = nullptr;  //!< [T]
  double* dwhat = nullptr;      //!< [d, E]
  double* col_dot = nullptr;    //!< [E]

  static dynmoe_device_scratch take(workspace_arena& ws, index_t tokens, index_t d, index_t e_max,
                                    bool backward) {
    dynmoe_device_scratch s;
    s.theta = ws.take<float>(e_max);
    s.mask = ws.take<std::int32_t>(e_max);
    s.wn = ws.take<double>(e_max);
    s.me = ws.take<double>(e_max);
    s.ce = ws.take<double>(e_max);
    s.counters = ws.take<index_t>(2);
    s.a = ws.take<double>(e_max * e_max);
    s.norm_a = ws.take<double>(1);
    s.xn = ws.take<double>(tokens);
    if (!backward) return s;
    s.dz = ws.take<double>(tokens * e_max);
    s.g = ws.take<double>(tokens * e_max);
    s.dot = ws.take<double>(tokens);
    s.any = ws.take<std::int32_t>(tokens);
    s.dwhat = ws.take<double>(d * e_max);
    s.col_dot = ws.take<double>(e_max);
    return s;
  }
};

//! Bytes the device route takes for T tokens (the most of forward's and backward's carving).
inline std::size_t dynmoe_device_workspace_size(index_t tokens, index_t d, index_t e_max) {
  workspace_arena ws;
  (void)dynmoe_device_scratch::take(ws, tokens, d, e_max, true);
  return ws.required();
}

//! The device forward as a sequence of launches: `run(n, functor, name)` runs functor(i) for
//! i in [0, n) (cuda::for_each on the device, a loop on the host), in order. Writes the plan
//! (ids, weights, counts, logits, probs: arrays the functors can address) and `*losses`.
template <class Run, ElementType T>
void dynmoe_forward_pipeline(const Run& run, const matrix_view<const T>& x,
                             const routing::dynmoe_params& p, bool training,
                             const routing::plan_ref& plan, routing::dynmoe_losses* losses,
                             cuda::device_status* status, const dynmoe_device_scratch& sc) {
  const index_t tokens = x.extent(0), e_max = p.w_gate.extent(1);
  if (tokens == 0) {
    run(1, ops::dynmoe_losses_zero{losses}, "switchyard::ops::dynmoe_losses_zero");
    return;
  }
  const float s = dynmoe_scale(p.log_temperature);
  run(e_max,
      ops::dynmoe_prepare_expert{p.w_gate, p.thresholds, p.experts_mask, s, sc.theta, sc.wn,
                                 sc.mask},
      "switchyard::ops::dynmoe_prepare_expert");
  run(tokens, ops::dynmoe_token_norm<T>{x, sc.xn}, "switchyard::ops::dynmoe_token_norm");
  run(tokens * e_max,
      ops::dynmoe_score_entry<T>{x, p.w_gate, sc.xn, sc.wn, sc.mask, s, plan.logits.data(),
                                 plan.probs.data()},
      "switchyard::ops::dynmoe_score_entry");
  const routing::topany_rule rule{
      span<const float>(sc.theta, static_cast<std::size_t>(e_max)),
      span<const std::int32_t>(sc.mask, static_cast<std::size_t>(e_max)), training};
  run(tokens,
      ops::dynmoe_select_token{rule, e_max, plan.logits.data(), plan.probs.data(),
                               plan.expert_ids.data(), plan.weights.data(), plan.counts.data(),
                               status},
      "switchyard::ops::dynmoe_select_token");
  run(e_max,
      ops::dynmoe_usage_column{tokens, e_max, plan.expert_ids.data(), plan.counts.data(), sc.me,
                               sc.ce, sc.counters, sc.counters + 1, false},
      "switchyard::ops::dynmoe_usage_column");
  run(e_max * e_max, ops::dynmoe_sim_entry{p.w_gate, sc.mask, sc.wn, sc.a},
      "switchyard::ops::dynmoe_sim_entry");
  run(1,
      ops::dynmoe_losses_finish{tokens, e_max, sc.me, sc.ce, sc.counters, sc.counters + 1, sc.a,
                                sc.wn, losses},
      "switchyard::ops::dynmoe_losses_finish");
}

//! The device backward (same conventions): dx += ∂/∂x, grads += ∂/∂params of
//! Σ d_weights ⊙ weights + Σ coeff · loss (routers::DynMoE::backward). Empty views skipped.
template <class Run, ElementType T>
void dynmoe_backward_pipeline(const Run& run, const matrix_view<const T>& x,
                              const routing::dynmoe_params& p, const routing::plan_ref& plan,
                              const float* d_weights, const routing::dynmoe_losses& coeff,
                              const matrix_view<float>& dx, const routing::dynmoe_grads& grads,
                              const dynmoe_device_scratch& sc) {
  const index_t tokens = x.extent(0), d = p.w_gate.extent(0), e_max = p.w_gate.extent(1);
  if (tokens == 0) return;
  const bool want_dx = present(dx), want_w = present(grads.w_gate),
             want_g = present(grads.thresholds);
  const float s = dynmoe_scale(p.log_temperature);
  run(e_max,
      ops::dynmoe_prepare_expert{p.w_gate, p.thresholds, p.experts_mask, s, sc.theta, sc.wn,
                                 sc.mask},
      "switchyard::ops::dynmoe_prepare_expert");
  run(e_max,
      ops::dynmoe_usage_column{tokens, e_max, plan.expert_ids.data(), plan.counts.data(), nullptr,
                               sc.ce, sc.counters, nullptr, true},
      "switchyard::ops::dynmoe_usage_column");
  const double c_eff = coeff.efficiency_loss / (static_cast<double>(tokens) * e_max);
  run(tokens,
      ops::dynmoe_straight_through_token{e_max, plan.expert_ids.data(), plan.counts.data(),
                                         d_weights, plan.probs.data(), sc.theta, sc.ce, sc.counters,
                                         coeff.load_balance_loss, c_eff, sc.dz, sc.g},
      "switchyard::ops::dynmoe_straight_through_token");
  if (want_g) {
    run(e_max, ops::dynmoe_threshold_grad{tokens, e_max, sc.g, sc.theta, s, grads.thresholds},
        "switchyard::ops::dynmoe_threshold_grad");
  }
  if (!want_dx && !want_w) return;
  run(tokens,
      ops::dynmoe_cosine_token<T>{x, p.w_gate, sc.wn, sc.dz, s, want_dx, sc.xn, sc.dot, sc.any},
      "switchyard::ops::dynmoe_cosine_token");
  if (want_dx) {
    run(tokens * d,
        ops::dynmoe_input_grad<T>{x, p.w_gate, sc.wn, sc.dz, s, sc.xn, sc.dot, sc.any, dx},
        "switchyard::ops::dynmoe_input_grad");
  }
  if (!want_w) return;
  if (coeff.sim_loss != 0.0f) {
    run(e_max * e_max, ops::dynmoe_sim_entry{p.w_gate, sc.mask, sc.wn, sc.a},
        "switchyard::ops::dynmoe_sim_entry");
    run(1, ops::dynmoe_sim_norm{sc.a, e_max, sc.norm_a}, "switchyard::ops::dynmoe_sim_norm");
  }
  run(d * e_max,
      ops::dynmoe_gate_dwhat<T>{x, p.w_gate, sc.wn, sc.dz, s, sc.xn, sc.a, sc.norm_a,
                                coeff.sim_loss, sc.dwhat},
      "switchyard::ops::dynmoe_gate_dwhat");
  run(e_max, ops::dynmoe_gate_column_dot{p.w_gate, sc.wn, sc.dwhat, sc.col_dot},
      "switchyard::ops::dynmoe_gate_column_dot");
  run(d * e_max,
      ops::dynmoe_gate_grad{p.w_gate, sc.wn, sc.dwhat, sc.col_dot, coeff.simple_loss, grads.w_gate},
      "switchyard::ops::dynmoe_gate_grad");
}

}  // namespace switchyard::detail
