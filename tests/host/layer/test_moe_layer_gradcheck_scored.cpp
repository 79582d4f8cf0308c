// SPDX-License-Identifier: Apache-2.0
// Whole-layer gradient check of routers::ScoredTopK, the production routers: MoELayer::backward
// with each preset of routing/routers/presets.hpp (its options at run time: one layer type
// serves them all) × swiglu × every dispatch (sorted_grouped, dense, padded_capacity without
// drops / dropping to zero / passing w·x through), and DeepSeek-V4 with clamped_swiglu and
// gpt-oss with gpt_oss_swiglu (their models' activations) × every dispatch, against float64
// central differences of the reference layer of gradcheck_reference.hpp (steps 1-8 of
// routing/scored.hpp in double: scores, selection bias, group limit, hash table, softmax after
// top-k, normalisations, scaling; losses lb, sequence_balance over sequences of 8 tokens, z,
// all with nonzero coefficients). Parameters: x, router w, router b (gpt-oss, and OLMoE with a
// bias added to reach params.b through a full softmax), the MoE++ gating residual's residual_w
// and prev_logits, W1, b1, W2, b2; Llama-4 with the layer's router_weight_on_input;
// LongCat-Flash with one identity expert (router width E + 1); AdaMoE with one null expert
// (router null_experts = MoELayer::zero_experts = 1: lb over the true experts).
//
// The selection bias and the hash table have no gradient (scored_router_grads has no field for
// them): they only choose experts, so the check is that the plan, the combine weights and
// every gradient equal the reference in which they enter the choice and nothing else.
// Redraws, kinks and tolerance: gradcheck_reference.hpp.
#include <boost/test/unit_test.hpp>

#include <boost/mp11.hpp>

#include <string>
#include <tuple>
#include <vector>

#include "host/layer/gradcheck_reference.hpp"

namespace {

namespace presets = sy::routers::presets;

//! Every preset family, k = 2 (Llama-4: 1) of E = 4, sequence_length 8 (T = 16: 2 sequences).
std::vector<bwd::scored_preset> all_presets() {
  auto seq = [](sy::routers::ScoredTopK r) {
    r.sequence_length = 8;
    return r;
  };
  auto with_null = [](sy::routers::ScoredTopK r, sy::index_t n) {
    r.null_experts = n;
    return r;
  };
  return {
      {.name = "deepseek_v3(groups 2/1, sum+eps, x2.5, selection bias)",
       .router = seq(presets::deepseek_v3(2, 2, 1, true, 2.5f)),
       .selection_bias = true},
      {.name = "glm4_moe/dots1(n_group 1, selection bias)",
       .router = seq(presets::glm4_moe(2)),
       .selection_bias = true},
      {.name = "deepseek_v2(groups 2/1 max fill 0, x1.5)",
       .router = seq(presets::deepseek_v2(2, 2, 1, 1.5f))},
      {.name = "deepseek_v4(sqrt_softplus, x1.5, selection bias)",
       .router = seq(presets::deepseek_v4(2, 1.5f)),
       .selection_bias = true},
      {.name = "deepseek_v4_hash(vocab 5)", .router = seq(presets::deepseek_v4_hash(2)), .vocab = 5},
      {.name = "llama4(k 1, weight on input)",
       .router = seq(presets::llama4(1)),
       .weight_on_input = true},
      {.name = "gpt_oss(router bias)", .router = seq(presets::gpt_oss(2)), .bias = true},
      {.name = "qwen_moe/Mixtral/HunYuan(norm)", .router = seq(presets::qwen_moe(2, true))},
      {.name = "OLMoE(no norm) + router bias", .router = seq(presets::qwen_moe(2, false)), .bias = true},
      {.name = "granite", .router = seq(presets::granite(2))},
      {.name = "minimax_m2(selection bias)", .router = seq(presets::minimax_m2(2)), .selection_bias = true},
      {.name = "ernie45(selection bias)", .router = seq(presets::ernie45(2)), .selection_bias = true},
      {.name = "dbrx(p 1)", .router = seq(presets::dbrx(2, 1.0f))},
      {.name = "dbrx(p 2)", .router = seq(presets::dbrx(2, 2.0f))},
      {.name = "dbrx(p 1.5)", .router = seq(presets::dbrx(2, 1.5f))},
      {.name = "longcat_flash(1 identity expert, x1.5, selection bias)",
       .router = seq(presets::longcat_flash(2, 1.5f)),
       .selection_bias = true,
       .identity = 1},
      {.name = "AdaMoE(qwen_moe no norm, 1 null expert)",
       .router = with_null(seq(presets::qwen_moe(2, false)), 1),
       .null = 1},
      {.name = "MoE++ gating residual(qwen_moe norm, E_prev 3)",
       .router = seq(presets::qwen_moe(2, true)),
       .residual = 3},
  };
}

template <class A, class D>
void check_preset(const bwd::scored_preset& p) {
  bwd::check_combo<bwd::scored_case, A, D>(
      bwd::scored_case{p}, "ScoredTopK " + p.name + " x " + bwd::act_label<A>() + " x " +
                               bwd::type_label<D>());
}

}  // namespace

using dispatch_cases = boost::mp11::mp_rename<gradcheck_dispatch_cases, std::tuple>;

BOOST_AUTO_TEST_CASE_TEMPLATE(every_preset_with_swiglu, D, dispatch_cases) {
  for (const auto& p : all_presets()) check_preset<bwd::swiglu_act, D>(p);
}

BOOST_AUTO_TEST_CASE_TEMPLATE(deepseek_v4_with_clamped_swiglu_and_gpt_oss_with_its_swiglu, D,
                              dispatch_cases) {
  for (const auto& p : all_presets()) {
    if (p.name.rfind("deepseek_v4(", 0) == 0) check_preset<bwd::clamped_swiglu_act, D>(p);
    if (p.name.rfind("gpt_oss(", 0) == 0) check_preset<bwd::gpt_oss_swiglu_act, D>(p);
  }
}
