// SPDX-License-Identifier: Apache-2.0
// MoELayer::backward through EVERY router of the linear-gate and DynMoE families × EVERY
// dispatch against float64 central differences of the float64 reference layer of
// gradcheck_reference.hpp (router scoring, selection, combine weights, aux losses, capacity
// drops, expert FFNs), for x, the router's parameters (DynMoE: w_gate and thresholds), W1,
// b1, W2, b2, with nonzero aux-loss coefficients.
//
// Routers: TopK (GShard/Mixtral), the two routers HyperMoE plugs into MoELayer (Switch top-1
// raw weights; GPT-2 top-2 over a transposed, strided gate), TopP, AdaptiveGating, DA-MoE with
// caller-supplied importance and with attention-derived importance (K_t rule), DynMoE in
// training and eval mode, each with one activation (swiglu or gelu, alternating). Dispatches:
// sorted_grouped, dense, padded_capacity without drops, with drops contributing zero, with
// drops passing w·x through. The other activations: test_moe_layer_gradcheck_act_*.cpp;
// ScoredTopK, ReMoE, ExpertChoice: test_moe_layer_gradcheck_scored.cpp,
// test_moe_layer_gradcheck_remoe_ec.cpp. Redraws, tolerance: gradcheck_reference.hpp.
#include <boost/test/unit_test.hpp>

#include <boost/mp11.hpp>

#include <tuple>

#include "host/layer/gradcheck_reference.hpp"

// ---- the typed list: (router, activation) × dispatch, one test case each ------------------
// (global names, so that the case names read e.g. combo<TopP_p05, gelu_act, padded_capacity_drop_zero>)

//! TopK k = 2, renormalised (GShard / Mixtral).
struct TopK_k2_renorm : bwd::topk_case<2, true, false> {};
//! HyperMoE's Switch variant (HM-sw): TopK k = 1, raw weights.
struct HyperMoE_switch_TopK_k1_raw : bwd::topk_case<1, false, false> {};
//! HyperMoE's GPT-2 variant (HM-g2): TopK k = 2, renormalised, gate stored [d, E] and passed
//! as a strided [E, d] view (docs/routers/hypermoe.md).
struct HyperMoE_gpt2_TopK_k2_strided_gate : bwd::topk_case<2, true, true> {};
struct DAMoE_precomputed_importance_k1to3
    : bwd::damoe_case<sy::routing::importance::precomputed, 1, 3> {};
struct DAMoE_attention_col_mean_k1to2 : bwd::damoe_case<sy::routing::importance::col_mean, 1, 2> {};
struct DynMoE_training : bwd::dynmoe_case<true> {};
struct DynMoE_eval : bwd::dynmoe_case<false> {};
//! TopP p = 0.5, raw weights; entropy, any-slot load balance and z losses.
struct TopP_p05 : bwd::topp_case<500, 0> {};
//! TopP p = 0.7 capped at 2 experts (plan width 2 < E).
struct TopP_p07_max_k2 : bwd::topp_case<700, 2> {};
//! AdaptiveGating threshold 0.2, renormalised; the top2_fraction coefficient must be ignored.
struct AdaptiveGating_t02 : bwd::adaptive_gating_case {};


template <class R, class A>
struct with {
  using router_case = R;
  using act_case = A;
};
template <class RA, class D>
using combo_of = bwd::combo<typename RA::router_case, typename RA::act_case, D>;

using router_cases = boost::mp11::mp_list<
    with<TopK_k2_renorm, bwd::swiglu_act>, with<HyperMoE_switch_TopK_k1_raw, bwd::gelu_act>,
    with<HyperMoE_gpt2_TopK_k2_strided_gate, bwd::swiglu_act>, with<TopP_p05, bwd::gelu_act>,
    with<TopP_p07_max_k2, bwd::swiglu_act>, with<AdaptiveGating_t02, bwd::swiglu_act>,
    with<DAMoE_precomputed_importance_k1to3, bwd::gelu_act>,
    with<DAMoE_attention_col_mean_k1to2, bwd::swiglu_act>, with<DynMoE_training, bwd::swiglu_act>,
    with<DynMoE_eval, bwd::gelu_act>>;
using dispatch_cases = gradcheck_dispatch_cases;
using combos =
    boost::mp11::mp_rename<boost::mp11::mp_product<combo_of, router_cases, dispatch_cases>, std::tuple>;

BOOST_AUTO_TEST_CASE_TEMPLATE(layer_backward_matches_float64_central_differences, C, combos) {
  C::run();
}
