// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file route_losses.hpp
//! The loss terms of routing/loss_terms.hpp as per-row and per-expert functors
//! (backend-neutral; see gather.hpp): what a backend that cannot loop over a whole plan in one
//! thread runs instead of a term's `value` and `backward`.
//!
//! Every reduction runs in a fixed order, so the result is the same run to run however the
//! work is spread: per-expert sums (f, P̄) are one item per expert looping over the tokens
//! in order (the host's order: bit for bit its doubles); sums over tokens are per-token rows
//! into a [T] array, then one item adding them in token order. (The CUDA backend runs
//! `expert_column_sums` and `mean_of_rows` as block kernels with these very additions in this
//! very order, and the token counts of `count_tokens`, `load_balance_finish` and
//! `two_expert_share_finish` as integer counts in parallel: backend/cuda/route_reductions.cuh.)
//! The entropy is the one value
//! whose host order (one running sum over all T·E terms) is not kept: its device value is the
//! token-ordered sum of per-token entropies (a few ulps of a double from the host's, the same
//! float almost always); its backward row is the host's.
//!
//! `device_loss_term<Term>` describes each term: its scratch (carved from a workspace arena),
//! its forward (launches through a launcher, see route_steps.hpp; writes the value to a float in
//! the losses struct) and its backward preparation (launches, then returns the term's per-token
//! backward row for `router_d_logits`).

#include <cstdint>
#include <type_traits>

#include "switchyard/core/config.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/span.hpp"
#include "switchyard/core/workspace.hpp"
#include "switchyard/ops/route_rows.hpp"
#include "switchyard/routing/loss_terms.hpp"
#include "switchyard/routing/plan.hpp"
#include "switchyard/routing/softmax.hpp"

namespace switchyard::ops {

//! Which slots of a token count towards a load balance's f.
enum class counted_slots : int {
  top1 = 0,        //!< the first slot of a token that uses any (Switch)
  every_used = 1,  //!< every used slot (Mixtral, top-p)
  singles = 2,     //!< the slot of a token that uses exactly one expert (Adaptive Gating)
};

//! Per-expert sums of one expert e, tokens in order: f[e] = how many counted slots name e,
//! and (when `pbar` is non-null) pbar[e] = Σ_t probs[t, e] in double (the host's
//! `load_balance_count_row` / `probability_sum_row` loops, column e).
struct expert_column_sums {
  const std::int32_t* ids = nullptr;     //!< [T, width]
  const std::int32_t* counts = nullptr;  //!< [T]
  const float* probs = nullptr;          //!< [T, E]
  index_t tokens = 0, experts = 0, width = 0;
  counted_slots slots = counted_slots::top1;
  double* f = nullptr;     //!< [E] output
  double* pbar = nullptr;  //!< [E] output, or null

  //! Counted slots of token t naming expert e.
  SWITCHYARD_HD index_t count_of(index_t e, index_t t) const {
    const index_t w = width;
    const int c = readable_slots(counts[t], w);
    const int used = slots == counted_slots::every_used ? c
                     : slots == counted_slots::top1     ? (c > 0 ? 1 : 0)
                                                        : (c == 1 ? 1 : 0);
    index_t fe = 0;
    for (int j = 0; j < used; ++j) fe += ids[t * w + j] == e ? 1 : 0;
    return fe;
  }

  SWITCHYARD_HD void operator()(index_t e) const {
    const index_t n = tokens, stride = experts;
    // f as an integer count (the host's sum of 1.0s is exact, so the same double), in its own
    // loop: the compiler may unroll and reorder it, the loads of P̄'s double chain then
    // pipeline (P̄ itself is summed strictly in token order).
    index_t fe = 0;
    for (index_t t = 0; t < n; ++t) fe += count_of(e, t);
    f[e] = static_cast<double>(fe);
    if (pbar == nullptr) return;
    double pe = 0.0;
    for (index_t t = 0; t < n; ++t) pe += probs[t * stride + e];
    pbar[e] = pe;
  }
};

//! How many tokens use exactly `count` slots (one item; tokens in order).
//! (`counts_tokens`, `count_of` and `finish` are its pieces, for a backend that counts in
//! parallel: an integer count, exact in any order; likewise the two finishes below.)
struct count_tokens {
  const std::int32_t* counts = nullptr;  //!< [T]
  index_t tokens = 0;
  std::int32_t count = 1;
  index_t* out = nullptr;  //!< one index_t

  //! Whether the result counts tokens.
  SWITCHYARD_HD static constexpr bool counts_tokens() { return true; }
  //! Token t's count: 1 when it uses exactly `count` slots.
  SWITCHYARD_HD index_t count_of(index_t t) const { return counts[t] == count ? 1 : 0; }
  //! Writes the result from the count over every token.
  SWITCHYARD_HD void finish(index_t n) const { *out = n; }

  SWITCHYARD_HD void operator()(index_t) const {
    index_t n = 0;
    for (index_t t = 0; t < tokens; ++t) n += count_of(t);
    finish(n);
  }
};

//! The load balance's value from its sums (one item): E · Σ_e (f_e / F) · (P̄_e / T) with F
//! = T, or the number of single-expert tokens (`singles`, 0 -> value 0); 0 for T = 0.
struct load_balance_finish {
  const double* f = nullptr;             //!< [E]
  const double* pbar = nullptr;          //!< [E]
  const std::int32_t* counts = nullptr;  //!< [T]
  index_t tokens = 0, experts = 0;
  bool singles = false;  //!< F = tokens using exactly one expert (Adaptive Gating)
  float* out = nullptr;  //!< the losses field

  //! Whether the value counts tokens (`singles`).
  SWITCHYARD_HD bool counts_tokens() const { return singles; }
  //! Token t's count: 1 when it uses exactly one expert.
  SWITCHYARD_HD index_t count_of(index_t t) const { return counts[t] == 1 ? 1 : 0; }
  //! Writes the value from the count of single-expert tokens (ignored unless `singles`).
  SWITCHYARD_HD void finish(index_t singles_count) const {
    const index_t f_count = singles ? singles_count : tokens;
    *out = f_count == 0 ? 0.0f : routing::load_balance_value(f, pbar, experts, f_count, tokens);
  }

  SWITCHYARD_HD void operator()(index_t) const {
    index_t n = 0;
    if (counts_tokens())
      for (index_t t = 0; t < tokens; ++t) n += count_of(t);
    finish(n);
  }
};

//! The share of tokens using exactly two experts (one item); 0 for T = 0.
struct two_expert_share_finish {
  const std::int32_t* counts = nullptr;  //!< [T]
  index_t tokens = 0;
  float* out = nullptr;  //!< the losses field

  //! Whether the value counts tokens.
  SWITCHYARD_HD static constexpr bool counts_tokens() { return true; }
  //! Token t's count: 1 when it uses exactly two experts.
  SWITCHYARD_HD index_t count_of(index_t t) const { return counts[t] == 2 ? 1 : 0; }
  //! Writes the share from the count of two-expert tokens.
  SWITCHYARD_HD void finish(index_t top2) const {
    *out = tokens == 0 ? 0.0f : static_cast<float>(static_cast<double>(top2) / tokens);
  }

  SWITCHYARD_HD void operator()(index_t) const {
    index_t top2 = 0;
    for (index_t t = 0; t < tokens; ++t) top2 += count_of(t);
    finish(top2);
  }
};

//! rows[t] = logsumexp(logits[t])² (the z-loss of one token).
struct lse_square_rows {
  const float* logits = nullptr;  //!< [T, E]
  index_t experts = 0;
  double* rows = nullptr;  //!< [T] output

  SWITCHYARD_HD void operator()(index_t t) const {
    const double lse = routing::logsumexp(
        span<const float>(logits + t * experts, static_cast<std::size_t>(experts)));
    rows[t] = lse * lse;
  }
};

//! rows[t] = −Σ_e P_te · (logit_te − lse_t), e in order (the entropy of one token).
struct entropy_rows {
  const float* logits = nullptr;  //!< [T, E]
  const float* probs = nullptr;   //!< [T, E]
  index_t experts = 0;
  double* rows = nullptr;  //!< [T] output

  SWITCHYARD_HD void operator()(index_t t) const {
    const span<const float> lg(logits + t * experts, static_cast<std::size_t>(experts));
    double h = 0.0;
    routing::entropy_accumulate_row(
        lg, span<const float>(probs + t * experts, static_cast<std::size_t>(experts)),
        routing::logsumexp(lg), h);
    rows[t] = h;
  }
};

//! The mean of per-token values (one item): Σ_t rows[t] in token order, / T; 0 for T = 0.
struct mean_of_rows {
  const double* rows = nullptr;  //!< [T]
  index_t tokens = 0;
  float* out = nullptr;  //!< the losses field

  SWITCHYARD_HD void operator()(index_t) const {
    if (tokens == 0) {
      *out = 0.0f;
      return;
    }
    double s = 0.0;
    for (index_t t = 0; t < tokens; ++t) s += rows[t];
    *out = static_cast<float>(s / tokens);
  }
};

// ---- backward rows (see router_d_logits) ------------------------------------------------------

//! Load balance backward of one token: d_probs[e] += scale · f_e (the host's
//! `load_balance_backward_row`), scale = coeff · E / (F · T) with F = T, or read from
//! `singles` (Adaptive Gating: nothing when no token uses one expert).
struct load_balance_row {
  static constexpr routing::loss_target target = routing::loss_target::probs;
  const double* f = nullptr;         //!< [E]
  const index_t* singles = nullptr;  //!< F of Adaptive Gating, or null (F = T)
  double scale = 0.0;                //!< coeff · E / (T · T) when `singles` is null
  float coeff = 0.0f;
  index_t tokens = 0, experts = 0;
  bool active = false;  //!< false: coeff == 0 or T == 0 (the host skips)

  SWITCHYARD_HD void operator()(const token_rows& r) const {
    if (!active) return;
    double s = scale;
    if (singles != nullptr) {
      const index_t n = *singles;
      if (n == 0) return;
      s = static_cast<double>(coeff) * experts / (static_cast<double>(n) * tokens);
    }
    routing::load_balance_backward_row(f, s, r.d);
  }
};

//! z-loss backward of one token: d_logits += coeff · 2·lse·P / T.
struct z_loss_row {
  static constexpr routing::loss_target target = routing::loss_target::logits;
  float coeff = 0.0f;
  index_t tokens = 0;
  bool active = false;

  SWITCHYARD_HD void operator()(const token_rows& r) const {
    if (!active) return;
    routing::z_loss_backward_row(r.probs, routing::logsumexp(r.logits), coeff, tokens, r.d);
  }
};

//! Entropy backward of one token (the host's `entropy_backward_row`).
struct entropy_row {
  static constexpr routing::loss_target target = routing::loss_target::logits;
  float coeff = 0.0f;
  index_t tokens = 0;
  bool active = false;

  SWITCHYARD_HD void operator()(const token_rows& r) const {
    if (!active) return;
    routing::entropy_backward_row(r.logits, r.probs, routing::logsumexp(r.logits), coeff, tokens,
                                  r.d);
  }
};

//! A term with no gradient (a diagnostic).
struct no_row {
  static constexpr routing::loss_target target = routing::loss_target::none;
  SWITCHYARD_HD void operator()(const token_rows&) const {}
};

// ---- the terms --------------------------------------------------------------------------------

template <class Term>
inline constexpr bool no_device_loss_term_for = false;

//! How a backend without whole-plan loops runs loss term `Term` (see the file comment):
//! `carve_forward(ws, T, E)` / `carve_backward(ws, T, E)` (scratch, from an arena: the same
//! code measures it), `forward(launch, term, plan, scratch, float* value)` and
//! `backward(launch, term, plan, coeff, scratch)` -> the term's backward row.
template <class Term>
struct device_loss_term {
  static_assert(no_device_loss_term_for<Term>,
                "switchyard: this loss term has no device implementation: specialise "
                "switchyard::ops::device_loss_term<Term> (ops/route_losses.hpp) with its "
                "scratch, forward and backward row");
};

//! The plan's arrays the loss functors read.
struct plan_arrays {
  const std::int32_t* ids;
  const std::int32_t* counts;
  const float* logits;
  const float* probs;
  index_t tokens, experts, width;
};
inline plan_arrays arrays_of(const routing::plan_ref& plan) {
  return {plan.expert_ids.data(), plan.counts.data(), plan.logits.data(), plan.probs.data(),
          plan.num_tokens,        plan.num_experts,   plan.width};
}

//! Load balance over the tokens' first or every used slot.
template <>
struct device_loss_term<routing::terms::load_balance> {
  using term_type = routing::terms::load_balance;
  struct scratch {
    double* f;
    double* pbar;
  };
  static scratch carve_forward(workspace_arena& ws, index_t /*tokens*/, index_t experts) {
    return {ws.take<double>(experts), ws.take<double>(experts)};
  }
  static scratch carve_backward(workspace_arena& ws, index_t /*tokens*/, index_t experts) {
    return {ws.take<double>(experts), nullptr};
  }
  static counted_slots slots(const term_type& term) {
    if (term.null_experts != 0) {
      throw unsupported_error(detail::concat(
          "switchyard: the load balance with null_experts = ", term.null_experts,
          " (AdaMoE) runs on the host backend only for now"));
    }
    return term.any_slot ? counted_slots::every_used : counted_slots::top1;
  }
  template <class Launcher>
  static void forward(const Launcher& launch, const term_type& term, const routing::plan_ref& plan,
                      const scratch& s, float* value) {
    const counted_slots counted = slots(term);  // refuses what the device does not run
    const plan_arrays a = arrays_of(plan);
    launch.tokens(a.experts,
                  expert_column_sums{a.ids, a.counts, a.probs, a.tokens, a.experts, a.width,
                                     counted, s.f, s.pbar},
                  "switchyard::ops::expert_column_sums");
    launch.elements(1,
                    load_balance_finish{s.f, s.pbar, a.counts, a.tokens, a.experts, false, value},
                    "switchyard::ops::load_balance_finish");
  }
  template <class Launcher>
  static load_balance_row backward(const Launcher& launch, const term_type& term,
                                   const routing::plan_ref& plan, float coeff, const scratch& s) {
    const plan_arrays a = arrays_of(plan);
    const bool active = a.tokens != 0 && coeff != 0.0f;
    if (active) {
      launch.tokens(a.experts,
                    expert_column_sums{a.ids, a.counts, a.probs, a.tokens, a.experts, a.width,
                                       slots(term), s.f, nullptr},
                    "switchyard::ops::expert_column_sums");
    }
    const index_t tokens = a.tokens, e_count = a.experts;
    const double scale =
        active ? static_cast<double>(coeff) * e_count / (static_cast<double>(tokens) * tokens)
               : 0.0;
    return {s.f, nullptr, scale, coeff, tokens, e_count, active};
  }
};

//! Adaptive Gating's load balance over the single-expert tokens.
template <>
struct device_loss_term<routing::terms::top1_only_load_balance> {
  using term_type = routing::terms::top1_only_load_balance;
  struct scratch {
    double* f;
    double* pbar;
    index_t* singles;
  };
  static scratch carve_forward(workspace_arena& ws, index_t /*tokens*/, index_t experts) {
    return {ws.take<double>(experts), ws.take<double>(experts), nullptr};
  }
  static scratch carve_backward(workspace_arena& ws, index_t /*tokens*/, index_t experts) {
    double* f = ws.take<double>(experts);
    return {f, nullptr, ws.take<index_t>(1)};
  }
  template <class Launcher>
  static void forward(const Launcher& launch, const term_type&, const routing::plan_ref& plan,
                      const scratch& s, float* value) {
    const plan_arrays a = arrays_of(plan);
    launch.tokens(a.experts,
                  expert_column_sums{a.ids, a.counts, a.probs, a.tokens, a.experts, a.width,
                                     counted_slots::singles, s.f, s.pbar},
                  "switchyard::ops::expert_column_sums");
    launch.elements(1, load_balance_finish{s.f, s.pbar, a.counts, a.tokens, a.experts, true, value},
                    "switchyard::ops::load_balance_finish");
  }
  template <class Launcher>
  static load_balance_row backward(const Launcher& launch, const term_type&,
                                   const routing::plan_ref& plan, float coeff, const scratch& s) {
    const plan_arrays a = arrays_of(plan);
    const bool active = a.tokens != 0 && coeff != 0.0f;
    if (active) {
      launch.tokens(a.experts,
                    expert_column_sums{a.ids, a.counts, a.probs, a.tokens, a.experts, a.width,
                                       counted_slots::singles, s.f, nullptr},
                    "switchyard::ops::expert_column_sums");
      launch.elements(1, count_tokens{a.counts, a.tokens, 1, s.singles},
                      "switchyard::ops::count_tokens");
    }
    return {s.f, s.singles, 0.0, coeff, a.tokens, a.experts, active};
  }
};

//! Rows of per-token doubles, summed in token order: the z-loss and the entropy.
template <class Rows, class Row>
struct device_token_mean_term {
  struct scratch {
    double* rows;
  };
  static scratch carve_forward(workspace_arena& ws, index_t tokens, index_t /*experts*/) {
    return {ws.take<double>(tokens)};
  }
  static scratch carve_backward(workspace_arena&, index_t, index_t) { return {nullptr}; }
  template <class Launcher, class Term>
  static void forward(const Launcher& launch, const Term&, const routing::plan_ref& plan,
                      const scratch& s, float* value) {
    const plan_arrays a = arrays_of(plan);
    if constexpr (std::is_same_v<Rows, lse_square_rows>) {
      launch.tokens(a.tokens, lse_square_rows{a.logits, a.experts, s.rows},
                    "switchyard::ops::lse_square_rows");
    } else {
      launch.tokens(a.tokens, entropy_rows{a.logits, a.probs, a.experts, s.rows},
                    "switchyard::ops::entropy_rows");
    }
    launch.elements(1, mean_of_rows{s.rows, a.tokens, value}, "switchyard::ops::mean_of_rows");
  }
  template <class Launcher, class Term>
  static Row backward(const Launcher&, const Term&, const routing::plan_ref& plan, float coeff,
                      const scratch&) {
    return {coeff, plan.num_tokens, plan.num_tokens != 0 && coeff != 0.0f};
  }
};

//! ST-MoE z-loss.
template <>
struct device_loss_term<routing::terms::z_loss>
    : device_token_mean_term<lse_square_rows, z_loss_row> {
  using term_type = routing::terms::z_loss;
};

//! Mean router entropy (top-p's dynamic loss).
template <>
struct device_loss_term<routing::terms::entropy>
    : device_token_mean_term<entropy_rows, entropy_row> {
  using term_type = routing::terms::entropy;
};

//! The two-expert share diagnostic (no gradient).
template <>
struct device_loss_term<routing::terms::two_expert_share> {
  using term_type = routing::terms::two_expert_share;
  struct scratch {};
  static scratch carve_forward(workspace_arena&, index_t, index_t) { return {}; }
  static scratch carve_backward(workspace_arena&, index_t, index_t) { return {}; }
  template <class Launcher>
  static void forward(const Launcher& launch, const term_type&, const routing::plan_ref& plan,
                      const scratch&, float* value) {
    launch.elements(1, two_expert_share_finish{plan.counts.data(), plan.num_tokens, value},
                    "switchyard::ops::two_expert_share_finish");
  }
  template <class Launcher>
  static no_row backward(const Launcher&, const term_type&, const routing::plan_ref&, float,
                         const scratch&) {
    return {};
  }
};

}  // namespace switchyard::ops
