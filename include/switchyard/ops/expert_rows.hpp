// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file expert_rows.hpp
//! Functors of the CUDA expert phase (backend-neutral; see gather.hpp for the convention),
//! whose buffers hold storage-type rows for the GEMMs: gathered token rows of T, the fused
//! bias + activation writing A of T, the expert bias add, the backward's dY and dH (with their
//! T copies), and the per-expert segmented bias gradient. Streaming ones take one element per
//! index (i = row·columns + column: a warp touches consecutive columns); those with a
//! per-row reduction (dY's d_weights dot) take one row. They reuse the host's functors
//! (gather.hpp, activate.hpp, bias.hpp, combine.hpp) or their per-element arithmetic, so a
//! value computed here is bitwise the host's value rounded to T.
//!
//! Row layouts: grouped layouts (sorted_grouped, padded_capacity) give expert e the rows
//! [row_begin[e], row_begin[e] + row_count[e]) with row_begin non-decreasing; the rows past
//! row_count[e] in a padded block are padding (`grouped_row_expert` says -1). The dense layout
//! gives expert e the T rows [e·T, e·T + T) (`dense_row_expert`).

#include "switchyard/activation/concepts.hpp"
#include "switchyard/core/config.hpp"
#include "switchyard/core/element_type.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/ops/activate.hpp"
#include "switchyard/ops/bias.hpp"
#include "switchyard/ops/combine.hpp"
#include "switchyard/ops/gather.hpp"

namespace switchyard::ops {

//! The expert of a grouped layout's row r, or -1 for a padding row: the last e with
//! row_begin[e] <= r (binary search), if r lies within its row_count[e] rows.
struct grouped_row_expert {
  const index_t* row_begin;  //!< [E] non-decreasing
  const index_t* row_count;  //!< [E]
  index_t experts = 0;       //!< E

  SWITCHYARD_HD index_t operator()(index_t r) const {
    index_t lo = 0, hi = experts;  // first e with row_begin[e] > r
    while (lo < hi) {
      const index_t mid = lo + (hi - lo) / 2;
      if (row_begin[mid] <= r)
        lo = mid + 1;
      else
        hi = mid;
    }
    const index_t e = lo - 1;
    if (e < 0 || r - row_begin[e] >= row_count[e]) return -1;
    return e;
  }
};

//! The expert of the dense layout's row r: every expert owns T consecutive rows.
struct dense_row_expert {
  index_t tokens = 0;  //!< T

  SWITCHYARD_HD index_t operator()(index_t r) const { return r / tokens; }
};

//! Gathers token rows into expert rows of T (exact copies), element i = r·d + c: row r holds
//! x[t] for the pair row_pair[r] = t · width + j, zeros for a padding row (negative pair).
//! One element per index: a warp reads and writes consecutive columns.
template <ElementType T>
struct gather_as {
  matrix_view<const T> x;   //!< [T, d] tokens
  const index_t* row_pair;  //!< [rows] pair of each row, negative for padding
  index_t width = 0;        //!< plan slots per token
  index_t d = 0;            //!< model width
  T* rows = nullptr;        //!< [rows, d] output

  SWITCHYARD_HD void operator()(index_t i) const {
    const index_t r = i / d, c = i - r * d;
    const index_t pair = row_pair[r];
    rows[i] = pair < 0 ? from_float<T>(0.0f) : x(pair / width, c);
  }
};

//! The tokens as contiguous rows of T (the dense layout's Xs), element i = t·d + c.
template <ElementType T>
struct load_as {
  matrix_view<const T> x;  //!< [T, d] tokens (any strides)
  index_t d = 0;           //!< model width
  T* rows = nullptr;       //!< [T, d] output

  SWITCHYARD_HD void operator()(index_t i) const {
    const index_t t = i / d, c = i - t * d;
    rows[i] = x(t, c);
  }
};

//! The fused first-projection epilogue, element i = r·d_ff + c of A: H[r] += b1[e] at the
//! columns A[r, c] reads (c, and d_ff + c when gated; written back when `store_h`, as the
//! backward needs the biased H), A[r, c] = act(H[r, c] (, H[r, d_ff + c])) rounded to T. A
//! padding row (e < 0) gets A = 0 and keeps H. Per element the float arithmetic of the
//! host's `add_bias_rows` then `activate_rows`.
template <ElementType T, class Act, class RowExpert>
struct bias_activate {
  Act act{};                //!< the activation
  RowExpert expert_of;      //!< row -> expert (-1: padding)
  float* h;                 //!< [rows, ld_h] H (P columns)
  index_t ld_h = 0;         //!< P
  matrix_view<const T> b1;  //!< [E, P] or empty
  T* a;                     //!< [rows, ld_a] A
  index_t ld_a = 0;         //!< leading dimension of A
  index_t d_ff = 0;         //!< columns of A
  bool store_h = false;     //!< write the biased H back

  SWITCHYARD_HD void operator()(index_t i) const {
    const index_t f = d_ff, r = i / f, c = i - r * f;
    const index_t e = expert_of(r);
    T& out = a[r * ld_a + c];
    if (e < 0) {
      out = from_float<T>(0.0f);
      return;
    }
    float* hr = h + r * ld_h;
    const bool bias = detail::present(b1);
    if constexpr (activation_traits<Act>::is_gated) {
      float g = hr[c], u = hr[f + c];
      if (bias) {
        g += to_float(b1(e, c));
        u += to_float(b1(e, f + c));
      }
      if (store_h) {
        hr[c] = g;
        hr[f + c] = u;
      }
      out = from_float<T>(act(g, u));
    } else {
      float v = hr[c];
      if (bias) v += to_float(b1(e, c));
      if (store_h) hr[c] = v;
      out = from_float<T>(act(v));
    }
  }
};

//! m[r, c] += bias(e, c) for element i = r·cols + c of a row of expert e = expert_of(r)
//! (nothing for a padding row): the host's `add_bias_rows` per element.
template <ElementType T, class RowExpert>
struct add_expert_bias {
  RowExpert expert_of;        //!< row -> expert (-1: padding)
  matrix_view<const T> bias;  //!< [E, cols]
  float* m;                   //!< [rows, ld]
  index_t cols = 0;           //!< columns to add to
  index_t ld = 0;             //!< leading dimension of m

  SWITCHYARD_HD void operator()(index_t i) const {
    const index_t r = i / cols, c = i - r * cols;
    const index_t e = expert_of(r);
    if (e < 0) return;
    m[r * ld + c] += to_float(bias(e, c));
  }
};

//! dst[r] = src[r] rounded to T, `cols` columns.
template <ElementType T>
struct round_rows {
  const float* src;    //!< [rows, ld_src]
  index_t ld_src = 0;  //!< leading dimension of src
  T* dst;              //!< [rows, ld_dst]
  index_t ld_dst = 0;  //!< leading dimension of dst
  index_t cols = 0;    //!< columns

  SWITCHYARD_HD void operator()(index_t r) const {
    const float* in = src + r * ld_src;
    T* out = dst + r * ld_dst;
    const index_t n = cols;
    for (index_t c = 0; c < n; ++c) out[c] = from_float<T>(in[c]);
  }
};

//! Backward, grouped layout, row r: `grouped_dy_rows` (dY row = w_tj · dy_t, d_weights of its
//! pair, zeros for padding) and the row's T copy for the GEMMs.
template <ElementType T, class W>
struct grouped_dy_rows_as {
  grouped_dy_rows<T, W> rows;  //!< the float rows and d_weights
  T* dys_t;                    //!< [rows, d] dY rounded to T

  SWITCHYARD_HD void operator()(index_t r) const {
    rows(r);
    round_rows<T>{rows.dys, rows.d, dys_t, rows.d, rows.d}(r);
  }
};

//! Backward, dense layout, row i = e·T + t of expert e: `dense_dy_rows` of expert e for token
//! t (its masked dY row and the d_weights of its slots naming e) and the row's T copy.
//! `rows.expert`, `rows.ys` and `rows.dys` are replaced by expert e's ones.
template <ElementType T, class Id, class W>
struct dense_dy_rows_as {
  dense_dy_rows<T, Id, W> rows;  //!< ys / dys: the [E·T, d] buffers' starts
  T* dys_t;                      //!< [E·T, d] dY rounded to T

  SWITCHYARD_HD void operator()(index_t i) const {
    const index_t tokens = rows.tokens, n = rows.d;
    const index_t e = i / tokens, t = i - e * tokens;
    dense_dy_rows<T, Id, W> f = rows;
    f.expert = e;
    f.ys = rows.ys + e * tokens * n;
    f.dys = rows.dys + e * tokens * n;
    f(t);
    round_rows<T>{rows.dys, n, dys_t, n, n}(i);
  }
};

//! `dense_dy_rows_as`' dY one element at a time, index i = r·d + c of row r = e·T + t
//! (coalesced on the GPU): the row form's per-element arithmetic — w = the weights of t's
//! slots naming e added in slot order (1 with `weight_on_input`), dY = w · dy_t — so bitwise
//! its dys, and its copy rounded to T when `dys_t` is non-null. The d_weights dots are
//! `dense_dy_weights`' (one per row).
template <ElementType T, class Id, class W>
struct dense_dy_elements {
  dense_dy_rows<T, Id, W> rows;  //!< ys / dys: the [E·T, d] buffers' starts
  T* dys_t = nullptr;            //!< [E·T, d] dY rounded to T, or null

  SWITCHYARD_HD void operator()(index_t i) const {
    const index_t n = rows.d, r = i / n, c = i - r * n;
    const index_t tokens = rows.tokens, e = r / tokens, t = r - e * tokens;
    float wt = 0.0f;
    const index_t used = rows.counts(t);
    for (index_t j = 0; j < used; ++j) {
      if (rows.expert_ids(t, j) != e) continue;
      if (rows.weight_on_input) {
        wt = 1.0f;
        continue;
      }
      wt += rows.weights(t, j);
    }
    const float v = wt * to_float(rows.dy(t, c));
    rows.dys[i] = v;
    if (dys_t != nullptr) dys_t[i] = from_float<T>(v);
  }
};

//! `dense_dy_rows_as`' d_weights alone, row r = e·T + t: d_weights of every used slot of t
//! naming e = ⟨dy_t, Y row r⟩ (the same dot, columns in order: `dot_row_pipelined`); nothing
//! with `weight_on_input`. Reads ys only, so it may run before or after `dense_dy_elements`.
template <ElementType T, class Id, class W>
struct dense_dy_weights {
  dense_dy_rows<T, Id, W> rows;  //!< ys / dys: the [E·T, d] buffers' starts

  SWITCHYARD_HD void operator()(index_t r) const {
    if (rows.weight_on_input) return;
    const index_t n = rows.d, tokens = rows.tokens, e = r / tokens, t = r - e * tokens;
    const index_t used = rows.counts(t);
    for (index_t j = 0; j < used; ++j) {
      if (rows.expert_ids(t, j) != e) continue;
      rows.d_weights[dispatch::pair_index(t, j, rows.width)] =
          dot_row_pipelined(rows.dy, t, rows.ys + r * n, n);
    }
  }
};

//! dH from dA through the activation, element i = r·d_ff + c (in place over H, the host's
//! `activate_backward_rows` arithmetic per element: column c, and d_ff + c when gated), and
//! its T copy; a padding row (e < 0) gets dH = 0 (its H is never biased or computed from a
//! real token, so its expert's weights, even NaN, never reach a gradient).
template <ElementType T, class Act, class RowExpert>
struct activate_backward_as {
  Act act{};            //!< the activation
  RowExpert expert_of;  //!< row -> expert (-1: padding)
  float* h;             //!< [rows, ld_h] pre-activation H, overwritten with dH
  index_t ld_h = 0;     //!< P
  const float* da;      //!< [rows, ld_da] dA
  index_t ld_da = 0;    //!< leading dimension of dA
  index_t d_ff = 0;     //!< columns of A
  T* dh_t;              //!< [rows, ld_h] dH rounded to T

  SWITCHYARD_HD void operator()(index_t i) const {
    const index_t f = d_ff, r = i / f, c = i - r * f;
    float* hr = h + r * ld_h;
    T* out = dh_t + r * ld_h;
    constexpr bool gated = activation_traits<Act>::is_gated;
    if (expert_of(r) < 0) {
      hr[c] = 0.0f;
      out[c] = from_float<T>(0.0f);
      if constexpr (gated) {
        hr[f + c] = 0.0f;
        out[f + c] = from_float<T>(0.0f);
      }
      return;
    }
    const float d_out = da[r * ld_da + c];
    if constexpr (gated) {
      float dg, du;
      act.backward(hr[c], hr[f + c], d_out, dg, du);
      hr[c] = dg;
      hr[f + c] = du;
      out[c] = from_float<T>(dg);
      out[f + c] = from_float<T>(du);
    } else {
      hr[c] = d_out * act.derivative(hr[c]);
      out[c] = from_float<T>(hr[c]);
    }
  }
};

//! The dense layout's slot rows for every expert at once, row i = e·T + t: `keep_dense_slots`
//! of expert e for token t (copies expert e's row t into the pair rows of t's slots naming
//! e). `slots.expert` and `slots.rows` are replaced by expert e's ones.
template <class Id>
struct keep_dense_slots_all {
  keep_dense_slots<Id> slots;  //!< rows: the [E·T, d] buffer's start
  index_t tokens = 0;          //!< T

  SWITCHYARD_HD void operator()(index_t i) const {
    const index_t e = i / tokens, t = i - e * tokens;
    keep_dense_slots<Id> f = slots;
    f.expert = e;
    f.rows = slots.rows + e * tokens * slots.d;
    f(t);
  }
};

//! `keep_dense_slots_all` one element at a time, index i = r·d + c of row r = e·T + t
//! (coalesced on the GPU): copies element c of expert e's row t into the pair row of every
//! used slot of t naming e (the same copies).
template <class Id>
struct keep_dense_slot_elements {
  keep_dense_slots<Id> slots;  //!< rows: the [E·T, d] buffer's start
  index_t tokens = 0;          //!< T

  SWITCHYARD_HD void operator()(index_t i) const {
    const index_t n = slots.d, r = i / n, c = i - r * n;
    const index_t e = r / tokens, t = r - e * tokens;
    const index_t used = slots.counts(t);
    for (index_t j = 0; j < used; ++j) {
      if (slots.expert_ids(t, j) != e) continue;
      slots.pair_out[dispatch::pair_index(t, j, slots.width) * n + c] = slots.rows[i];
    }
  }
};

//! Expert e's rows of a grouped layout: [row_begin[e], row_begin[e] + row_count[e]).
struct grouped_segments {
  const index_t* row_begin;  //!< [E]
  const index_t* row_count;  //!< [E]

  //! First row of expert e.
  SWITCHYARD_HD index_t begin(index_t e) const { return row_begin[e]; }
  //! Real rows of expert e.
  SWITCHYARD_HD index_t count(index_t e) const { return row_count[e]; }
};

//! Expert e's rows of the dense layout: all T rows at e·T when a pair names e, none otherwise
//! (the host skips experts no token is routed to).
struct dense_segments {
  index_t tokens = 0;        //!< T
  const index_t* row_count;  //!< [E] pairs routed to e

  //! First row of expert e.
  SWITCHYARD_HD index_t begin(index_t e) const { return e * tokens; }
  //! Rows of expert e summed (T, or 0 for an unused expert).
  SWITCHYARD_HD index_t count(index_t e) const { return row_count[e] > 0 ? tokens : 0; }
};

//! The segmented bias gradient, element i = e·cols + c: db(e, c) += Σ of expert e's rows of
//! m in column c, in row order in float (`bias_grad_columns`); nothing for an expert without
//! rows. One writer per element: no atomics.
template <class Segments>
struct bias_grad_segments {
  Segments segments;      //!< each expert's rows
  const float* m;         //!< [rows, ld] dY or dH rows
  index_t ld = 0;         //!< leading dimension of m
  index_t cols = 0;       //!< columns (d or P)
  matrix_view<float> db;  //!< [E, cols] bias gradient

  SWITCHYARD_HD void operator()(index_t i) const {
    const index_t e = i / cols, c = i - e * cols;
    const index_t n = segments.count(e);
    if (n == 0) return;
    bias_grad_columns{m + segments.begin(e) * ld, n, ld, &db(e, 0), db.stride(1)}(c);
  }
};

//! grad(e, r, c) += part[e, r, c] (contiguous [E, rows, cols]) for experts a pair names,
//! element i = (e·rows + r)·cols + c: the dense layout's weight gradients, computed for every
//! expert, reach only the used experts' gradients (as the host, which skips the others).
struct add_used_expert_grads {
  const float* part;           //!< [E, rows, cols]
  const index_t* row_count;    //!< [E] pairs routed to e
  tensor_view<float, 3> grad;  //!< [E, rows, cols]

  SWITCHYARD_HD void operator()(index_t i) const {
    const index_t rows = grad.extent(1), cols = grad.extent(2);
    const index_t e = i / (rows * cols), rc = i - e * rows * cols;
    if (row_count[e] == 0) return;
    const index_t r = rc / cols, c = rc - r * cols;
    grad(e, r, c) += part[i];
  }
};

}  // namespace switchyard::ops
