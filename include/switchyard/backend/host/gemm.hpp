// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file gemm.hpp
//! Row-major single-precision GEMM for the host backend: `C = alpha · op(A) · op(B) + beta · C`.
//! With a CBLAS (`SWITCHYARD_HAS_CBLAS` defined by the build and `<cblas.h>` present) it calls
//! its `sgemm`; otherwise a cache-blocked loop nest (OpenMP over output tiles, each element's
//! k-reduction in one fixed order, so results do not depend on the thread count).
//! Which CBLAS is the build's choice (CMake option `SWITCHYARD_BLAS`, docs/blas.md):
//! - scipy-openblas (PyPI's scipy-openblas32, a current OpenBLAS): its `cblas.h` declares every
//!   symbol with the prefix `scipy_` (`scipy_cblas_sgemm`, `scipy_openblas_set_num_threads`), so
//!   it never clashes with another BLAS in the process; the target `switchyard::scipy_openblas`
//!   defines `SWITCHYARD_BLAS_SCIPY_OPENBLAS` and the calls below take the prefixed names;
//! - a system CBLAS (e.g. Debian's OpenBLAS): the plain names.

#include <algorithm>
#include <climits>
#include <cstddef>

#include "switchyard/core/config.hpp"
#include "switchyard/core/error.hpp"

#if defined(SWITCHYARD_HAS_CBLAS) && __has_include(<cblas.h>)
#  include <cblas.h>
#  define SWITCHYARD_HOST_GEMM_CBLAS 1
#else
#  define SWITCHYARD_HOST_GEMM_CBLAS 0
#endif

// OpenBLAS's cblas.h includes openblas_config.h (OPENBLAS_VERSION) and declares its thread
// controls: with them the host backend can run independent expert GEMMs in parallel threads.
#if SWITCHYARD_HOST_GEMM_CBLAS && defined(OPENBLAS_VERSION)
#  define SWITCHYARD_HOST_BLAS_THREAD_CONTROL 1
#else
#  define SWITCHYARD_HOST_BLAS_THREAD_CONTROL 0
#endif

#if SWITCHYARD_HOST_GEMM_CBLAS && defined(SWITCHYARD_BLAS_SCIPY_OPENBLAS)
//! scipy-openblas declares only the prefixed thread controls; these forward OpenBLAS's plain
//! names to them, so that code written against OpenBLAS's cblas.h (tests, user code setting the
//! BLAS's thread count) builds with either library. switchyard's own code calls
//! `switchyard::host::blas_threads()` / `set_blas_threads()`.
inline int openblas_get_num_threads() { return scipy_openblas_get_num_threads(); }
inline void openblas_set_num_threads(int num_threads) { scipy_openblas_set_num_threads(num_threads); }
#endif

namespace switchyard::detail {

#if SWITCHYARD_HOST_GEMM_CBLAS
//! The CBLAS's row-major sgemm under the name the linked library gives it.
inline void cblas_sgemm_row_major(bool trans_a, bool trans_b, int m, int n, int k, float alpha,
                                  const float* a, int lda, const float* b, int ldb, float beta,
                                  float* c, int ldc) {
#  if defined(SWITCHYARD_BLAS_SCIPY_OPENBLAS)
  scipy_cblas_sgemm(
#  else
  cblas_sgemm(
#  endif
      CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, m,
      n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
#endif

#if SWITCHYARD_HOST_BLAS_THREAD_CONTROL
//! OpenBLAS's runtime queries under the names the linked library gives them.
inline int openblas_threads() {
#  if defined(SWITCHYARD_BLAS_SCIPY_OPENBLAS)
  return scipy_openblas_get_num_threads();
#  else
  return ::openblas_get_num_threads();
#  endif
}
inline void set_openblas_threads(int n) {
#  if defined(SWITCHYARD_BLAS_SCIPY_OPENBLAS)
  scipy_openblas_set_num_threads(n);
#  else
  ::openblas_set_num_threads(n);
#  endif
}
//! The kernel set OpenBLAS chose at load time ("SkylakeX", "Haswell", ...).
inline const char* openblas_corename() {
#  if defined(SWITCHYARD_BLAS_SCIPY_OPENBLAS)
  return scipy_openblas_get_corename();
#  else
  return ::openblas_get_corename();
#  endif
}
//! The library's build line ("OpenBLAS 0.3.21 NO_LAPACKE DYNAMIC_ARCH ... SkylakeX MAX_THREADS=64").
inline const char* openblas_config() {
#  if defined(SWITCHYARD_BLAS_SCIPY_OPENBLAS)
  return scipy_openblas_get_config();
#  else
  return ::openblas_get_config();
#  endif
}
#endif

}  // namespace switchyard::detail

namespace switchyard::host {

//! Whether an operand is used as stored or transposed.
enum class op { none, transpose };

//! Name of the GEMM implementation compiled in ("cblas" or "blocked").
inline constexpr const char* gemm_backend_name() {
  return SWITCHYARD_HOST_GEMM_CBLAS ? "cblas" : "blocked";
}

//! The BLAS's own thread count (OpenBLAS's `openblas_get_num_threads()`); 1 where the BLAS
//! offers no thread control.
inline int blas_threads() {
#if SWITCHYARD_HOST_BLAS_THREAD_CONTROL
  return detail::openblas_threads();
#else
  return 1;
#endif
}

//! Sets the BLAS's own thread count (process-wide; OpenBLAS's `openblas_set_num_threads`); does
//! nothing where the BLAS offers no thread control.
inline void set_blas_threads(int n) {
#if SWITCHYARD_HOST_BLAS_THREAD_CONTROL
  detail::set_openblas_threads(n);
#else
  (void)n;
#endif
}

//! While alive, the BLAS runs each call on the calling thread only (OpenBLAS's global thread
//! count is set to 1 and restored on destruction), so independent GEMMs can run in parallel
//! OpenMP threads instead of each being split across threads (small expert GEMMs scale
//! poorly when split). `active()` is false where the BLAS offers no such control.
class blas_single_thread_scope {
 public:
  blas_single_thread_scope() {
#if SWITCHYARD_HOST_BLAS_THREAD_CONTROL
    previous_ = detail::openblas_threads();
    if (previous_ > 1) detail::set_openblas_threads(1);
#endif
  }
  ~blas_single_thread_scope() {
#if SWITCHYARD_HOST_BLAS_THREAD_CONTROL
    if (previous_ > 1) detail::set_openblas_threads(previous_);
#endif
  }
  blas_single_thread_scope(const blas_single_thread_scope&) = delete;
  blas_single_thread_scope& operator=(const blas_single_thread_scope&) = delete;
  //! Whether the BLAS really is single-threaded inside this scope.
  [[nodiscard]] static constexpr bool active() { return SWITCHYARD_HOST_BLAS_THREAD_CONTROL != 0; }

 private:
  [[maybe_unused]] int previous_ = 1;  // read only with SWITCHYARD_HOST_BLAS_THREAD_CONTROL
};

}  // namespace switchyard::host

namespace switchyard::detail {
using namespace ::switchyard::host;  // this block's helpers use switchyard::host's names

//! Element (i, j) of op(M) for a row-major M with leading dimension ld.
SWITCHYARD_FORCEINLINE float op_at(const float* m, index_t ld, op o, index_t i, index_t j) {
  return o == op::none ? m[i * ld + j] : m[j * ld + i];
}

//! Cache-blocked fallback: tiles of C (64 × 128) in parallel, k in panels of 128; every
//! C element sums its k terms in increasing k order whatever the thread count.
inline void sgemm_blocked(op ta, op tb, index_t m, index_t n, index_t k, float alpha,
                          const float* a, index_t lda, const float* b, index_t ldb, float beta,
                          float* c, index_t ldc) {
  constexpr index_t mb = 64, nb = 128, kb = 128;
  const index_t tiles_m = (m + mb - 1) / mb, tiles_n = (n + nb - 1) / nb;
#pragma omp parallel for schedule(static) if (m * n * k > (1 << 18))
  for (index_t tile = 0; tile < tiles_m * tiles_n; ++tile) {
    const index_t i0 = (tile / tiles_n) * mb, j0 = (tile % tiles_n) * nb;
    const index_t i1 = std::min(m, i0 + mb), j1 = std::min(n, j0 + nb);
    float acc[mb][nb];
    for (index_t i = i0; i < i1; ++i)
      for (index_t j = j0; j < j1; ++j) acc[i - i0][j - j0] = 0.0f;
    float bpanel[kb][nb];  // op(B)[p0:p1, j0:j1], contiguous in j for the inner loop
    for (index_t p0 = 0; p0 < k; p0 += kb) {
      const index_t p1 = std::min(k, p0 + kb);
      for (index_t p = p0; p < p1; ++p)
        for (index_t j = j0; j < j1; ++j) bpanel[p - p0][j - j0] = op_at(b, ldb, tb, p, j);
      for (index_t i = i0; i < i1; ++i) {
        float* row = acc[i - i0];
        for (index_t p = p0; p < p1; ++p) {
          const float av = op_at(a, lda, ta, i, p);
          const float* bp = bpanel[p - p0];
          for (index_t j = 0; j < j1 - j0; ++j) row[j] += av * bp[j];
        }
      }
    }
    for (index_t i = i0; i < i1; ++i)
      for (index_t j = j0; j < j1; ++j) {
        float& out = c[i * ldc + j];
        const float v = alpha * acc[i - i0][j - j0];
        out = beta == 0.0f ? v : v + beta * out;
      }
  }
}

inline int blas_int(const char* what, index_t v) {
  if (v < 0 || v > INT_MAX) {
    throw range_error(what, detail::concat(
                                what, ": a BLAS dimension must fit in a 32-bit int (<= ",
                                INT_MAX, "), got ", v));
  }
  return static_cast<int>(v);
}

}  // namespace switchyard::detail

namespace switchyard::host {

//! Row-major `C[m, n] = alpha · op(A) · op(B) + beta · C`; op(A) is [m, k], op(B) is [k, n].
//! Empty products (m, n or k = 0) leave C scaled by beta.
inline void sgemm(op ta, op tb, index_t m, index_t n, index_t k, float alpha, const float* a,
                  index_t lda, const float* b, index_t ldb, float beta, float* c, index_t ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    for (index_t i = 0; i < m; ++i)
      for (index_t j = 0; j < n; ++j) c[i * ldc + j] = beta == 0.0f ? 0.0f : beta * c[i * ldc + j];
    return;
  }
#if SWITCHYARD_HOST_GEMM_CBLAS
  detail::cblas_sgemm_row_major(ta == op::transpose, tb == op::transpose, detail::blas_int("gemm m", m),
                                detail::blas_int("gemm n", n), detail::blas_int("gemm k", k), alpha,
                                a, detail::blas_int("gemm lda", lda), b,
                                detail::blas_int("gemm ldb", ldb), beta, c,
                                detail::blas_int("gemm ldc", ldc));
#else
  detail::sgemm_blocked(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
#endif
}

}  // namespace switchyard::host
