// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file expert_phase.hpp
//! The sizes and row layout of one host expert phase: `expert_dims`, the row-panel rule it
//! uses, the index arrays and work items carved from the workspace, the re-layout of a
//! grouped dispatch's rows in panels, and the gather of token rows into them.

#include <algorithm>
#include <cstddef>

#include "switchyard/backend/host/gemm.hpp"
#include "switchyard/backend/host/row_panels.hpp"
#include "switchyard/backend/host/run_ops.hpp"
#include "switchyard/core/element_type.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/core/workspace.hpp"
#include "switchyard/dispatch/groups.hpp"
#include "switchyard/ops/gather.hpp"

namespace switchyard::host {

//! Sizes the expert execution works with.
struct expert_dims {
  index_t tokens = 0;    //!< T
  index_t width = 0;     //!< plan slots per token
  index_t experts = 0;   //!< E
  index_t d = 0;         //!< model width
  index_t d_ff = 0;      //!< expert hidden width
  index_t p = 0;         //!< first-projection width: d_ff or 2·d_ff (gated)
  index_t max_rows = 0;  //!< rows the dispatch's planning may address (dispatch's max_rows)
  bool batch_invariant = false;  //!< token-row GEMMs on the fixed-order kernels
  //! Llama-4: w_tj scales the gathered input row; the combine then sums unweighted outputs.
  bool weight_on_input = false;
};

//! The row rule of a phase: batch-invariant kernels when asked, else BLAS row panels.
inline row_panels panels_for(const expert_dims& dm) {
  return dm.batch_invariant ? row_panels::batch_invariant() : row_panels::for_shape(dm.d, dm.d_ff);
}

//! Most conversion-panel slots a phase carves (`panel_slots`).
inline constexpr index_t max_panel_slots = 8;
//! Bytes of conversion panels a phase may carve beyond its first slot (`panel_slots`).
inline constexpr double panel_slot_budget = 64.0 * 1024 * 1024;

//! Conversion-panel slots of a phase whose expert weights need a float panel (half /
//! bfloat16 storage, a layout BLAS cannot read): as many experts are converted and run at
//! once, one per thread. A function of the shapes alone (the workspace query sees no thread
//! count): min(max_panel_slots, E, slots whose W1 + W2 panels fit panel_slot_budget), at
//! least 1. Results do not depend on it: each expert is one thread's, in any slot.
inline index_t panel_slots(const expert_dims& dm) {
  const double slot_bytes =
      4.0 * (static_cast<double>(dm.p) * static_cast<double>(dm.d) +
             static_cast<double>(dm.d) * static_cast<double>(dm.d_ff));
  index_t fit = max_panel_slots;
  if (slot_bytes > 0.0 && panel_slot_budget / slot_bytes < static_cast<double>(max_panel_slots))
    fit = static_cast<index_t>(panel_slot_budget / slot_bytes);
  return std::max<index_t>(1, std::min<index_t>(fit, std::max<index_t>(dm.experts, 1)));
}

}  // namespace switchyard::host

namespace switchyard::detail {
using namespace ::switchyard::host;  // this block's helpers use switchyard::host's names

//! One GEMM call's worth of an expert's rows: rows [row, row + rows) of the padded layout.
struct work_item {
  index_t expert;
  index_t row;
  index_t rows;
};

//! Index arrays and work items of one expert phase, carved from the workspace.
struct phase_layout {
  dispatch::expert_groups g;     //!< the dispatch's groups, then re-laid out in panels
  index_t* padded_begin = nullptr;      //!< [E] first row of expert e in the padded layout
  index_t* padded_row_pair = nullptr;   //!< [padded rows] pair of each row, -1 for padding
  work_item* items = nullptr;           //!< forward work items
  index_t max_items = 0;
  index_t padded_rows = 0;              //!< rows of the padded buffers
};

//! Rows of the padded buffers: grouped layouts hold at most min(max_rows, T·width) real rows
//! over at most E experts; the dense layout holds T rows.
inline index_t padded_row_bound(const expert_dims& dm, const row_panels& rp, bool grouped) {
  if (!grouped) return rp.padded(dm.tokens);
  const index_t real = std::min(dm.max_rows, dm.tokens * dm.width);
  return rp.bound(real, dm.experts);
}

//! Carves the index arrays every dispatch fills, and the padded layout's.
inline phase_layout carve_layout(workspace_arena& ws, const expert_dims& dm, const row_panels& rp,
                                 bool grouped) {
  phase_layout l;
  const index_t pairs = dm.tokens * dm.width;
  const index_t plan_rows = std::max(dm.max_rows, pairs);
  l.padded_rows = padded_row_bound(dm, rp, grouped);
  l.max_items = l.padded_rows / row_panels::block + std::max<index_t>(dm.experts, 1);
  index_t* begin = ws.take<index_t>(dm.experts);
  index_t* count = ws.take<index_t>(dm.experts);
  index_t* dropped = ws.take<index_t>(dm.experts);
  index_t* pair_row = ws.take<index_t>(pairs);
  index_t* row_pair = ws.take<index_t>(plan_rows);
  l.padded_begin = ws.take<index_t>(dm.experts);
  l.padded_row_pair = ws.take<index_t>(l.padded_rows);
  l.items = ws.take<work_item>(l.max_items);
  if (ws.carving()) {
    l.g.row_begin = {begin, static_cast<std::size_t>(dm.experts)};
    l.g.row_count = {count, static_cast<std::size_t>(dm.experts)};
    l.g.dropped = {dropped, static_cast<std::size_t>(dm.experts)};
    l.g.pair_row = {pair_row, static_cast<std::size_t>(pairs)};
    l.g.row_pair = {row_pair, static_cast<std::size_t>(plan_rows)};
  }
  return l;
}

//! Re-lays a grouped dispatch's rows out in panels: expert e's n_e rows move to
//! [padded_begin[e], padded_begin[e] + n_e) (same order), followed by padding rows up to
//! padded(n_e); pair_row follows, row_begin/row_pair/num_rows now describe the padded layout.
//! Returns the forward work items (one per block of each non-empty expert) in expert order.
inline index_t pad_groups(phase_layout& l, const row_panels& rp, index_t experts) {
  dispatch::expert_groups& g = l.g;
  index_t next = 0, items = 0;
  for (index_t e = 0; e < experts; ++e) {
    const index_t n = g.row_count[e], old = g.row_begin[e], padded = rp.padded(n);
    l.padded_begin[e] = next;
    for (index_t i = 0; i < n; ++i) {
      const index_t pair = g.row_pair[old + i];
      g.pair_row[pair] = next + i;
      l.padded_row_pair[next + i] = pair;
    }
    for (index_t i = n; i < padded; ++i) l.padded_row_pair[next + i] = dispatch::unused_pair;
    for (index_t r = 0; r < padded; r += row_panels::block)
      l.items[items++] = {e, next + r, std::min(row_panels::block, padded - r)};
    next += padded;
  }
  g.row_begin = {l.padded_begin, static_cast<std::size_t>(experts)};
  g.row_pair = {l.padded_row_pair, static_cast<std::size_t>(next)};
  g.num_rows = next;
  return items;
}

//! Runs the row functor `gather` over every expert's padded rows; one OpenMP region over
//! experts, each expert's rows in order (each row written by one call alone).
template <class Gather>
void gather_groups_with(const Gather& gather, const dispatch::expert_groups& g,
                        const row_panels& rp, index_t experts, index_t d) {
#pragma omp parallel for schedule(dynamic) if (g.num_rows * d > (1 << 15))
  for (index_t e = 0; e < experts; ++e) {
    const index_t r0 = g.row_begin[e];
    run_range(r0, r0 + rp.padded(g.row_count[e]), gather);
  }
}

//! Gathers every expert's padded rows as float (`ops::gather_rows`: padding rows zero).
template <ElementType T>
void gather_groups(const matrix_view<const T>& x, const dispatch::expert_groups& g,
                   const row_panels& rp, index_t experts, index_t width, float* rows) {
  const index_t d = x.extent(1);
  gather_groups_with(ops::gather_rows<T>{x, g.row_pair.data(), width, d, rows}, g, rp, experts, d);
}

//! Gathers the padded rows of the phase: w_tj · x_t when `dm.weight_on_input`
//! (`ops::gather_scaled_rows`), else x_t (`gather_groups`); padding rows zero.
template <ElementType T, class W>
void gather_phase_rows(const matrix_view<const T>& x, const matrix_view<W>& weights,
                       const dispatch::expert_groups& g, const row_panels& rp,
                       const expert_dims& dm, float* rows) {
  if (!dm.weight_on_input) {
    gather_groups(x, g, rp, dm.experts, dm.width, rows);
    return;
  }
  gather_groups_with(ops::gather_scaled_rows<T, W>{x, weights, g.row_pair.data(), dm.width, dm.d, rows},
                     g, rp, dm.experts, dm.d);
}

//! The work items of the dense layout for one expert: blocks of the padded T rows.
inline index_t dense_items(const row_panels& rp, index_t tokens, index_t e, work_item* items) {
  const index_t padded = rp.padded(tokens);
  index_t n = 0;
  for (index_t r = 0; r < padded; r += row_panels::block)
    items[n++] = {e, r, std::min(row_panels::block, padded - r)};
  return n;
}

//! Throws range_error unless every GEMM dimension of the phase fits the BLAS's 32-bit ints
//! (checked before any parallel region).
inline void check_gemm_dims(const expert_dims& dm, index_t rows) {
  detail::blas_int("d", dm.d);
  detail::blas_int("projection width", dm.p);
  detail::blas_int("d_ff", dm.d_ff);
  detail::blas_int("expert rows", rows);
}

}  // namespace switchyard::detail

namespace switchyard::host {

}  // namespace switchyard::host
