// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file sorted_grouped.hpp
//! `dispatch::sorted_grouped`: the (token, slot) pairs sorted by expert. Every pair gets the
//! key of its expert id, an unused slot the sentinel key E; a stable counting sort (histogram
//! over E + 1 keys, exclusive scan, scatter in pair order) puts each expert's pairs in
//! contiguous rows in token order, the unused ones last. The backend runs one GEMM per
//! expert over its rows and combines each token's slots by gathering them in slot order (no
//! scatter-add, so the output is bitwise deterministic).
//!
//! The host backend plans it in `backend/host/dispatch_plan.hpp` (`host::plan_groups`).

#include <cstdint>

#include "switchyard/dispatch/concepts.hpp"
#include "switchyard/dispatch/groups.hpp"

namespace switchyard::dispatch {

//! Sort-by-expert dispatch (the GPU default; on the host the same grouping feeds BLAS).
struct sorted_grouped {
  using policy_kind = dispatch_tag;
  //! Each expert's rows are gathered contiguously.
  static constexpr dispatch_layout layout = dispatch_layout::grouped_rows;

  //! No hyperparameters to check.
  void validate() const {}

  //! Rows of the expert buffers: at most one per (token, slot).
  [[nodiscard]] SWITCHYARD_HD index_t max_rows(index_t tokens, index_t width,
                                              index_t /*experts*/) const {
    return tokens * width;
  }

  //! Sort key of a slot: its expert id, or E for an unused slot (sorts last).
  SWITCHYARD_HD static constexpr index_t key(std::int32_t id, bool used, index_t experts) {
    return used ? static_cast<index_t>(id) : experts;
  }
};

static_assert(check_dispatch<sorted_grouped>());

}  // namespace switchyard::dispatch
