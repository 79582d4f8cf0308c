// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file presets.hpp
//! `routers::ScoredTopK` configured (`routers::presets::deepseek_v3(8, 8, 4, true, 2.5f)`, also
//! spelled `routing::presets::...`) as the router of each production family of
//! ../shared/hf-cases/README.md (table "Families"), with the family's hyperparameters as
//! arguments (their Hugging Face config names in the comments). Each says what else the MoE
//! layer needs: shared experts (`expert_weights::shared`), `MoELayer::router_weight_on_input`,
//! `MoELayer::identity_experts`, the activation, and which router params are set
//! (`params.b`, `params.selection_bias`, `params.hash_table` / `params.token_ids`).
//! docs/routers/production.md has the table and an example.

#include <cmath>

#include "switchyard/routing/routers/scored_topk.hpp"
#include "switchyard/routing/scored.hpp"

namespace switchyard::routers::presets {
using namespace ::switchyard::routing;  // the vocabulary of scored.hpp


//! DeepSeek-V2 (`DeepseekV2Moe`): softmax, top-k (`topk_method = "greedy"`: n_group = 1) or
//! group-limited greedy (`"group_limited_greedy"`: group score max, excluded experts' score
//! 0), no normalisation (HF never reads `norm_topk_prob`), × `routed_scaling_factor`.
//! Layer: shared experts (ungated, `n_shared_experts`), swiglu.
inline routers::ScoredTopK deepseek_v2(int num_experts_per_tok, int n_group = 1,
                                       int topk_group = 1, float routed_scaling_factor = 1.0f) {
  return {.k = num_experts_per_tok,
          .scoring = score_function::softmax,
          .groups = {.n_group = n_group, .topk_group = topk_group, .score = group_score::max,
                     .excluded_fill = 0.0f},
          .scaling = routed_scaling_factor};
}

//! DeepSeek-V3 (`DeepseekV3MoE`; also GLM-4.5 `Glm4MoeMoE` and dots.llm1 `Dots1MoE`, the same
//! router code): sigmoid, selection bias (`e_score_correction_bias`: `params.selection_bias`,
//! updated by training/selection_bias.hpp), group limit (top2_sum, excluded −inf), sum
//! normalisation + 1e-20 when `norm_topk_prob`, × `routed_scaling_factor`.
//! Layer: shared experts (ungated), swiglu. GLM-4.5 ships n_group = 1.
inline routers::ScoredTopK deepseek_v3(int num_experts_per_tok, int n_group = 1,
                                       int topk_group = 1, bool norm_topk_prob = true,
                                       float routed_scaling_factor = 1.0f) {
  return {.k = num_experts_per_tok,
          .scoring = score_function::sigmoid,
          .groups = {.n_group = n_group, .topk_group = topk_group, .score = group_score::top2_sum,
                     .excluded_fill = -INFINITY},
          .normalize = norm_topk_prob
                           ? weight_normalization{.kind = normalization::sum,
                                                  .eps = epsilon_kind::add, .eps_value = 1e-20f}
                           : weight_normalization{},
          .scaling = routed_scaling_factor};
}

//! GLM-4.5 (`Glm4MoeMoE`): deepseek_v3's router.
inline routers::ScoredTopK glm4_moe(int num_experts_per_tok, int n_group = 1, int topk_group = 1,
                                    bool norm_topk_prob = true,
                                    float routed_scaling_factor = 1.0f) {
  return deepseek_v3(num_experts_per_tok, n_group, topk_group, norm_topk_prob,
                     routed_scaling_factor);
}

//! dots.llm1 (`Dots1MoE`): deepseek_v3's router.
inline routers::ScoredTopK dots1(int num_experts_per_tok, int n_group = 1, int topk_group = 1,
                                 bool norm_topk_prob = true, float routed_scaling_factor = 1.0f) {
  return deepseek_v3(num_experts_per_tok, n_group, topk_group, norm_topk_prob,
                     routed_scaling_factor);
}

//! DeepSeek-V4 (`DeepseekV4SparseMoeBlock`, score layers): sqrt(softplus), selection bias
//! (`params.selection_bias`), sum normalisation + 1e-20 (always), × `routed_scaling_factor`.
//! Layer: one shared expert of width `moe_intermediate_size`, clamped SwiGLU
//! (`swiglu_limit`) for the experts and the shared expert.
inline routers::ScoredTopK deepseek_v4(int num_experts_per_tok,
                                       float routed_scaling_factor = 1.0f) {
  return {.k = num_experts_per_tok,
          .scoring = score_function::sqrt_softplus,
          .normalize = {.kind = normalization::sum, .eps = epsilon_kind::add, .eps_value = 1e-20f},
          .scaling = routed_scaling_factor};
}

//! DeepSeek-V4 hash layers (`hash_moe`): the experts of `params.hash_table[params.token_ids[t]]`
//! (frozen table [vocab, k]), weights from sqrt(softplus) scores, sum normalisation + 1e-20,
//! × `routed_scaling_factor`. Layer: as deepseek_v4.
inline routers::ScoredTopK deepseek_v4_hash(int num_experts_per_tok,
                                            float routed_scaling_factor = 1.0f) {
  routers::ScoredTopK r = deepseek_v4(num_experts_per_tok, routed_scaling_factor);
  r.selection = selection_kind::hash;
  return r;
}

//! Llama-4 (`Llama4TextMoe`): top-k of the logits, weight sigmoid(logit), no normalisation.
//! Layer: `router_weight_on_input = true` (the weight scales the expert's input), one shared
//! expert (ungated), swiglu, experts without biases.
inline routers::ScoredTopK llama4(int num_experts_per_tok) {
  return {.k = num_experts_per_tok, .scoring = score_function::sigmoid, .select_on_logits = true};
}

//! gpt-oss (`GptOssMLP`): router bias (`params.b`, trainable), top-k of the logits, weights =
//! softmax of the k selected logits (plan.probs holds the softmax of all logits).
//! Layer: expert biases (b1, b2), `gpt_oss_swiglu` (alpha 1.702, `swiglu_limit`), no shared
//! expert.
inline routers::ScoredTopK gpt_oss(int num_experts_per_tok) {
  return {.k = num_experts_per_tok, .scoring = score_function::softmax,
          .softmax_after_topk = true};
}

//! The softmax top-k family: Qwen2-MoE / Qwen3-MoE / Qwen3-Next, Mixtral
//! (`norm_topk_prob = true`), OLMoE (`false`), HunYuan-MoE (`true`): softmax over E, top-k,
//! sum normalisation without ε when `norm_topk_prob`. Layer: swiglu; Qwen2-MoE and Qwen3-Next
//! have one shared expert gated by sigmoid(x · shared_gate_w), HunYuan an ungated shared MLP.
inline routers::ScoredTopK qwen_moe(int num_experts_per_tok, bool norm_topk_prob = true) {
  return {.k = num_experts_per_tok,
          .scoring = score_function::softmax,
          .normalize = norm_topk_prob ? weight_normalization{.kind = normalization::sum}
                                      : weight_normalization{}};
}

//! GraniteMoE (`GraniteMoeMoE`): top-k of the logits, weights = softmax of the k selected
//! logits. Layer: swiglu, no shared expert.
inline routers::ScoredTopK granite(int num_experts_per_tok) {
  return {.k = num_experts_per_tok, .scoring = score_function::softmax,
          .softmax_after_topk = true};
}

//! MiniMax-M2 (`MiniMaxM2SparseMoeBlock`): sigmoid, selection bias
//! (`e_score_correction_bias`, on the block: `params.selection_bias`), sum normalisation
//! without ε. Layer: swiglu, no shared expert.
inline routers::ScoredTopK minimax_m2(int num_experts_per_tok) {
  return {.k = num_experts_per_tok,
          .scoring = score_function::sigmoid,
          .normalize = {.kind = normalization::sum}};
}

//! ERNIE-4.5 (`Ernie4_5_MoeSparseMoeBlock`): softmax, selection bias
//! (`moe_statics.e_score_correction_bias`, a [1, E] parameter without gradient:
//! `params.selection_bias`), w / max(Σ w, 1e-12). Layer: shared experts (ungated), swiglu.
inline routers::ScoredTopK ernie45(int num_experts_per_tok, float norm_min = 1e-12f) {
  return {.k = num_experts_per_tok,
          .scoring = score_function::softmax,
          .normalize = {.kind = normalization::sum, .eps = epsilon_kind::clamp_min,
                        .eps_value = norm_min}};
}

//! DBRX (`DbrxFFN`): softmax, top-k, weights / their p-norm (`moe_normalize_expert_weights`
//! = p; a config with None there is qwen_moe(k, false)). Layer: swiglu, no shared expert.
inline routers::ScoredTopK dbrx(int moe_top_k, float moe_normalize_expert_weights = 1.0f) {
  return {.k = moe_top_k,
          .scoring = score_function::softmax,
          .normalize = {.kind = normalization::pnorm, .p = moe_normalize_expert_weights}};
}

//! LongCat-Flash (`LongcatFlashMoE`): softmax over the E routed plus Z zero-computation
//! experts (`params.w` is [E + Z, d]), selection bias (`params.selection_bias`), no
//! normalisation, × `routed_scaling_factor`. Layer: `identity_experts = Z`
//! (`zero_expert_num`: experts E.. output their input), swiglu, no shared expert; HF never
//! uses the classifier's bias.
inline routers::ScoredTopK longcat_flash(int moe_topk, float routed_scaling_factor = 1.0f) {
  return {.k = moe_topk, .scoring = score_function::softmax, .scaling = routed_scaling_factor};
}

}  // namespace switchyard::routers::presets

namespace switchyard::routing {
//! The presets are also reachable as `routing::presets::...`.
namespace presets = ::switchyard::routers::presets;
}  // namespace switchyard::routing
