// SPDX-License-Identifier: Apache-2.0
// ReMoE's adaptive L1 coefficient (training::remoe_controller): the update rule step by step,
// its errors, and a synthetic training run in which a ReMoE router's activity is driven up by a
// task gradient and down by λ·L1: λ rises while the gates are denser than the target, falls
// once they are sparser, and the measured sparsity ends nearer the target than it started.
#include <boost/test/unit_test.hpp>

#include <switchyard/switchyard.hpp>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "support/router_testbed.hpp"

namespace sy = switchyard;
using sy::test::expect_error;

BOOST_AUTO_TEST_CASE(update_rule) {
  sy::training::remoe_controller c{.target_sparsity = 0.75f, .lambda = 1e-3f};
  BOOST_TEST(c.update(0.5) == 1e-3f * 1.2f);           // too dense: × α
  BOOST_TEST(c.update(0.9) == 1e-3f * 1.2f / 1.2f);    // too sparse: ÷ α
  const float before = c.lambda;
  BOOST_TEST(c.update(0.75) == before);                // on target: kept
  sy::routing::remoe_losses l{.scored_pairs = 80, .active_pairs = 40};  // sparsity 0.5
  BOOST_TEST(c.update(l) == before * 1.2f);
  BOOST_TEST(c.update(sy::routing::remoe_losses{}) == before * 1.2f);  // empty batch: no measure
  BOOST_TEST(sy::training::remoe_target_sparsity(2, 8) == 0.75f);
  BOOST_TEST(sy::training::remoe_target_sparsity(1.5, 6) == 0.75f);
}

BOOST_AUTO_TEST_CASE(errors_name_their_argument) {
  using C = sy::training::remoe_controller;
  expect_error<sy::range_error>([] { C{.lambda = 0.0f}.validate(); }, "lambda", "got 0");
  expect_error<sy::range_error>([] { C{.lambda = -1.0f}.update(0.5); }, "lambda", "> 0");
  expect_error<sy::range_error>([] { C{.alpha = 1.0f}.validate(); }, "alpha", "> 1, got 1");
  expect_error<sy::range_error>([] { C{.target_sparsity = 1.0f}.validate(); }, "target_sparsity", "[0, 1)");
  expect_error<sy::range_error>([] { C{}.update(1.5); }, "measured_sparsity", "got 1.5");
  expect_error<sy::range_error>([] { C{}.update(std::numeric_limits<double>::quiet_NaN()); }, "measured_sparsity");
  expect_error<sy::range_error>([] { (void)sy::training::remoe_target_sparsity(9, 8); }, "k", "(0, E] = (0, 8], got 9");
  expect_error<sy::range_error>([] { (void)sy::training::remoe_target_sparsity(0, 8); }, "k");
}

// A router whose activity we control (a constant input feature acts as its bias): W starts dense (about half the gates on, sparsity ≈ 0.5,
// target 0.75); each step the task cotangent d_w = −1 on every used slot pushes the gates up,
// λ·L1 pushes every positive gate down; W ← W − lr·dW.
BOOST_AUTO_TEST_CASE(lambda_moves_the_right_way_on_a_synthetic_run) {
  sy::test::router_problem p({128, 8, 8}, sy::test::base_seed() + 71, 0.5f);
  // feature 0 is a constant 1 (a bias input): without one, ReLU(x·w) of symmetric x is on for
  // about half the tokens whatever w is, and no coefficient could make the gates sparser
  for (int t = 0; t < p.tokens; ++t) p.x[t * p.d] = 1.0f;
  std::vector<float> w = p.w;
  const sy::routers::ReMoE r{.max_k = 8};
  sy::training::remoe_controller c{.target_sparsity = 0.75f, .lambda = 0.01f};
  const float lr = 0.1f, drift = 0.01f;
  double late_gap = 0.0, late_signed = 0.0;  // mean |gap| and mean gap over the last 100 steps
  double first_gap = 0.0, last_gap = 0.0;
  int raised = 0, lowered = 0;
  bool crossed = false;
  for (int step = 0; step < 200; ++step) {
    const sy::routing::linear_router_params params{sy::make_view<const float>(w.data(), p.experts, p.d)};
    sy::routing::routing_plan plan;
    sy::routing::remoe_losses l{};
    sy::host::route(r, p.xv(), params, plan, l);
    const double gap = c.target_sparsity - l.sparsity;
    if (step == 0) {
      first_gap = gap;
      BOOST_TEST_REQUIRE(gap > 0.1);  // starts too dense
    }
    last_gap = gap;
    const float before = c.lambda;
    const float after = c.update(l);
    if (gap > 0) {
      BOOST_TEST(after == before * 1.2f, "step " << step);
      ++raised;
    } else if (gap < 0) {
      BOOST_TEST(after == before / 1.2f, "step " << step);
      ++lowered;
      crossed = true;
    } else {
      BOOST_TEST(after == before);
    }
    // no task cotangent (the drift below stands for the task): only λ·L1's gradient
    const std::vector<float> cot(plan.expert_ids.size(), 0.0f);
    std::vector<float> dw(w.size(), 0.0f);
    sy::host::route_backward(r, p.xv(), params, plan, cot.data(), sy::routing::remoe_losses{.l1 = c.lambda}, {},
                             {sy::make_view(dw.data(), p.experts, p.d)});
    for (std::size_t i = 0; i < w.size(); ++i) w[i] -= lr * dw[i];
    for (int e = 0; e < p.experts; ++e) w[e * p.d] += drift;  // the task's pull towards more experts
    if (step >= 100) {
      late_gap += std::abs(gap) / 100.0;
      late_signed += gap / 100.0;
    }
  }
  BOOST_TEST(raised > 0);
  BOOST_TEST(crossed);  // the rising λ made the router sparser than the target at some step
  BOOST_TEST(lowered > 0);
  BOOST_TEST(std::abs(last_gap) < std::abs(first_gap));
  // the controller is bang-bang: the sparsity oscillates about the target, centred on it
  BOOST_TEST(late_gap < 0.15, "mean |target - sparsity| over the last 100 steps: " << late_gap);
  BOOST_TEST(std::abs(late_signed) < 0.05, "mean (target - sparsity) over the last 100 steps: " << late_signed);
  BOOST_TEST_MESSAGE("ReMoE controller: gap " << first_gap << " -> " << last_gap << ", late mean |gap| "
                                                << late_gap << ", late mean gap " << late_signed);
}
