// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file bias.hpp
//! Bias add (per row) and bias gradient (per column) of one expert as functors
//! (backend-neutral; see gather.hpp for the convention).

#include "switchyard/core/config.hpp"
#include "switchyard/core/element_type.hpp"

namespace switchyard::ops {

//! m[r, c] += bias[c] for c < cols, one row r. `bias` is expert e's row of the bias view
//! (element c at `bias[c · stride]`).
template <ElementType T>
struct add_bias_rows {
  const T* bias;        //!< expert e's bias row
  index_t stride = 1;   //!< column stride of the bias view
  float* m;             //!< [rows, ld]
  index_t cols = 0;     //!< columns to add to
  index_t ld = 0;       //!< leading dimension of m

  SWITCHYARD_HD void operator()(index_t r) const {
    float* row = m + r * ld;
    for (index_t c = 0; c < cols; ++c) row[c] += to_float(bias[c * stride]);
  }
};

//! db[c] += Σ_{r < rows} m[r, c] for one column c, summed in row order in float and then
//! added once (`db` element c at `db[c · stride]`).
struct bias_grad_columns {
  const float* m;        //!< [rows, ld] the rows' gradients (dY or dH)
  index_t rows = 0;      //!< real rows to sum
  index_t ld = 0;        //!< leading dimension of m
  float* db;             //!< expert e's bias-gradient row
  index_t stride = 1;    //!< column stride of the gradient view

  SWITCHYARD_HD void operator()(index_t c) const {
    float s = 0.0f;
    for (index_t r = 0; r < rows; ++r) s += m[r * ld + c];
    db[c * stride] += s;
  }
};

}  // namespace switchyard::ops
