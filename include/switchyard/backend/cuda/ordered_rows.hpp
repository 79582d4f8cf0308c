#pragma once
//! \file ordered_rows.hpp
//! Device layouts of the router's long fixed-order sums (`__host__ __device__`, host-testable,
//! no CUDA runtime): the same floating-point operations in the same order as the ops/ functors
//! they replace on the GPU — so the same bits — with the work laid out for the GPU:
//! - `staged_column_sums`, `staged_mean`: the pieces of the one-block kernels of
//!   backend/cuda/route_reductions.cuh that run ops::expert_column_sums and ops::mean_of_rows
//!   (one thread per expert over T tokens in order: 1 ms and 264 µs per call there): a block's
//!   threads stage a chunk of the inputs in shared memory and count slots (integers: exact in
//!   any order), then one thread adds the staged values in token order, as the functor does.

#include <cstdint>

#include "switchyard/core/config.hpp"
#include "switchyard/ops/route_losses.hpp"

namespace switchyard::cuda {

//! Tokens one chunk of the staged reductions holds.
inline constexpr index_t staged_chunk = 1024;

//! The pieces of the staged `ops::expert_column_sums` (see the file comment).
struct staged_column_sums {
  ops::expert_column_sums f;  //!< the plain functor (its members)

  //! Counted slots of token t naming expert e (the functor's count, one token).
  SWITCHYARD_HD index_t count(index_t e, index_t t) const { return f.count_of(e, t); }
  //! P̄'s term of token t for expert e.
  SWITCHYARD_HD float prob(index_t e, index_t t) const { return f.probs[t * f.experts + e]; }
  //! pe + the n staged terms, in order (the functor's double additions).
  SWITCHYARD_HD static double add(double pe, const float* staged, index_t n) {
    for (index_t k = 0; k < n; ++k) pe += staged[k];
    return pe;
  }
};

//! The pieces of the staged `ops::mean_of_rows`.
struct staged_mean {
  ops::mean_of_rows f;  //!< the plain functor (its members)

  //! s + the n staged rows, in order (the functor's double additions).
  SWITCHYARD_HD static double add(double s, const double* staged, index_t n) {
    for (index_t k = 0; k < n; ++k) s += staged[k];
    return s;
  }
  //! The value from the sum (the functor's division and rounding; 0 for T = 0).
  SWITCHYARD_HD float finish(double s) const {
    return f.tokens == 0 ? 0.0f : static_cast<float>(s / f.tokens);
  }
};

}  // namespace switchyard::cuda
