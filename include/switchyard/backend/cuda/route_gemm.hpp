// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file route_gemm.hpp
//! The linear scoring's three GEMMs as row-major intents (`cuda::gemm_desc`, mapped to
//! cuBLAS's column-major call by `cuda::to_column_major` in the one place the expert GEMMs
//! are mapped too; backend/cuda/gemm.hpp, which g++ compiles), so that the host tests check
//! them against the host's loops:
//!
//!     logits  L  [T, E]  = x [T, d] · Wᵀ          (W [E, d])
//!     d_x     dx [T, d] += dL [T, E] · W
//!     grad_w  gW [E, d] += dLᵀ · x                (K = T)
//!
//! `blas_compatible` says whether cuBLAS can take a description (32-bit sizes >= 1, leading
//! dimensions covering the rows); where it cannot, the CUDA router runs the element functors
//! of route_rows.hpp instead of throwing.

#include <algorithm>
#include <limits>

#include "switchyard/backend/cuda/gemm.hpp"
#include "switchyard/core/config.hpp"

namespace switchyard::ops {

//! logits [T, E] = x [T, d] · wᵀ (x row stride ld_x, w row stride ld_w).
[[nodiscard]] constexpr cuda::gemm_desc router_logits_gemm(index_t tokens, index_t d,
                                                           index_t experts, index_t ld_x,
                                                           index_t ld_w) {
  cuda::gemm_desc g;
  g.op_a = cuda::gemm_op::none;
  g.op_b = cuda::gemm_op::transpose;
  g.m = tokens, g.n = experts, g.k = d;
  g.lda = ld_x, g.ldb = ld_w, g.ldc = experts;
  g.beta = 0.0f;
  return g;
}

//! dx [T, d] += d_logits [T, E] · w [E, d] (w row stride ld_w, dx row stride ld_dx).
[[nodiscard]] constexpr cuda::gemm_desc router_dx_gemm(index_t tokens, index_t d, index_t experts,
                                                       index_t ld_w, index_t ld_dx) {
  cuda::gemm_desc g;
  g.op_a = cuda::gemm_op::none;
  g.op_b = cuda::gemm_op::none;
  g.m = tokens, g.n = d, g.k = experts;
  g.lda = experts, g.ldb = ld_w, g.ldc = ld_dx;
  g.beta = 1.0f;
  return g;
}

//! grad_w [E, d] += d_logitsᵀ [E, T] · x [T, d] (x row stride ld_x, grad_w row stride ld_g).
[[nodiscard]] constexpr cuda::gemm_desc router_grad_w_gemm(index_t tokens, index_t d,
                                                           index_t experts, index_t ld_x,
                                                           index_t ld_g) {
  cuda::gemm_desc g;
  g.op_a = cuda::gemm_op::transpose;
  g.op_b = cuda::gemm_op::none;
  g.m = experts, g.n = d, g.k = tokens;
  g.lda = experts, g.ldb = ld_x, g.ldc = ld_g;
  g.beta = 1.0f;
  return g;
}

//! Whether cuBLAS can run `g` as it is: every size in [1, 2^31) and each leading dimension
//! at least its stored row (to_column_major would throw otherwise).
[[nodiscard]] constexpr bool blas_compatible(const cuda::gemm_desc& g) {
  constexpr index_t most = std::numeric_limits<int>::max();
  const auto fits = [](index_t v) { return v >= 1 && v <= most; };
  return fits(g.m) && fits(g.n) && fits(g.k) && fits(g.lda) && fits(g.ldb) && fits(g.ldc) &&
         g.lda >= std::max<index_t>(g.a_cols(), 1) && g.ldb >= std::max<index_t>(g.b_cols(), 1) &&
         g.ldc >= std::max<index_t>(g.n, 1);
}

}  // namespace switchyard::ops
