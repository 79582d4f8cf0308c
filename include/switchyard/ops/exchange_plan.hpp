// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file exchange_plan.hpp
//! The planning of `parallel::static_bound`'s exchange as per-token, per-sorted-position and
//! per-row functors (backend-neutral, like permute.hpp): the CUDA backend runs them as kernels
//! around two stable radix sorts, so the plan and the counts stay on the device and every
//! buffer has a size fixed by the bound (docs/expert-parallel.md, "CUDA graphs and
//! static_bound"); the host tests run the very same functors around `std::stable_sort` and
//! compare with the host planner (`detail::plan_exchange`), which defines the layout.
//!
//! Pipeline on the sending rank (P = T·width pairs, p = t·width + j, N ranks, L = E/N local
//! experts, R = peer_rows; destination of global expert e: e / L):
//! 1. `ep_destination_keys` per token: validates the token (`check_token`), writes key[p] =
//!    the destination rank of a used slot, N for an unused slot or a faulty token, and
//!    pair_row[p] = unused_pair.
//! 2. Stable sort of (key, p): each destination's pairs in pair order.
//! 3. `ep_claim` per sorted position: a pair's claim is its position among its destination's
//!    pairs; claims below R keep the pair (key2[p] = e), the others drop it (key2[p] = E,
//!    pair_row[p] = dropped_pair, dropped[e] + 1). Unused pairs get key2 = E.
//! 4. Stable sort of (key2, p): the kept pairs expert-major (hence destination-major), each
//!    expert's in pair order.
//! 5. `ep_place` per sorted position: send row = dest·R + (position among the destination's
//!    kept pairs): pair_row[p], row_pair[row], row_local[row] = e − dest·L (−1 on the rows of
//!    a block nobody claims, which the caller fills first).
//! The receiver gets the senders' row_local blocks with the rows (`all_to_all` of fixed
//! blocks), so it needs no count exchange: `ep_receiver_rows` turns them into its one-slot
//! plan (count 0 on unclaimed rows).
//! With a local dispatch that drops (`padded_capacity`), the receiver returns its verdict per
//! row and `ep_local_drops` marks and counts the dropped pairs on the token's rank.

#include <cstdint>

#include "switchyard/core/config.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/dispatch/groups.hpp"
#include "switchyard/ops/permute.hpp"
#include "switchyard/routing/plan.hpp"

namespace switchyard::ops {

//! Adds one to `*count` (an atomic add on the device: the sum does not depend on the order).
SWITCHYARD_HD inline void count_one(index_t* count) {
#ifdef __CUDA_ARCH__
  atomicAdd(reinterpret_cast<unsigned long long*>(count), 1ULL);
#else
  ++*count;
#endif
}

//! Step 1, per token t: validates the token (`check_token`; a fault goes to
//! `report(kind, index)` and the token routes nowhere) and writes, for each of its pairs p,
//! keys[p] = the destination rank e / L of a used slot or N (the sentinel), pairs[p] = p and
//! pair_row[p] = unused_pair.
template <class Id, class Report>
struct ep_destination_keys {
  matrix_view<Id> expert_ids;    //!< [T, width]
  vector_view<Id> counts;        //!< [T]
  index_t width = 0;             //!< slots per token
  index_t experts = 0;           //!< the global E
  index_t local_experts = 1;     //!< L = E/N (> 0 when E > 0)
  index_t ranks = 1;             //!< N
  sort_key* keys = nullptr;      //!< [P] output
  index_t* pairs = nullptr;      //!< [P] output p, or null
  index_t* pair_row = nullptr;   //!< [P] output unused_pair
  Report report;                 //!< called as report(plan_fault, index) on a faulty token

  SWITCHYARD_HD void operator()(index_t t) const {
    const token_fault fault = check_token(expert_ids, counts, t, width, experts);
    if (fault.kind != plan_fault::none) report(fault.kind, fault.index);
    const index_t c = fault.kind == plan_fault::none ? static_cast<index_t>(counts(t)) : 0;
    for (index_t j = 0; j < width; ++j) {
      const index_t p = dispatch::pair_index(t, j, width);
      keys[p] = static_cast<sort_key>(
          j < c ? static_cast<index_t>(expert_ids(t, j)) / local_experts : ranks);
      if (pairs != nullptr) pairs[p] = p;
      pair_row[p] = dispatch::unused_pair;
    }
  }
};

//! Step 3, per sorted position i of the destination sort: keeps the first R pairs of each
//! destination (pair order), drops the others (counted per global expert).
template <class Id>
struct ep_claim {
  const sort_key* sorted_keys = nullptr;   //!< [P] destination keys, ascending
  const index_t* sorted_pairs = nullptr;   //!< [P]
  index_t pairs = 0;                       //!< P
  matrix_view<Id> expert_ids;              //!< [T, width]
  index_t width = 0;                       //!< slots per token
  index_t experts = 0;                     //!< E (key2's sentinel)
  index_t ranks = 1;                       //!< N (key's sentinel)
  index_t peer_rows = 0;                   //!< R
  sort_key* keys2 = nullptr;               //!< [P] output, indexed by pair
  index_t* pairs2 = nullptr;               //!< [P] output p (the second sort's values), or null
  index_t* pair_row = nullptr;             //!< [P] dropped_pair for a dropped pair
  index_t* dropped = nullptr;              //!< [E] += 1 per dropped pair (zeroed by the caller)

  SWITCHYARD_HD void operator()(index_t i) const {
    const index_t dest = sorted_keys[i], p = sorted_pairs[i];
    if (pairs2 != nullptr) pairs2[p] = p;
    if (dest >= ranks) {
      keys2[p] = static_cast<sort_key>(experts);
      return;
    }
    const index_t claim = i - first_position(sorted_keys, pairs, dest);
    const index_t e = static_cast<index_t>(expert_ids(p / width, p % width));
    if (claim < peer_rows) {
      keys2[p] = static_cast<sort_key>(e);
      return;
    }
    keys2[p] = static_cast<sort_key>(experts);
    pair_row[p] = dispatch::dropped_pair;
    if (dropped != nullptr) count_one(dropped + e);
  }
};

//! Step 5, per sorted position i of the expert sort: the kept pair's send row in its
//! destination's block, and the row's pair, local expert and (when `row_weight` is given)
//! combine weight.
template <class W>
struct ep_place {
  const sort_key* sorted_keys = nullptr;   //!< [P] global expert keys, ascending (E: not sent)
  const index_t* sorted_pairs = nullptr;   //!< [P]
  index_t pairs = 0;                       //!< P
  index_t experts = 0;                     //!< E
  index_t local_experts = 1;               //!< L
  index_t peer_rows = 0;                   //!< R
  index_t* pair_row = nullptr;             //!< [P] output (kept pairs only)
  index_t* row_pair = nullptr;             //!< [N·R] output (claimed rows only)
  index_t* row_local = nullptr;            //!< [N·R] output (claimed rows only)
  matrix_view<W> weights;                  //!< [T, width] the plan's weights
  index_t width = 0;                       //!< slots per token
  float* row_weight = nullptr;             //!< [N·R] output, or null

  SWITCHYARD_HD void operator()(index_t i) const {
    const index_t e = sorted_keys[i];
    if (e >= experts) return;
    const index_t p = sorted_pairs[i], dest = e / local_experts;
    const index_t row =
        dest * peer_rows + i - first_position(sorted_keys, pairs, dest * local_experts);
    pair_row[p] = row;
    row_pair[row] = p;
    row_local[row] = e - dest * local_experts;
    if (row_weight != nullptr) row_weight[row] = static_cast<float>(weights(p / width, p % width));
  }
};

//! Per row r of the sender's block: its source token (row_pair / width), or −1 (unclaimed).
struct ep_row_tokens {
  const index_t* row_pair = nullptr;  //!< [N·R], −1 on unclaimed rows
  index_t width = 1;                  //!< slots per token (> 0 when any row is claimed)
  index_t* row_token = nullptr;       //!< [N·R] output

  SWITCHYARD_HD void operator()(index_t r) const {
    row_token[r] = row_pair[r] >= 0 ? row_pair[r] / width : index_t{-1};
  }
};

//! Per received row r: the receiver's one-slot plan (id = the local expert, count 1; id
//! `routing::unused_slot` and count 0 on an unclaimed row) and its weight (`row_weight[r]`,
//! or 1; 0 on an unclaimed row).
struct ep_receiver_rows {
  const index_t* row_local = nullptr;     //!< [N·R] received, −1 on unclaimed rows
  const float* row_weight = nullptr;      //!< [N·R] received, or null (weight 1)
  std::int32_t* ids = nullptr;            //!< [N·R] output
  std::int32_t* counts = nullptr;         //!< [N·R] output
  float* weights = nullptr;               //!< [N·R] output

  SWITCHYARD_HD void operator()(index_t r) const {
    const bool used = row_local[r] >= 0;
    ids[r] = used ? static_cast<std::int32_t>(row_local[r]) : routing::unused_slot;
    counts[r] = used ? 1 : 0;
    weights[r] = used ? (row_weight != nullptr ? row_weight[r] : 1.0f) : 0.0f;
  }
};

//! After a local dispatch that drops rows (`padded_capacity` under `static_bound`), per pair p
//! of the sending rank: when the receiver's verdict on the pair's send row is
//! `dispatch::dropped_pair` (its local capacity dropped the row), marks the pair dropped
//! (pair_row[p] = dropped_pair, so the combine treats it like the bound's own drops) and
//! counts it on its global expert. `verdict` [N·R] is the receiver's pair_row of its one-slot
//! plan, returned in the reverse fixed-block exchange (row r of the sender's blocks).
template <class Id>
struct ep_local_drops {
  matrix_view<Id> expert_ids;          //!< [T, width]
  index_t width = 1;                   //!< slots per token
  const index_t* verdict = nullptr;    //!< [N·R] the receivers' pair_row of each send row
  index_t* pair_row = nullptr;         //!< [P] send row of each pair; dropped_pair written
  index_t* dropped = nullptr;          //!< [E] += 1 per pair dropped here, or null

  SWITCHYARD_HD void operator()(index_t p) const {
    const index_t row = pair_row[p];
    if (row < 0 || verdict[row] != dispatch::dropped_pair) return;
    pair_row[p] = dispatch::dropped_pair;
    if (dropped != nullptr) {
      count_one(dropped + static_cast<index_t>(expert_ids(p / width, p % width)));
    }
  }
};

}  // namespace switchyard::ops
