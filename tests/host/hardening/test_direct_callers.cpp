// SPDX-License-Identifier: Apache-2.0
// Regression tests of the #17 hardening follow-ups for callers that skip MoELayer and call
// the pieces directly: the routing plan's size arithmetic (plan_ref::required,
// routing_plan::resize) rejects sizes whose products overflow index_t, and a router's
// backward checks every gradient view before it writes dx or any gradient.
#include <boost/test/unit_test.hpp>

#include <limits>

#include "host/hardening/hardening_setup.hpp"

namespace sy = switchyard;
using sy::index_t;

namespace {

constexpr index_t huge_tokens = index_t{1} << 62;
constexpr index_t int64_max = std::numeric_limits<index_t>::max();

}  // namespace

BOOST_AUTO_TEST_CASE(plan_required_rejects_overflowing_sizes) {
  using sy::routing::plan_ref;
  // T · width and T · E wrapped (2^62 · 4 = 0 in 64-bit arithmetic, a zero-sized plan).
  sy::test::expect_named<sy::range_error>([] { (void)plan_ref::required(huge_tokens, 4, 8); },
                                          "tokens");
  sy::test::expect_named<sy::range_error>([] { (void)plan_ref::required(huge_tokens, 1, 8); },
                                          "tokens");
  sy::test::expect_named<sy::range_error>([] { (void)plan_ref::required(4, huge_tokens, 8); },
                                          "width");
  sy::test::expect_named<sy::range_error>([] { (void)plan_ref::required(4, 2, int64_max); },
                                          "E");
  sy::test::expect_named<sy::range_error>([] { (void)plan_ref::required(-1, 2, 8); }, "tokens");
  sy::test::expect_named<sy::range_error>([] { (void)plan_ref::required(4, -2, 8); }, "width");
  sy::test::expect_named<sy::range_error>([] { (void)plan_ref::required(4, 2, -8); }, "E");

  const plan_ref::sizes n = plan_ref::required(5, 3, 7);
  BOOST_TEST(n.slots == 15);
  BOOST_TEST(n.tokens == 5);
  BOOST_TEST(n.scores == 35);
  const plan_ref::sizes empty = plan_ref::required(0, 3, 7);
  BOOST_TEST(empty.slots == 0);
  BOOST_TEST(empty.scores == 0);
}

BOOST_AUTO_TEST_CASE(routing_plan_resize_rejects_overflowing_sizes) {
  sy::routing::routing_plan plan;
  plan.resize(5, 3, 7);
  BOOST_TEST(plan.expert_ids.size() == 15u);
  BOOST_TEST(plan.weights.size() == 15u);
  BOOST_TEST(plan.counts.size() == 5u);
  BOOST_TEST(plan.logits.size() == 35u);
  BOOST_TEST(plan.probs.size() == 35u);
  plan.ref().check("plan");

  // A wrapped T · width used to size the arrays to 0 while num_tokens said 2^62.
  sy::test::expect_named<sy::range_error>([&] { plan.resize(huge_tokens, 4, 8); }, "tokens");
  sy::test::expect_named<sy::range_error>([&] { plan.resize(4, 2, int64_max); }, "E");
  // The failed resizes left the plan as it was.
  BOOST_TEST(plan.num_tokens == 5);
  BOOST_TEST(plan.width == 3);
  BOOST_TEST(plan.num_experts == 7);
  plan.ref().check("plan");
}
