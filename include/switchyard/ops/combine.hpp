// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file combine.hpp
//! The combine of the expert phase as per-token functors (backend-neutral; see gather.hpp for
//! the convention): each token gathers its slots' rows in slot order (no scatter-add), so the
//! result is bitwise the same however the tokens are spread over threads or blocks.
//!
//! Router weight on the input (Llama-4, `weight_on_input` members, default false): the expert
//! rows were computed from w_tj · x_t, so the combine sums them with weight 1, and backward
//! gives dx_t += w_tj · dU row and d_weights = ⟨x_t, dU row⟩ (dU: the gradient of the expert's
//! input). A dropped `scaled_input` pair contributes w_tj · x_t either way. With the flag
//! false every functor computes what it did before it existed, bit for bit.

#include "switchyard/core/config.hpp"
#include "switchyard/core/element_type.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/dispatch/groups.hpp"

namespace switchyard::ops {

//! y[t] = Σ_j w_tj · rows[pair_row(t, j)] in slot order (+ w_tj · x_t for a dropped pair under
//! `pass_through`) (+ extra[t] when non-null), rounded to `Out` (the element type T of x by
//! default; float for a term another phase adds, e.g. the shared experts'). One token t.
//! With `weight_on_input` a kept row enters with weight 1 (it was computed from w_tj · x_t).
template <ElementType T, class Id, class W, class Out = T>
struct combine_slots {
  matrix_view<W> weights;        //!< [T, width] plan combine weights
  vector_view<Id> counts;        //!< [T] used slots
  const index_t* pair_row;       //!< [T·width] the dispatch's row of each pair
  index_t width = 0;             //!< plan slots per token
  index_t d = 0;                 //!< model width
  const float* rows;             //!< [rows, d] expert outputs
  matrix_view<const T> x;        //!< [T, d] tokens (read for dropped pass-through pairs)
  bool pass_through = false;     //!< dropped pairs contribute w_tj · x_t
  const float* extra = nullptr;  //!< [T, d] add-on term, or null
  matrix_view<Out> y;            //!< [T, d] output
  bool weight_on_input = false;  //!< kept rows enter unweighted (Llama-4)

  SWITCHYARD_HD void operator()(index_t t) const {
    // Members as locals: the loops below then keep them in registers.
    const index_t c = counts(t), n = d, slots = width;
    const index_t* rows_of = pair_row;
    const float* in = rows;
    const float* add = extra;
    const bool pass = pass_through, unit = weight_on_input;
    for (index_t i = 0; i < n; ++i) {
      float s = 0.0f;
      for (index_t j = 0; j < c; ++j) {
        const index_t row = rows_of[dispatch::pair_index(t, j, slots)];
        const float wt = weights(t, j);
        // 1 · v is v exactly (also as a fused multiply-add), so the flag changes no other bit.
        if (row >= 0) s += (unit ? 1.0f : wt) * in[row * n + i];
        else if (row == dispatch::dropped_pair && pass) s += wt * to_float(x(t, i));
      }
      if (add != nullptr) s += add[t * n + i];
      y(t, i) = from_float<Out>(s);
    }
  }
};

//! `combine_slots` one output element at a time, index r = t·d + i: the form the GPU runs
//! (consecutive threads write consecutive columns of a token, so the loads of a slot's row
//! coalesce). Each element is the same float sum in slot order as the row form's, so the
//! result is bitwise the row form's.
template <ElementType T, class Id, class W>
struct combine_slot_elements {
  combine_slots<T, Id, W> f;  //!< the row form (its members)

  SWITCHYARD_HD void operator()(index_t r) const {
    const index_t t = r / f.d, i = r % f.d;
    const index_t c = f.counts(t);
    float s = 0.0f;
    for (index_t j = 0; j < c; ++j) {
      const index_t row = f.pair_row[dispatch::pair_index(t, j, f.width)];
      const float wt = f.weights(t, j);
      if (row >= 0) s += (f.weight_on_input ? 1.0f : wt) * f.rows[row * f.d + i];
      else if (row == dispatch::dropped_pair && f.pass_through) s += wt * to_float(f.x(t, i));
    }
    if (f.extra != nullptr) s += f.extra[t * f.d + i];
    f.y(t, i) = from_float<T>(s);
  }
};

//! Backward of the combine for one token t: d_weights of its dropped pass-through pairs
//! (⟨dy_t, x_t⟩), then, when `has_dx`, dx[t] += Σ_j (dX row of slot j, or w_tj · dy_t for a
//! dropped pass-through pair) in slot order. With `weight_on_input` the dX rows are the
//! gradients of the expert inputs w_tj · x_t: a kept slot's d_weights is ⟨x_t, dX row⟩ and its
//! dx term w_tj · dX row.
template <ElementType T, class Id, class W>
struct combine_backward_slots {
  matrix_view<W> weights;        //!< [T, width] plan combine weights
  vector_view<Id> counts;        //!< [T] used slots
  const index_t* pair_row;       //!< [T·width] the dispatch's row of each pair
  index_t width = 0;             //!< plan slots per token
  index_t d = 0;                 //!< model width
  const float* dx_rows;          //!< [rows, d] dX rows of the experts
  matrix_view<const T> x;        //!< [T, d] tokens
  matrix_view<const T> dy;       //!< [T, d] output cotangent
  bool pass_through = false;     //!< dropped pairs contributed w_tj · x_t
  float* d_weights;              //!< [T·width] combine-weight cotangent
  matrix_view<float> dx;         //!< [T, d] accumulated into when `has_dx`
  bool has_dx = false;           //!< dx is present
  bool weight_on_input = false;  //!< dX rows are gradients of w_tj · x_t (Llama-4)

  SWITCHYARD_HD void operator()(index_t t) const {
    // Members as locals: the loops below then keep them in registers.
    const index_t c = counts(t), n = d, slots = width;
    const index_t* rows_of = pair_row;
    const float* in = dx_rows;
    const bool pass = pass_through, scaled = weight_on_input;
    for (index_t j = 0; j < c; ++j) {
      const index_t pr = dispatch::pair_index(t, j, slots), row = rows_of[pr];
      if (row == dispatch::dropped_pair && pass) d_weights[pr] = dot_x(t);
      else if (row >= 0 && scaled) d_weights[pr] = dot_input(t, row);
    }
    if (!has_dx) return;
    for (index_t i = 0; i < n; ++i) {
      float s = 0.0f;
      for (index_t j = 0; j < c; ++j) {
        const index_t row = rows_of[dispatch::pair_index(t, j, slots)];
        if (row >= 0) s += (scaled ? static_cast<float>(weights(t, j)) : 1.0f) * in[row * n + i];
        else if (row == dispatch::dropped_pair && pass) s += weights(t, j) * to_float(dy(t, i));
      }
      dx(t, i) += s;
    }
  }

  //! ⟨dy_t, x_t⟩ summed in column order in float.
  SWITCHYARD_HD float dot_x(index_t t) const {
    float s = 0.0f;
    for (index_t i = 0; i < d; ++i) s += to_float(dy(t, i)) * to_float(x(t, i));
    return s;
  }

  //! ⟨x_t, dX row⟩ summed in column order in float (a kept slot's d_weights under
  //! `weight_on_input`).
  SWITCHYARD_HD float dot_input(index_t t, index_t row) const {
    const float* in = dx_rows + row * d;
    float s = 0.0f;
    for (index_t i = 0; i < d; ++i) s += to_float(x(t, i)) * in[i];
    return s;
  }
};

//! `combine_backward_slots`' d_weights of one token's dropped pass-through pairs alone (and of
//! its kept pairs under `weight_on_input`; the GPU runs it per token, and
//! `combine_backward_elements` for dx).
template <ElementType T, class Id, class W>
struct combine_backward_pass_weights {
  combine_backward_slots<T, Id, W> f;  //!< the row form (its members)

  SWITCHYARD_HD void operator()(index_t t) const {
    if (!f.pass_through && !f.weight_on_input) return;
    const index_t c = f.counts(t);
    for (index_t j = 0; j < c; ++j) {
      const index_t pr = dispatch::pair_index(t, j, f.width), row = f.pair_row[pr];
      if (row == dispatch::dropped_pair && f.pass_through) f.d_weights[pr] = f.dot_x(t);
      else if (row >= 0 && f.weight_on_input) f.d_weights[pr] = f.dot_input(t, row);
    }
  }
};

//! `combine_backward_slots`' dx one element at a time, index r = t·d + i (coalesced on the
//! GPU; the same float sum in slot order, so bitwise the row form's dx).
template <ElementType T, class Id, class W>
struct combine_backward_elements {
  combine_backward_slots<T, Id, W> f;  //!< the row form (its members)

  SWITCHYARD_HD void operator()(index_t r) const {
    if (!f.has_dx) return;
    const index_t t = r / f.d, i = r % f.d;
    const index_t c = f.counts(t);
    float s = 0.0f;
    for (index_t j = 0; j < c; ++j) {
      const index_t row = f.pair_row[dispatch::pair_index(t, j, f.width)];
      if (row >= 0)
        s += (f.weight_on_input ? static_cast<float>(f.weights(t, j)) : 1.0f) * f.dx_rows[row * f.d + i];
      else if (row == dispatch::dropped_pair && f.pass_through) s += f.weights(t, j) * to_float(f.dy(t, i));
    }
    f.dx(t, i) += s;
  }
};

//! ⟨dy_t, row⟩ summed in column order in float (a slot's combine-weight cotangent).
template <ElementType T>
SWITCHYARD_HD inline float dot_row(const matrix_view<const T>& dy, index_t t, const float* row,
                                   index_t d) {
  float s = 0.0f;
  for (index_t i = 0; i < d; ++i) s += to_float(dy(t, i)) * row[i];
  return s;
}

//! `dot_row` with its loads ahead of its sum: 16 columns are loaded, then added in column order
//! (the same float sum of the same products, so bitwise dot_row; a GPU thread then has 32 loads
//! in flight instead of waiting for each before its add).
template <ElementType T>
SWITCHYARD_HD inline float dot_row_pipelined(const matrix_view<const T>& dy, index_t t,
                                             const float* row, index_t d) {
  constexpr index_t unroll = 16;
  float s = 0.0f;
  index_t i = 0;
  for (; i + unroll <= d; i += unroll) {
    float a[unroll], b[unroll];
    for (index_t q = 0; q < unroll; ++q) {
      a[q] = to_float(dy(t, i + q));
      b[q] = row[i + q];
    }
    for (index_t q = 0; q < unroll; ++q) s += a[q] * b[q];
  }
  for (; i < d; ++i) s += to_float(dy(t, i)) * row[i];
  return s;
}

//! Backward, grouped layout, one expert row r: dY row = w_tj · dy_t and d_weights[p] =
//! ⟨dy_t, Y row⟩ for the row's pair p = (t, j); a padding row (negative pair) gets zeros. With
//! `weight_on_input`: dY row = dy_t, and d_weights is left to the combine's backward.
template <ElementType T, class W>
struct grouped_dy_rows {
  matrix_view<W> weights;     //!< [T, width] plan combine weights
  const index_t* row_pair;    //!< [rows] pair of each row, negative for padding
  index_t width = 0;          //!< plan slots per token
  index_t d = 0;              //!< model width
  matrix_view<const T> dy;    //!< [T, d] output cotangent
  const float* ys;            //!< [rows, d] recomputed expert outputs
  float* dys;                 //!< [rows, d] dY rows (output)
  float* d_weights;           //!< [T·width] combine-weight cotangent
  bool weight_on_input = false;  //!< rows enter the combine unweighted (Llama-4)

  SWITCHYARD_HD void operator()(index_t r) const {
    const index_t n = d;
    float* out = dys + r * n;
    const index_t pr = row_pair[r];
    if (pr < 0) {
      for (index_t i = 0; i < n; ++i) out[i] = 0.0f;
      return;
    }
    const index_t t = pr / width, j = pr % width;
    if (weight_on_input) {
      for (index_t i = 0; i < n; ++i) out[i] = to_float(dy(t, i));
      return;
    }
    const float wt = weights(t, j);
    for (index_t i = 0; i < n; ++i) out[i] = wt * to_float(dy(t, i));
    d_weights[pr] = dot_row(dy, t, ys + r * n, n);
  }
};

//! `grouped_dy_rows`' dY one element at a time, index i = r·d + c (coalesced on the GPU; the
//! row form's per-element arithmetic, so bitwise its dys), and its copy rounded to T when
//! `dys_t` is non-null. The d_weights dot is `grouped_dy_weights`' (one per row).
template <ElementType T, class W>
struct grouped_dy_elements {
  grouped_dy_rows<T, W> rows;  //!< the row form (its members)
  T* dys_t = nullptr;          //!< [rows, d] dY rounded to T, or null

  SWITCHYARD_HD void operator()(index_t i) const {
    const index_t n = rows.d, r = i / n, c = i - r * n;
    const index_t pr = rows.row_pair[r];
    float v = 0.0f;
    if (pr >= 0) {
      const index_t t = pr / rows.width;
      if (rows.weight_on_input) {
        v = to_float(rows.dy(t, c));
      } else {
        const float wt = rows.weights(t, pr % rows.width);
        v = wt * to_float(rows.dy(t, c));
      }
    }
    rows.dys[i] = v;
    if (dys_t != nullptr) dys_t[i] = from_float<T>(v);
  }
};

//! `grouped_dy_rows`' d_weights alone, row r: d_weights[p] = ⟨dy_t, Y row⟩ for the row's pair
//! p = (t, j) (the same dot, columns in order); nothing for a padding row or
//! `weight_on_input`. Reads ys only, so it may run before or after `grouped_dy_elements`.
template <ElementType T, class W>
struct grouped_dy_weights {
  grouped_dy_rows<T, W> rows;  //!< the row form (its members)

  SWITCHYARD_HD void operator()(index_t r) const {
    const index_t pr = rows.row_pair[r];
    if (pr < 0 || rows.weight_on_input) return;
    const index_t n = rows.d, t = pr / rows.width;
    rows.d_weights[pr] = dot_row_pipelined(rows.dy, t, rows.ys + r * n, n);
  }
};

//! Backward, dense layout, expert e, one token row t: the masked dY row (Σ of the weights of
//! the slots naming e, times dy_t) and d_weights of those slots; rows t >= tokens (padding)
//! get zeros. With `weight_on_input`: dY row = dy_t when a slot names e (else zeros), and
//! d_weights is left to the combine's backward.
template <ElementType T, class Id, class W>
struct dense_dy_rows {
  matrix_view<Id> expert_ids;  //!< [T, width] plan ids
  matrix_view<W> weights;      //!< [T, width] plan combine weights
  vector_view<Id> counts;      //!< [T] used slots
  index_t expert = 0;          //!< e
  index_t tokens = 0;          //!< T
  index_t width = 0;           //!< plan slots per token
  index_t d = 0;               //!< model width
  matrix_view<const T> dy;     //!< [T, d] output cotangent
  const float* ys;             //!< [padded T, d] expert e's recomputed outputs
  float* dys;                  //!< [padded T, d] dY rows (output)
  float* d_weights;            //!< [T·width] combine-weight cotangent
  bool weight_on_input = false;  //!< rows enter the combine unweighted (Llama-4)

  SWITCHYARD_HD void operator()(index_t t) const {
    const index_t n = d;
    float* out = dys + t * n;
    if (t >= tokens) {
      for (index_t i = 0; i < n; ++i) out[i] = 0.0f;
      return;
    }
    float wt = 0.0f;
    const index_t c = counts(t);
    for (index_t j = 0; j < c; ++j) {
      if (expert_ids(t, j) != expert) continue;
      if (weight_on_input) {
        wt = 1.0f;
        continue;
      }
      wt += weights(t, j);
      d_weights[dispatch::pair_index(t, j, width)] = dot_row(dy, t, ys + t * n, n);
    }
    for (index_t i = 0; i < n; ++i) out[i] = wt * to_float(dy(t, i));
  }
};

}  // namespace switchyard::ops
