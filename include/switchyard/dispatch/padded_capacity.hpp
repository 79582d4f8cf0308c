#pragma once
//! \file padded_capacity.hpp
//! `dispatch::padded_capacity`: GShard / Switch expert capacity. Each expert owns a block of
//! C rows (`[E, C, d]` buffers, expert e at rows `[e·C, e·C + C)`), filled by its pairs in
//! token order (then slot order); pairs past C are dropped, counted per expert and reported.
//!
//! Capacity: `C = ceil(capacity_factor · T · k̄ / E)` with k̄ = the plan's mean experts per
//! token (so T · k̄ = Σ_t counts[t], and k̄ = k for top-k), then `max(C, min_capacity)`, then
//! rounded up to a multiple of `capacity_multiple`, and finally capped at T rounded up to the
//! same multiple (an expert cannot receive more than T pairs from distinct-expert plans, so
//! the cap drops nothing and only bounds the buffers).

#include <algorithm>
#include <cmath>

#include "switchyard/core/error.hpp"
#include "switchyard/dispatch/concepts.hpp"
#include "switchyard/dispatch/groups.hpp"
#include "switchyard/routing/plan.hpp"

namespace switchyard::dispatch {

//! Capacity-factor dispatch with token dropping.
struct padded_capacity {
  using policy_kind = dispatch_tag;
  //! Each expert's kept pairs are contiguous rows of its capacity block.
  static constexpr dispatch_layout layout = dispatch_layout::grouped_rows;

  float capacity_factor = 1.25f;  //!< cf > 0; 1.0 = exactly balanced load fits
  index_t min_capacity = 4;       //!< lower bound on C (DeepSpeed's default), >= 0
  index_t capacity_multiple = 8;  //!< C is rounded up to a multiple of this (GEMM tiles), >= 1
  dropped_output drop = dropped_output::zero;  //!< what a dropped pair contributes to y

  //! Throws range_error unless capacity_factor > 0 (and finite), min_capacity >= 0 and
  //! capacity_multiple >= 1.
  void validate() const {
    if (!(capacity_factor > 0.0f) || !std::isfinite(capacity_factor)) {
      throw range_error("capacity_factor",
                        ::switchyard::detail::concat("capacity_factor must be a finite value > 0, got ",
                                                     capacity_factor));
    }
    if (min_capacity < 0) {
      throw range_error("min_capacity", ::switchyard::detail::concat(
                                            "min_capacity must be >= 0, got ", min_capacity));
    }
    if (capacity_multiple < 1) {
      throw range_error("capacity_multiple",
                        ::switchyard::detail::concat("capacity_multiple must be >= 1, got ",
                                                     capacity_multiple));
    }
  }

  //! Rounds n up to a multiple of capacity_multiple.
  [[nodiscard]] index_t round_up(index_t n) const {
    return (n + capacity_multiple - 1) / capacity_multiple * capacity_multiple;
  }

  //! C for T tokens routing `assignments` = T · k̄ pairs over E experts (file comment).
  [[nodiscard]] index_t capacity(index_t tokens, index_t assignments, index_t experts) const {
    const double raw = std::ceil(static_cast<double>(capacity_factor) *
                                 static_cast<double>(assignments) / static_cast<double>(experts));
    const index_t c = round_up(std::max(static_cast<index_t>(raw), min_capacity));
    return std::min(c, round_up(tokens));
  }

  //! Rows of the expert buffers: E · C with the largest C a plan of this size can give.
  [[nodiscard]] index_t max_rows(index_t tokens, index_t width, index_t experts) const {
    return experts * capacity(tokens, tokens * width, experts);
  }

  //! Fills `g` (spans sized E, E, E, T·width, max_rows) from the plan: pairs in token order
  //! take the next row of their expert's block until it holds C.
  //! Precondition: the plan passed routing::validate_plan (the layer validates before
  //! dispatch); ids outside [0, E) or counts outside [0, width] would index past `g`.
  template <class Id, class W>
  void plan_groups(const routing::plan_view<Id, W>& plan, expert_groups& g) const {
    const index_t tokens = plan.num_tokens(), width = plan.width(), experts = plan.num_experts;
    index_t assignments = 0;
    for (index_t t = 0; t < tokens; ++t) assignments += plan.counts(t);
    const index_t cap = capacity(tokens, assignments, experts);
    std::fill(g.row_count.begin(), g.row_count.end(), index_t{0});
    std::fill(g.dropped.begin(), g.dropped.end(), index_t{0});
    for (index_t e = 0; e < experts; ++e) g.row_begin[e] = e * cap;
    for (index_t t = 0; t < tokens; ++t) {
      const index_t c = plan.counts(t);
      for (index_t j = 0; j < width; ++j) {
        const index_t p = pair_index(t, j, width);
        if (j >= c) {
          g.pair_row[p] = unused_pair;
          continue;
        }
        const index_t e = plan.expert_ids(t, j);
        if (g.row_count[e] < cap) {
          const index_t row = g.row_begin[e] + g.row_count[e]++;
          g.row_pair[row] = p;
          g.pair_row[p] = row;
        } else {
          g.pair_row[p] = dropped_pair;
          ++g.dropped[e];
        }
      }
    }
    g.num_rows = experts * cap;
    g.drop = drop;
  }
};

static_assert(check_dispatch<padded_capacity>());

}  // namespace switchyard::dispatch
