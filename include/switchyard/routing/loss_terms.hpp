// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file loss_terms.hpp
//! The auxiliary losses of the softmax routers as parts a router lists (docs/design.md,
//! "Routers are compositions"): per-row `__host__ __device__` pieces, and one struct per loss
//! term with its value and backward over a whole plan (the host reference, written with the
//! rows; the scratch it needs comes from the caller, so neither allocates).
//!
//! A loss term `L` has
//! - `static constexpr loss_target target`: where its gradient lands (the probabilities, the
//!   logits, or nowhere for a diagnostic),
//! - `index_t scratch_doubles(index_t experts) const`: doubles of scratch value/backward take,
//! - `float value(const plan_ref&, double* scratch) const`,
//! - `void backward(const plan_ref&, float coeff, float* d, double* scratch) const`:
//!   d [T, E] += coeff · ∂L/∂target (not for `loss_target::none`).
//! A router binds each term to the field of its `losses_type` that holds the value (and, in
//! backward, the coefficient): `bind_loss<&losses_type::z>(terms::z_loss{})`.

#include <cstdint>

#include <cuda/std/span>

#include "switchyard/core/span.hpp"
#include "switchyard/core/config.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/routing/plan.hpp"
#include "switchyard/routing/softmax.hpp"

namespace switchyard::routing {

// ---- rows: one token ---------------------------------------------------------------------

//! Load balance counts: f[id_j] += 1 for the token's first `slots` slots.
SWITCHYARD_HD inline void load_balance_count_row(span<const std::int32_t> ids,
                                                 int slots, double* f) {
  for (int j = 0; j < slots; ++j) f[ids[j]] += 1.0;
}

//! pbar[e] += probs[e] (the running sum behind the mean probability P̄).
SWITCHYARD_HD inline void probability_sum_row(span<const float> probs, double* pbar) {
  const int n = static_cast<int>(probs.size());
  for (int e = 0; e < n; ++e) pbar[e] += probs[e];
}

//! E · Σ_e (f_e / f_count) · (pbar_e / tokens): the load balance from its sums.
SWITCHYARD_HD inline float load_balance_value(const double* f, const double* pbar, index_t experts,
                                              index_t f_count, index_t tokens) {
  double s = 0.0;
  for (index_t e = 0; e < experts; ++e) s += (f[e] / f_count) * (pbar[e] / tokens);
  return static_cast<float>(s * experts);
}

//! Load-balance backward row: d_probs[e] += scale · f_e (f is piecewise constant in P; scale
//! = coeff · E / (f_count · T)).
SWITCHYARD_HD inline void load_balance_backward_row(const double* f, double scale,
                                                    span<float> d_probs) {
  const int n = static_cast<int>(d_probs.size());
  for (int e = 0; e < n; ++e) d_probs[e] += static_cast<float>(scale * f[e]);
}

//! z-loss backward row: d_logits[e] += coeff · 2·lse·P_e / T (lse = logsumexp of the row).
SWITCHYARD_HD inline void z_loss_backward_row(span<const float> probs, double lse,
                                              float coeff, index_t tokens,
                                              span<float> d_logits) {
  const int n = static_cast<int>(probs.size());
  for (int e = 0; e < n; ++e)
    d_logits[e] += static_cast<float>(coeff * 2.0 * lse * probs[e] / tokens);
}

//! Entropy row: s −= Σ_e P_e · (logit_e − lse), accumulated into `s` term by term
//! (log P = logit − lse, so a P that underflows to 0 adds 0, not NaN).
SWITCHYARD_HD inline void entropy_accumulate_row(span<const float> logits,
                                                 span<const float> probs, double lse,
                                                 double& s) {
  const int n = static_cast<int>(logits.size());
  for (int e = 0; e < n; ++e) s -= probs[e] * (logits[e] - lse);
}

//! Entropy backward row: d_logits[e] += −coeff/T · P_e · (log P_e + H) with H the row entropy.
SWITCHYARD_HD inline void entropy_backward_row(span<const float> logits,
                                               span<const float> probs, double lse,
                                               float coeff, index_t tokens,
                                               span<float> d_logits) {
  const int n = static_cast<int>(logits.size());
  double h = 0.0;
  entropy_accumulate_row(logits, probs, lse, h);
  for (int e = 0; e < n; ++e)
    d_logits[e] += static_cast<float>(-static_cast<double>(coeff) / tokens * probs[e] *
                                      ((logits[e] - lse) + h));
}

//! z-loss backward row from the logits alone: d_logits[e] += coeff · 2·lse·exp(l_e − lse) / T
//! (for routers whose plan scores are not the softmax of the logits).
SWITCHYARD_HD inline void z_loss_backward_row_from_logits(span<const float> logits, double lse,
                                                          float coeff, index_t tokens,
                                                          span<float> d_logits) {
  const int n = static_cast<int>(logits.size());
  for (int e = 0; e < n; ++e)
    d_logits[e] += static_cast<float>(coeff * 2.0 * lse * ::exp(logits[e] - lse) / tokens);
}

//! Sequence balance: p[e] += s_e / Σ_j s_j for one token's scores (the token's normalised
//! affinity); a row whose scores sum to 0 adds nothing.
SWITCHYARD_HD inline void normalized_score_sum_row(span<const float> scores, double* p) {
  const int n = static_cast<int>(scores.size());
  double sum = 0.0;
  for (int e = 0; e < n; ++e) sum += scores[e];
  if (sum == 0.0) return;
  for (int e = 0; e < n; ++e) p[e] += scores[e] / sum;
}

//! Sequence balance backward row: with Σ = Σ_j s_j, d_scores[j] += scale / Σ · (f_j −
//! Σ_i f_i s_i / Σ) (f already scaled by E / (k·S); scale = coeff / (B·S)).
SWITCHYARD_HD inline void sequence_balance_backward_row(const double* f, span<const float> scores,
                                                        double scale, span<float> d_scores) {
  const int n = static_cast<int>(scores.size());
  double sum = 0.0, dot = 0.0;
  for (int e = 0; e < n; ++e) {
    sum += scores[e];
    dot += f[e] * scores[e];
  }
  if (sum == 0.0) return;
  dot /= sum;
  for (int e = 0; e < n; ++e) d_scores[e] += static_cast<float>(scale / sum * (f[e] - dot));
}

// ---- terms: a whole plan ------------------------------------------------------------------

//! Where a loss term's gradient lands.
enum class loss_target { probs, logits, none };

}  // namespace switchyard::routing

namespace switchyard::detail {
using namespace ::switchyard::routing;  // this block's helpers use switchyard::routing's names
inline span<const float> row(span<float> a, index_t t, index_t n) {
  return {a.data() + t * n, static_cast<std::size_t>(n)};
}
inline span<float> mutable_row(float* a, index_t t, index_t n) {
  return {a + t * n, static_cast<std::size_t>(n)};
}
inline span<const std::int32_t> id_row(const plan_ref& plan, index_t t) {
  return {plan.expert_ids.data() + t * plan.width, static_cast<std::size_t>(plan.width)};
}
inline void zero(double* a, index_t n) {
  for (index_t i = 0; i < n; ++i) a[i] = 0.0;
}
}  // namespace switchyard::detail

namespace switchyard::routing {

namespace terms {

//! Switch load balance E·Σ_e f_e·P̄_e, f_e the share of tokens whose top-1 is e, or (any_slot,
//! Mixtral / top-p) the share of tokens that selected e in any slot. 0 for an empty batch.
//!
//! With `null_experts` = N > 0 (AdaMoE, Zeng et al. 2024: ids in [E − N, E) are null experts
//! that compute nothing) the sum runs over the E' = E − N true experts only:
//! E'·Σ_{e<E'} f_e·P̄_e, f_e counting the slots that name true expert e (a null slot counts
//! for nothing; without any_slot a token counts only when its first slot is a true expert),
//! P̄_e the mean over all tokens of the probability over all E (true and null) experts. Its
//! gradient reaches the true experts' probabilities only. N = 0 is the plain loss, bit for bit.
struct load_balance {
  static constexpr loss_target target = loss_target::probs;
  bool any_slot = false;
  index_t null_experts = 0;  //!< N: the last N router ids are null experts (AdaMoE), 0 = none

  [[nodiscard]] index_t scratch_doubles(index_t experts) const { return 2 * experts; }
  [[nodiscard]] int slots(const plan_ref& plan, index_t t) const {
    return any_slot ? plan.counts[t] : (plan.counts[t] > 0 ? 1 : 0);
  }
  //! E' = E − N (throws range_error naming null_experts unless 0 <= N < E).
  [[nodiscard]] index_t true_experts(index_t experts) const {
    if (null_experts < 0 || (experts > 0 && null_experts >= experts)) {
      throw range_error("null_experts",
                        detail::concat("null_experts must be in [0, E) = [0, ", experts,
                                       "), got ", null_experts));
    }
    return experts - null_experts;
  }
  //! f counts of one token: all its counted slots, or with null experts those naming a true
  //! expert (id < E').
  void count_row(const plan_ref& plan, index_t t, index_t true_e, double* f) const {
    const auto ids = detail::id_row(plan, t);
    if (null_experts == 0) {
      load_balance_count_row(ids, slots(plan, t), f);
      return;
    }
    const int n = slots(plan, t);
    for (int j = 0; j < n; ++j)
      if (ids[j] < true_e) f[ids[j]] += 1.0;
  }

  [[nodiscard]] float value(const plan_ref& plan, double* scratch) const {
    const index_t tokens = plan.num_tokens, e_count = plan.num_experts;
    const index_t true_e = true_experts(e_count);
    if (tokens == 0) return 0.0f;
    double *f = scratch, *pbar = scratch + e_count;
    detail::zero(scratch, 2 * e_count);
    for (index_t t = 0; t < tokens; ++t) {
      count_row(plan, t, true_e, f);
      probability_sum_row(detail::row(plan.probs, t, e_count), pbar);
    }
    return load_balance_value(f, pbar, true_e, tokens, tokens);
  }

  void backward(const plan_ref& plan, float coeff, float* d_probs, double* scratch) const {
    const index_t tokens = plan.num_tokens, e_count = plan.num_experts;
    const index_t true_e = true_experts(e_count);
    if (tokens == 0 || coeff == 0.0f) return;
    double* f = scratch;
    detail::zero(f, e_count);
    for (index_t t = 0; t < tokens; ++t) count_row(plan, t, true_e, f);
    const double scale =
        static_cast<double>(coeff) * true_e / (static_cast<double>(tokens) * tokens);
    for (index_t t = 0; t < tokens; ++t)
      load_balance_backward_row(f, scale, detail::mutable_row(d_probs, t, e_count));
  }
};

//! Adaptive Gating's load balance (paper eq. 4): E · Σ_e f¹_e · P̄_e with f¹ the expert shares
//! among the tokens that use one expert and P̄ over all tokens; 0 when no token uses one.
struct top1_only_load_balance {
  static constexpr loss_target target = loss_target::probs;

  [[nodiscard]] index_t scratch_doubles(index_t experts) const { return 2 * experts; }

  [[nodiscard]] float value(const plan_ref& plan, double* scratch) const {
    const index_t tokens = plan.num_tokens, experts = plan.num_experts;
    double *f = scratch, *pbar = scratch + experts;
    detail::zero(scratch, 2 * experts);
    index_t singles = 0;
    for (index_t t = 0; t < tokens; ++t) {
      if (plan.counts[t] == 1) {
        load_balance_count_row(detail::id_row(plan, t), 1, f);
        ++singles;
      }
      probability_sum_row(detail::row(plan.probs, t, experts), pbar);
    }
    if (singles == 0) return 0.0f;
    return load_balance_value(f, pbar, experts, singles, tokens);
  }

  void backward(const plan_ref& plan, float coeff, float* d_probs, double* scratch) const {
    const index_t tokens = plan.num_tokens, experts = plan.num_experts;
    if (tokens == 0 || coeff == 0.0f) return;
    double* f = scratch;
    detail::zero(f, experts);
    index_t singles = 0;
    for (index_t t = 0; t < tokens; ++t) {
      if (plan.counts[t] == 1) {
        load_balance_count_row(detail::id_row(plan, t), 1, f);
        ++singles;
      }
    }
    if (singles == 0) return;
    const double scale =
        static_cast<double>(coeff) * experts / (static_cast<double>(singles) * tokens);
    for (index_t t = 0; t < tokens; ++t)
      load_balance_backward_row(f, scale, detail::mutable_row(d_probs, t, experts));
  }
};

//! ST-MoE z-loss mean_t logsumexp(logits_t)². 0 for an empty batch.
struct z_loss {
  static constexpr loss_target target = loss_target::logits;

  [[nodiscard]] index_t scratch_doubles(index_t /*experts*/) const { return 0; }

  [[nodiscard]] float value(const plan_ref& plan, double* /*scratch*/) const {
    const index_t tokens = plan.num_tokens, e_count = plan.num_experts;
    if (tokens == 0) return 0.0f;
    double s = 0.0;
    for (index_t t = 0; t < tokens; ++t) {
      const double lse = logsumexp(detail::row(plan.logits, t, e_count));
      s += lse * lse;
    }
    return static_cast<float>(s / tokens);
  }

  void backward(const plan_ref& plan, float coeff, float* d_logits, double* /*scratch*/) const {
    const index_t tokens = plan.num_tokens, e_count = plan.num_experts;
    if (tokens == 0 || coeff == 0.0f) return;
    for (index_t t = 0; t < tokens; ++t) {
      const double lse = logsumexp(detail::row(plan.logits, t, e_count));
      z_loss_backward_row(detail::row(plan.probs, t, e_count), lse, coeff, tokens,
                          detail::mutable_row(d_logits, t, e_count));
    }
  }
};

//! ST-MoE z-loss mean_t logsumexp(logits_t)² of a router whose plan scores are not the softmax
//! of its logits (routers::ScoredTopK): the value of `z_loss`, the gradient recomputed from the
//! logits. 0 for an empty batch.
struct scored_z_loss {
  static constexpr loss_target target = loss_target::logits;

  [[nodiscard]] index_t scratch_doubles(index_t /*experts*/) const { return 0; }

  [[nodiscard]] float value(const plan_ref& plan, double* scratch) const {
    return z_loss{}.value(plan, scratch);
  }

  void backward(const plan_ref& plan, float coeff, float* d_logits, double* /*scratch*/) const {
    const index_t tokens = plan.num_tokens, e_count = plan.num_experts;
    if (tokens == 0 || coeff == 0.0f) return;
    for (index_t t = 0; t < tokens; ++t) {
      const auto lg = detail::row(plan.logits, t, e_count);
      z_loss_backward_row_from_logits(lg, logsumexp(lg), coeff, tokens,
                                      detail::mutable_row(d_logits, t, e_count));
    }
  }
};

//! DeepSeek-V3's complementary sequence-wise balance loss (arXiv 2412.19437, eq. 17-20), on the
//! plan's scores: per sequence of S tokens, Σ_i f_i · P_i with f_i = E / (k·S) · #{t: i
//! selected by t} and P_i = (1/S) Σ_t s_{t,i} / Σ_j s_{t,j}; the mean over the B = T / S
//! sequences (k = the plan width; the coefficient α is the caller's). S = `sequence_length`,
//! or T when 0; T must be a multiple of S (range_error naming sequence_length). The scores
//! should be positive (a token whose scores sum to 0 contributes no affinity). 0 for an
//! empty batch.
struct sequence_balance {
  static constexpr loss_target target = loss_target::probs;
  index_t sequence_length = 0;  //!< S (0: the batch is one sequence)

  [[nodiscard]] index_t scratch_doubles(index_t experts) const { return 2 * experts; }

  //! S for T tokens; throws range_error unless S divides T.
  [[nodiscard]] index_t length(index_t tokens) const {
    const index_t s = sequence_length == 0 ? tokens : sequence_length;
    if (sequence_length < 0 || (tokens > 0 && tokens % s != 0)) {
      throw range_error("sequence_length",
                        detail::concat("sequence_length must be >= 0 and divide T = ", tokens,
                                       " (T = B·S tokens in sequence order), got ",
                                       sequence_length));
    }
    return s;
  }

  [[nodiscard]] float value(const plan_ref& plan, double* scratch) const {
    const index_t tokens = plan.num_tokens, e_count = plan.num_experts;
    const index_t s = length(tokens);
    if (tokens == 0 || plan.width == 0) return 0.0f;
    double *f = scratch, *p = scratch + e_count;
    const double f_scale = static_cast<double>(e_count) / (static_cast<double>(plan.width) * s);
    double total = 0.0;
    for (index_t first = 0; first < tokens; first += s) {
      detail::zero(scratch, 2 * e_count);
      for (index_t t = first; t < first + s; ++t) {
        load_balance_count_row(detail::id_row(plan, t), plan.counts[t], f);
        normalized_score_sum_row(detail::row(plan.probs, t, e_count), p);
      }
      double seq = 0.0;
      for (index_t e = 0; e < e_count; ++e) seq += f_scale * f[e] * (p[e] / s);
      total += seq;
    }
    const index_t sequences = tokens / s;  // exact: length() checked that s divides T
    return static_cast<float>(total / static_cast<double>(sequences));
  }

  void backward(const plan_ref& plan, float coeff, float* d_probs, double* scratch) const {
    const index_t tokens = plan.num_tokens, e_count = plan.num_experts;
    const index_t s = length(tokens);
    if (tokens == 0 || plan.width == 0 || coeff == 0.0f) return;
    double* f = scratch;
    const double f_scale = static_cast<double>(e_count) / (static_cast<double>(plan.width) * s);
    const index_t sequences = tokens / s;  // exact: length() checked that s divides T
    const double scale = static_cast<double>(coeff) / (static_cast<double>(sequences) * static_cast<double>(s));
    for (index_t first = 0; first < tokens; first += s) {
      detail::zero(f, e_count);
      for (index_t t = first; t < first + s; ++t)
        load_balance_count_row(detail::id_row(plan, t), plan.counts[t], f);
      for (index_t e = 0; e < e_count; ++e) f[e] *= f_scale;
      for (index_t t = first; t < first + s; ++t)
        sequence_balance_backward_row(f, detail::row(plan.probs, t, e_count), scale,
                                      detail::mutable_row(d_probs, t, e_count));
    }
  }
};

//! Mean router entropy mean_t −Σ_e P log P (top-p's "dynamic loss"). 0 for an empty batch.
struct entropy {
  static constexpr loss_target target = loss_target::logits;

  [[nodiscard]] index_t scratch_doubles(index_t /*experts*/) const { return 0; }

  [[nodiscard]] float value(const plan_ref& plan, double* /*scratch*/) const {
    const index_t tokens = plan.num_tokens, experts = plan.num_experts;
    if (tokens == 0) return 0.0f;
    double s = 0.0;
    for (index_t t = 0; t < tokens; ++t) {
      const auto lg = detail::row(plan.logits, t, experts);
      entropy_accumulate_row(lg, detail::row(plan.probs, t, experts), logsumexp(lg), s);
    }
    return static_cast<float>(s / tokens);
  }

  void backward(const plan_ref& plan, float coeff, float* d_logits, double* /*scratch*/) const {
    const index_t tokens = plan.num_tokens, experts = plan.num_experts;
    if (tokens == 0 || coeff == 0.0f) return;
    for (index_t t = 0; t < tokens; ++t) {
      const auto lg = detail::row(plan.logits, t, experts);
      entropy_backward_row(lg, detail::row(plan.probs, t, experts), logsumexp(lg), coeff, tokens,
                           detail::mutable_row(d_logits, t, experts));
    }
  }
};

//! Diagnostic, not a loss: the share of tokens routed to exactly two experts (no gradient;
//! its coefficient is ignored). 0 for an empty batch.
struct two_expert_share {
  static constexpr loss_target target = loss_target::none;

  [[nodiscard]] index_t scratch_doubles(index_t /*experts*/) const { return 0; }

  [[nodiscard]] float value(const plan_ref& plan, double* /*scratch*/) const {
    index_t top2 = 0;
    for (auto c : plan.counts) top2 += c == 2 ? 1 : 0;
    return plan.num_tokens == 0
               ? 0.0f
               : static_cast<float>(static_cast<double>(top2) / plan.num_tokens);
  }
};

}  // namespace terms

//! A loss term bound to the field of a router's `losses_type` that receives its value in
//! forward and holds its coefficient in backward.
template <auto Field, class Term>
struct bound_loss {
  Term term{};
  static constexpr auto field = Field;
};

//! `bind_loss<&losses_type::lb_switch>(terms::load_balance{})`.
template <auto Field, class Term>
constexpr bound_loss<Field, Term> bind_loss(Term term) {
  return {term};
}

}  // namespace switchyard::routing
