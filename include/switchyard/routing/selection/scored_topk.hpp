// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file scored_topk.hpp
//! One token's selection and combine weights for the production routers (README steps 3-8),
//! `SWITCHYARD_HD` and allocation-free:
//!
//! - `scored_weights`: steps 6-8 (the selected scores, or a softmax of the selected logits;
//!   normalisation; scaling) and their backward row (`accumulate`: d_weights -> d_scores, or
//!   d_logits for the softmax after top-k);
//! - `scored_selection`: the per-token rule, steps 3-5 then the weights. Selection scores
//!   c = (logits or scores) + selection bias; a group limit keeps the `topk_group` best of
//!   `n_group` consecutive groups (ties to the lower group) and gives every other expert
//!   `excluded_fill`; then the k largest c, ids in descending c, ties to the lower id (the
//!   plan's slot order). Hash selection takes the token's row of a frozen table instead.
//!   The group limit is found without arrays: the `topk_group`-th best group is located by
//!   `topk_group` scans over the groups, and a group is kept when it ranks no lower than it
//!   (O((k + topk_group) · E) per token);
//! - `scored_rules`: the per-token rules of a batch (the token's hash-table row).

#include <cmath>
#include <cstdint>

#include <cuda/std/span>

#include "switchyard/core/config.hpp"
#include "switchyard/core/policy.hpp"
#include "switchyard/core/span.hpp"
#include "switchyard/routing/ranking.hpp"
#include "switchyard/routing/scored.hpp"

namespace switchyard::routing {

//! The raw weights (step 6) of one token's selected experts, computed on demand: the score
//! of expert e_j, or (softmax after top-k) exp(l_{e_j} − m) / Σ_i exp(l_{e_i} − m) with m the
//! largest selected logit (PyTorch's softmax of the k logits).
struct selected_raw_weights {
  span<const float> scores;
  span<const float> logits;
  span<const std::int32_t> ids;
  int count = 0;
  bool softmax_of_logits = false;
  float max_logit = 0.0f;
  float exp_sum = 1.0f;

  SWITCHYARD_HD selected_raw_weights(span<const float> s, span<const float> l,
                                     span<const std::int32_t> selected, int n, bool softmax)
      : scores(s), logits(l), ids(selected), count(n), softmax_of_logits(softmax) {
    if (!softmax || n == 0) return;
    max_logit = logits[ids[0]];
    for (int j = 1; j < n; ++j) max_logit = logits[ids[j]] > max_logit ? logits[ids[j]] : max_logit;
    exp_sum = 0.0f;
    for (int j = 0; j < n; ++j) exp_sum += expf(logits[ids[j]] - max_logit);
  }
  //! w_j before normalisation and scaling.
  [[nodiscard]] SWITCHYARD_HD float operator()(int j) const {
    return softmax_of_logits ? expf(logits[ids[j]] - max_logit) / exp_sum : scores[ids[j]];
  }
};

//! The denominator N of a normalisation over raw weights, and whether its gradient flows
//! (normalization::none: N = 1, no gradient; clamp_min with Σ < ε: N = ε, no gradient).
struct normalization_denominator {
  float value = 1.0f;
  bool differentiable = false;

  template <class Raw>
  SWITCHYARD_HD normalization_denominator(const weight_normalization& n, const Raw& raw,
                                          int count) {
    if (n.kind == normalization::sum) {
      float s = 0.0f;
      for (int j = 0; j < count; ++j) s += raw(j);
      differentiable = true;
      if (n.eps == epsilon_kind::add) {
        value = s + n.eps_value;
      } else if (n.eps == epsilon_kind::clamp_min && s < n.eps_value) {
        value = n.eps_value;
        differentiable = false;
      } else {
        value = s;
      }
    } else if (n.kind == normalization::pnorm) {
      float s = 0.0f;
      if (n.p == 1.0f) {
        for (int j = 0; j < count; ++j) s += fabsf(raw(j));
        value = s;
      } else if (n.p == 2.0f) {
        for (int j = 0; j < count; ++j) s += raw(j) * raw(j);
        value = sqrtf(s);
      } else {
        for (int j = 0; j < count; ++j) s += powf(fabsf(raw(j)), n.p);
        value = powf(s, 1.0f / n.p);
      }
      differentiable = true;
    }
  }
};

//! Steps 6-8 of one token and their backward.
struct scored_weights {
  bool softmax_after_topk = false;   //!< w = softmax of the selected logits
  weight_normalization normalize{};  //!< step 7
  float scaling = 1.0f;              //!< step 8

  //! weights[j] for the first `count` slots of `ids` (the rest untouched).
  SWITCHYARD_HD void apply(span<const float> scores, span<const float> logits,
                           span<const std::int32_t> ids, int count, span<float> weights) const {
    const selected_raw_weights raw(scores, logits, ids, count, softmax_after_topk);
    const normalization_denominator n(normalize, raw, count);
    for (int j = 0; j < count; ++j) {
      float w = raw(j);
      if (normalize.kind != normalization::none) w = w / n.value;
      weights[j] = w * scaling;
    }
  }

  //! Accumulates the gradient of Σ_j d_weights[j] · weights[j] into d_scores [E] (or, with
  //! the softmax after top-k, into d_logits [E]): through the scaling, the normalisation
  //! (sum: (d_u_j − ⟨d_u, u⟩) / N; p-norm: (d_u_j − ⟨d_u, u⟩ · |u_j|^(p−1) sign u_j) / N, with
  //! u = w / scaling; none, or clamp_min below ε: d_u_j / N) and the softmax of the selected
  //! logits. `weights` (the plan's) is not read: everything is recomputed from the scores.
  SWITCHYARD_HD void accumulate(span<const float> scores, span<const float> logits,
                                span<const std::int32_t> ids, span<const float> /*weights*/,
                                span<const float> d_weights, int count, span<float> d_scores,
                                span<float> d_logits) const {
    const selected_raw_weights raw(scores, logits, ids, count, softmax_after_topk);
    const normalization_denominator n(normalize, raw, count);
    const bool pnorm = normalize.kind == normalization::pnorm;
    float dot = 0.0f;  // ⟨d_u, u⟩
    if (n.differentiable) {
      for (int j = 0; j < count; ++j) dot += d_weights[j] * scaling * (raw(j) / n.value);
    }
    const auto d_raw = [&](int j) {
      const float du = d_weights[j] * scaling;
      if (!n.differentiable) return normalize.kind == normalization::none ? du : du / n.value;
      if (!pnorm) return (du - dot) / n.value;
      const float u = raw(j) / n.value;
      const float direction =
          normalize.p == 1.0f ? (u > 0.0f ? 1.0f : (u < 0.0f ? -1.0f : 0.0f))
          : normalize.p == 2.0f
              ? u
              : (u < 0.0f ? -1.0f : 1.0f) * powf(fabsf(u), normalize.p - 1.0f);
      return (du - dot * direction) / n.value;
    };
    if (!softmax_after_topk) {
      for (int j = 0; j < count; ++j) d_scores[ids[j]] += d_raw(j);
      return;
    }
    float dot_raw = 0.0f;
    for (int j = 0; j < count; ++j) dot_raw += raw(j) * d_raw(j);
    for (int j = 0; j < count; ++j) d_logits[ids[j]] += raw(j) * (d_raw(j) - dot_raw);
  }
};

//! One token's production selection rule (steps 3-8; see the file comment).
struct scored_selection {
  using policy_kind = selection_rule_tag;

  int k = 8;                                        //!< experts per token
  bool select_on_logits = false;                    //!< c from the logits instead of the scores
  selection_kind selection = selection_kind::topk;  //!< top-k or hash
  group_limit groups{};                             //!< step 4
  scored_weights weights{};                         //!< steps 6-8
  const float* selection_bias = nullptr;            //!< [E] (stride `bias_stride`) or null
  index_t bias_stride = 1;
  const std::int32_t* hash_row = nullptr;  //!< this token's k experts (stride `hash_stride`)
  index_t hash_stride = 1;

  [[nodiscard]] SWITCHYARD_HD int width(int /*num_experts*/) const { return k; }

  //! c_e before the group limit: (logits or scores) + selection bias.
  [[nodiscard]] SWITCHYARD_HD float choice(span<const float> scores, span<const float> logits,
                                           int e) const {
    const float base = select_on_logits || weights.softmax_after_topk ? logits[e] : scores[e];
    return selection_bias != nullptr ? base + selection_bias[e * bias_stride] : base;
  }

  //! Group g's score over c (top2_sum or max).
  [[nodiscard]] SWITCHYARD_HD float group_value(span<const float> scores,
                                                span<const float> logits, int g, int size) const {
    float m1 = choice(scores, logits, g * size);
    if (groups.score == group_score::max) {
      for (int i = 1; i < size; ++i) {
        const float v = choice(scores, logits, g * size + i);
        m1 = v > m1 ? v : m1;
      }
      return m1;
    }
    float m2 = choice(scores, logits, g * size + 1);
    if (m2 > m1) {
      const float t = m1;
      m1 = m2;
      m2 = t;
    }
    for (int i = 2; i < size; ++i) {
      const float v = choice(scores, logits, g * size + i);
      if (v > m1) {
        m2 = m1;
        m1 = v;
      } else if (v > m2) {
        m2 = v;
      }
    }
    return m1 + m2;
  }

  //! The last kept group (the `topk_group`-th in descending group score, ties to the lower
  //! group) and its score.
  struct group_cut {
    int group = -1;
    float value = 0.0f;
    int size = 0;  //!< experts per group; 0: no group limit
  };
  [[nodiscard]] SWITCHYARD_HD group_cut cut(span<const float> scores,
                                            span<const float> logits) const {
    group_cut c{};
    const int n = static_cast<int>(scores.size());
    if (groups.n_group <= 1) return c;
    c.size = n / groups.n_group;
    for (int pass = 0; pass < groups.topk_group; ++pass) {
      int best = -1;
      float best_v = 0.0f;
      for (int g = 0; g < groups.n_group; ++g) {
        const float v = group_value(scores, logits, g, c.size);
        if (c.group >= 0 && !ranks_before(c.value, c.group, v, g)) continue;  // already kept
        if (best < 0 || ranks_before(v, g, best_v, best)) {
          best = g;
          best_v = v;
        }
      }
      c.group = best;
      c.value = best_v;
    }
    return c;
  }

  //! Whether group g (of score v) is kept under cut `c`.
  [[nodiscard]] SWITCHYARD_HD static bool kept(const group_cut& c, int g, float v) {
    return g == c.group || ranks_before(v, g, c.value, c.group);
  }

  //! The selection scores after the group limit (README step 4, `selection_scores`) into
  //! out [E]: a diagnostic, the values top-k is taken of.
  SWITCHYARD_HD void selection_scores(span<const float> scores, span<const float> logits,
                                      span<float> out) const {
    const int n = static_cast<int>(scores.size());
    const group_cut c = cut(scores, logits);
    const int size = c.size > 0 ? c.size : n;
    for (int g = 0; g * size < n; ++g) {
      const bool keep = c.size == 0 || kept(c, g, group_value(scores, logits, g, size));
      for (int e = g * size; e < (g + 1) * size; ++e)
        out[e] = keep ? choice(scores, logits, e) : groups.excluded_fill;
    }
  }

  //! Selects one token's experts and writes their weights; returns k.
  SWITCHYARD_HD int select(span<const float> scores, span<const float> logits,
                           span<std::int32_t> ids, span<float> out_weights) const {
    const int n = static_cast<int>(scores.size());
    const int kk = k < n ? k : n;
    if (selection == selection_kind::hash) {
      for (int j = 0; j < kk; ++j) ids[j] = hash_row[j * hash_stride];
    } else {
      const group_cut c = cut(scores, logits);
      const int size = c.size > 0 ? c.size : n;
      int last = -1;
      float last_v = 0.0f;
      for (int j = 0; j < kk; ++j) {
        int best = -1;
        float best_v = 0.0f;
        for (int g = 0; g * size < n; ++g) {
          const bool keep = c.size == 0 || kept(c, g, group_value(scores, logits, g, size));
          for (int e = g * size; e < (g + 1) * size; ++e) {
            const float v = keep ? choice(scores, logits, e) : groups.excluded_fill;
            if (last >= 0 && !ranks_before(last_v, last, v, e)) continue;  // already selected
            if (best < 0 || ranks_before(v, e, best_v, best)) {
              best = e;
              best_v = v;
            }
          }
        }
        ids[j] = best;
        last = best;
        last_v = best_v;
      }
    }
    weights.apply(scores, logits, span<const std::int32_t>(ids.data(), ids.size()), kk,
                  out_weights);
    for (int j = kk; j < static_cast<int>(ids.size()); ++j) {
      ids[j] = -1;
      out_weights[j] = 0.0f;
    }
    return kk;
  }
};

//! The per-token rules of one batch: `rule(t)` is the shared rule with token t's hash-table
//! row (hash selection).
struct scored_rules {
  scored_selection base{};                  //!< every token's rule but the hash row
  const std::int32_t* table = nullptr;      //!< hash_table [vocab, k] or null
  index_t table_row_stride = 0;             //!< elements between two table rows
  index_t table_col_stride = 1;             //!< elements between two entries of a row
  const std::int32_t* token_ids = nullptr;  //!< [T] (stride `token_stride`) or null
  index_t token_stride = 1;
  const std::int32_t* max_k = nullptr;  //!< [T] per-token cap (stride `max_k_stride`) or null
  index_t max_k_stride = 1;

  [[nodiscard]] SWITCHYARD_HD scored_selection rule(index_t t) const {
    scored_selection r = base;
    if (max_k != nullptr) {
      const int cap = static_cast<int>(max_k[t * max_k_stride]);
      if (cap < r.k) r.k = cap;  // the first cap of the k (top-k order, or the hash row's)
    }
    if (table != nullptr) {
      r.hash_row = table + static_cast<index_t>(token_ids[t * token_stride]) * table_row_stride;
      r.hash_stride = table_col_stride;
    }
    return r;
  }
};

}  // namespace switchyard::routing
