// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file kernels.hpp
//! The per-row pieces of `routers::DynMoE` (routing/routers/dynmoe.hpp) and its scratch
//! layouts over a `workspace_arena`, so that forward and backward given a workspace do not
//! allocate.
//!
//! One token's row is SWITCHYARD_HD (a CUDA backend reuses it): its scores (cosine × scale,
//! sigmoid × mask), the straight-through backward of its gates, and the backward through its
//! cosines (x̂ and dx). Reductions over tokens (dŴ, dθ) are the caller's: the host runs them
//! in token order.

#include <cmath>
#include <cstdint>

#include "switchyard/core/config.hpp"
#include "switchyard/core/element_type.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/core/workspace.hpp"

namespace switchyard::routing {}  // (declared for the using-directive below)

namespace switchyard::detail {
using namespace ::switchyard::routing;  // this block's helpers use switchyard::routing's names

//! Normalisation floor of F.normalize (upstream eps).
inline constexpr double dynmoe_norm_eps = 1e-12;

//! max(v, eps) with std::max(v, eps)'s result for every input.
SWITCHYARD_HD SWITCHYARD_FORCEINLINE double dynmoe_clamp_norm(double v) {
  return v < dynmoe_norm_eps ? dynmoe_norm_eps : v;
}

//! Logistic sigmoid in float32, 1/(1+e^{-z}) as torch's CPU kernel computes it.
SWITCHYARD_HD SWITCHYARD_FORCEINLINE float dynmoe_sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }

//! Scale s = exp(min(log τ, log 100)).
SWITCHYARD_HD inline float dynmoe_scale(float log_temperature) {
  const float cap = logf(100.0f);
  return expf(cap < log_temperature ? cap : log_temperature);
}

//! θ_e = σ(s·G_e) for every slot into `theta` [E_max].
inline void dynmoe_threshold_probs(const vector_view<const float>& thresholds, float s, float* theta) {
  for (index_t e = 0; e < thresholds.extent(0); ++e) theta[e] = dynmoe_sigmoid(s * thresholds(e));
}

//! Column norms ‖W[:, e]‖ in double into `norms` [E_max].
inline void dynmoe_column_norms(const matrix_view<const float>& w, double* norms) {
  const index_t d = w.extent(0), e_count = w.extent(1);
  for (index_t e = 0; e < e_count; ++e) {
    double s = 0.0;
    for (index_t i = 0; i < d; ++i) s += static_cast<double>(w(i, e)) * w(i, e);
    norms[e] = sqrt(s);
  }
}

//! Accumulates into a double array: out[i] += v.
struct dynmoe_add_to {
  double* out;
  SWITCHYARD_HD void operator()(index_t i, double v) const { out[i] += v; }
};

//! Accumulates into one row of a float matrix: m(row, i) += float(v).
struct dynmoe_add_to_row {
  matrix_view<float> m;
  index_t row;
  SWITCHYARD_HD void operator()(index_t i, double v) const { m(row, i) += static_cast<float>(v); }
};

//! Backward of u = v / max(‖v‖, eps) for one vector: given û [n] (the normalised vector), the
//! norm ‖v‖ and the cotangent du [n], adds dv through `add(i, dv_i)`: (du − û⟨û, du⟩)/‖v‖, or
//! du/eps when ‖v‖ <= eps (the clamp is then the active branch).
template <class Add>
SWITCHYARD_HD void dynmoe_normalize_backward(index_t n, double norm, const double* uhat,
                                             const double* du, Add add) {
  if (norm > dynmoe_norm_eps) {
    double dot = 0.0;
    for (index_t i = 0; i < n; ++i) dot += uhat[i] * du[i];
    for (index_t i = 0; i < n; ++i) add(i, (du[i] - uhat[i] * dot) / norm);
  } else {
    for (index_t i = 0; i < n; ++i) add(i, du[i] / dynmoe_norm_eps);
  }
}

//! Scores of token t: logits[e] = s·cos(x_t, w_e) and probs[e] = σ(logits[e])·mask[e], for
//! every slot e < E_max (`wn` the column norms, see dynmoe_column_norms).
template <class T>
SWITCHYARD_HD void dynmoe_score_row(const matrix_view<const T>& x, index_t t,
                                    const matrix_view<const float>& w, const double* wn,
                                    const std::int32_t* mask, float s, float* logits, float* probs) {
  const index_t d = w.extent(0), e_max = w.extent(1);
  double xn = 0.0;
  for (index_t i = 0; i < d; ++i) xn += static_cast<double>(to_float(x(t, i))) * to_float(x(t, i));
  xn = dynmoe_clamp_norm(sqrt(xn));
  for (index_t e = 0; e < e_max; ++e) {
    double dot = 0.0;
    for (index_t i = 0; i < d; ++i) dot += static_cast<double>(to_float(x(t, i))) * w(i, e);
    const float cos = static_cast<float>(dot / (xn * dynmoe_clamp_norm(wn[e])));
    const float z = cos * s;
    logits[e] = z;
    probs[e] = dynmoe_sigmoid(z) * static_cast<float>(mask[e]);
  }
}

//! Straight-through backward of one token's gates (spec §3.4). Inputs: its plan row (`k`
//! slots used, `ids`, the slot cotangents `d_w`), its scores `probs` [E_max], θ [E_max], the
//! routed share ce [E_max] (tokens with k > 0 using e, over their number T'), `lb_factor` =
//! c_lb·E_max/T' and `c_eff` = c_eff/(T·E_max). Writes, for every slot e, dz[e] = ∂/∂(s·cos)
//! and g[e] = ∂/∂(S_e − θ_e) (both 0 unless e is on: S_e > θ_e; θ's gradient is −Σ_t g).
SWITCHYARD_HD inline void dynmoe_straight_through_row(index_t e_max, index_t k, const std::int32_t* ids,
                                                      const float* d_w, const float* probs,
                                                      const float* theta, const double* ce,
                                                      double lb_factor, double c_eff, double* dz,
                                                      double* g) {
  for (index_t e = 0; e < e_max; ++e) {
    dz[e] = 0.0;
    g[e] = 0.0;
  }
  if (k == 0) return;
  double ce_dot_b = 0.0;  // Σ_e ce_e b_{t,e} (fallback entries count: b is 1 there)
  for (index_t j = 0; j < k; ++j) ce_dot_b += ce[ids[j]];
  const double kd = static_cast<double>(k);
  for (index_t j = 0; j < k; ++j) {
    const index_t e = ids[j];
    if (!(probs[e] > theta[e])) continue;  // off, or an eval fallback: no gradient
    double ge = static_cast<double>(d_w[j]) / kd;
    ge += lb_factor * (ce[e] / kd - ce_dot_b / (kd * kd));
    ge += c_eff;
    // S_e = σ(z)·m_e (m_e = 1 since e is on); b = sign(relu(S − θ)), identity backward.
    const double sig = probs[e];
    dz[e] = ge * sig * (1.0 - sig);
    g[e] = ge;
  }
}

//! Backward through token t's cosines cos_e = ⟨x̂_t, ŵ_e⟩ given dz [E_max] (dcos = s·dz):
//! writes x̂_t into `xhat` [d]; returns false (and does nothing else) when dz is all zero.
//! Otherwise, when `dx` is non-empty, computes dx̂ into `dxhat` [d] and adds
//! dx(t, ·) += ∂/∂x_t. The weight side, dŵ_e += dcos_e·x̂_t, is the caller's reduction.
template <class T>
SWITCHYARD_HD bool dynmoe_cosine_backward_row(const matrix_view<const T>& x, index_t t,
                                              const matrix_view<const float>& w, const double* wn,
                                              const double* dz, float s, double* xhat,
                                              double* dxhat, const matrix_view<float>& dx) {
  const index_t d = w.extent(0), e_max = w.extent(1);
  double xn = 0.0;
  for (index_t i = 0; i < d; ++i) xn += static_cast<double>(to_float(x(t, i))) * to_float(x(t, i));
  xn = sqrt(xn);
  const double xden = dynmoe_clamp_norm(xn);
  for (index_t i = 0; i < d; ++i) xhat[i] = to_float(x(t, i)) / xden;
  bool any = false;
  for (index_t e = 0; e < e_max; ++e) any |= dz[e] != 0.0;
  if (!any) return false;
  if (!detail::present(dx)) return true;
  for (index_t i = 0; i < d; ++i) dxhat[i] = 0.0;
  for (index_t e = 0; e < e_max; ++e) {
    const double dc = dz[e] * s;
    if (dc == 0.0) continue;
    const double wden = dynmoe_clamp_norm(wn[e]);
    for (index_t i = 0; i < d; ++i) dxhat[i] += dc * (static_cast<double>(w(i, e)) / wden);
  }
  dynmoe_normalize_backward(d, xn, xhat, dxhat, dynmoe_add_to_row{dx, t});
  return true;
}

//! dŵ [d, E_max] += dcos_e·x̂_t for one token (dcos = s·dz; slots with dcos = 0 skipped).
SWITCHYARD_HD inline void dynmoe_cosine_weight_row(index_t d, index_t e_max, const double* dz, float s,
                                                   const double* xhat, double* dwhat) {
  for (index_t e = 0; e < e_max; ++e) {
    const double dc = dz[e] * s;
    if (dc == 0.0) continue;
    for (index_t i = 0; i < d; ++i) dwhat[i * e_max + e] += dc * xhat[i];
  }
}

// ---- scratch layouts (null arrays while the arena measures) -----------------------------

//! Forward's scratch: E_max-sized arrays only.
struct dynmoe_forward_scratch {
  float* theta;         //!< [E_max] θ_e = σ(s·G_e)
  std::int32_t* mask;   //!< [E_max] contiguous copy of the mask (the rule's span)
  double* wn;           //!< [E_max] column norms
  double* me;           //!< [E_max] Σ_t b/k over routed tokens
  double* ce;           //!< [E_max] Σ_t b over routed tokens

  static dynmoe_forward_scratch take(workspace_arena& ws, index_t e_max) {
    dynmoe_forward_scratch s{};
    s.theta = ws.take<float>(e_max);
    s.mask = ws.take<std::int32_t>(e_max);
    s.wn = ws.take<double>(e_max);
    s.me = ws.take<double>(e_max);
    s.ce = ws.take<double>(e_max);
    return s;
  }
};

//! Backward's scratch: dz [T, E_max] (one row per token), dŴ [d, E_max], the sim-loss matrix
//! A [E_max, E_max], E_max- and d-sized rows (the token loop runs in order, one set of rows).
struct dynmoe_backward_scratch {
  float* theta;    //!< [E_max]
  double* wn;      //!< [E_max] column norms
  double* ce;      //!< [E_max] routed share
  double* dtheta;  //!< [E_max] ∂/∂θ
  double* g;       //!< [E_max] one token's ∂/∂(S − θ)
  double* dz;      //!< [T, E_max] ∂/∂(s·cos)
  double* dwhat;   //!< [d, E_max] ∂/∂Ŵ
  double* a;       //!< [E_max, E_max] (ŴᵀŴ − I) ⊙ m mᵀ
  double* xhat;    //!< [d] one token's x̂
  double* dxhat;   //!< [d] one token's ∂/∂x̂
  double* what;    //!< [d] one column ŵ_e
  double* col;     //!< [d] one column of dŴ
  double* dcol;    //!< [d] one column of ∂/∂W

  static dynmoe_backward_scratch take(workspace_arena& ws, index_t tokens, index_t d, index_t e_max) {
    dynmoe_backward_scratch s{};
    s.theta = ws.take<float>(e_max);
    s.wn = ws.take<double>(e_max);
    s.ce = ws.take<double>(e_max);
    s.dtheta = ws.take<double>(e_max);
    s.g = ws.take<double>(e_max);
    s.dz = ws.take<double>(tokens * e_max);
    s.dwhat = ws.take<double>(d * e_max);
    s.a = ws.take<double>(e_max * e_max);
    s.xhat = ws.take<double>(d);
    s.dxhat = ws.take<double>(d);
    s.what = ws.take<double>(d);
    s.col = ws.take<double>(d);
    s.dcol = ws.take<double>(d);
    return s;
  }
};

}  // namespace switchyard::detail
