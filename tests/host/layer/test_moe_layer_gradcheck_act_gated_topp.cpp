// SPDX-License-Identifier: Apache-2.0
// Whole-layer gradient check, activation axis: MoELayer::backward with TopP p = 0.5, raw weights (a
// variable number of experts per token) × the activations geglu, clamped_swiglu, gpt_oss_swiglu
// (the gated activations; swiglu is in test_moe_layer_backward_routers.cpp; the clamps at limit 1.5
// so that both their clipped and unclipped branches are hit) × every dispatch (sorted_grouped,
// dense, padded_capacity without drops / dropping to zero / passing w·x through) against float64
// central differences of the reference layer of gradcheck_reference.hpp, for x, router w, W1, b1,
// W2, b2 with nonzero aux-loss coefficients (redraws, kinks and tolerance: that header).
//
// Coverage of the activation axis (the four test_moe_layer_gradcheck_act_*.cpp files with
// test_moe_layer_backward_routers.cpp): every activation of activation/functors.hpp × every
// dispatch for two routers, TopK k = 2 (fixed k) and TopP p = 0.5 (variable k); every router ×
// every dispatch with one of swiglu / gelu in test_moe_layer_backward_routers.cpp. Split in
// four files (router × plain / gated) so that each compiles in about a minute.
#include <boost/test/unit_test.hpp>

#include <boost/mp11.hpp>

#include <tuple>

#include "host/layer/gradcheck_reference.hpp"

struct TopP_p05 : bwd::topp_case<500, 0> {};

using combos = gradcheck_activation_combos<
    TopP_p05,
    boost::mp11::mp_list<bwd::geglu_act, bwd::clamped_swiglu_act, bwd::gpt_oss_swiglu_act>>;

BOOST_AUTO_TEST_CASE_TEMPLATE(layer_backward_matches_float64_central_differences, C, combos) {
  C::run();
}
