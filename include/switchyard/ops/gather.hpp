// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file gather.hpp
//! Row loads of the expert phase as per-row functors (backend-neutral): a backend runs
//! `f(i)` for every row i, on host threads or as a device kernel (`cub::DeviceFor::Bulk`).
//! Each functor holds raw pointers and sizes (or views) only, and writes row i alone.

#include <cstddef>
#include <cstring>

#include "switchyard/core/config.hpp"
#include "switchyard/core/element_type.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/dispatch/groups.hpp"

namespace switchyard::ops {

//! Gathers token rows into expert rows as float: row r holds x[t] for the pair
//! p = row_pair[r] (t = p / width), and zeros where `row_pair[r]` is negative (a padding
//! row, `dispatch::unused_pair`).
template <ElementType T>
struct gather_rows {
  matrix_view<const T> x;    //!< [T, d] tokens
  const index_t* row_pair;   //!< [rows] pair of each row, negative for padding
  index_t width = 0;         //!< plan slots per token
  index_t d = 0;             //!< model width
  float* rows = nullptr;     //!< [rows, d] output

  SWITCHYARD_HD void operator()(index_t r) const {
    const index_t n = d;
    float* out = rows + r * n;
    const index_t pair = row_pair[r];
    if (pair < 0) {
      for (index_t i = 0; i < n; ++i) out[i] = 0.0f;
      return;
    }
    const index_t t = pair / width;
    for (index_t i = 0; i < n; ++i) out[i] = to_float(x(t, i));
  }
};

//! `gather_rows` with the router weight on the input (Llama-4): row r holds w_tj · x[t] for
//! the pair p = row_pair[r] = (t, j) (each product one float multiply of the float token
//! value), zeros for a padding row.
template <ElementType T, class W>
struct gather_scaled_rows {
  matrix_view<const T> x;    //!< [T, d] tokens
  matrix_view<W> weights;    //!< [T, width] plan combine weights
  const index_t* row_pair;   //!< [rows] pair of each row, negative for padding
  index_t width = 0;         //!< plan slots per token
  index_t d = 0;             //!< model width
  float* rows = nullptr;     //!< [rows, d] output

  SWITCHYARD_HD void operator()(index_t r) const {
    const index_t n = d;
    float* out = rows + r * n;
    const index_t pair = row_pair[r];
    if (pair < 0) {
      for (index_t i = 0; i < n; ++i) out[i] = 0.0f;
      return;
    }
    const index_t t = pair / width;
    const float w = static_cast<float>(weights(t, pair - t * width));
    for (index_t i = 0; i < n; ++i) out[i] = w * to_float(x(t, i));
  }
};

//! The dense layout with the router weight on the input, expert e, row t: w_tj · x[t] for the
//! slot j of token t naming e (a plan names an expert at most once per token), zeros when no
//! used slot names e or t >= tokens (padding). Those zero rows' outputs are never combined,
//! and their dY rows are zero in backward.
template <ElementType T, class Id, class W>
struct load_scaled_rows {
  matrix_view<const T> x;      //!< [T, d] tokens
  matrix_view<Id> expert_ids;  //!< [T, width] plan ids
  matrix_view<W> weights;      //!< [T, width] plan combine weights
  vector_view<Id> counts;      //!< [T] used slots
  index_t expert = 0;          //!< e
  index_t tokens = 0;          //!< T
  index_t d = 0;               //!< model width
  float* rows = nullptr;       //!< [padded rows, d] output

  SWITCHYARD_HD void operator()(index_t t) const {
    const index_t n = d;
    float* out = rows + t * n;
    index_t slot = -1;
    if (t < tokens) {
      const index_t c = counts(t);
      for (index_t j = 0; j < c; ++j)
        if (expert_ids(t, j) == expert) slot = j;
    }
    if (slot < 0) {
      for (index_t i = 0; i < n; ++i) out[i] = 0.0f;
      return;
    }
    const float w = static_cast<float>(weights(t, slot));
    for (index_t i = 0; i < n; ++i) out[i] = w * to_float(x(t, i));
  }
};

//! Loads the tokens as float rows (the dense layout): row t holds x[t] for t < tokens, zeros
//! for the padding rows past it.
template <ElementType T>
struct load_rows {
  matrix_view<const T> x;  //!< [T, d] tokens
  index_t tokens = 0;      //!< T
  index_t d = 0;           //!< model width
  float* rows = nullptr;   //!< [padded rows, d] output

  SWITCHYARD_HD void operator()(index_t t) const {
    const index_t n = d;
    float* out = rows + t * n;
    for (index_t i = 0; i < n; ++i) out[i] = t < tokens ? to_float(x(t, i)) : 0.0f;
  }
};

//! `load_rows` one element at a time, index i = t·d + c (coalesced on the GPU; the same
//! values).
template <ElementType T>
struct load_row_elements {
  load_rows<T> f;  //!< the row form (its members)

  SWITCHYARD_HD void operator()(index_t i) const {
    const index_t n = f.d, t = i / n, c = i - t * n;
    f.rows[i] = t < f.tokens ? to_float(f.x(t, c)) : 0.0f;
  }
};

//! The dense layout's slot rows: for token t, copies expert e's output row t into the pair
//! row of every used slot naming e (`pair_out` is [T·width, d]).
template <class Id>
struct keep_dense_slots {
  matrix_view<Id> expert_ids;  //!< [T, width] plan ids
  vector_view<Id> counts;      //!< [T] used slots
  index_t expert = 0;          //!< e
  index_t width = 0;           //!< plan slots per token
  index_t d = 0;               //!< model width
  const float* rows = nullptr;  //!< [T, d] expert e's output over every token
  float* pair_out = nullptr;    //!< [T·width, d]

  SWITCHYARD_HD void operator()(index_t t) const {
    const index_t c = counts(t), n = d;
    for (index_t j = 0; j < c; ++j) {
      if (expert_ids(t, j) != expert) continue;
      const float* in = rows + t * n;
      float* out = pair_out + dispatch::pair_index(t, j, width) * n;
#if defined(__CUDA_ARCH__)
      for (index_t i = 0; i < n; ++i) out[i] = in[i];
#else
      std::memcpy(out, in, static_cast<std::size_t>(n) * sizeof(float));  // the host's fast copy
#endif
    }
  }
};

}  // namespace switchyard::ops
