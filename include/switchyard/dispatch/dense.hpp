#pragma once
//! \file dense.hpp
//! `dispatch::dense`: every expert over every token, masked by the plan: the backend runs
//! each expert the plan uses on all T tokens and keeps, for each (token, slot) pair, the row
//! of the expert that slot names. The reference dispatch, and the choice for tiny E. Experts
//! no token is routed to are skipped (their output would be masked away), which also keeps
//! DynMoE's inactive slots unread.

#include <algorithm>

#include "switchyard/dispatch/concepts.hpp"
#include "switchyard/dispatch/groups.hpp"
#include "switchyard/routing/plan.hpp"

namespace switchyard::dispatch {

//! Dense (masked) dispatch.
struct dense {
  using policy_kind = dispatch_tag;
  //! Each expert runs on all tokens.
  static constexpr dispatch_layout layout = dispatch_layout::all_tokens;

  //! No hyperparameters to check.
  void validate() const {}

  //! Rows of the pair buffer: one per (token, slot).
  [[nodiscard]] index_t max_rows(index_t tokens, index_t width, index_t /*experts*/) const {
    return tokens * width;
  }

  //! Fills `g`: `pair_row[p] = p` for a used slot (its row in the [T·width, d] pair buffer),
  //! `row_count[e]` = pairs routed to e (0 means the expert is skipped).
  //! Precondition: the plan passed routing::validate_plan (the layer validates before
  //! dispatch); ids outside [0, E) or counts outside [0, width] would index past `g`.
  template <class Id, class W>
  void plan_groups(const routing::plan_view<Id, W>& plan, expert_groups& g) const {
    const index_t tokens = plan.num_tokens(), width = plan.width();
    std::fill(g.row_count.begin(), g.row_count.end(), index_t{0});
    std::fill(g.row_begin.begin(), g.row_begin.end(), index_t{0});
    std::fill(g.dropped.begin(), g.dropped.end(), index_t{0});
    for (index_t t = 0; t < tokens; ++t) {
      const index_t c = plan.counts(t);
      for (index_t j = 0; j < width; ++j) {
        const index_t p = pair_index(t, j, width);
        if (j < c) {
          ++g.row_count[plan.expert_ids(t, j)];
          g.pair_row[p] = p;
          g.row_pair[p] = p;
        } else {
          g.pair_row[p] = unused_pair;
          g.row_pair[p] = p;
        }
      }
    }
    g.num_rows = tokens * width;
  }
};

static_assert(check_dispatch<dense>());

}  // namespace switchyard::dispatch
