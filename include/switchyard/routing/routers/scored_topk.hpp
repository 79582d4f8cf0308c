// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file scored_topk.hpp
//! `routers::ScoredTopK`: the one router of the production MoE models of 2024-26 (DeepSeek-V2/
//! V3/V4, GLM-4.5, dots1, Llama-4, gpt-oss, Qwen2/3-MoE, Qwen3-Next, Mixtral, OLMoE, HunYuan,
//! Granite, MiniMax-M2, ERNIE-4.5, DBRX, LongCat-Flash): README steps 1-8 of
//! ../shared/hf-cases (docs/routers/production.md), configured by members; presets per
//! family in presets.hpp. A composition (docs/design.md, "Routers are compositions"):
//!
//! - scoring `routing::scored_linear`: logits = x · wᵀ (+ b) -> plan.logits; scores =
//!   score(logits) -> plan.probs. With `softmax_after_topk` plan.probs holds the softmax over
//!   all E logits (what the load-balance losses read, as in HF's aux loss) and `scoring` is
//!   ignored: the weights are the softmax of the k selected logits;
//! - selection `routing::scored_rules` (token_rules: the token's hash row), steps 3-8;
//! - weights `routing::scored_weights` (backward through scaling, normalisation and the
//!   softmax after top-k; no gradient through the choice, the selection bias, the groups or
//!   the hash table);
//! - losses: `lb` (any-slot load balance on plan.probs), `sequence_balance` (DeepSeek-V3's
//!   sequence-wise balance) and `z` (z-loss of the logits).
//!
//! Host backend only for now (the CUDA backend refuses it at compile time).

#include <cmath>
#include <tuple>

#include "switchyard/core/error.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/core/workspace.hpp"
#include "switchyard/routing/composition.hpp"
#include "switchyard/routing/concepts.hpp"
#include "switchyard/routing/loss_terms.hpp"
#include "switchyard/routing/plan.hpp"
#include "switchyard/routing/scored.hpp"
#include "switchyard/routing/selection/scored_topk.hpp"

namespace switchyard::routers {

//! The production top-k router (see the file comment): `ScoredTopK{.k = 8, .scoring =
//! routing::score_function::sigmoid, .groups = {.n_group = 8, .topk_group = 4}, ...}` or a
//! preset (`routers::presets::deepseek_v3(...)`, presets.hpp).
struct ScoredTopK {
  using policy_kind = router_tag;
  using params_type = routing::scored_router_params;
  using grads_type = routing::scored_router_grads;
  using losses_type = routing::scored_router_losses;

  int k = 8;  //!< experts per token, 1 <= k <= E
  routing::score_function scoring = routing::score_function::sigmoid;  //!< step 2
  bool select_on_logits = false;    //!< top-k of the logits (Llama-4) instead of the scores
  bool softmax_after_topk = false;  //!< gpt-oss/Granite: top-k of the logits, weights = softmax of the k selected logits (`scoring` ignored; plan.probs = softmax of all logits)
  routing::selection_kind selection = routing::selection_kind::topk;  //!< step 5
  routing::group_limit groups{};                                      //!< step 4
  routing::weight_normalization normalize{};                          //!< step 7
  float scaling = 1.0f;          //!< step 8, routed_scaling_factor
  index_t sequence_length = 0;   //!< S of the sequence-level balance loss (0: the batch is one sequence)
  //! AdaMoE null experts: the last N router ids compute nothing; `lb` balances the E − N true
  //! experts only (terms::load_balance::null_experts). 0 <= N < E.
  index_t null_experts = 0;

  [[nodiscard]] index_t num_experts(const params_type& p) const { return p.w.extent(0); }
  [[nodiscard]] index_t width(const params_type&) const { return k; }

  //! Throws range_error naming the member for options that do not fit E experts.
  void validate(index_t experts) const {
    if (k < 1 || k > experts) {
      throw range_error("k", detail::concat("k must be in [1, E] = [1, ", experts, "], got ", k));
    }
    if (groups.n_group < 1 || experts % groups.n_group != 0) {
      throw range_error("groups.n_group",
                        detail::concat("groups.n_group must be >= 1 and divide E = ", experts,
                                       ", got ", groups.n_group));
    }
    if (groups.n_group > 1) {
      const index_t size = experts / groups.n_group;
      if (groups.topk_group < 1 || groups.topk_group > groups.n_group) {
        throw range_error("groups.topk_group",
                          detail::concat("groups.topk_group must be in [1, n_group] = [1, ",
                                         groups.n_group, "], got ", groups.topk_group));
      }
      if (groups.score == routing::group_score::top2_sum && size < 2) {
        throw range_error("groups.n_group",
                          detail::concat("groups.n_group: group_score::top2_sum needs at least "
                                         "2 experts per group, got E / n_group = ", experts,
                                         " / ", groups.n_group, " = ", size));
      }
      if (selection == routing::selection_kind::topk && k > groups.topk_group * size) {
        throw range_error("k", detail::concat("k must be <= topk_group · E / n_group = ",
                                              groups.topk_group * size,
                                              " (the experts of the kept groups), got ", k));
      }
      if (std::isnan(groups.excluded_fill)) {
        throw range_error("groups.excluded_fill", "groups.excluded_fill must not be NaN");
      }
    }
    if (normalize.kind == routing::normalization::pnorm &&
        (!(normalize.p > 0.0f) || !std::isfinite(normalize.p))) {
      throw range_error("normalize.p", detail::concat("normalize.p must be finite and > 0, got ",
                                                      normalize.p));
    }
    if (normalize.eps != routing::epsilon_kind::none) {
      if (normalize.kind != routing::normalization::sum) {
        throw range_error("normalize.eps",
                          "normalize.eps applies to normalization::sum only, got an epsilon "
                          "with another normalization");
      }
      if (!(normalize.eps_value >= 0.0f) || !std::isfinite(normalize.eps_value)) {
        throw range_error("normalize.eps_value",
                          detail::concat("normalize.eps_value must be finite and >= 0, got ",
                                         normalize.eps_value));
      }
    }
    if (!std::isfinite(scaling)) {
      throw range_error("scaling", detail::concat("scaling must be finite, got ", scaling));
    }
    (void)routing::terms::load_balance{.null_experts = null_experts}.true_experts(experts);
    if (sequence_length < 0) {
      throw range_error("sequence_length",
                        detail::concat("sequence_length must be >= 0, got ", sequence_length));
    }
  }

  //! The per-token rule with no params bound (tests, diagnostics: `selection_scores`).
  [[nodiscard]] routing::scored_selection rule_options() const {
    return {.k = k,
            .select_on_logits = select_on_logits,
            .selection = selection,
            .groups = groups,
            .weights = weights_backward()};
  }

  //! The batch's per-token rules: the selection bias and the hash table bound from `p`.
  //! When `ws` carves (a run, not a size query), checks what the rules read: T a multiple of
  //! sequence_length, the per-token cap token_max_k [T] in [1, k] (the compute knob), the
  //! selection bias [E] and finite, and for hash selection the table
  //! [vocab, k] and the token ids [T] in range, the table rows the batch uses without a
  //! repeated expert (each error names its argument, index and value).
  [[nodiscard]] routing::scored_rules token_rules(const params_type& p, index_t tokens,
                                                  workspace_arena& ws) const {
    routing::scored_rules rules{.base = rule_options()};
    if (!ws.carving()) return rules;
    (void)routing::terms::sequence_balance{sequence_length}.length(tokens);
    const index_t experts = p.w.extent(0);
    if (detail::present(p.selection_bias)) {
      check_view("params.selection_bias", p.selection_bias, {experts}, "[E]");
      for (index_t e = 0; e < experts; ++e) {
        if (!std::isfinite(p.selection_bias(e))) {
          throw non_finite_error("params.selection_bias",
                                 detail::concat("params.selection_bias[", e,
                                                "] must be finite, got ", p.selection_bias(e)));
        }
      }
      rules.base.selection_bias = p.selection_bias.data_handle();
      rules.base.bias_stride = p.selection_bias.stride(0);
    }
    if (detail::present(p.token_max_k)) {
      check_view("params.token_max_k", p.token_max_k, {tokens}, "[T] with T = x.extent(0)");
      for (index_t t = 0; t < tokens; ++t) {
        const index_t c = p.token_max_k(t);
        if (c < 1 || c > k) {
          throw range_error("params.token_max_k",
                            detail::concat("params.token_max_k[", t, "] must be in [1, k] = [1, ",
                                           k, "], got ", c));
        }
      }
      rules.max_k = p.token_max_k.data_handle();
      rules.max_k_stride = p.token_max_k.stride(0);
    }
    if (selection == routing::selection_kind::hash && tokens > 0) {
      check_hash(p, tokens, experts);
      rules.table = p.hash_table.data_handle();
      rules.table_row_stride = p.hash_table.stride(0);
      rules.table_col_stride = p.hash_table.stride(1);
      rules.token_ids = p.token_ids.data_handle();
      rules.token_stride = p.token_ids.stride(0);
    }
    return rules;
  }

  // ---- the composition (run by a backend's generic route) ---------------------------------
  //! The scoring part (named so because `scoring` is the score-function member).
  [[nodiscard]] routing::scored_linear scoring_part() const {
    return {softmax_after_topk ? routing::score_function::softmax : scoring};
  }
  [[nodiscard]] routing::scored_weights weights_backward() const {
    return {softmax_after_topk, normalize, scaling};
  }
  [[nodiscard]] auto loss_terms() const {
    return std::tuple{
        routing::bind_loss<&losses_type::lb>(
            routing::terms::load_balance{.any_slot = true, .null_experts = null_experts}),
        routing::bind_loss<&losses_type::sequence_balance>(
            routing::terms::sequence_balance{sequence_length}),
        routing::bind_loss<&losses_type::z>(routing::terms::scored_z_loss{})};
  }

 private:
  void check_hash(const params_type& p, index_t tokens, index_t experts) const {
    if (!detail::present(p.hash_table) || !detail::present(p.token_ids)) {
      throw shape_error(!detail::present(p.hash_table) ? "params.hash_table" : "params.token_ids",
                        "params.hash_table [vocab, k] and params.token_ids [T] are required by "
                        "selection_kind::hash");
    }
    check_view("params.hash_table", p.hash_table, {-1, k}, "[vocab, k]");
    check_view("params.token_ids", p.token_ids, {tokens}, "[T] with T = x.extent(0)");
    const index_t vocab = p.hash_table.extent(0);
    for (index_t t = 0; t < tokens; ++t) {
      const index_t v = p.token_ids(t);
      if (v < 0 || v >= vocab) {
        throw range_error("params.token_ids",
                          detail::concat("params.token_ids[", t, "] must be in [0, vocab) = [0, ",
                                         vocab, "), got ", v));
      }
      for (index_t j = 0; j < k; ++j) {
        const index_t e = p.hash_table(v, j);
        if (e < 0 || e >= experts) {
          throw range_error("params.hash_table",
                            detail::concat("params.hash_table[", v, ", ", j,
                                           "] must be in [0, E) = [0, ", experts, "), got ", e,
                                           " (row of params.token_ids[", t, "])"));
        }
        for (index_t i = 0; i < j; ++i) {
          if (p.hash_table(v, i) == e) {
            throw range_error("params.hash_table",
                              detail::concat("params.hash_table[", v, ", ", j, "] repeats expert ",
                                             e, " (also at [", v, ", ", i,
                                             "]); a row must name k distinct experts"));
          }
        }
      }
    }
  }
};

static_assert(check_router<ScoredTopK>());
static_assert(routing::ComposedRouter<ScoredTopK>);

}  // namespace switchyard::routers
