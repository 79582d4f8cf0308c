// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file blas_probe.hpp
//! `host::blas_batch_invariant()`: whether the linked BLAS keeps a token row's bits wherever
//! the row-panel rule puts it.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "switchyard/backend/host/gemm.hpp"
#include "switchyard/backend/host/gemm_rows.hpp"
#include "switchyard/backend/host/row_panels.hpp"

namespace switchyard::host {

//! Whether the linked BLAS gives a token row the same bits wherever the row-panel rule puts it
//! (any position inside a call, any call row count the rule allows), i.e. whether a layer
//! without `batch_invariant` is batch-invariant on this machine too. Probed once with a few
//! single-threaded products of the two token-row forms (X·Wᵀ and dY·W) and cached. True
//! without a BLAS (the blocked fallback's per-element order is fixed). Thread invariance does
//! not depend on it.
inline bool blas_batch_invariant() {
  static const bool invariant = [] {
    if (!SWITCHYARD_HOST_GEMM_CBLAS) return true;
    const blas_single_thread_scope single_threaded_blas;
    constexpr index_t n = 320, k = 320, max_m = 32;
    const row_panels rp = row_panels::for_shape(n, k);
    std::vector<float> a(max_m * k), b(n * k), c(max_m * n), ref(n), x(k);
    std::uint32_t state = 12345u;  // a small LCG: values in [-1, 1)
    auto next = [&] {
      state = state * 1664525u + 1013904223u;
      return static_cast<float>(state >> 8) / 8388608.0f - 1.0f;
    };
    for (auto& v : b) v = next();
    for (auto& v : x) v = next();
    for (const op tb : {op::transpose, op::none}) {
      bool first = true;
      for (index_t m = rp.min_rows; m <= max_m; m += row_panels::granule) {
        for (index_t q = 0; q < m; ++q) {
          for (auto& v : a) v = next();
          std::copy(x.begin(), x.end(), a.begin() + q * k);
          detail::gemm_rows(rp, op::none, tb, m, n, k, a.data(), k, b.data(), tb == op::transpose ? k : n,
                            c.data(), n);
          if (first) {
            std::copy_n(c.begin() + q * n, n, ref.begin());
            first = false;
          } else if (!std::equal(ref.begin(), ref.end(), c.begin() + q * n)) {
            return false;
          }
        }
      }
    }
    return true;
  }();
  return invariant;
}

}  // namespace switchyard::host
