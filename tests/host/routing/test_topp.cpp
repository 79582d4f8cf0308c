// SPDX-License-Identifier: Apache-2.0
// Top-p router (spec §1): plan properties on fresh random inputs, determinism and batch
// invariance, gradients (d_logits with every aux loss, dx, dw) against float64 central
// differences, and every bad-input error.
#include <boost/test/unit_test.hpp>

#include <switchyard/routing/routers/topp.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
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

routing_plan route(const sy::routers::TopP& r, const router_problem& p,
                   sy::routing::topp_losses* losses = nullptr) {
  return sy::test::route_plan(r, p.xv(), params_of(p), losses);
}

// float64 reference: Σ cot ⊙ raw weights + c.dyn·mean entropy + c.lb·E·Σ f^any·P̄ + c.z·z, as a
// function of the logits, for the plan's (fixed) selection.
double objective_logits(const std::vector<double>& logits, const routing_plan& plan,
                        const std::vector<float>& cot, const sy::routing::topp_losses& c) {
  const int tokens = static_cast<int>(plan.num_tokens), e = static_cast<int>(plan.num_experts),
            k = static_cast<int>(plan.width);
  double total = 0, z = 0, ent = 0;
  std::vector<double> pbar(e, 0), fa(e, 0);
  for (int t = 0; t < tokens; ++t) {
    double m = -1e300;
    for (int i = 0; i < e; ++i) m = std::max(m, logits[t * e + i]);
    double s = 0;
    for (int i = 0; i < e; ++i) s += std::exp(logits[t * e + i] - m);
    const double lse = m + std::log(s);
    for (int i = 0; i < e; ++i) {
      const double pi = std::exp(logits[t * e + i] - lse);
      pbar[i] += pi / tokens;
      ent -= pi * (logits[t * e + i] - lse) / tokens;
    }
    z += lse * lse / tokens;
    for (int j = 0; j < plan.counts[t]; ++j) {
      const int id = plan.id(t, j);
      total += cot[t * k + j] * std::exp(logits[t * e + id] - lse);
      fa[id] += 1.0 / tokens;
    }
  }
  double lb = 0;
  for (int i = 0; i < e; ++i) lb += e * fa[i] * pbar[i];
  return total + c.dynamic_loss * ent + c.lb_loss * lb + c.z_loss * z;
}

}  // namespace

BOOST_AUTO_TEST_CASE(plan_properties_on_random_inputs) {
  const auto seed = sy::test::base_seed();
  for (float p_thr : {0.1f, 0.4f, 0.7f, 0.95f, 1.0f}) {
    for (int max_k : {0, 1, 3}) {
      BOOST_TEST_CONTEXT("p=" << p_thr << " max_k=" << max_k) {
        const router_problem p({64, 24, 8}, seed + static_cast<int>(p_thr * 100) + max_k, 0.4f);
        const sy::routers::TopP r{.p = p_thr, .max_k = max_k};
        const auto plan = route(r, p);
        const int width = max_k > 0 ? max_k : p.experts;
        BOOST_TEST(plan.width == width);
        for (int t = 0; t < p.tokens; ++t) {
          const int n = plan.counts[t];
          BOOST_TEST_REQUIRE((n >= 1 && n <= width));
          const float* pr = plan.probs.data() + t * p.experts;
          float cum = 0.0f;  // float32 running sum in slot order
          for (int j = 0; j < n; ++j) {
            const int id = plan.id(t, j);
            BOOST_TEST_REQUIRE((id >= 0 && id < p.experts));
            BOOST_TEST(plan.weight(t, j) == pr[id]);  // raw probability, not renormalised
            BOOST_TEST(plan.weight(t, j) >= 0.0f);
            if (j > 0) {
              const int prev = plan.id(t, j - 1);
              BOOST_TEST((pr[prev] > pr[id] || (pr[prev] == pr[id] && prev < id)));
            }
            if (j + 1 < n) BOOST_TEST(cum + pr[id] <= p_thr);  // no shorter prefix passes p
            cum += pr[id];
          }
          // Either the prefix passed p, or the cap was hit, or every expert was kept.
          BOOST_TEST((cum > p_thr || n == width || n == p.experts));
          for (int j = n; j < plan.width; ++j) {
            BOOST_TEST(plan.id(t, j) == -1);
            BOOST_TEST(plan.weight(t, j) == 0.0f);
          }
          // Every unselected expert ranks below the last selected one.
          const int last = plan.id(t, n - 1);
          for (int e = 0; e < p.experts; ++e) {
            bool selected = false;
            for (int j = 0; j < n; ++j) selected |= plan.id(t, j) == e;
            if (!selected) BOOST_TEST((pr[e] < pr[last] || (pr[e] == pr[last] && e > last)));
          }
        }
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(p_one_keeps_every_expert_and_equal_prefix_is_not_enough) {
  // Identical router rows: uniform probabilities 1/E. With p = 1 the running sum never exceeds
  // p (keep-all fallback); a prefix equal to p exactly does not stop the selection.
  const int e = 4;
  std::vector<float> x{0.3f, -1.2f, 0.7f, 0.1f};
  std::vector<float> w(e * 4);
  for (int i = 0; i < e; ++i)
    for (int q = 0; q < 4; ++q) w[i * 4 + q] = 0.1f * static_cast<float>(q + 1);
  const sy::matrix_view<const float> xv(sy::make_view(x.data(), 1, 4));
  const sy::routing::linear_router_params prm{sy::make_view<const float>(w.data(), e, 4)};
  auto plan = sy::test::route_plan(sy::routers::TopP{.p = 1.0f}, xv, prm);
  BOOST_TEST(plan.counts[0] == e);
  for (int j = 0; j < e; ++j) BOOST_TEST(plan.id(0, j) == j);  // ties to the lower index
  const float q = plan.probs[0];
  const float half = q + q;  // the float32 sum of the first two sorted probabilities
  plan = sy::test::route_plan(sy::routers::TopP{.p = half}, xv, prm);
  BOOST_TEST(plan.counts[0] == 3);
  plan = sy::test::route_plan(sy::routers::TopP{.p = std::nextafter(half, 0.0f)}, xv, prm);
  BOOST_TEST(plan.counts[0] == 2);
}

BOOST_AUTO_TEST_CASE(deterministic_and_batch_invariant) {
  const router_problem p({40, 16, 8}, sy::test::base_seed() + 99);
  const sy::routers::TopP r{.p = 0.6f};
  const auto a = route(r, p), b = route(r, p);
  BOOST_TEST(a.expert_ids == b.expert_ids);
  BOOST_TEST(a.counts == b.counts);
  BOOST_TEST(std::memcmp(a.weights.data(), b.weights.data(), a.weights.size() * 4) == 0);
  for (int tok : {0, 17, 39}) {
    const auto s = route(r, p.token(tok));
    BOOST_TEST(s.counts[0] == a.counts[tok]);
    for (int j = 0; j < a.width; ++j) {
      BOOST_TEST(s.id(0, j) == a.id(tok, j));
      BOOST_TEST(s.weight(0, j) == a.weight(tok, j));
    }
  }
}

BOOST_AUTO_TEST_CASE(losses_match_float64_reference) {
  const router_problem p({20, 12, 6}, sy::test::base_seed() + 5);
  sy::routing::topp_losses l;
  const auto plan = route(sy::routers::TopP{.p = 0.5f}, p, &l);
  std::vector<double> lg(plan.logits.begin(), plan.logits.end());
  const std::vector<float> zero(plan.weights.size(), 0.0f);
  const double ent = objective_logits(lg, plan, zero, {.dynamic_loss = 1});
  const double lb = objective_logits(lg, plan, zero, {.lb_loss = 1});
  const double z = objective_logits(lg, plan, zero, {.z_loss = 1});
  BOOST_TEST(std::abs(l.dynamic_loss - ent) <= 1e-5 * std::abs(ent) + 1e-6);
  BOOST_TEST(std::abs(l.lb_loss - lb) <= 1e-5 * std::abs(lb) + 1e-6);
  BOOST_TEST(std::abs(l.z_loss - z) <= 1e-5 * std::abs(z) + 1e-6);
  BOOST_TEST(l.dynamic_loss > 0.0f);
  BOOST_TEST(l.dynamic_loss <= std::log(6.0) + 1e-5);
}

BOOST_AUTO_TEST_CASE(gradients_match_float64_central_differences) {
  const router_problem p({10, 7, 6}, sy::test::base_seed() + 7);
  for (int max_k : {0, 2}) {
    BOOST_TEST_CONTEXT("max_k=" << max_k) {
      const sy::routers::TopP r{.p = 0.55f, .max_k = max_k};
      const auto plan = route(r, p);
      std::mt19937_64 g(sy::test::base_seed() + 8);
      const auto cot = sy::test::normal(g, plan.weights.size());
      const sy::routing::topp_losses coeff{.dynamic_loss = 0.3f, .lb_loss = 0.2f, .z_loss = 0.05f};
      const auto obj = [&](const std::vector<double>& lg) {
        return objective_logits(lg, plan, cot, coeff);
      };
      sy::test::check_gradient("d_logits", sy::test::backward_logits(r, plan, cot, coeff), obj,
                               sy::test::to64(plan.logits), 2e-5, 1e-4);
      sy::test::check_linear_backward(r, p, params_of(p), plan, cot, coeff, obj);
    }
  }
}

BOOST_AUTO_TEST_CASE(empty_batch_is_not_an_error) {
  const router_problem p({0, 8, 4}, 1);
  sy::routing::topp_losses l{1, 1, 1};
  const auto plan = sy::test::route_plan(
      sy::routers::TopP{.p = 0.5f},
      sy::matrix_view<const float>(sy::make_view(static_cast<const float*>(nullptr), 0, 8)),
      params_of(p), &l);
  BOOST_TEST(plan.num_tokens == 0);
  BOOST_TEST(plan.counts.empty());
  BOOST_TEST(l.dynamic_loss == 0.0f);
  BOOST_TEST(l.lb_loss == 0.0f);
  BOOST_TEST(l.z_loss == 0.0f);
}

BOOST_AUTO_TEST_CASE(bad_input_is_rejected_with_named_arguments) {
  const router_problem p({4, 8, 4}, 3);
  const auto run = [&](sy::routers::TopP r, sy::matrix_view<const float> x) {
    return [&, r, x] { (void)sy::test::route_plan(r, x, params_of(p)); };
  };
  expect_error<sy::range_error>(run({.p = 0.0f}, p.xv()), "p", "(0, 1], got 0");
  expect_error<sy::range_error>(run({.p = -0.5f}, p.xv()), "p", "got -0.5");
  expect_error<sy::range_error>(run({.p = 1.5f}, p.xv()), "p", "got 1.5");
  expect_error<sy::range_error>(run({.p = std::numeric_limits<float>::quiet_NaN()}, p.xv()), "p",
                                "got nan");
  expect_error<sy::range_error>(run({.p = 0.5f, .max_k = -1}, p.xv()), "max_k", "got -1");
  expect_error<sy::range_error>(run({.p = 0.5f, .max_k = 5}, p.xv()), "max_k",
                                "[1, E] = [1, 4], got 5");
  BOOST_CHECK_NO_THROW(run({.p = 0.5f, .max_k = 4}, p.xv())());
  auto nan_x = p.x;
  nan_x[1 * 8 + 3] = std::numeric_limits<float>::quiet_NaN();
  expect_error<sy::non_finite_error>(
      run({.p = 0.5f}, sy::make_view<const float>(nan_x.data(), 4, 8)), "x", "token 1");
  std::vector<float> x7(4 * 7, 1.0f);
  expect_error<sy::shape_error>(run({.p = 0.5f}, sy::make_view<const float>(x7.data(), 4, 7)),
                                "x", "[4, 7]");
}
