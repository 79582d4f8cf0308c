#pragma once
//! \file gemm.hpp
//! Row-major single-precision GEMM for the host backend: `C = alpha · op(A) · op(B) + beta · C`.
//! With a CBLAS (`SWITCHYARD_HAS_CBLAS` defined by the build and `<cblas.h>` present, e.g.
//! Debian's OpenBLAS) it calls `cblas_sgemm`; otherwise a cache-blocked loop nest (OpenMP
//! over output tiles, each element's k-reduction in one fixed order, so results do not depend
//! on the thread count).

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

namespace switchyard::host {

//! Whether an operand is used as stored or transposed.
enum class op { none, transpose };

//! Name of the GEMM implementation compiled in ("cblas" or "blocked").
inline constexpr const char* gemm_backend_name() {
  return SWITCHYARD_HOST_GEMM_CBLAS ? "cblas" : "blocked";
}

//! While alive, the BLAS runs each call on the calling thread only (OpenBLAS's global thread
//! count is set to 1 and restored on destruction), so independent GEMMs can run in parallel
//! OpenMP threads instead of each being split across threads (small expert GEMMs scale
//! poorly when split). `active()` is false where the BLAS offers no such control.
class blas_single_thread_scope {
 public:
  blas_single_thread_scope() {
#if SWITCHYARD_HOST_BLAS_THREAD_CONTROL
    previous_ = openblas_get_num_threads();
    if (previous_ > 1) openblas_set_num_threads(1);
#endif
  }
  ~blas_single_thread_scope() {
#if SWITCHYARD_HOST_BLAS_THREAD_CONTROL
    if (previous_ > 1) openblas_set_num_threads(previous_);
#endif
  }
  blas_single_thread_scope(const blas_single_thread_scope&) = delete;
  blas_single_thread_scope& operator=(const blas_single_thread_scope&) = delete;
  //! Whether the BLAS really is single-threaded inside this scope.
  [[nodiscard]] static constexpr bool active() { return SWITCHYARD_HOST_BLAS_THREAD_CONTROL != 0; }

 private:
  int previous_ = 1;
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
  cblas_sgemm(CblasRowMajor, ta == op::none ? CblasNoTrans : CblasTrans,
              tb == op::none ? CblasNoTrans : CblasTrans, detail::blas_int("gemm m", m),
              detail::blas_int("gemm n", n), detail::blas_int("gemm k", k), alpha, a,
              detail::blas_int("gemm lda", lda), b, detail::blas_int("gemm ldb", ldb), beta, c,
              detail::blas_int("gemm ldc", ldc));
#else
  detail::sgemm_blocked(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
#endif
}

}  // namespace switchyard::host
