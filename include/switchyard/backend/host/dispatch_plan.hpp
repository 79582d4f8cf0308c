// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file dispatch_plan.hpp
//! Host planning of the dispatch policies: `host::plan_groups(policy, plan, groups)` turns a
//! validated routing plan into `dispatch::expert_groups` on the calling thread. The policies
//! themselves (`switchyard/dispatch/`) are values with `SWITCHYARD_HD` math (capacity, sort
//! key); the loops over the plan live with the backend that runs them. A user-defined policy
//! is planned by its own `plan_groups(plan, groups)` member.
//!
//! Precondition of every overload: the plan passed routing::validate_plan (the layer validates
//! before dispatch); ids outside [0, E) or counts outside [0, width] would index past `g`.

#include <algorithm>

#include "switchyard/core/config.hpp"
#include "switchyard/dispatch/dense.hpp"
#include "switchyard/dispatch/groups.hpp"
#include "switchyard/dispatch/padded_capacity.hpp"
#include "switchyard/dispatch/sorted_grouped.hpp"
#include "switchyard/routing/plan.hpp"

namespace switchyard::host {

//! `sorted_grouped`: fills `g` (spans sized E, E, E, T·width, T·width) by a stable counting
//! sort of the pairs by `sorted_grouped::key`. `g.row_count` doubles as the histogram,
//! `g.row_begin` as the exclusive scan.
template <class Id, class W>
void plan_groups(const dispatch::sorted_grouped& policy, const routing::plan_view<Id, W>& plan,
                 dispatch::expert_groups& g) {
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
      const index_t p = dispatch::pair_index(t, j, width);
      const index_t k = policy.key(j < c ? plan.expert_ids(t, j) : 0, j < c, experts);
      if (k == experts) {
        g.row_pair[unused_cursor++] = p;
        g.pair_row[p] = dispatch::unused_pair;
      } else {
        const index_t row = g.row_begin[k] + g.row_count[k]++;
        g.row_pair[row] = p;
        g.pair_row[p] = row;
      }
    }
  }
}

//! `padded_capacity`: fills `g` (spans sized E, E, E, T·width, max_rows) from the plan: pairs
//! in the policy's `priority` order (token_major: token by token, each token's slots in
//! order; slot_major: slot 0 of every token in token order, then slot 1, ...) take the next
//! row of their expert's block of C rows until it holds C; the rest are dropped and counted
//! per expert. A kept pair's row inside its block is its rank among the expert's kept pairs
//! in that order.
template <class Id, class W>
void plan_groups(const dispatch::padded_capacity& policy, const routing::plan_view<Id, W>& plan,
                 dispatch::expert_groups& g) {
  const index_t tokens = plan.num_tokens(), width = plan.width(), experts = plan.num_experts;
  index_t assignments = 0;
  for (index_t t = 0; t < tokens; ++t) assignments += plan.counts(t);
  const index_t cap = policy.capacity(tokens, assignments, experts);
  std::fill(g.row_count.begin(), g.row_count.end(), index_t{0});
  std::fill(g.dropped.begin(), g.dropped.end(), index_t{0});
  for (index_t e = 0; e < experts; ++e) g.row_begin[e] = e * cap;
  auto claim = [&](index_t t, index_t j) {  // pair (t, j) claims its expert's next row
    const index_t p = dispatch::pair_index(t, j, width);
    if (j >= plan.counts(t)) {
      g.pair_row[p] = dispatch::unused_pair;
      return;
    }
    const index_t e = plan.expert_ids(t, j);
    if (g.row_count[e] < cap) {
      const index_t row = g.row_begin[e] + g.row_count[e]++;
      g.row_pair[row] = p;
      g.pair_row[p] = row;
    } else {
      g.pair_row[p] = dispatch::dropped_pair;
      ++g.dropped[e];
    }
  };
  if (policy.priority == dispatch::capacity_priority::slot_major) {
    for (index_t j = 0; j < width; ++j)
      for (index_t t = 0; t < tokens; ++t) claim(t, j);
  } else {
    for (index_t t = 0; t < tokens; ++t)
      for (index_t j = 0; j < width; ++j) claim(t, j);
  }
  g.num_rows = experts * cap;
  g.drop = policy.drop;
}

//! `dense`: fills `g`: `pair_row[p] = p` for a used slot (its row in the [T·width, d] pair
//! buffer), `row_count[e]` = pairs routed to e (0 means the expert is skipped).
template <class Id, class W>
void plan_groups(const dispatch::dense& /*policy*/, const routing::plan_view<Id, W>& plan,
                 dispatch::expert_groups& g) {
  const index_t tokens = plan.num_tokens(), width = plan.width();
  std::fill(g.row_count.begin(), g.row_count.end(), index_t{0});
  std::fill(g.row_begin.begin(), g.row_begin.end(), index_t{0});
  std::fill(g.dropped.begin(), g.dropped.end(), index_t{0});
  for (index_t t = 0; t < tokens; ++t) {
    const index_t c = plan.counts(t);
    for (index_t j = 0; j < width; ++j) {
      const index_t p = dispatch::pair_index(t, j, width);
      if (j < c) {
        ++g.row_count[plan.expert_ids(t, j)];
        g.pair_row[p] = p;
        g.row_pair[p] = p;
      } else {
        g.pair_row[p] = dispatch::unused_pair;
        g.row_pair[p] = p;
      }
    }
  }
  g.num_rows = tokens * width;
}

//! A user-defined policy: planned by its own `plan_groups(plan, groups)` member.
template <class DispatchPolicy, class Id, class W>
  requires requires(const DispatchPolicy& d, const routing::plan_view<Id, W>& plan,
                    dispatch::expert_groups& g) { d.plan_groups(plan, g); }
void plan_groups(const DispatchPolicy& policy, const routing::plan_view<Id, W>& plan,
                 dispatch::expert_groups& g) {
  policy.plan_groups(plan, g);
}

}  // namespace switchyard::host
