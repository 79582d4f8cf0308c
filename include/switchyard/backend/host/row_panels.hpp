// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file row_panels.hpp
//! The row-panel rule of the host backend: how the rows of one expert are cut into GEMM calls
//! so that a token's result is bitwise the same whatever the thread count and whatever other
//! tokens share its batch (docs/design.md, "Same bits on any machine").
//!
//! A BLAS computes row i of `C = A·op(B)` from row i of A and B only, but *which* instructions
//! it uses depends on the call's shape. Measured with Debian's OpenBLAS 0.3.21 over every x86-64
//! kernel set it ships (`OPENBLAS_CORETYPE` = Prescott … Sandybridge, Haswell, Zen, SkylakeX,
//! Cooperlake), and again with scipy-openblas32's OpenBLAS 0.3.34 (the default BLAS,
//! docs/blas.md), which ships five x86-64 sets: Katmai (what Prescott/Core2/Penryn/Opteron
//! select), Nehalem, Sandybridge, Haswell (also for Zen) and SkylakeX (also for Cooperlake and
//! SapphireRapids). 0.3.34 behaves as 0.3.21 on every point below: the same SkylakeX
//! small-kernel bound (rows of an NN call change kernel exactly up to M·N·K = 10^6; NT calls
//! switch below it), SSE row tails below 4 rows (Katmai), Haswell's 6-of-12 row split; so the
//! rule is unchanged, and `blas_batch_invariant()` is true on Katmai, Nehalem, Sandybridge and
//! SkylakeX, false on Haswell:
//! - A multi-threaded call splits the rows at thread-count-dependent places (seen: 1 vs 2
//!   threads differ on Haswell/Zen kernels). Every call here is single-threaded
//!   (`blas_single_thread_scope`); parallelism comes from running independent calls (experts,
//!   row blocks) on OpenMP threads, a partition fixed by the data alone. This alone gives
//!   thread invariance, on every kernel set.
//! - Prescott/Core2/Penryn/Dunnington handle a row tail shorter than 4 with other
//!   instructions: calls here have a multiple of 4 rows.
//! - SkylakeX/Cooperlake take "small-matrix" kernels, which sum in another order, when
//!   M·N·K ≤ 10^6: a call with more rows switches kernel. Calls here stay above that bound.
//! - Haswell/Zen compute rows 6–11 of every 12 with other instructions than rows 0–5, whatever
//!   the call's shape: no row decomposition makes a token's bits independent of its position,
//!   so on those kernels only `batch_invariant` layers (fixed_gemm.hpp) are batch-invariant.
//! So each expert's rows are padded to `padded(n)` rows: blocks of `block` rows, then a tail
//! rounded up to a multiple of `granule` and to at least `min_rows`; padding rows are zero and
//! their outputs ignored. `host::blas_batch_invariant()` probes whether the linked BLAS then
//! treats every row alike; `tests/host/layer/test_moe_layer_invariance.cpp` checks the layer.
//!
//! Where the smallest call would need more than `block` rows to pass the small-kernel bound
//! (d·d_ff < 10^6 / block: toy shapes), the backend uses its own blocked GEMM instead, whose
//! per-element arithmetic (k summed in increasing order) does not depend on the call's shape.

#include <algorithm>

#include "switchyard/core/config.hpp"

namespace switchyard::host {

//! How an expert's rows become GEMM calls (see the file comment).
struct row_panels {
  //! Every call's row count is a multiple of this (Prescott…Dunnington row tails).
  static constexpr index_t granule = 4;
  //! Rows of one work item (one call per GEMM); a multiple of `granule`.
  static constexpr index_t block = 384;
  //! OpenBLAS's SkylakeX small-matrix kernels take M·N·K ≤ this; calls stay above it.
  static constexpr double small_kernel_bound = 1.0e6;

  index_t min_rows = granule;  //!< fewest rows of a call (a multiple of granule, <= block)
  bool use_blas = true;        //!< false: the backend's own blocked GEMM for toy shapes
  bool fixed = false;          //!< token-row GEMMs on the batch-invariant kernels (no padding)

  //! The batch-invariant rule: fixed-order kernels, so rows need no padding.
  [[nodiscard]] static constexpr row_panels batch_invariant() {
    row_panels r;
    r.fixed = true;
    r.min_rows = 1;
    return r;
  }

  //! The rule for experts of model width d and hidden width d_ff: the smallest N·K among the
  //! GEMMs whose rows are tokens is d·d_ff (H = X·W1ᵀ has p·d ≥ d·d_ff).
  [[nodiscard]] static constexpr row_panels for_shape(index_t d, index_t d_ff) {
    row_panels r;
    const double nk = static_cast<double>(d) * static_cast<double>(d_ff);
    index_t need = granule;
    if (nk > 0.0) {
      const double rows = small_kernel_bound / nk;  // calls need M > rows
      need = rows >= static_cast<double>(block) ? block + 1 : static_cast<index_t>(rows) + 1;
    }
    need = (need + granule - 1) / granule * granule;
    if (need > block) {
      r.use_blas = false;
      r.min_rows = granule;
    } else {
      r.min_rows = std::max(granule, need);
    }
    return r;
  }

  //! Rows an expert with n real rows occupies: full blocks, then the tail rounded up.
  [[nodiscard]] constexpr index_t padded(index_t n) const {
    if (n <= 0) return 0;
    if (fixed) return n;
    const index_t full = n / block * block, tail = n - full;
    if (tail == 0) return full;
    return full + std::max((tail + granule - 1) / granule * granule, min_rows);
  }

  //! Upper bound on Σ_e padded(n_e) when Σ_e n_e <= rows over at most `groups` experts.
  [[nodiscard]] constexpr index_t bound(index_t rows, index_t groups) const {
    if (fixed) return rows;
    return rows + std::min(groups, rows) * (std::max(granule, min_rows) - 1);
  }

  //! Work items (one per block) an expert of n real rows splits into.
  [[nodiscard]] static constexpr index_t blocks(index_t padded_rows) {
    return (padded_rows + block - 1) / block;
  }
};

}  // namespace switchyard::host
