// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file fixed_gemm.hpp
//! The host backend's batch-invariant GEMMs: row-major products whose every output element
//! is computed by one fixed sequence of float operations that depends on the reduction length
//! only, never on the row count, the row's position, the thread count or the CPU. Used for the
//! GEMMs whose rows are tokens when a layer asks for `batch_invariant` (docs/design.md):
//! a BLAS chooses instructions by call shape and position (measured: OpenBLAS's Haswell/Zen
//! kernels give rows 6–11 of every 12 other bits than rows 0–5), so no row decomposition of
//! BLAS calls can promise a token the same bits whatever its batch.
//!
//! Two forms, each with products rounded before they are added (no fused multiply-add: the
//! functions are compiled with contraction off, so an FMA-capable -march changes nothing):
//! - `gemm_nt_fixed`: C[i, j] = Σ_k A[i, k]·B[j, k] (both operands row-contiguous in k, the
//!   layout of X·Wᵀ): 4 lane partial sums over k ≡ lane (mod 4), in increasing k, then
//!   (l0 + l2) + (l1 + l3), then the k tail in increasing k.
//! - `gemm_nn_fixed`: C[i, j] = Σ_k A[i, k]·B[k, j] (B row-contiguous in j, the layout of
//!   dY·W): one sum per element in increasing k (vectorised across j).

#include <cstddef>
#include <cstdlib>

#include "switchyard/core/config.hpp"

// AVX / AVX-512 versions of the kernels (same bits) where the compiler can target them per
// function and the CPU has them at run time; not under nvcc, whose host pass gets the portable
// code.
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(__CUDACC__)
#  include <immintrin.h>
#  define SWITCHYARD_FIXED_GEMM_AVX 1
#else
#  define SWITCHYARD_FIXED_GEMM_AVX 0
#endif

#if defined(__clang__)
#  define SWITCHYARD_NO_CONTRACT_BEGIN _Pragma("clang fp contract(off)")
#  define SWITCHYARD_NO_CONTRACT_ATTR
#elif defined(__GNUC__)
#  define SWITCHYARD_NO_CONTRACT_BEGIN
#  define SWITCHYARD_NO_CONTRACT_ATTR __attribute__((optimize("fp-contract=off")))
#else
#  define SWITCHYARD_NO_CONTRACT_BEGIN
#  define SWITCHYARD_NO_CONTRACT_ATTR
#endif

namespace switchyard::host {

}  // namespace switchyard::host

namespace switchyard::detail {
using namespace ::switchyard::host;  // this block's helpers use switchyard::host's names

//! Four float lanes (GCC/Clang vector extension: one SSE register on baseline x86-64).
typedef float lanes4 __attribute__((vector_size(16)));

SWITCHYARD_NO_CONTRACT_ATTR inline lanes4 load4(const float* p) {
  lanes4 v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

SWITCHYARD_NO_CONTRACT_ATTR inline void store4(float* p, lanes4 v) {
  __builtin_memcpy(p, &v, sizeof v);
}

//! The fixed lane reduction: (l0 + l2) + (l1 + l3).
SWITCHYARD_NO_CONTRACT_ATTR inline float reduce4(lanes4 v) {
  SWITCHYARD_NO_CONTRACT_BEGIN
  return (v[0] + v[2]) + (v[1] + v[3]);
}

}  // namespace switchyard::detail

namespace switchyard::host {

//! C[m, n] = A[m, k] · B[n, k]ᵀ (or C += that when `accumulate`), fixed per-element order
//! (portable 4-lane code; `gemm_nt_fixed` may run the AVX version, which gives the same bits).
SWITCHYARD_NO_CONTRACT_ATTR inline void gemm_nt_fixed_portable(index_t m, index_t n, index_t k,
                                                     const float* a, index_t lda,
                                                     const float* b, index_t ldb, float* c,
                                                     index_t ldc, bool accumulate) {
  SWITCHYARD_NO_CONTRACT_BEGIN
  using detail::lanes4;
  const index_t k4 = k / 4 * 4;
  index_t i = 0;
  // 2 rows × 4 columns of C per step: 8 lane accumulators.
  for (; i + 2 <= m; i += 2) {
    const float* a0 = a + i * lda;
    const float* a1 = a0 + lda;
    index_t j = 0;
    for (; j + 4 <= n; j += 4) {
      const float* b0 = b + j * ldb;
      const float* b1 = b0 + ldb;
      const float* b2 = b1 + ldb;
      const float* b3 = b2 + ldb;
      lanes4 s00{}, s01{}, s02{}, s03{}, s10{}, s11{}, s12{}, s13{};
      for (index_t p = 0; p < k4; p += 4) {
        const lanes4 x0 = detail::load4(a0 + p), x1 = detail::load4(a1 + p);
        const lanes4 w0 = detail::load4(b0 + p), w1 = detail::load4(b1 + p);
        const lanes4 w2 = detail::load4(b2 + p), w3 = detail::load4(b3 + p);
        s00 = s00 + x0 * w0;
        s01 = s01 + x0 * w1;
        s02 = s02 + x0 * w2;
        s03 = s03 + x0 * w3;
        s10 = s10 + x1 * w0;
        s11 = s11 + x1 * w1;
        s12 = s12 + x1 * w2;
        s13 = s13 + x1 * w3;
      }
      float r[2][4] = {{detail::reduce4(s00), detail::reduce4(s01), detail::reduce4(s02), detail::reduce4(s03)},
                       {detail::reduce4(s10), detail::reduce4(s11), detail::reduce4(s12), detail::reduce4(s13)}};
      for (index_t p = k4; p < k; ++p) {
        for (int q = 0; q < 4; ++q) {
          const float w = b[(j + q) * ldb + p];
          r[0][q] = r[0][q] + a0[p] * w;
          r[1][q] = r[1][q] + a1[p] * w;
        }
      }
      for (int q = 0; q < 4; ++q) {
        float& c0 = c[i * ldc + j + q];
        float& c1 = c[(i + 1) * ldc + j + q];
        c0 = accumulate ? c0 + r[0][q] : r[0][q];
        c1 = accumulate ? c1 + r[1][q] : r[1][q];
      }
    }
    for (; j < n; ++j) {  // remaining columns, the same per-element sequence
      const float* bj = b + j * ldb;
      for (index_t row = 0; row < 2; ++row) {
        const float* ar = row == 0 ? a0 : a1;
        lanes4 s{};
        for (index_t p = 0; p < k4; p += 4) s = s + detail::load4(ar + p) * detail::load4(bj + p);
        float r = detail::reduce4(s);
        for (index_t p = k4; p < k; ++p) r = r + ar[p] * bj[p];
        float& out = c[(i + row) * ldc + j];
        out = accumulate ? out + r : r;
      }
    }
  }
  for (; i < m; ++i) {  // a last odd row, the same per-element sequence
    const float* ar = a + i * lda;
    for (index_t j = 0; j < n; ++j) {
      const float* bj = b + j * ldb;
      lanes4 s{};
      for (index_t p = 0; p < k4; p += 4) s = s + detail::load4(ar + p) * detail::load4(bj + p);
      float r = detail::reduce4(s);
      for (index_t p = k4; p < k; ++p) r = r + ar[p] * bj[p];
      float& out = c[i * ldc + j];
      out = accumulate ? out + r : r;
    }
  }
}

//! C[m, n] = A[m, k] · B[k, n] (or C += that when `accumulate`), fixed per-element order
//! (portable code; `gemm_nn_fixed` may run the AVX version, which gives the same bits):
//! c_ij = (…((a_i0·b_0j) + a_i1·b_1j) + …) + a_i(k−1)·b_(k−1)j, then added to C if accumulating.
SWITCHYARD_NO_CONTRACT_ATTR inline void gemm_nn_fixed_portable(index_t m, index_t n, index_t k,
                                                     const float* a, index_t lda,
                                                     const float* b, index_t ldb, float* c,
                                                     index_t ldc, bool accumulate) {
  SWITCHYARD_NO_CONTRACT_BEGIN
  using detail::lanes4;
  const index_t n8 = n / 8 * 8;
  index_t i = 0;
  for (; i + 4 <= m; i += 4) {  // 4 rows × 8 columns per step: 8 lane accumulators
    for (index_t j = 0; j < n8; j += 8) {
      lanes4 s[4][2] = {};
      for (index_t p = 0; p < k; ++p) {
        const lanes4 w0 = detail::load4(b + p * ldb + j), w1 = detail::load4(b + p * ldb + j + 4);
        for (int r = 0; r < 4; ++r) {
          const float av = a[(i + r) * lda + p];
          const lanes4 x = {av, av, av, av};
          s[r][0] = s[r][0] + x * w0;
          s[r][1] = s[r][1] + x * w1;
        }
      }
      for (int r = 0; r < 4; ++r) {
        float* out = c + (i + r) * ldc + j;
        if (accumulate) {
          detail::store4(out, detail::load4(out) + s[r][0]);
          detail::store4(out + 4, detail::load4(out + 4) + s[r][1]);
        } else {
          detail::store4(out, s[r][0]);
          detail::store4(out + 4, s[r][1]);
        }
      }
    }
  }
  // Remaining columns of the 4-row blocks, then remaining rows: scalar, the same per-element
  // sequence.
  for (index_t row = 0; row < m; ++row) {
    for (index_t j = row < i ? n8 : 0; j < n; ++j) {
      float s = 0.0f;
      for (index_t p = 0; p < k; ++p) s = s + a[row * lda + p] * b[p * ldb + j];
      float& out = c[row * ldc + j];
      out = accumulate ? out + s : s;
    }
  }
}

#if SWITCHYARD_FIXED_GEMM_AVX
// The same per-element sequences with 256-bit registers: in gemm_nt two output columns share
// a register (lanes 0–3 column j, lanes 4–7 column j + 1, each the 4-lane partial sums of the
// portable code); in gemm_nn the lanes are 8 output columns. Products and sums are separate
// instructions (the target has no FMA and contraction is off), so every element sees exactly
// the portable code's operations. Remainder rows/columns run the portable code itself.

__attribute__((target("avx"))) SWITCHYARD_NO_CONTRACT_ATTR inline void gemm_nt_fixed_avx(
    index_t m, index_t n, index_t k, const float* a, index_t lda, const float* b, index_t ldb,
    float* c, index_t ldc, bool accumulate) {
  SWITCHYARD_NO_CONTRACT_BEGIN
  const index_t k4 = k / 4 * 4, m4 = m / 4 * 4, n4 = n / 4 * 4;
  for (index_t i = 0; i < m4; i += 4) {
    for (index_t j = 0; j < n4; j += 4) {
      __m256 s[4][2];
      for (auto& row : s) row[0] = row[1] = _mm256_setzero_ps();
      for (index_t p = 0; p < k4; p += 4) {
        const __m256 w01 = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(b + j * ldb + p)),
                                                _mm_loadu_ps(b + (j + 1) * ldb + p), 1);
        const __m256 w23 = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(b + (j + 2) * ldb + p)),
                                                _mm_loadu_ps(b + (j + 3) * ldb + p), 1);
        for (int r = 0; r < 4; ++r) {
          const __m128 x4 = _mm_loadu_ps(a + (i + r) * lda + p);
          const __m256 x = _mm256_insertf128_ps(_mm256_castps128_ps256(x4), x4, 1);
          s[r][0] = _mm256_add_ps(s[r][0], _mm256_mul_ps(x, w01));
          s[r][1] = _mm256_add_ps(s[r][1], _mm256_mul_ps(x, w23));
        }
      }
      for (int r = 0; r < 4; ++r) {
        const float* ar = a + (i + r) * lda;
        for (index_t h = 0; h < 2; ++h) {
          float l[8];
          _mm256_storeu_ps(l, s[r][h]);
          for (index_t half = 0; half < 2; ++half) {
            const index_t col = j + 2 * h + half;
            const float* lh = l + 4 * half;
            float v = (lh[0] + lh[2]) + (lh[1] + lh[3]);
            const float* bj = b + col * ldb;
            for (index_t p = k4; p < k; ++p) v = v + ar[p] * bj[p];
            float& out = c[(i + r) * ldc + col];
            out = accumulate ? out + v : v;
          }
        }
      }
    }
  }
  if (n4 < n) gemm_nt_fixed_portable(m4, n - n4, k, a, lda, b + n4 * ldb, ldb, c + n4, ldc, accumulate);
  if (m4 < m) gemm_nt_fixed_portable(m - m4, n, k, a + m4 * lda, lda, b, ldb, c + m4 * ldc, ldc, accumulate);
}

__attribute__((target("avx"))) SWITCHYARD_NO_CONTRACT_ATTR inline void gemm_nn_fixed_avx(
    index_t m, index_t n, index_t k, const float* a, index_t lda, const float* b, index_t ldb,
    float* c, index_t ldc, bool accumulate) {
  SWITCHYARD_NO_CONTRACT_BEGIN
  const index_t m4 = m / 4 * 4, n16 = n / 16 * 16;
  for (index_t i = 0; i < m4; i += 4) {
    for (index_t j = 0; j < n16; j += 16) {
      __m256 s[4][2];
      for (auto& row : s) row[0] = row[1] = _mm256_setzero_ps();
      for (index_t p = 0; p < k; ++p) {
        const __m256 w0 = _mm256_loadu_ps(b + p * ldb + j), w1 = _mm256_loadu_ps(b + p * ldb + j + 8);
        for (int r = 0; r < 4; ++r) {
          const __m256 x = _mm256_set1_ps(a[(i + r) * lda + p]);
          s[r][0] = _mm256_add_ps(s[r][0], _mm256_mul_ps(x, w0));
          s[r][1] = _mm256_add_ps(s[r][1], _mm256_mul_ps(x, w1));
        }
      }
      for (int r = 0; r < 4; ++r) {
        float* out = c + (i + r) * ldc + j;
        for (index_t h = 0; h < 2; ++h) {
          const __m256 v = accumulate ? _mm256_add_ps(_mm256_loadu_ps(out + 8 * h), s[r][h]) : s[r][h];
          _mm256_storeu_ps(out + 8 * h, v);
        }
      }
    }
  }
  if (n16 < n) gemm_nn_fixed_portable(m4, n - n16, k, a, lda, b + n16, ldb, c + n16, ldc, accumulate);
  if (m4 < m) gemm_nn_fixed_portable(m - m4, n, k, a + m4 * lda, lda, b, ldb, c + m4 * ldc, ldc, accumulate);
}

// AVX-512: four output columns share a register (lanes 4q..4q+3 hold column j + q's 4-lane
// partial sums), 4 rows × 8 columns per step; the rest as in the AVX version.
__attribute__((target("avx512f"))) SWITCHYARD_NO_CONTRACT_ATTR inline void gemm_nt_fixed_avx512(
    index_t m, index_t n, index_t k, const float* a, index_t lda, const float* b, index_t ldb,
    float* c, index_t ldc, bool accumulate) {
  SWITCHYARD_NO_CONTRACT_BEGIN
  const index_t k4 = k / 4 * 4, m4 = m / 4 * 4, n8 = n / 8 * 8;
  for (index_t i = 0; i < m4; i += 4) {
    for (index_t j = 0; j < n8; j += 8) {
      __m512 s[4][2];
      for (auto& row : s) row[0] = row[1] = _mm512_setzero_ps();
      for (index_t p = 0; p < k4; p += 4) {
        __m512 w0 = _mm512_castps128_ps512(_mm_loadu_ps(b + j * ldb + p));  // b[j + q][p..p+3]
        w0 = _mm512_insertf32x4(w0, _mm_loadu_ps(b + (j + 1) * ldb + p), 1);  // in quarter q
        w0 = _mm512_insertf32x4(w0, _mm_loadu_ps(b + (j + 2) * ldb + p), 2);
        w0 = _mm512_insertf32x4(w0, _mm_loadu_ps(b + (j + 3) * ldb + p), 3);
        __m512 w1 = _mm512_castps128_ps512(_mm_loadu_ps(b + (j + 4) * ldb + p));
        w1 = _mm512_insertf32x4(w1, _mm_loadu_ps(b + (j + 5) * ldb + p), 1);
        w1 = _mm512_insertf32x4(w1, _mm_loadu_ps(b + (j + 6) * ldb + p), 2);
        w1 = _mm512_insertf32x4(w1, _mm_loadu_ps(b + (j + 7) * ldb + p), 3);
        for (int r = 0; r < 4; ++r) {
          const __m512 x =  // masked form: the unmasked one trips GCC 12 -Wmaybe-uninitialized
              _mm512_mask_broadcast_f32x4(_mm512_setzero_ps(), 0xFFFF, _mm_loadu_ps(a + (i + r) * lda + p));
          s[r][0] = _mm512_add_ps(s[r][0], _mm512_mul_ps(x, w0));
          s[r][1] = _mm512_add_ps(s[r][1], _mm512_mul_ps(x, w1));
        }
      }
      for (int r = 0; r < 4; ++r) {
        const float* ar = a + (i + r) * lda;
        for (index_t h = 0; h < 2; ++h) {
          float l[16];
          _mm512_storeu_ps(l, s[r][h]);
          for (index_t q = 0; q < 4; ++q) {
            const index_t col = j + 4 * h + q;
            const float* lq = l + 4 * q;
            float v = (lq[0] + lq[2]) + (lq[1] + lq[3]);
            const float* bj = b + col * ldb;
            for (index_t p = k4; p < k; ++p) v = v + ar[p] * bj[p];
            float& out = c[(i + r) * ldc + col];
            out = accumulate ? out + v : v;
          }
        }
      }
    }
  }
  if (n8 < n) gemm_nt_fixed_portable(m4, n - n8, k, a, lda, b + n8 * ldb, ldb, c + n8, ldc, accumulate);
  if (m4 < m) gemm_nt_fixed_portable(m - m4, n, k, a + m4 * lda, lda, b, ldb, c + m4 * ldc, ldc, accumulate);
}
#endif

//! Which versions of the fixed kernels run (all give the same bits): 0 portable, 1 AVX,
//! 2 AVX-512 (X·Wᵀ only); the best the CPU has, capped by SWITCHYARD_FIXED_GEMM_PORTABLE
//! (set: portable) or SWITCHYARD_FIXED_GEMM_AVX (set: at most AVX), so tests can check each.
inline int fixed_gemm_level() {
#if SWITCHYARD_FIXED_GEMM_AVX
  static const int level = [] {
    if (std::getenv("SWITCHYARD_FIXED_GEMM_PORTABLE") != nullptr || !__builtin_cpu_supports("avx")) return 0;
    if (std::getenv("SWITCHYARD_FIXED_GEMM_AVX") != nullptr || !__builtin_cpu_supports("avx512f")) return 1;
    return 2;
  }();
  return level;
#else
  return 0;
#endif
}

//! C[m, n] = A[m, k] · B[n, k]ᵀ (or C += that when `accumulate`), fixed per-element order:
//! 4 lane partial sums over k ≡ lane (mod 4), then (l0 + l2) + (l1 + l3), then the k tail.
inline void gemm_nt_fixed(index_t m, index_t n, index_t k, const float* a, index_t lda,
                          const float* b, index_t ldb, float* c, index_t ldc, bool accumulate) {
#if SWITCHYARD_FIXED_GEMM_AVX
  if (fixed_gemm_level() == 2) return gemm_nt_fixed_avx512(m, n, k, a, lda, b, ldb, c, ldc, accumulate);
  if (fixed_gemm_level() == 1) return gemm_nt_fixed_avx(m, n, k, a, lda, b, ldb, c, ldc, accumulate);
#endif
  gemm_nt_fixed_portable(m, n, k, a, lda, b, ldb, c, ldc, accumulate);
}

//! C[m, n] = A[m, k] · B[k, n] (or C += that when `accumulate`), fixed per-element order: one
//! sum per element in increasing k.
inline void gemm_nn_fixed(index_t m, index_t n, index_t k, const float* a, index_t lda,
                          const float* b, index_t ldb, float* c, index_t ldc, bool accumulate) {
#if SWITCHYARD_FIXED_GEMM_AVX
  if (fixed_gemm_level() >= 1) return gemm_nn_fixed_avx(m, n, k, a, lda, b, ldb, c, ldc, accumulate);
#endif
  gemm_nn_fixed_portable(m, n, k, a, lda, b, ldb, c, ldc, accumulate);
}

}  // namespace switchyard::host
