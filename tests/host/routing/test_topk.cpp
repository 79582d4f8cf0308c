// SPDX-License-Identifier: Apache-2.0
// Top-k router: properties on fresh random inputs, gradients against float64 central
// differences, and every bad-input error.
#include <boost/test/unit_test.hpp>

#include <switchyard/routing/routers/topk.hpp>

#include <cstring>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "support/router_testbed.hpp"

namespace sy = switchyard;
using sy::routing::routing_plan;
using sy::test::expect_error;
using sy::test::router_problem;

namespace {

sy::routing::linear_router_params params_of(const router_problem& p) { return {p.wv()}; }

routing_plan route(const sy::routers::TopK& r, const router_problem& p,
                   sy::routing::softmax_router_losses* losses = nullptr) {
  return sy::test::route_plan(r, p.xv(), params_of(p), losses);
}

// float64 reference of Σ cot ⊙ w + c_sw·lb_switch + c_any·lb_topk + c_z·z as a function of
// the logits, for a fixed selection (selection is piecewise constant).
double objective(const std::vector<double>& logits, const routing_plan& plan,
                 const std::vector<float>& cot, bool renorm,
                 const sy::routing::softmax_router_losses& c) {
  const int tokens = static_cast<int>(plan.num_tokens), e = static_cast<int>(plan.num_experts),
            k = static_cast<int>(plan.width);
  double total = 0, z = 0;
  std::vector<double> pbar(e, 0), f1(e, 0), fa(e, 0);
  for (int t = 0; t < tokens; ++t) {
    double m = -1e300;
    for (int i = 0; i < e; ++i) m = std::max(m, logits[t * e + i]);
    double s = 0;
    for (int i = 0; i < e; ++i) s += std::exp(logits[t * e + i] - m);
    std::vector<double> p(e);
    for (int i = 0; i < e; ++i) p[i] = std::exp(logits[t * e + i] - m) / s, pbar[i] += p[i] / tokens;
    const double lse = m + std::log(s);
    z += lse * lse / tokens;
    double sel = 0;
    for (int j = 0; j < plan.counts[t]; ++j) sel += p[plan.id(t, j)];
    for (int j = 0; j < plan.counts[t]; ++j) {
      const int id = plan.id(t, j);
      total += cot[t * k + j] * (renorm ? p[id] / sel : p[id]);
      fa[id] += 1.0 / tokens;
    }
    f1[plan.id(t, 0)] += 1.0 / tokens;
  }
  double lb1 = 0, lba = 0;
  for (int i = 0; i < e; ++i) lb1 += e * f1[i] * pbar[i], lba += e * fa[i] * pbar[i];
  return total + c.lb_switch * lb1 + c.lb_topk * lba + c.z * z;
}

}  // namespace

BOOST_AUTO_TEST_CASE(plan_properties_on_random_inputs) {
  const auto seed = sy::test::base_seed();
  for (int k : {1, 2, 3, 8}) {
    for (bool renorm : {true, false}) {
      BOOST_TEST_CONTEXT("k=" << k << " renormalize=" << renorm) {
        const router_problem p({64, 24, 8}, seed + k);
        const sy::routers::TopK r{.k = k, .renormalize = renorm};
        const auto plan = route(r, p);
        for (int t = 0; t < p.tokens; ++t) {
          BOOST_TEST(plan.counts[t] == k);
          double sum = 0;
          for (int j = 0; j < k; ++j) {
            const int id = plan.id(t, j);
            BOOST_TEST_REQUIRE((id >= 0 && id < p.experts));
            BOOST_TEST(plan.weight(t, j) >= 0.0f);
            sum += plan.weight(t, j);
            if (j > 0) {  // descending probability, ties to the lower index
              const float prev = plan.probs[t * p.experts + plan.id(t, j - 1)];
              const float cur = plan.probs[t * p.experts + id];
              BOOST_TEST((prev > cur || (prev == cur && plan.id(t, j - 1) < id)));
            }
          }
          // every unselected expert ranks below the last selected one
          const int last = plan.id(t, k - 1);
          for (int e = 0; e < p.experts; ++e) {
            bool selected = false;
            for (int j = 0; j < k; ++j) selected |= plan.id(t, j) == e;
            if (!selected) BOOST_TEST(plan.probs[t * p.experts + e] <= plan.probs[t * p.experts + last]);
          }
          if (renorm) BOOST_TEST(std::abs(sum - 1.0) < 1e-6);
        }
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(ties_go_to_the_lower_expert_index) {
  // Identical router rows give identical probabilities: the plan must pick 0, 1, ...
  std::vector<float> x{0.3f, -1.2f, 0.7f, 0.1f};
  std::vector<float> w(4 * 4);
  for (int e = 0; e < 4; ++e)
    for (int i = 0; i < 4; ++i) w[e * 4 + i] = 0.25f * static_cast<float>(i + 1);
  const auto plan = sy::test::route_plan(sy::routers::TopK{.k = 3},
                                         sy::matrix_view<const float>(sy::make_view(x.data(), 1, 4)),
                                         {sy::make_view<const float>(w.data(), 4, 4)});
  BOOST_TEST(plan.expert_ids == (std::vector<std::int32_t>{0, 1, 2}), boost::test_tools::per_element());
}

BOOST_AUTO_TEST_CASE(deterministic_and_batch_invariant) {
  const router_problem p({40, 16, 8}, sy::test::base_seed() + 99);
  const sy::routers::TopK r{.k = 2};
  const auto a = route(r, p), b = route(r, p);
  BOOST_TEST(a.expert_ids == b.expert_ids);
  BOOST_TEST(std::memcmp(a.weights.data(), b.weights.data(), a.weights.size() * 4) == 0);
  // Token 17 alone gives the same plan row as inside the batch.
  const auto s = route(r, p.token(17));
  for (int j = 0; j < 2; ++j) {
    BOOST_TEST(s.id(0, j) == a.id(17, j));
    BOOST_TEST(s.weight(0, j) == a.weight(17, j));
  }
}

BOOST_AUTO_TEST_CASE(gradients_match_float64_central_differences) {
  const router_problem p({12, 10, 6}, sy::test::base_seed() + 7);
  for (bool renorm : {true, false}) {
    BOOST_TEST_CONTEXT("renormalize=" << renorm) {
      const sy::routers::TopK r{.k = 2, .renormalize = renorm};
      const auto plan = route(r, p);
      std::mt19937_64 g(sy::test::base_seed() + 8);
      const auto cot = sy::test::normal(g, plan.weights.size());
      const sy::routing::softmax_router_losses coeff{.lb_switch = 0.3f, .lb_topk = 0.2f, .z = 0.05f};
      const auto obj = [&](const std::vector<double>& lg) {
        return objective(lg, plan, cot, renorm, coeff);
      };
      sy::test::check_gradient("d_logits", sy::test::backward_logits(r, plan, cot, coeff), obj,
                               sy::test::to64(plan.logits), 2e-5, 1e-4);
      sy::test::check_linear_backward(r, p, params_of(p), plan, cot, coeff, obj);
    }
  }
}

BOOST_AUTO_TEST_CASE(empty_batch_is_not_an_error) {
  const router_problem p({0, 8, 4}, 1);
  sy::routing::softmax_router_losses l{1, 1, 1};
  const auto plan = sy::test::route_plan(
      sy::routers::TopK{.k = 2},
      sy::matrix_view<const float>(sy::make_view(static_cast<const float*>(nullptr), 0, 8)),
      params_of(p), &l);
  BOOST_TEST(plan.num_tokens == 0);
  BOOST_TEST(plan.counts.empty());
  BOOST_TEST(l.lb_switch == 0.0f);
  BOOST_TEST(l.z == 0.0f);
}

BOOST_AUTO_TEST_CASE(bad_input_is_rejected_with_named_arguments) {
  const router_problem p({4, 8, 4}, 3);
  const auto run = [&](sy::routers::TopK r, sy::matrix_view<const float> x) {
    return [&, r, x] { (void)sy::test::route_plan(r, x, params_of(p)); };
  };
  expect_error<sy::range_error>(run({.k = 0}, p.xv()), "k", "got 0");
  expect_error<sy::range_error>(run({.k = 5}, p.xv()), "k", "[1, E] = [1, 4], got 5");
  std::vector<float> x7(4 * 7, 1.0f);
  expect_error<sy::shape_error>(run({.k = 2}, sy::make_view<const float>(x7.data(), 4, 7)), "x",
                                "[4, 7]");
  expect_error<sy::invalid_argument>(
      run({.k = 2}, sy::make_view(static_cast<const float*>(nullptr), 4, 8)), "x", "null");
  auto nan_x = p.x;
  nan_x[2 * 8 + 3] = std::numeric_limits<float>::quiet_NaN();
  expect_error<sy::non_finite_error>(run({.k = 2}, sy::make_view<const float>(nan_x.data(), 4, 8)),
                                     "x", "token 2");
}
