// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file losses.hpp
//! DynMoE's four auxiliary losses (DeepSpeed `loss.py`) and the backward of the two that
//! depend on the gate weights alone (L_sim, L_simple) together with the column
//! normalisation, over caller scratch (see kernels.hpp); the host runs them in order, so the
//! bits do not depend on the thread count.

#include <cmath>
#include <cstdint>

#include "switchyard/core/view.hpp"
#include "switchyard/routing/dynmoe/kernels.hpp"
#include "switchyard/routing/dynmoe/params.hpp"
#include "switchyard/routing/plan.hpp"

namespace switchyard::detail {
using namespace ::switchyard::routing;  // this block's helpers use switchyard::routing's names

//! Load balance over tokens with k > 0 and efficiency over all T·E_max entries, from a
//! selected plan (T > 0); `me`, `ce` [E_max] are scratch.
inline void dynmoe_plan_losses(const plan_ref& plan, double* me, double* ce, dynmoe_losses& losses) {
  const index_t tokens = plan.num_tokens, e_max = plan.num_experts;
  for (index_t e = 0; e < e_max; ++e) me[e] = ce[e] = 0.0;
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
  losses.efficiency_loss =
      static_cast<float>(static_cast<double>(total) / (static_cast<double>(tokens) * e_max));
}

//! L_sim = ‖(ŴᵀŴ − I) ⊙ m mᵀ‖_F in double (`wn` the column norms); writes A [E_max, E_max]
//! when `a` is given (0 outside the active block).
inline double dynmoe_sim_loss(const matrix_view<const float>& w,
                              const vector_view<const std::int32_t>& mask, const double* wn,
                              double* a) {
  const index_t d = w.extent(0), e_max = w.extent(1);
  if (a != nullptr)
    for (index_t i = 0; i < e_max * e_max; ++i) a[i] = 0.0;
  double sum = 0.0;
  for (index_t e = 0; e < e_max; ++e) {
    if (mask(e) == 0) continue;
    const double ne = dynmoe_clamp_norm(wn[e]);
    for (index_t f = 0; f < e_max; ++f) {
      if (mask(f) == 0) continue;
      const double nf = dynmoe_clamp_norm(wn[f]);
      double dot = 0.0;
      for (index_t i = 0; i < d; ++i) dot += static_cast<double>(w(i, e)) * w(i, f);
      const double v = dot / (ne * nf) - (e == f ? 1.0 : 0.0);
      if (a != nullptr) a[e * e_max + f] = v;
      sum += v * v;
    }
  }
  return std::sqrt(sum);
}

//! L_simple = mean_e ‖W[:, e]‖ over all E_max columns.
inline float dynmoe_simple_loss(const double* wn, index_t e_max) {
  double simple = 0.0;
  for (index_t e = 0; e < e_max; ++e) simple += wn[e];
  return static_cast<float>(simple / static_cast<double>(e_max));
}

//! The routed share ce_e = (tokens with k > 0 using e) / T' into `ce` [E_max]; returns T'.
inline index_t dynmoe_routed_share(const plan_ref& plan, double* ce) {
  const index_t e_max = plan.num_experts;
  for (index_t e = 0; e < e_max; ++e) ce[e] = 0.0;
  index_t routed = 0;
  for (index_t t = 0; t < plan.num_tokens; ++t) {
    if (plan.counts[t] == 0) continue;
    ++routed;
    for (index_t j = 0; j < plan.counts[t]; ++j) ce[plan.id(t, j)] += 1.0;
  }
  for (index_t e = 0; e < e_max; ++e) ce[e] /= routed > 1 ? routed : index_t{1};
  return routed;
}

//! grads.w_gate += ∂/∂W given dŴ [d, E_max] (scratch `s.dwhat`, modified): adds L_sim's
//! (2/‖A‖)·Ŵ A (c_sim ≠ 0), goes through ŵ_e = w_e / max(‖w_e‖, eps), adds L_simple's
//! w_e/(E_max·‖w_e‖) (c_simple ≠ 0, non-zero column); one += per weight.
inline void dynmoe_weight_backward(const dynmoe_params& p, const dynmoe_losses& coeff,
                                   const dynmoe_backward_scratch& s,
                                   const matrix_view<float>& grad_w) {
  const index_t d = p.w_gate.extent(0), e_max = p.w_gate.extent(1);
  const double* wn = s.wn;
  auto what = [&](index_t i, index_t e) {
    return static_cast<double>(p.w_gate(i, e)) / dynmoe_clamp_norm(wn[e]);
  };
  // L_sim: ∂‖A‖/∂ŵ_e = (2/‖A‖) Σ_f A_ef ŵ_f, A = (ŴᵀŴ − I) ⊙ m mᵀ
  if (coeff.sim_loss != 0.0f) {
    const double norm_a = dynmoe_sim_loss(p.w_gate, p.experts_mask, wn, s.a);
    if (norm_a > 0.0) {
      for (index_t e = 0; e < e_max; ++e)
        for (index_t f = 0; f < e_max; ++f) {
          const double af = s.a[e * e_max + f];
          if (af == 0.0) continue;
          const double c = coeff.sim_loss * 2.0 * af / norm_a;
          for (index_t i = 0; i < d; ++i) s.dwhat[i * e_max + e] += c * what(i, f);
        }
    }
  }
  // Through ŵ_e = w_e / max(‖w_e‖, eps), then L_simple = mean_e ‖w_e‖ on the raw columns.
  for (index_t e = 0; e < e_max; ++e) {
    for (index_t i = 0; i < d; ++i) {
      s.col[i] = s.dwhat[i * e_max + e];
      s.what[i] = what(i, e);
      s.dcol[i] = 0.0;
    }
    dynmoe_normalize_backward(d, wn[e], s.what, s.col, dynmoe_add_to{s.dcol});
    if (coeff.simple_loss != 0.0f && wn[e] > 0.0) {
      const double c = coeff.simple_loss / (static_cast<double>(e_max) * wn[e]);
      for (index_t i = 0; i < d; ++i) s.dcol[i] += c * p.w_gate(i, e);
    }
    for (index_t i = 0; i < d; ++i) grad_w(i, e) += static_cast<float>(s.dcol[i]);  // one +=
  }
}

}  // namespace switchyard::detail
