// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file finite.hpp
//! The NaN policy's scan as a per-row functor (backend-neutral; see gather.hpp): the first
//! non-finite column of one row, so that a backend can name the first bad element in
//! row-major order (the host scans in a loop); and as a per-element test (the CUDA backend
//! records the smallest flat index on the device).

#include <cuda/std/cmath>

#include "switchyard/core/config.hpp"
#include "switchyard/core/element_type.hpp"
#include "switchyard/core/view.hpp"

namespace switchyard::ops {

//! First column i of row t with a NaN or Inf, or -1 when the row is finite.
template <ElementType T>
struct first_non_finite {
  matrix_view<const T> x;  //!< [T, d]

  SWITCHYARD_HD index_t operator()(index_t t) const {
    const index_t n = x.extent(1);
    for (index_t i = 0; i < n; ++i) {
      const float v = to_float(x(t, i));
      if (!::cuda::std::isfinite(v)) return i;
    }
    return -1;
  }
};

//! Whether element i = t·d + c of x is a NaN or Inf (`first_non_finite` one element at a time:
//! the smallest such i is t·d + first_non_finite(t) of the first row with one, so a backend
//! keeping the smallest i names the same element; coalesced on the GPU).
template <ElementType T>
struct non_finite_element {
  matrix_view<const T> x;  //!< [T, d]

  SWITCHYARD_HD bool operator()(index_t i) const {
    const index_t n = x.extent(1), t = i / n, c = i - t * n;
    return !::cuda::std::isfinite(to_float(x(t, c)));
  }
};

}  // namespace switchyard::ops
