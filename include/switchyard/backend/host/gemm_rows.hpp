// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file gemm_rows.hpp
//! The expert phase's GEMM plumbing: expert weight slices as float panels BLAS can read
//! (converted when their storage or layout needs it), and `gemm_rows`, which picks the
//! batch-invariant kernels, the BLAS or the blocked loops for one call.

#include <climits>
#include <type_traits>

#include "switchyard/backend/host/fixed_gemm.hpp"
#include "switchyard/backend/host/gemm.hpp"
#include "switchyard/backend/host/row_panels.hpp"
#include "switchyard/core/element_type.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/layer/expert_weights.hpp"

namespace switchyard::detail {
using namespace ::switchyard::host;  // this block's helpers use switchyard::host's names

//! A float matrix in memory the GEMM can read: pointer and leading dimension.
struct float_panel {
  const float* data;
  index_t ld;
};

//! Whether a float [E, R, C] view can be read (or written) by BLAS in place: unit column
//! stride and rows at least C apart, and that row stride (the leading dimension) fits the
//! BLAS's 32-bit int. Otherwise the slice goes through a float panel, so a row stride past
//! INT_MAX is computed right instead of failing inside the parallel expert region.
template <class T>
bool blas_layout(const tensor_view<T, 3>& w) {
  return w.stride(2) == 1 && w.stride(1) >= w.extent(2) && w.stride(1) <= INT_MAX;
}

//! Whether expert slices of `w` must be converted to a float panel (non-float storage, or a
//! layout BLAS cannot read directly).
template <ElementType T>
bool needs_panel(const tensor_view<const T, 3>& w) {
  if constexpr (!std::is_same_v<T, float>) {
    return true;
  } else {
    return !blas_layout(w);
  }
}

//! Expert e's slice w[e] as a row-major float matrix, converting into `buffer` if needed.
template <ElementType T>
float_panel expert_panel(const tensor_view<const T, 3>& w, index_t e, float* buffer) {
  const index_t rows = w.extent(1), cols = w.extent(2);
  if (!needs_panel(w)) {
    if constexpr (std::is_same_v<T, float>) {
      return {w.data_handle() + detail::offset3(e, 0, 0, w.stride(0), w.stride(1), w.stride(2)),
              w.stride(1)};
    }
  }
  const T* base = w.data_handle();
  const index_t s0 = w.stride(0), s1 = w.stride(1), s2 = w.stride(2);
  for (index_t r = 0; r < rows; ++r) {
    const T* src = base + detail::offset3(e, r, 0, s0, s1, s2);
    // Callers pass a null buffer only where no panel is needed (returned above).
    // cppcheck-suppress nullPointerArithmetic
    float* dst = buffer + r * cols;
    if (s2 == 1) {
      for (index_t c = 0; c < cols; ++c) dst[c] = to_float(src[c]);
    } else {
      for (index_t c = 0; c < cols; ++c) dst[c] = to_float(src[c * s2]);
    }
  }
  return {buffer, cols};
}

//! Row-major C[m, n] = op(A)·op(B) (+ C when `accumulate`) on the calling thread: the
//! batch-invariant kernels for token-row products (op(A) = A) under `rp.fixed`, the BLAS when
//! the panel rule allows it, else the blocked loops (whose per-element order is fixed).
inline void gemm_rows(const row_panels& rp, op ta, op tb, index_t m, index_t n, index_t k,
                      const float* a, index_t lda, const float* b, index_t ldb, float* c,
                      index_t ldc, bool accumulate = false) {
  const float beta = accumulate ? 1.0f : 0.0f;
  if (rp.fixed && ta == op::none) {
    if (tb == op::transpose) gemm_nt_fixed(m, n, k, a, lda, b, ldb, c, ldc, accumulate);
    else gemm_nn_fixed(m, n, k, a, lda, b, ldb, c, ldc, accumulate);
  } else if (rp.use_blas) sgemm(ta, tb, m, n, k, 1.0f, a, lda, b, ldb, beta, c, ldc);
  else if (m > 0 && n > 0) detail::sgemm_blocked(ta, tb, m, n, k, 1.0f, a, lda, b, ldb, beta, c, ldc);
}

}  // namespace switchyard::detail
