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

//! Read-only views of every expert's FFN parameters (layout in the file comment).
template <ElementType T>
struct expert_weights {
  tensor_view<const T, 3> w1;  //!< [E, P, d], P = d_ff or 2·d_ff ([gate | up]) when gated
  matrix_view<const T> b1;     //!< [E, P] or empty (no bias)
  tensor_view<const T, 3> w2;  //!< [E, d, d_ff]
  matrix_view<const T> b2;     //!< [E, d] or empty (no bias)

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
}

//! Checks the gradient views that are present against the weights' extents.
template <ElementType T>
void validate_expert_grads(const expert_grads& g, const expert_weights<T>& w) {
  const index_t e = w.num_experts(), p = w.projection_width(), d = w.d_model(), f = w.d_ff();
  if (detail::present(g.w1)) check_view("grads.w1", g.w1, {e, p, d}, "(same as weights.w1)");
  if (detail::present(g.b1)) check_view("grads.b1", g.b1, {e, p}, "(same as weights.b1)");
  if (detail::present(g.w2)) check_view("grads.w2", g.w2, {e, d, f}, "(same as weights.w2)");
  if (detail::present(g.b2)) check_view("grads.b2", g.b2, {e, d}, "(same as weights.b2)");
}

}  // namespace switchyard
