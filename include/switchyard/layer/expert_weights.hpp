// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file expert_weights.hpp
//! The expert FFNs' parameters as views over caller memory, and their gradients.
//!
//! Layout (nn.Linear convention, `out = in · Wᵀ`), E experts (DynMoE: E_max slots):
//! - `w1 [E, P, d]`: first projection; P = d_ff, or P = 2·d_ff for a gated activation, whose
//!   fused projection is `[gate | up]`: rows `[0, d_ff)` are the gate, rows `[d_ff, 2·d_ff)`
//!   the up projection;
//! - `b1 [E, P]`: optional bias of the first projection (an empty view means none);
//! - `w2 [E, d, d_ff]`: second projection;
//! - `b2 [E, d]`: optional bias of the second projection.
//!
//! Views may be strided (any layout_stride). Dynamic expert counts need no reallocation:
//! the weights span all E_max slots and the routing plan never routes to a masked slot, so
//! an inactive slot's values (even NaN) are never read by `sorted_grouped` or
//! `padded_capacity`, and `dense` skips experts no token was routed to.

#include <cstdint>

#include "switchyard/core/config.hpp"
#include "switchyard/core/element_type.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/view.hpp"

namespace switchyard {

//! Shared (always-on) experts: S FFNs every token runs besides its routed experts (Qwen2-MoE,
//! Qwen3-Next, DeepSeek-V2/V3/V4, Llama-4, ERNIE-4.5, dots1, HunYuan), with the layer's
//! activation and their own hidden width d_ff_s. Their term is
//! `y_shared_t = g_t · Σ_s FFN_s(x_t)` with `g_t = sigmoid(x_t · gateᵀ)` when `gate` is given
//! (Qwen2-MoE, Qwen3-Next), else 1. Absent (every view empty, the default): no shared term.
//! A model that fuses several shared experts into one FFN (Hugging Face does) passes S = 1
//! with the fused width.
template <ElementType T>
struct shared_expert_weights {
  tensor_view<const T, 3> w1;  //!< [S, P_s, d], P_s = d_ff_s or 2·d_ff_s ([gate | up]) when gated
  matrix_view<const T> b1;     //!< [S, P_s] or empty
  tensor_view<const T, 3> w2;  //!< [S, d, d_ff_s]
  matrix_view<const T> b2;     //!< [S, d] or empty
  matrix_view<const T> gate;   //!< [1, d] sigmoid gate weight, or empty (g = 1)

  //! True when the layer has shared experts (w2 holds data).
  [[nodiscard]] bool present() const { return detail::present(w2) || detail::present(w1); }
  //! S.
  [[nodiscard]] index_t count() const { return w2.extent(0); }
  //! d_ff_s.
  [[nodiscard]] index_t d_ff() const { return w2.extent(2); }
  //! True when a sigmoid gate scales the shared term.
  [[nodiscard]] bool gated() const { return detail::present(gate); }
};

//! Gradients of the shared experts (float, +=); an empty view skips that gradient.
struct shared_expert_grads {
  tensor_view<float, 3> w1;  //!< [S, P_s, d]
  matrix_view<float> b1;     //!< [S, P_s]
  tensor_view<float, 3> w2;  //!< [S, d, d_ff_s]
  matrix_view<float> b2;     //!< [S, d]
  matrix_view<float> gate;   //!< [1, d]
};

//! Constant experts (MoE++, Jin et al. 2024): expert c outputs `α1 · x_t + α2 · v_c` with
//! `[α1, α2] = softmax(gate_c · x_t)`. Used with `MoELayer::constant_experts = C` (ids past the
//! FFN, identity and zero experts); empty (the default) when C = 0.
template <ElementType T>
struct constant_expert_weights {
  matrix_view<const T> v;        //!< [C, d] learned vectors
  tensor_view<const T, 3> gate;  //!< [C, 2, d] per-expert mixing gates (row 0: α1, row 1: α2)

  //! True when either view holds data.
  [[nodiscard]] bool present() const { return detail::present(v) || detail::present(gate); }
  //! C.
  [[nodiscard]] index_t count() const { return v.extent(0); }
};

//! Gradients of the constant experts (float, +=); an empty view skips that gradient.
struct constant_expert_grads {
  matrix_view<float> v;        //!< [C, d]
  tensor_view<float, 3> gate;  //!< [C, 2, d]
};

//! Read-only views of every expert's FFN parameters (layout in the file comment).
template <ElementType T>
struct expert_weights {
  tensor_view<const T, 3> w1;  //!< [E, P, d], P = d_ff or 2·d_ff ([gate | up]) when gated
  matrix_view<const T> b1;     //!< [E, P] or empty (no bias)
  tensor_view<const T, 3> w2;  //!< [E, d, d_ff]
  matrix_view<const T> b2;     //!< [E, d] or empty (no bias)
  shared_expert_weights<T> shared{};  //!< always-on experts, or empty (none)
  constant_expert_weights<T> constant{};  //!< constant experts (MoELayer::constant_experts)

  //! E (expert slots).
  [[nodiscard]] index_t num_experts() const { return w1.extent(0); }
  //! d (model width).
  [[nodiscard]] index_t d_model() const { return w1.extent(2); }
  //! d_ff (hidden width of one expert; half of w1's P when gated).
  [[nodiscard]] index_t d_ff() const { return w2.extent(2); }
  //! P = w1.extent(1): d_ff, or 2·d_ff for gated experts.
  [[nodiscard]] index_t projection_width() const { return w1.extent(1); }
  //! True when b1 holds data.
  [[nodiscard]] bool has_b1() const { return detail::present(b1); }
  //! True when b2 holds data.
  [[nodiscard]] bool has_b2() const { return detail::present(b2); }
};

//! Gradients of the expert parameters, float, accumulated (+=) into caller memory; an empty
//! view skips that gradient. Same extents as the matching `expert_weights` member.
struct expert_grads {
  tensor_view<float, 3> w1;  //!< [E, P, d]
  matrix_view<float> b1;     //!< [E, P]
  tensor_view<float, 3> w2;  //!< [E, d, d_ff]
  matrix_view<float> b2;     //!< [E, d]
  shared_expert_grads shared{};  //!< the shared experts' gradients
  constant_expert_grads constant{};  //!< the constant experts' gradients
};

namespace detail {

//! 64-bit element offset of index (i0, i1, i2) under strides (s0, s1, s2); the arithmetic of
//! every weight and activation access, exposed so tests can check it past 2^31 directly.
SWITCHYARD_HD constexpr index_t offset3(index_t i0, index_t i1, index_t i2, index_t s0,
                                        index_t s1, index_t s2) {
  return i0 * s0 + i1 * s1 + i2 * s2;
}

//! 64-bit offset of row `r` of a row-major matrix with leading dimension `ld`.
SWITCHYARD_HD constexpr index_t row_offset(index_t r, index_t ld) { return r * ld; }

}  // namespace detail

//! Checks the weights' extents against each other, against d (from x) and against whether
//! the activation is gated; throws shape_error naming the member and the expectation.
template <ElementType T>
void validate_expert_weights(const expert_weights<T>& w, index_t d, bool gated) {
  check_view("weights.w2", w.w2, {-1, d, -1}, "[E, d, d_ff] with d = x.extent(1)");
  const index_t e = w.w2.extent(0), d_ff = w.w2.extent(2);
  if (e < 1) {
    throw shape_error("weights.w2", detail::concat(
                                        "weights.w2: expected at least one expert (extent 0 "
                                        ">= 1), got ", e));
  }
  if (d_ff < 1) {
    throw shape_error("weights.w2", detail::concat(
                                        "weights.w2: expected d_ff = extent 2 >= 1, got ", d_ff));
  }
  const index_t p = gated ? 2 * d_ff : d_ff;
  check_view("weights.w1", w.w1, {e, p, d},
             gated ? "[E, 2·d_ff, d] (gated activation: fused [gate | up]) with E, d_ff from "
                     "weights.w2 and d = x.extent(1)"
                   : "[E, d_ff, d] with E, d_ff from weights.w2 and d = x.extent(1)");
  if (detail::present(w.b1)) check_view("weights.b1", w.b1, {e, p}, "[E, P] (P = w1.extent(1))");
  if (detail::present(w.b2)) check_view("weights.b2", w.b2, {e, d}, "[E, d]");
  const shared_expert_weights<T>& s = w.shared;
  if (!s.present()) {
    if (detail::present(s.gate) || detail::present(s.b1) || detail::present(s.b2)) {
      throw shape_error("weights.shared.w2",
                        "weights.shared.w2: the shared experts' gate or biases are given but "
                        "their weights (w1, w2) are not");
    }
    return;
  }
  check_view("weights.shared.w2", s.w2, {-1, d, -1}, "[S, d, d_ff_s] with d = x.extent(1)");
  const index_t n = s.w2.extent(0), f = s.w2.extent(2);
  if (n < 1 || f < 1) {
    throw shape_error("weights.shared.w2",
                      detail::concat("weights.shared.w2: expected S >= 1 shared experts and "
                                     "d_ff_s >= 1, got S = ", n, ", d_ff_s = ", f));
  }
  const index_t ps = gated ? 2 * f : f;
  check_view("weights.shared.w1", s.w1, {n, ps, d},
             gated ? "[S, 2·d_ff_s, d] (gated activation: fused [gate | up])"
                   : "[S, d_ff_s, d]");
  if (detail::present(s.b1)) check_view("weights.shared.b1", s.b1, {n, ps}, "[S, P_s]");
  if (detail::present(s.b2)) check_view("weights.shared.b2", s.b2, {n, d}, "[S, d]");
  if (detail::present(s.gate)) check_view("weights.shared.gate", s.gate, {1, d}, "[1, d]");
}

//! Checks the gradient views that are present against the weights' extents.
template <ElementType T>
void validate_expert_grads(const expert_grads& g, const expert_weights<T>& w) {
  const index_t e = w.num_experts(), p = w.projection_width(), d = w.d_model(), f = w.d_ff();
  if (detail::present(g.w1)) check_view("grads.w1", g.w1, {e, p, d}, "(same as weights.w1)");
  if (detail::present(g.b1)) check_view("grads.b1", g.b1, {e, p}, "(same as weights.b1)");
  if (detail::present(g.w2)) check_view("grads.w2", g.w2, {e, d, f}, "(same as weights.w2)");
  if (detail::present(g.b2)) check_view("grads.b2", g.b2, {e, d}, "(same as weights.b2)");
  const shared_expert_grads& sg = g.shared;
  const bool any = detail::present(sg.w1) || detail::present(sg.b1) || detail::present(sg.w2) ||
                   detail::present(sg.b2) || detail::present(sg.gate);
  if (!any) return;
  if (!w.shared.present()) {
    throw shape_error("grads.shared", "grads.shared: shared-expert gradients are given but the "
                                      "layer has no shared experts (weights.shared is empty)");
  }
  const auto& s = w.shared;
  const index_t n = s.count(), ps = s.w1.extent(1), fs = s.d_ff();
  if (detail::present(sg.w1)) check_view("grads.shared.w1", sg.w1, {n, ps, d}, "(same as weights.shared.w1)");
  if (detail::present(sg.b1)) check_view("grads.shared.b1", sg.b1, {n, ps}, "[S, P_s]");
  if (detail::present(sg.w2)) check_view("grads.shared.w2", sg.w2, {n, d, fs}, "(same as weights.shared.w2)");
  if (detail::present(sg.b2)) check_view("grads.shared.b2", sg.b2, {n, d}, "[S, d]");
  if (detail::present(sg.gate)) {
    if (!s.gated()) {
      throw shape_error("grads.shared.gate", "grads.shared.gate: given, but the shared experts "
                                             "have no gate (weights.shared.gate is empty)");
    }
    check_view("grads.shared.gate", sg.gate, {1, d}, "[1, d]");
  }
}

}  // namespace switchyard
