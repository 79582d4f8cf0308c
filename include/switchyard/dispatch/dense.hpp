// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file dense.hpp
//! `dispatch::dense`: every expert over every token, masked by the plan: the backend runs
//! each expert the plan uses on all T tokens and keeps, for each (token, slot) pair, the row
//! of the expert that slot names. The reference dispatch, and the choice for tiny E. Experts
//! no token is routed to are skipped (their output would be masked away), which also keeps
//! DynMoE's inactive slots unread.
//!
//! The host backend plans it in `backend/host/dispatch_plan.hpp` (`host::plan_groups`).

#include "switchyard/dispatch/concepts.hpp"
#include "switchyard/dispatch/groups.hpp"

namespace switchyard::dispatch {

//! Dense (masked) dispatch.
struct dense {
  using policy_kind = dispatch_tag;
  //! Each expert runs on all tokens.
  static constexpr dispatch_layout layout = dispatch_layout::all_tokens;

  //! No hyperparameters to check.
  void validate() const {}

  //! Rows of the pair buffer: one per (token, slot).
  [[nodiscard]] SWITCHYARD_HD index_t max_rows(index_t tokens, index_t width,
                                              index_t /*experts*/) const {
    return tokens * width;
  }
};

static_assert(check_dispatch<dense>());

}  // namespace switchyard::dispatch
