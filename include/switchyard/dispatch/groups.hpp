// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file groups.hpp
//! What a dispatch policy produces from a routing plan: where each (token, slot) pair's
//! expert output row lives, and which rows each expert computes. Pure planning data (index
//! arrays in caller workspace); the backend executes it.
//!
//! Pair index: `p = t · width + j` (64-bit) for token t and slot j of the plan.

#include <cstdint>

#include <cuda/std/span>

#include "switchyard/core/span.hpp"
#include "switchyard/core/config.hpp"

namespace switchyard::dispatch {

//! `pair_row` value of an unused slot (j >= counts[t]).
inline constexpr index_t unused_pair = -1;
//! `pair_row` value of a pair dropped for lack of expert capacity.
inline constexpr index_t dropped_pair = -2;

//! What a dropped (token, slot) pair contributes to the token's output.
enum class dropped_output {
  zero,          //!< nothing: y_t gets no term for that slot (GShard; the residual carries x)
  scaled_input,  //!< w_tj · x_t: the slot acts as an identity expert (Switch's pass-through)
};

//! How the backend executes the expert FFNs of a dispatch.
enum class dispatch_layout {
  grouped_rows,  //!< gather each expert's pairs into contiguous rows, one GEMM per expert
  all_tokens,    //!< every used expert over every token, then keep the routed rows (dense)
};

//! 64-bit index of pair (t, j) in a plan of `width` slots per token.
SWITCHYARD_HD constexpr index_t pair_index(index_t t, index_t j, index_t width) {
  return t * width + j;
}

//! The dispatch's result over a plan of T tokens, `width` slots and E experts (spans into
//! the caller's workspace). Within an expert's rows the pairs follow the dispatch's order
//! (sorted_grouped: pair order; padded_capacity: the order its `priority` gives the pairs,
//! token- or slot-major); which row a pair holds never changes the combine, which reads each
//! token's slots in slot order through `pair_row`.
struct expert_groups {
  span<index_t> row_begin;  //!< [E] first row of expert e
  span<index_t> row_count;  //!< [E] rows expert e computes (pairs it keeps)
  span<index_t> dropped;    //!< [E] pairs routed to e but dropped (capacity)
  span<index_t> pair_row;   //!< [T·width] row of pair p, unused_pair or dropped_pair
  span<index_t> row_pair;   //!< [num_rows] pair held by each row (grouped_rows)
  index_t num_rows = 0;                  //!< rows of the expert buffers (grouped_rows)
  dropped_output drop = dropped_output::zero;  //!< what a dropped pair contributes

  //! Σ_e dropped[e].
  [[nodiscard]] index_t total_dropped() const {
    index_t n = 0;
    for (auto v : dropped) n += v;
    return n;
  }
};

}  // namespace switchyard::dispatch
