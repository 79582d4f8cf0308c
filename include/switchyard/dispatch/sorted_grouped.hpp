#pragma once
//! \file sorted_grouped.hpp
//! `dispatch::sorted_grouped`: the (token, slot) pairs sorted by expert. Every pair gets the
//! key of its expert id, an unused slot the sentinel key E; a stable counting sort (histogram
//! over E + 1 keys, exclusive scan, scatter in pair order) puts each expert's pairs in
//! contiguous rows in token order, the unused ones last. The backend runs one GEMM per
//! expert over its rows and combines each token's slots by gathering them in slot order (no
//! scatter-add, so the output is bitwise deterministic).

#include <algorithm>

#include "switchyard/core/error.hpp"
#include "switchyard/dispatch/concepts.hpp"
#include "switchyard/dispatch/groups.hpp"
#include "switchyard/routing/plan.hpp"

namespace switchyard::dispatch {

//! Sort-by-expert dispatch (the GPU default; on the host the same grouping feeds BLAS).
struct sorted_grouped {
  using policy_kind = dispatch_tag;
  //! Each expert's rows are gathered contiguously.
  static constexpr dispatch_layout layout = dispatch_layout::grouped_rows;

  //! No hyperparameters to check.
  void validate() const {}

  //! Rows of the expert buffers: at most one per (token, slot).
  [[nodiscard]] index_t max_rows(index_t tokens, index_t width, index_t /*experts*/) const {
    return tokens * width;
  }

  //! Sort key of a slot: its expert id, or E for an unused slot (sorts last).
  SWITCHYARD_HD static constexpr index_t key(std::int32_t id, bool used, index_t experts) {
    return used ? static_cast<index_t>(id) : experts;
  }

  //! Fills `g` (spans sized E, E, E, T·width, T·width) from the plan by a stable counting
  //! sort. `g.row_count` doubles as the histogram, `g.row_begin` as the exclusive scan.
  //! Precondition: the plan passed routing::validate_plan (the layer validates before
  //! dispatch); ids outside [0, E) or counts outside [0, width] would index past `g`.
  template <class Id, class W>
  void plan_groups(const routing::plan_view<Id, W>& plan, expert_groups& g) const {
    const index_t tokens = plan.num_tokens(), width = plan.width(), experts = plan.num_experts;
    std::fill(g.row_count.begin(), g.row_count.end(), index_t{0});
    std::fill(g.dropped.begin(), g.dropped.end(), index_t{0});
    for (index_t t = 0; t < tokens; ++t) {  // histogram over keys [0, E); key E is the rest
      const index_t c = plan.counts(t);
      for (index_t j = 0; j < c; ++j) ++g.row_count[plan.expert_ids(t, j)];
    }
    index_t run = 0;  // exclusive scan
    for (index_t e = 0; e < experts; ++e) {
      g.row_begin[e] = run;
      run += g.row_count[e];
    }
    g.num_rows = run;  // valid rows; the unused pairs follow at [run, run + unused)
    index_t unused_cursor = run;
    // Stable scatter in pair order; row_count is rebuilt as each expert's cursor.
    std::fill(g.row_count.begin(), g.row_count.end(), index_t{0});
    for (index_t t = 0; t < tokens; ++t) {
      const index_t c = plan.counts(t);
      for (index_t j = 0; j < width; ++j) {
        const index_t p = pair_index(t, j, width);
        const index_t k = key(j < c ? plan.expert_ids(t, j) : 0, j < c, experts);
        if (k == experts) {
          g.row_pair[unused_cursor++] = p;
          g.pair_row[p] = unused_pair;
        } else {
          const index_t row = g.row_begin[k] + g.row_count[k]++;
          g.row_pair[row] = p;
          g.pair_row[p] = row;
        }
      }
    }
  }
};

static_assert(check_dispatch<sorted_grouped>());

}  // namespace switchyard::dispatch
