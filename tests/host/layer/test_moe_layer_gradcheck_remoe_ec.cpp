// SPDX-License-Identifier: Apache-2.0
// Whole-layer gradient check of routers::ReMoE (ReLU routing, max_k = 2 of E = 4, L1 and
// load-balanced L1 with nonzero coefficients) and routers::ExpertChoice (capacity factor 1: a
// token gets 0…E experts) × swiglu and gelu × every dispatch (sorted_grouped, dense,
// padded_capacity without drops / dropping to zero / passing w·x through) against float64
// central differences of the reference layer of gradcheck_reference.hpp, for x, router w, W1,
// b1, W2, b2. ReMoE's set of positive gates is pinned like the selection (a gate crossing 0
// under a perturbation redraws); ExpertChoice's losses struct (capacity, pairs, unrouted
// tokens) is checked against the reference. Redraws, kinks and tolerance: that header.
#include <boost/test/unit_test.hpp>

#include <boost/mp11.hpp>

#include <tuple>

#include "host/layer/gradcheck_reference.hpp"

struct ReMoE_max_k2 : bwd::remoe_case {};
struct ExpertChoice_cf1 : bwd::expert_choice_case {};

using router_cases = boost::mp11::mp_list<ReMoE_max_k2, ExpertChoice_cf1>;
using activations = boost::mp11::mp_list<bwd::swiglu_act, bwd::gelu_act>;
using dispatch_cases = gradcheck_dispatch_cases;
using combos = boost::mp11::mp_rename<
    boost::mp11::mp_product<bwd::combo, router_cases, activations, dispatch_cases>, std::tuple>;

BOOST_AUTO_TEST_CASE_TEMPLATE(layer_backward_matches_float64_central_differences, C, combos) {
  C::run();
}
