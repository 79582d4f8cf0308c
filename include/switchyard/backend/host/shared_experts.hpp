// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file shared_experts.hpp
//! Shared (always-on) experts on the host: `y_shared_t = g_t · Σ_s FFN_s(x_t)` with
//! `g_t = σ(x_t · gateᵀ)` when `weights.shared.gate` is given, else 1 (layer/expert_weights.hpp).
//! They run as a second host expert phase (`host::experts_forward` / `experts_backward`) over
//! a plan built in the workspace: every token routed to shared experts 0..S−1 with weight
//! g_t, `sorted_grouped` dispatch, the shared weights' own d_ff_s. The forward writes the term
//! unrounded into a float [T, d] buffer that the routed phase adds before y is rounded;
//! backward gives dx (+=), the shared weights' gradients and, through the phase's d_weights
//! (the cotangent of g_t per slot), the gate's.
//!
//! The per-token and per-column work (gate, plan rows, gate backward) are `SWITCHYARD_HD`
//! functors in `switchyard::ops` below, for the GPU to run later. Every sum is in a fixed
//! order (slots, then tokens, then columns): the bits do not depend on the thread count.

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "switchyard/backend/host/expert_backward.hpp"
#include "switchyard/backend/host/expert_forward.hpp"
#include "switchyard/backend/host/expert_phase.hpp"
#include "switchyard/backend/host/run_ops.hpp"
#include "switchyard/core/config.hpp"
#include "switchyard/core/element_type.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/core/workspace.hpp"
#include "switchyard/dispatch/sorted_grouped.hpp"
#include "switchyard/layer/expert_weights.hpp"
#include "switchyard/routing/plan.hpp"

namespace switchyard::ops {

//! Token t's row of the shared plan: ids 0..S−1, weights g_t (σ(x_t · gateᵀ), the dot product
//! in float in column order; 1 without a gate), count S; g_t is also kept in `gate_value`.
template <ElementType T>
struct shared_plan_rows {
  matrix_view<const T> x;     //!< [T, d] tokens
  matrix_view<const T> gate;  //!< [1, d] gate weight, or empty (g = 1)
  bool gated = false;         //!< gate is given
  index_t d = 0;              //!< model width
  index_t count = 0;          //!< S
  float* gate_value;          //!< [T] g_t
  std::int32_t* ids;          //!< [T·S]
  float* weights;             //!< [T·S]
  std::int32_t* counts;       //!< [T]

  SWITCHYARD_HD void operator()(index_t t) const {
    float g = 1.0f;
    if (gated) {
      float logit = 0.0f;
      for (index_t i = 0; i < d; ++i) logit += to_float(x(t, i)) * to_float(gate(0, i));
      g = 1.0f / (1.0f + expf(-logit));
    }
    gate_value[t] = g;
    for (index_t s = 0; s < count; ++s) {
      ids[t * count + s] = static_cast<std::int32_t>(s);
      weights[t * count + s] = g;
    }
    counts[t] = static_cast<std::int32_t>(count);
  }
};

//! Backward of the gate for token t: d_g = Σ_s d_weights[t, s] (slot order), d_logit[t] =
//! d_g · g_t (1 − g_t), and dx[t, i] += d_logit · gate[i] when `has_dx`.
template <ElementType T>
struct shared_gate_backward_rows {
  matrix_view<const T> gate;   //!< [1, d] gate weight
  index_t d = 0;               //!< model width
  index_t count = 0;           //!< S
  const float* gate_value;     //!< [T] g_t
  const float* d_weights;      //!< [T·S] cotangent of each slot's weight g_t
  float* d_logit;              //!< [T] output
  matrix_view<float> dx;       //!< [T, d] accumulated into when `has_dx`
  bool has_dx = false;         //!< dx is present

  SWITCHYARD_HD void operator()(index_t t) const {
    float dg = 0.0f;
    for (index_t s = 0; s < count; ++s) dg += d_weights[t * count + s];
    const float g = gate_value[t], dl = dg * g * (1.0f - g);
    d_logit[t] = dl;
    if (!has_dx) return;
    for (index_t i = 0; i < d; ++i) dx(t, i) += dl * to_float(gate(0, i));
  }
};

//! Gate gradient, one column i: grad[0, i] += Σ_t d_logit[t] · x[t, i] (token order).
template <ElementType T>
struct shared_gate_grad_columns {
  matrix_view<const T> x;  //!< [T, d] tokens
  index_t tokens = 0;      //!< T
  const float* d_logit;    //!< [T]
  matrix_view<float> grad;  //!< [1, d] gate gradient (+=)

  SWITCHYARD_HD void operator()(index_t i) const {
    float s = 0.0f;
    for (index_t t = 0; t < tokens; ++t) s += d_logit[t] * to_float(x(t, i));
    grad(0, i) += s;
  }
};

}  // namespace switchyard::ops

namespace switchyard::host {

//! The sizes of the shared experts' phase: T tokens, S slots over S experts, their d_ff_s.
template <ElementType T>
expert_dims shared_expert_dims(const shared_expert_weights<T>& s, index_t tokens, index_t d,
                               bool batch_invariant) {
  expert_dims dm;
  dm.tokens = tokens;
  dm.width = s.count();
  dm.experts = s.count();
  dm.d = d;
  dm.d_ff = s.d_ff();
  dm.p = s.w1.extent(1);
  dm.max_rows = dispatch::sorted_grouped{}.max_rows(tokens, dm.width, dm.experts);
  dm.batch_invariant = batch_invariant;
  dm.weight_on_input = false;  // g_t scales the shared experts' output
  return dm;
}

//! The shared weights as the expert phase's `expert_weights` (S experts).
template <ElementType T>
expert_weights<T> shared_as_experts(const shared_expert_weights<T>& s) {
  return {s.w1, s.b1, s.w2, s.b2, {}};
}

//! The shared gradients as the expert phase's `expert_grads`.
inline expert_grads shared_as_grads(const shared_expert_grads& g) {
  return {g.w1, g.b1, g.w2, g.b2, {}};
}

}  // namespace switchyard::host

namespace switchyard::detail {

//! The shared plan's arrays, carved from the workspace (null while measuring).
struct shared_plan_arrays {
  float* gate_value = nullptr;     //!< [T]
  std::int32_t* ids = nullptr;     //!< [T·S]
  float* weights = nullptr;        //!< [T·S]
  std::int32_t* counts = nullptr;  //!< [T]
  index_t tokens = 0, count = 0;

  [[nodiscard]] routing::plan_view<const std::int32_t, const float> view() const {
    return {make_view<const std::int32_t>(ids, tokens, count),
            make_view<const float>(weights, tokens, count),
            make_view<const std::int32_t>(counts, tokens), count};
  }
};

//! Carves the shared plan and, when carving, fills it from x and the gate.
template <ElementType T>
shared_plan_arrays shared_plan(workspace_arena& ws, const shared_expert_weights<T>& s,
                               const matrix_view<const T>& x, index_t tokens, index_t d) {
  shared_plan_arrays a;
  a.tokens = tokens;
  a.count = s.count();
  a.gate_value = ws.take<float>(tokens);
  a.ids = ws.take<std::int32_t>(tokens * a.count);
  a.weights = ws.take<float>(tokens * a.count);
  a.counts = ws.take<std::int32_t>(tokens);
  if (!ws.carving()) return a;
  const ops::shared_plan_rows<T> rows{x, s.gate, s.gated(), d, a.count, a.gate_value,
                                      a.ids, a.weights, a.counts};
  run_static(tokens, s.gated() && tokens * d > (1 << 15), rows);
  return a;
}

}  // namespace switchyard::detail

namespace switchyard::host {

//! Forward of the shared experts: out [T, d] (float) = g_t · Σ_s FFN_s(x_t) (+ extra [T, d]
//! when non-null; `out` must not alias it). Carves its plan and the phase's scratch from
//! `ws`; a measuring arena only counts them (x may then be empty).
template <class Act, ElementType T>
void shared_experts_forward(const Act& act, index_t tokens, index_t d, bool batch_invariant,
                            const matrix_view<const T>& x, const shared_expert_weights<T>& s,
                            const float* extra, float* out, workspace_arena& ws) {
  const expert_dims dm = shared_expert_dims(s, tokens, d, batch_invariant);
  const detail::shared_plan_arrays plan = detail::shared_plan(ws, s, x, tokens, d);
  index_t* dropped = ws.take<index_t>(dm.experts);  // sorted_grouped drops nothing
  const matrix_view<float> y = ws.carving() ? make_view(out, tokens, d) : matrix_view<float>{};
  experts_forward(dispatch::sorted_grouped{}, act, dm, x, plan.view(), shared_as_experts(s),
                  extra, y, span<index_t>{dropped, static_cast<std::size_t>(dm.experts)}, ws);
}

//! Backward of the shared experts: dx [T, d] += ∂/∂x (when present), grads.shared += the
//! shared weights' and the gate's gradients (present views only). Carves its scratch from
//! `ws`; a measuring arena only counts it.
template <class Act, ElementType T>
void shared_experts_backward(const Act& act, index_t tokens, index_t d, bool batch_invariant,
                             const matrix_view<const T>& x, const shared_expert_weights<T>& s,
                             const matrix_view<const T>& dy, const matrix_view<float>& dx,
                             const shared_expert_grads& grads, workspace_arena& ws) {
  const expert_dims dm = shared_expert_dims(s, tokens, d, batch_invariant);
  const detail::shared_plan_arrays plan = detail::shared_plan(ws, s, x, tokens, d);
  float* d_weights = ws.take<float>(tokens * dm.width);  // [T·S] cotangent of g_t per slot
  float* d_logit = ws.take<float>(tokens);               // [T]
  experts_backward(dispatch::sorted_grouped{}, act, dm, x, plan.view(), shared_as_experts(s),
                   dy, dx, shared_as_grads(grads), d_weights, ws);
  if (!ws.carving() || !s.gated()) return;
  const bool has_dx = detail::present(dx);
  const bool big = tokens * d > (1 << 15);
  detail::run_static(tokens, big,
                     ops::shared_gate_backward_rows<T>{s.gate, d, dm.width, plan.gate_value,
                                                       d_weights, d_logit, dx, has_dx});
  if (detail::present(grads.gate)) {
    detail::run_static(d, big, ops::shared_gate_grad_columns<T>{x, tokens, d_logit, grads.gate});
  }
}

}  // namespace switchyard::host
