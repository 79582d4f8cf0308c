// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file permute.hpp
//! The permutation of the dispatch as per-token, per-pair, per-row and per-expert functors
//! (backend-neutral; see gather.hpp for the convention): plan validation and sort keys, the
//! key bounds of a stable sort by expert, and the placement of each policy. The CUDA backend
//! (`backend/cuda/dispatch.cuh`) runs them as kernels around a CUB radix sort; the host tests
//! run the very same functors around `std::stable_sort` and compare with `host::plan_groups`.
//!
//! Pipeline (N = T·width pairs, p = t·width + j):
//! 1. `plan_sort_keys` per token: validates the token (`routing::validate_plan`'s rule),
//!    writes key[p] = expert id of a used slot, E for an unused slot or a faulty token.
//! 2. A stable sort of (key, p) by key: `sorted_keys` [N], `sorted_pairs` [N].
//! 3. Per policy: `grouped_counts` + `grouped_placement` (sorted_grouped),
//!    `capacity_counts` + `capacity_placement` + `capacity_rows` (padded_capacity),
//!    `dense_counts` + `dense_placement` (dense; no sort, a histogram of the keys).

#include <cstdint>

#include "switchyard/core/config.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/dispatch/groups.hpp"
#include "switchyard/dispatch/padded_capacity.hpp"
#include "switchyard/dispatch/sorted_grouped.hpp"
#include "switchyard/routing/plan.hpp"

namespace switchyard::ops {

//! Sort key of a pair: its expert id, or E (the sentinel) for an unused slot. 32 bits: ids
//! are 32-bit, and the radix sort only looks at the low bit_width(E) bits.
using sort_key = std::int32_t;

//! What is wrong with a token of a plan.
enum class plan_fault {
  none,    //!< nothing
  counts,  //!< counts[t] outside [0, width] (index t)
  ids,     //!< expert_ids[t, j] outside [0, E), repeated, or not -1 when unused (t·width + j)
};

//! The first fault of one token and where (the flat index the status word takes).
struct token_fault {
  plan_fault kind = plan_fault::none;
  index_t index = 0;
};

//! Checks token t of a plan by `routing::validate_plan`'s rule: counts[t] in [0, width]; a
//! used slot's id in [0, E) and not repeated among the token's earlier slots; an unused
//! slot's id == -1. Returns the first fault in slot order (counts before ids).
template <class Id>
SWITCHYARD_HD token_fault check_token(const matrix_view<Id>& expert_ids,
                                      const vector_view<Id>& counts, index_t t, index_t width,
                                      index_t experts) {
  const index_t c = static_cast<index_t>(counts(t));
  if (c < 0 || c > width) return {plan_fault::counts, t};
  for (index_t j = 0; j < width; ++j) {
    const index_t id = static_cast<index_t>(expert_ids(t, j));
    const bool used = j < c;
    bool bad = used ? (id < 0 || id >= experts) : id != routing::unused_slot;
    for (index_t first = 0; used && !bad && first < j; ++first)
      bad = static_cast<index_t>(expert_ids(t, first)) == id;
    if (bad) return {plan_fault::ids, dispatch::pair_index(t, j, width)};
  }
  return {};
}

//! Per token t: validates the token, reports a fault through `report(kind, index)` (the
//! CUDA backend records it in the status word) and writes the sort keys of its `width`
//! pairs: `sorted_grouped::key` of each slot, every slot unused when the token is faulty (so
//! every later step stays in bounds on any data). Also writes pairs[p] = p when `pairs` is
//! non-null (the values a device-wide sort reads).
template <class Id, class Report>
struct plan_sort_keys {
  matrix_view<Id> expert_ids;  //!< [T, width]
  vector_view<Id> counts;      //!< [T]
  index_t width = 0;           //!< slots per token
  index_t experts = 0;         //!< E
  sort_key* keys = nullptr;    //!< [T·width] output
  index_t* pairs = nullptr;    //!< [T·width] output p, or null
  Report report;               //!< called as report(plan_fault, index) on a faulty token

  SWITCHYARD_HD void operator()(index_t t) const {
    const token_fault fault = check_token(expert_ids, counts, t, width, experts);
    if (fault.kind != plan_fault::none) report(fault.kind, fault.index);
    const index_t c = fault.kind == plan_fault::none ? static_cast<index_t>(counts(t)) : 0;
    for (index_t j = 0; j < width; ++j) {
      const index_t p = dispatch::pair_index(t, j, width);
      const bool used = j < c;
      const auto id = used ? static_cast<std::int32_t>(expert_ids(t, j)) : std::int32_t{0};
      keys[p] = static_cast<sort_key>(dispatch::sorted_grouped::key(id, used, experts));
      if (pairs != nullptr) pairs[p] = p;
    }
  }
};

//! Per pair i: the "sort" when there is nothing to sort (E == 0: every key is the
//! sentinel), keys copied and pairs in order.
struct unsorted_pairs {
  const sort_key* keys = nullptr;   //!< [N]
  sort_key* sorted_keys = nullptr;  //!< [N] output
  index_t* sorted_pairs = nullptr;  //!< [N] output

  SWITCHYARD_HD void operator()(index_t i) const {
    sorted_keys[i] = keys[i];
    sorted_pairs[i] = i;
  }
};

//! First position in `sorted_keys` [n] (ascending) whose key is >= k (binary search).
SWITCHYARD_HD inline index_t first_position(const sort_key* sorted_keys, index_t n, index_t k) {
  index_t lo = 0, hi = n;
  while (lo < hi) {
    const index_t mid = lo + (hi - lo) / 2;
    if (static_cast<index_t>(sorted_keys[mid]) < k) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// ---- sorted_grouped ------------------------------------------------------------------------

//! Per expert e: its rows are its run of the sorted keys (the histogram and exclusive scan
//! read from the sorted order): row_begin[e] = first position of key e, row_count[e] = its
//! length, dropped[e] = 0.
struct grouped_counts {
  const sort_key* sorted_keys = nullptr;  //!< [N]
  index_t pairs = 0;                      //!< N
  index_t* row_begin = nullptr;           //!< [E] output
  index_t* row_count = nullptr;           //!< [E] output
  index_t* dropped = nullptr;             //!< [E] output

  SWITCHYARD_HD void operator()(index_t e) const {
    const index_t begin = first_position(sorted_keys, pairs, e);
    row_begin[e] = begin;
    row_count[e] = first_position(sorted_keys, pairs, e + 1) - begin;
    dropped[e] = 0;
  }
};

//! Per sorted position i: the pair there takes row i (pair_row, row_pair); a sentinel
//! position (unused slot) gets pair_row = unused_pair and its row row_pair = unused_pair (a
//! padding row past the Σ row_count real rows, never computed).
struct grouped_placement {
  const sort_key* sorted_keys = nullptr;  //!< [N]
  const index_t* sorted_pairs = nullptr;  //!< [N]
  index_t experts = 0;                    //!< E
  index_t* pair_row = nullptr;            //!< [N] output
  index_t* row_pair = nullptr;            //!< [N] output

  SWITCHYARD_HD void operator()(index_t i) const {
    const index_t p = sorted_pairs[i];
    const bool used = static_cast<index_t>(sorted_keys[i]) < experts;
    pair_row[p] = used ? i : dispatch::unused_pair;
    row_pair[i] = used ? p : dispatch::unused_pair;
  }
};

// ---- padded_capacity -----------------------------------------------------------------------

//! Per key e in [0, E] (E + 1 calls): sorted_begin[e] = first sorted position of key e
//! (sorted_begin[E] = Σ counts, the plan's assignments); for e < E also the expert's block
//! (row_begin[e] = e · block), the pairs it keeps (min(n_e, C)) and drops (max(0, n_e − C)),
//! C = policy.capacity(T, Σ counts, E) <= block.
struct capacity_counts {
  dispatch::padded_capacity policy;       //!< the capacity rule
  const sort_key* sorted_keys = nullptr;  //!< [N]
  index_t pairs = 0;                      //!< N
  index_t tokens = 0;                     //!< T
  index_t experts = 0;                    //!< E
  index_t block = 0;                      //!< rows per expert block (the largest C)
  index_t* sorted_begin = nullptr;        //!< [E + 1] output
  index_t* row_begin = nullptr;           //!< [E] output
  index_t* row_count = nullptr;           //!< [E] output
  index_t* dropped = nullptr;             //!< [E] output

  SWITCHYARD_HD void operator()(index_t e) const {
    const index_t begin = first_position(sorted_keys, pairs, e);
    sorted_begin[e] = begin;
    if (e >= experts) return;
    const index_t n = first_position(sorted_keys, pairs, e + 1) - begin;
    const index_t cap =
        policy.capacity(tokens, first_position(sorted_keys, pairs, experts), experts);
    row_begin[e] = e * block;
    row_count[e] = n < cap ? n : cap;
    dropped[e] = n > cap ? n - cap : 0;
  }
};

//! Per sorted position i: the pair's rank within its expert (i − sorted_begin[e], token then
//! slot order since the sort is stable) gives row e · block + rank when rank < C, else the
//! pair is dropped; a sentinel position is an unused slot. Reads sorted_begin (capacity_counts).
struct capacity_placement {
  dispatch::padded_capacity policy;       //!< the capacity rule
  const sort_key* sorted_keys = nullptr;  //!< [N]
  const index_t* sorted_pairs = nullptr;  //!< [N]
  const index_t* sorted_begin = nullptr;  //!< [E + 1]
  index_t tokens = 0;                     //!< T
  index_t experts = 0;                    //!< E
  index_t block = 0;                      //!< rows per expert block
  index_t* pair_row = nullptr;            //!< [N] output

  SWITCHYARD_HD void operator()(index_t i) const {
    const index_t p = sorted_pairs[i], e = static_cast<index_t>(sorted_keys[i]);
    if (e >= experts) {
      pair_row[p] = dispatch::unused_pair;
      return;
    }
    const index_t cap = policy.capacity(tokens, sorted_begin[experts], experts);
    const index_t rank = i - sorted_begin[e];
    pair_row[p] = rank < cap ? e * block + rank : dispatch::dropped_pair;
  }
};

//! Per row r of the [E · block] expert rows: row_pair[r] = the pair of rank r − e·block of
//! expert e = r / block when that rank is kept (< row_count[e]), else unused_pair (padding,
//! gathered as zeros and never combined). Reads capacity_counts' outputs.
struct capacity_rows {
  const index_t* sorted_pairs = nullptr;  //!< [N]
  const index_t* sorted_begin = nullptr;  //!< [E + 1]
  const index_t* row_count = nullptr;     //!< [E]
  index_t block = 0;                      //!< rows per expert block (> 0 when called)
  index_t* row_pair = nullptr;            //!< [E · block] output

  SWITCHYARD_HD void operator()(index_t r) const {
    const index_t e = r / block, rank = r - e * block;
    row_pair[r] =
        rank < row_count[e] ? sorted_pairs[sorted_begin[e] + rank] : dispatch::unused_pair;
  }
};

// ---- dense ---------------------------------------------------------------------------------

//! Per expert e: row_count[e] = pairs routed to e (the histogram of the keys, or 0 when there
//! is none: no pairs), row_begin[e] = 0, dropped[e] = 0.
template <class Count>
struct dense_counts {
  const Count* histogram = nullptr;  //!< [E] pairs per key, or null for none
  index_t* row_begin = nullptr;      //!< [E] output
  index_t* row_count = nullptr;      //!< [E] output
  index_t* dropped = nullptr;        //!< [E] output

  SWITCHYARD_HD void operator()(index_t e) const {
    row_begin[e] = 0;
    row_count[e] = histogram != nullptr ? static_cast<index_t>(histogram[e]) : 0;
    dropped[e] = 0;
  }
};

//! Per pair p: pair_row[p] = p for a used slot (its row of the [T·width] pair buffer), else
//! unused_pair; row_pair[p] = p (the identity, as the host plans it).
struct dense_placement {
  const sort_key* keys = nullptr;  //!< [N] (unsorted)
  index_t experts = 0;             //!< E
  index_t* pair_row = nullptr;     //!< [N] output
  index_t* row_pair = nullptr;     //!< [N] output

  SWITCHYARD_HD void operator()(index_t p) const {
    pair_row[p] = static_cast<index_t>(keys[p]) < experts ? p : dispatch::unused_pair;
    row_pair[p] = p;
  }
};

}  // namespace switchyard::ops
