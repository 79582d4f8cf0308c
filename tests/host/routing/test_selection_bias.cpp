// SPDX-License-Identifier: Apache-2.0
// DeepSeek-V3's aux-loss-free selection-bias update (training/selection_bias.hpp): the load
// count against a direct count, the sign rule, the plan overload equal to count + update, a
// few updates balancing a skewed router, and the errors.
#include <boost/test/unit_test.hpp>

#include <switchyard/backend/host/route.hpp>
#include <switchyard/routing/routers/scored_topk.hpp>
#include <switchyard/training/selection_bias.hpp>

#include <algorithm>
#include <numeric>
#include <random>
#include <vector>

#include "support/random.hpp"
#include "support/router_testbed.hpp"

namespace sy = switchyard;
using sy::index_t;
using sy::make_view;

namespace {

struct routed {
  std::vector<float> x, w;
  sy::routing::routing_plan plan;
};

//! A skewed sigmoid router (expert 0's row is large) routed with `bias`.
void route(routed& r, const std::vector<float>& bias, int tokens, int d, int experts, int k) {
  sy::routing::scored_router_params p{make_view<const float>(r.w.data(), experts, d), {},
                                      make_view<const float>(bias.data(), experts), {}, {}};
  sy::routing::scored_router_losses l{};
  sy::host::route(sy::routers::ScoredTopK{.k = k, .scoring = sy::routing::score_function::sigmoid},
                  make_view<const float>(r.x.data(), tokens, d), p, r.plan, l);
}

}  // namespace

BOOST_AUTO_TEST_CASE(load_counts_every_used_slot) {
  std::mt19937_64 g(sy::test::base_seed() + 33001);
  routed r{sy::test::normal(g, 40 * 6), sy::test::normal(g, 8 * 6), {}};
  route(r, std::vector<float>(8, 0.0f), 40, 6, 8, 3);
  std::vector<index_t> load(8);
  sy::training::count_expert_load(r.plan.ref(), {load.data(), load.size()});
  for (int e = 0; e < 8; ++e) {
    index_t want = 0;
    for (int t = 0; t < 40; ++t)
      for (int j = 0; j < r.plan.counts[t]; ++j) want += r.plan.id(t, j) == e ? 1 : 0;
    BOOST_TEST(load[e] == want);
  }
  BOOST_TEST(std::accumulate(load.begin(), load.end(), index_t{0}) == 40 * 3);
}

BOOST_AUTO_TEST_CASE(update_moves_each_bias_by_gamma_towards_the_mean_load) {
  const std::vector<index_t> load{5, 1, 3, 3, 0, 6};  // mean 3
  std::vector<float> bias{0.5f, -0.25f, 0.125f, 0.0f, 1.0f, -1.0f};
  const auto before = bias;
  sy::training::update_selection_bias({load.data(), load.size()}, {bias.data(), bias.size()},
                                      0.01f);
  BOOST_TEST(bias[0] == before[0] - 0.01f);  // overloaded
  BOOST_TEST(bias[1] == before[1] + 0.01f);  // underloaded
  BOOST_TEST(bias[2] == before[2]);          // at the mean
  BOOST_TEST(bias[3] == before[3]);
  BOOST_TEST(bias[4] == before[4] + 0.01f);
  BOOST_TEST(bias[5] == before[5] - 0.01f);
}

BOOST_AUTO_TEST_CASE(plan_overload_equals_count_then_update_and_balances_a_skewed_router) {
  std::mt19937_64 g(sy::test::base_seed() + 33002);
  constexpr int tokens = 64, d = 6, experts = 8, k = 2;
  routed r{sy::test::normal(g, tokens * d), sy::test::normal(g, experts * d, 0.3f), {}};
  for (int i = 0; i < d; ++i) r.w[i] = 3.0f * (r.w[i] > 0 ? 1.0f : -1.0f);  // expert 0 dominates
  std::vector<float> bias(experts, 0.0f);
  const auto spread = [&] {
    std::vector<index_t> load(experts);
    sy::training::count_expert_load(r.plan.ref(), {load.data(), load.size()});
    return *std::max_element(load.begin(), load.end()) - *std::min_element(load.begin(), load.end());
  };
  route(r, bias, tokens, d, experts, k);
  const index_t first = spread();
  for (int step = 0; step < 200; ++step) {
    std::vector<index_t> load(experts);
    sy::training::count_expert_load(r.plan.ref(), {load.data(), load.size()});
    auto other = bias;
    sy::training::update_selection_bias({load.data(), load.size()}, {other.data(), other.size()},
                                        0.02f);
    sy::training::update_selection_bias(r.plan.ref(), {bias.data(), bias.size()}, 0.02f);
    BOOST_TEST(other == bias);
    route(r, bias, tokens, d, experts, k);
  }
  BOOST_TEST(spread() < first, "load spread " << spread() << " after the updates, " << first
                                              << " before");
}

BOOST_AUTO_TEST_CASE(errors_name_their_argument) {
  std::vector<index_t> load(4, 1);
  std::vector<float> bias(3, 0.0f), bias4(4, 0.0f);
  sy::test::expect_error<sy::shape_error>(
      [&] { sy::training::update_selection_bias({load.data(), 4}, {bias.data(), 3}, 0.1f); },
      "bias", "got 3");
  sy::test::expect_error<sy::range_error>(
      [&] { sy::training::update_selection_bias({load.data(), 4}, {bias4.data(), 4}, -0.1f); },
      "gamma", "got -0.1");
  sy::routing::routing_plan plan;
  plan.resize(2, 1, 4);
  sy::test::expect_error<sy::shape_error>(
      [&] { sy::training::count_expert_load(plan.ref(), {load.data(), 3}); }, "load", "got 3");
  sy::test::expect_error<sy::shape_error>(
      [&] { sy::training::update_selection_bias(plan.ref(), {bias.data(), 3}, 0.1f); }, "bias",
      "got 3");
  plan.counts[1] = 1;
  plan.expert_ids[1] = 9;
  sy::test::expect_error<sy::range_error>(
      [&] { sy::training::count_expert_load(plan.ref(), {load.data(), 4}); }, "plan.expert_ids",
      "got 9");
}
