// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file padded_capacity.hpp
//! `dispatch::padded_capacity`: GShard / Switch expert capacity. Each expert owns a block of
//! C rows (`[E, C, d]` buffers, expert e at rows `[e·C, e·C + C)`), filled by its pairs in the
//! order `priority` names; a pair is kept when, counting the pairs considered so far for its
//! expert (itself included), the count is ≤ C; the others are dropped, counted per expert and
//! reported, and contribute what `drop` says.
//!
//! Order (`capacity_priority`): `token_major` (the default: token by token, each token's slots
//! in order; Switch, Tutel) or `slot_major` (slot 0 of every token in token order, then slot 1
//! of every token, ...; GShard, fairseq, DeepSpeed, NLLB-MoE: a token's first choice is never
//! dropped for an earlier token's second choice). With k = 1 the two orders coincide. A kept
//! pair's row inside its expert's block is its rank among that expert's kept pairs in the
//! same order; the combine does not depend on it.
//!
//! Capacity: `expert_capacity` when > 0 (an absolute C, Hugging Face's `expert_capacity`; the
//! factor, min_capacity and capacity_multiple are then ignored). Otherwise
//! `C = ceil(capacity_factor · T · k̄ / E)` with k̄ = the plan's mean experts per
//! token (so T · k̄ = Σ_t counts[t], and k̄ = k for top-k), then `max(C, min_capacity)`, then
//! rounded up to a multiple of `capacity_multiple`, and finally capped at T rounded up to the
//! same multiple (an expert cannot receive more than T pairs from distinct-expert plans, so
//! the cap drops nothing and only bounds the buffers).
//!
//! Large values (overflow policy): every term of C saturates at T, the cap, instead of
//! overflowing. A `capacity_factor` so large that `cf · T · k̄ / E` exceeds T (1e30 is valid:
//! finite and > 0), a `min_capacity` of INT64_MAX or an `expert_capacity` >= T all mean "no
//! expert is ever full": nothing is dropped, and C is T rounded up (an absolute
//! `expert_capacity` is C as given, above T too, up to T rounded up, where it saturates; a
//! plan cannot put more than T pairs on one expert, so this changes no result). `capacity_multiple` is a GEMM-tile rounding: `validate()` rejects
//! one above `max_capacity_multiple` (2^16) with a range_error naming it (a larger multiple
//! only adds padding rows, and 2^62 would make E · C overflow). With E = 0 experts C is 0.
//! `capacity` and `max_rows` never overflow for T up to INT64_MAX − 2^16 (the layer checks
//! its sizes before they are reached: docs/errors.md).
//!
//! The host backend plans it in `backend/host/dispatch_plan.hpp` (`host::plan_groups`).

#include <cmath>

#include <cuda/std/cmath>

#include "switchyard/core/error.hpp"
#include "switchyard/dispatch/concepts.hpp"
#include "switchyard/dispatch/groups.hpp"

namespace switchyard::dispatch {

//! In which order the pairs of a plan claim their experts' capacity.
enum class capacity_priority {
  token_major,  //!< token by token, each token's slots in order (Switch, Tutel)
  slot_major,   //!< every token's first choice, then every second choice, ... (GShard,
                //!< fairseq, DeepSpeed, NLLB-MoE): a first choice is never dropped for a
                //!< second choice of an earlier token
};

//! Capacity-factor dispatch with token dropping.
struct padded_capacity {
  using policy_kind = dispatch_tag;
  //! Each expert's kept pairs are contiguous rows of its capacity block.
  static constexpr dispatch_layout layout = dispatch_layout::grouped_rows;

  float capacity_factor = 1.25f;  //!< cf > 0; 1.0 = exactly balanced load fits
  index_t min_capacity = 4;       //!< lower bound on C (DeepSpeed's default), >= 0
  index_t capacity_multiple = 8;  //!< C is rounded up to a multiple of this (GEMM tiles), >= 1
  dropped_output drop = dropped_output::zero;  //!< what a dropped pair contributes to y
  //! The order in which pairs claim capacity (the default keeps today's token-then-slot order).
  capacity_priority priority = capacity_priority::token_major;
  //! An absolute capacity C per expert when > 0 (Hugging Face's `expert_capacity`): the factor,
  //! min_capacity and capacity_multiple are then ignored. 0: C from the factor.
  index_t expert_capacity = 0;

  //! The largest `capacity_multiple` `validate()` accepts (file comment, overflow policy).
  static constexpr index_t max_capacity_multiple = index_t{1} << 16;

  //! Throws range_error unless capacity_factor > 0 (and finite), min_capacity >= 0,
  //! expert_capacity >= 0 and 1 <= capacity_multiple <= max_capacity_multiple.
  void validate() const {
    if (!(capacity_factor > 0.0f) || !std::isfinite(capacity_factor)) {
      throw range_error("capacity_factor",
                        detail::concat("capacity_factor must be a finite value > 0, got ",
                                                     capacity_factor));
    }
    if (min_capacity < 0) {
      throw range_error("min_capacity", detail::concat(
                                            "min_capacity must be >= 0, got ", min_capacity));
    }
    if (expert_capacity < 0) {
      throw range_error("expert_capacity", detail::concat(
                                               "expert_capacity must be >= 0 (0: from the "
                                               "capacity factor), got ", expert_capacity));
    }
    if (capacity_multiple < 1 || capacity_multiple > max_capacity_multiple) {
      throw range_error("capacity_multiple",
                        detail::concat("capacity_multiple must be in [1, ", max_capacity_multiple,
                                       "] (a GEMM-tile rounding of the capacity), got ",
                                       capacity_multiple));
    }
  }

  //! Rounds n up to a multiple of capacity_multiple.
  [[nodiscard]] SWITCHYARD_HD index_t round_up(index_t n) const {
    return (n + capacity_multiple - 1) / capacity_multiple * capacity_multiple;
  }

  //! C for T tokens routing `assignments` = T · k̄ pairs over E experts (file comment):
  //! each term saturates at T, so nothing overflows and no float-to-integer conversion
  //! leaves the range of index_t (a factor of 1e30 used to convert 1e30 to an integer).
  [[nodiscard]] SWITCHYARD_HD index_t capacity(index_t tokens, index_t assignments,
                                              index_t experts) const {
    const index_t cap = round_up(tokens > 0 ? tokens : 0);
    if (expert_capacity > 0) return expert_capacity < cap ? expert_capacity : cap;
    if (tokens <= 0 || experts <= 0) return 0;
    const double raw = ::cuda::std::ceil(static_cast<double>(capacity_factor) *
                                         static_cast<double>(assignments) /
                                         static_cast<double>(experts));
    // raw >= T (or NaN, which validate() excludes): the cap T; else exact in index_t.
    index_t c = raw < static_cast<double>(tokens) ? static_cast<index_t>(raw) : tokens;
    if (c < 0) c = 0;
    if (min_capacity > c) c = min_capacity < tokens ? min_capacity : tokens;
    // c <= T, so c rounded up is at most T rounded up: the cap.
    return round_up(c);
  }

  //! Rows of the expert buffers: E · C with the largest C a plan of this size can give.
  [[nodiscard]] SWITCHYARD_HD index_t max_rows(index_t tokens, index_t width,
                                              index_t experts) const {
    return experts * capacity(tokens, tokens * width, experts);
  }
};

static_assert(check_dispatch<padded_capacity>());

}  // namespace switchyard::dispatch
