// SPDX-License-Identifier: Apache-2.0
// ReLU routing (ReMoE, routers::ReMoE): plan properties on random inputs (every positive gate up
// to max_k, descending, weights = g), the cap counted, the L1 losses and the sparsity against a
// float64 reference, ties, float64 central-difference gradients of dx and dW (selected slots and
// both L1 terms), the empty batch, every error naming its argument, and the router in
// MoELayer<ReMoE, swiglu, dense> forward and backward against a float64 layer reference.
#include <boost/test/unit_test.hpp>

#include <switchyard/switchyard.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "host/layer/layer_reference.hpp"
#include "support/router_testbed.hpp"

namespace sy = switchyard;
using sy::index_t;
using sy::routing::routing_plan;
using sy::test::expect_error;
using sy::test::router_problem;

namespace {

sy::routing::linear_router_params params_of(const router_problem& p) { return {p.wv()}; }

// float64 reference of the objective, a function of the logits with the plan's selection fixed:
// Σ cot ⊙ ReLU(l at the selected slots) + c.l1 · (1/T) Σ ReLU(l) + c.bal · (E/T²) Σ_e n_e Σ_t ReLU(l)
// with n_e = #{t : l_te > 0} taken from the plan (piecewise constant).
double objective(const std::vector<double>& lg, const routing_plan& plan, const std::vector<float>& cot,
                 const sy::routing::remoe_losses& c) {
  const int T = static_cast<int>(plan.num_tokens), E = static_cast<int>(plan.num_experts),
            W = static_cast<int>(plan.width);
  std::vector<double> n(E, 0.0), gsum(E, 0.0);
  for (int t = 0; t < T; ++t)
    for (int e = 0; e < E; ++e) n[e] += plan.logits[t * E + e] > 0.0f ? 1.0 : 0.0;
  double total = 0.0, l1 = 0.0;
  for (int t = 0; t < T; ++t) {
    for (int e = 0; e < E; ++e) {
      const double g = std::max(lg[t * E + e], 0.0);
      l1 += g / T;
      gsum[e] += g;
    }
    for (int j = 0; j < plan.counts[t]; ++j) total += cot[t * W + j] * std::max(lg[t * E + plan.id(t, j)], 0.0);
  }
  double bal = 0.0;
  for (int e = 0; e < E; ++e) bal += n[e] * gsum[e] * E / (double(T) * T);
  return total + c.l1 * l1 + c.l1_balanced * bal;
}

}  // namespace

BOOST_AUTO_TEST_CASE(plan_properties_cap_and_losses_on_random_inputs) {
  const auto seed = sy::test::base_seed();
  for (int max_k : {1, 2, 3, 8}) {
    BOOST_TEST_CONTEXT("max_k=" << max_k) {
      const router_problem p({96, 16, 8}, seed + max_k, 0.5f);
      const sy::routers::ReMoE r{.max_k = max_k};
      sy::routing::remoe_losses l{};
      const auto plan = sy::test::route_plan(r, p.xv(), params_of(p), &l);
      BOOST_TEST(plan.width == max_k);
      const auto lg64 = sy::test::logits64(sy::test::to64(p.x), sy::test::to64(p.w), p.tokens, p.d, p.experts);
      index_t active = 0, capped_pairs = 0, capped_tokens = 0;
      double l1 = 0.0, bal = 0.0;
      std::vector<double> n(p.experts, 0.0), gsum(p.experts, 0.0);
      for (int t = 0; t < p.tokens; ++t) {
        const float* lg = plan.logits.data() + t * p.experts;
        const float* g = plan.probs.data() + t * p.experts;
        int pos = 0;
        for (int e = 0; e < p.experts; ++e) {
          BOOST_TEST(std::abs(lg[e] - lg64[t * p.experts + e]) <= 1e-5 * (1 + std::abs(lg64[t * p.experts + e])));
          BOOST_TEST(g[e] == std::max(lg[e], 0.0f));
          pos += g[e] > 0.0f;
          l1 += std::max(lg64[t * p.experts + e], 0.0) / p.tokens;
          gsum[e] += std::max(lg64[t * p.experts + e], 0.0);
          n[e] += g[e] > 0.0f;
        }
        active += pos;
        if (pos > max_k) {
          ++capped_tokens;
          capped_pairs += pos - max_k;
        }
        BOOST_TEST_REQUIRE(plan.counts[t] == std::min(pos, max_k));
        // the selected experts: positive, descending g (ties to the lower id), weights = g,
        // and no unselected expert ranks before the last selected one
        for (int j = 0; j < plan.counts[t]; ++j) {
          const int e = plan.id(t, j);
          BOOST_TEST(g[e] > 0.0f);
          BOOST_TEST(plan.weight(t, j) == g[e]);
          if (j > 0) BOOST_TEST(sy::routing::ranks_before(g[plan.id(t, j - 1)], plan.id(t, j - 1), g[e], e));
        }
        for (int e = 0; e < p.experts && plan.counts[t] > 0; ++e) {
          bool taken = false;
          for (int j = 0; j < plan.counts[t]; ++j) taken = taken || plan.id(t, j) == e;
          const int last = plan.id(t, plan.counts[t] - 1);
          if (!taken) BOOST_TEST(!sy::routing::ranks_before(g[e], e, g[last], last));
        }
        for (int j = plan.counts[t]; j < max_k; ++j) {
          BOOST_TEST(plan.id(t, j) == -1);
          BOOST_TEST(plan.weight(t, j) == 0.0f);
        }
      }
      for (int e = 0; e < p.experts; ++e) bal += n[e] * gsum[e] * p.experts / (double(p.tokens) * p.tokens);
      BOOST_TEST(l.scored_pairs == index_t(p.tokens) * p.experts);
      BOOST_TEST(l.active_pairs == active);
      BOOST_TEST(l.capped_pairs == capped_pairs);
      BOOST_TEST(l.capped_tokens == capped_tokens);
      BOOST_TEST(l.active_pairs - l.capped_pairs == plan.total_assignments());
      BOOST_TEST(std::abs(l.sparsity - (1.0 - double(active) / (p.tokens * p.experts))) <= 1e-6);
      BOOST_TEST(std::abs(l.l1 - l1) <= 1e-5 * (1 + l1));
      BOOST_TEST(std::abs(l.l1_balanced - bal) <= 1e-5 * (1 + bal));
      if (max_k <= 2) BOOST_TEST(l.capped_pairs > 0);  // the draw does exercise the cap
      if (max_k == p.experts) BOOST_TEST(l.capped_pairs == 0);
    }
  }
}

BOOST_AUTO_TEST_CASE(ties_go_to_the_lower_expert) {
  // experts 1 and 3 have the same gate row; expert 0 is negative for the token
  const std::vector<float> x{1.0f, 0.5f};
  const std::vector<float> w{-1.0f, -1.0f, 0.3f, 0.2f, 0.1f, 0.1f, 0.3f, 0.2f};
  const sy::routers::ReMoE r{.max_k = 3};
  routing_plan plan;
  sy::routing::remoe_losses l{};
  sy::host::route(r, sy::make_view<const float>(x.data(), 1, 2),
                  sy::routing::linear_router_params{sy::make_view<const float>(w.data(), 4, 2)}, plan, l);
  BOOST_TEST_REQUIRE(plan.counts[0] == 3);
  BOOST_TEST(plan.id(0, 0) == 1);
  BOOST_TEST(plan.id(0, 1) == 3);
  BOOST_TEST(plan.id(0, 2) == 2);
  BOOST_TEST(l.active_pairs == 3);
  BOOST_TEST(l.capped_pairs == 0);
  BOOST_TEST(std::abs(l.sparsity - 0.25f) <= 1e-7f);
}

BOOST_AUTO_TEST_CASE(gradients_match_float64_central_differences) {
  const auto seed = sy::test::base_seed();
  for (int max_k : {2, 4}) {
    BOOST_TEST_CONTEXT("max_k=" << max_k) {
      const router_problem p({10, 6, 4}, seed + 17 + max_k, 0.5f);
      const sy::routers::ReMoE r{.max_k = max_k};
      const auto plan = sy::test::route_plan(r, p.xv(), params_of(p));
      // the reference is piecewise linear: no logit may sit within the difference step of 0
      for (float v : plan.logits) BOOST_TEST_REQUIRE(std::abs(v) > 1e-4f);
      std::mt19937_64 g(seed + 5);
      const auto cot = sy::test::normal(g, plan.expert_ids.size());
      const sy::routing::remoe_losses c{.l1 = 0.7f, .l1_balanced = 0.3f};
      sy::test::check_linear_backward(r, p, params_of(p), plan, cot, c,
                                      [&](const std::vector<double>& lg) { return objective(lg, plan, cot, c); });
      // each term alone (a wrong factor in one cannot hide behind another)
      for (const sy::routing::remoe_losses one : {sy::routing::remoe_losses{.l1 = 1.0f},
                                                  sy::routing::remoe_losses{.l1_balanced = 1.0f}}) {
        const std::vector<float> zero(cot.size(), 0.0f);
        sy::test::check_linear_backward(r, p, params_of(p), plan, zero, one,
                                        [&](const std::vector<double>& lg) { return objective(lg, plan, zero, one); });
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(empty_batch_and_workspace) {
  const sy::routers::ReMoE r{.max_k = 2};
  const std::vector<float> w(4 * 3, 0.25f);
  const sy::routing::linear_router_params params{sy::make_view<const float>(w.data(), 4, 3)};
  routing_plan plan;
  sy::routing::remoe_losses l{.l1 = 5.0f};
  sy::host::route(r, sy::make_view<const float>(nullptr, 0, 3), params, plan, l);
  BOOST_TEST(l.l1 == 0.0f);
  BOOST_TEST(l.scored_pairs == 0);
  std::vector<float> dw(w.size(), 0.0f);
  sy::host::route_backward(r, sy::make_view<const float>(nullptr, 0, 3), params, plan, nullptr,
                           sy::routing::remoe_losses{.l1 = 1.0f}, {}, {sy::make_view(dw.data(), 4, 3)});
  for (float v : dw) BOOST_TEST(v == 0.0f);
  BOOST_TEST(r.workspace_size(100, params) >= 100 * 4 * sizeof(float));
}

BOOST_AUTO_TEST_CASE(errors_name_their_argument) {
  const router_problem p({4, 3, 4}, sy::test::base_seed() + 99);
  auto run = [&](sy::routers::ReMoE r) { (void)sy::test::route_plan(r, p.xv(), params_of(p)); };
  expect_error<sy::range_error>([&] { run({.max_k = 0}); }, "max_k", "[1, E] = [1, 4], got 0");
  expect_error<sy::range_error>([&] { run({.max_k = 5}); }, "max_k", "got 5");
  const std::vector<float> x_bad(5 * 2, 1.0f);
  expect_error<sy::shape_error>(
      [&] {
        routing_plan plan;
        sy::routing::remoe_losses l{};
        sy::host::route(sy::routers::ReMoE{}, sy::make_view<const float>(x_bad.data(), 5, 2), params_of(p), plan, l);
      },
      "x");
  auto x_nan = p.x;
  x_nan[4] = std::numeric_limits<float>::quiet_NaN();
  expect_error<sy::non_finite_error>(
      [&] {
        routing_plan plan;
        sy::routing::remoe_losses l{};
        sy::host::route(sy::routers::ReMoE{}, sy::make_view<const float>(x_nan.data(), 4, 3), params_of(p), plan, l);
      },
      "x", "token 1");
  const sy::routers::ReMoE r{.max_k = 2};
  const auto plan = sy::test::route_plan(r, p.xv(), params_of(p));
  const std::vector<float> cot(plan.expert_ids.size(), 1.0f);
  std::vector<float> dx(p.x.size());
  auto back = [&](const float* dw, sy::routing::remoe_losses c) {
    sy::host::route_backward(r, p.xv(), params_of(p), plan, dw, c, sy::make_view(dx.data(), p.tokens, p.d), {});
  };
  expect_error<sy::range_error>([&] { back(cot.data(), {.l1 = -1.0f}); }, "coeffs.l1", "got -1");
  expect_error<sy::range_error>([&] { back(cot.data(), {.l1_balanced = std::numeric_limits<float>::infinity()}); },
                                "coeffs.l1_balanced", "finite");
  expect_error<sy::null_pointer_error>([&] { back(nullptr, {}); }, "d_weights", "[T, max_k] = [4, 2]");
  expect_error<sy::shape_error>(
      [&] {
        sy::host::route_backward(sy::routers::ReMoE{.max_k = 3}, p.xv(), params_of(p), plan, cot.data(), {},
                                 sy::make_view(dx.data(), p.tokens, p.d), {});
      },
      "plan", "width = max_k = 3");
}

// ---- in a layer -------------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(moe_layer_forward_and_backward) {
  using A = sy::activation::swiglu;
  std::mt19937_64 g(sy::test::base_seed() + 31);
  const index_t T = 12, d = 6, f = 4, E = 4;
  const sy::test::layer_data<float> L(g, T, d, f, E, true, true);
  const auto wr = sy::test::normal(g, static_cast<std::size_t>(E * d), 0.6f);
  const sy::MoELayer<sy::routers::ReMoE, A, sy::dispatch::dense> layer{.router = {.max_k = 2}};
  const sy::routing::linear_router_params rp{sy::make_view<const float>(wr.data(), E, d)};
  std::vector<float> y(static_cast<std::size_t>(T * d));
  decltype(layer)::result_type res;
  layer.forward<float>(sy::host_context{}, L.xv(), rp, L.weights(), sy::make_view(y.data(), T, d), res);
  BOOST_TEST(res.losses.capped_pairs > 0);  // the cap is reported through the layer too
  const auto y64 = sy::test::ref_layer<A>(L, res.plan, {}, false);
  for (std::size_t i = 0; i < y.size(); ++i) BOOST_TEST(std::abs(y[i] - y64[i]) <= 1e-4 * (1 + std::abs(y64[i])));

  // backward of ⟨g, y⟩ + λ·l1 against float64 central differences with the plan's selection
  const auto dy = sy::test::normal(g, y.size());
  const sy::routing::remoe_losses coeffs{.l1 = 0.05f};
  std::vector<float> dx(L.x.size(), 0.0f), dwr(wr.size(), 0.0f), dw1(L.w1.size(), 0.0f), dw2(L.w2.size(), 0.0f),
      db1(L.b1.size(), 0.0f), db2(L.b2.size(), 0.0f);
  layer.backward<float>(sy::host_context{}, L.xv(), rp, L.weights(), res, sy::make_view<const float>(dy.data(), T, d),
                        coeffs, sy::make_view(dx.data(), T, d),
                        {sy::make_view(dw1.data(), E, 2 * f, d), sy::make_view(db1.data(), E, 2 * f),
                         sy::make_view(dw2.data(), E, d, f), sy::make_view(db2.data(), E, d)},
                        {sy::make_view(dwr.data(), E, d)});
  for (float v : res.plan.logits) BOOST_TEST_REQUIRE(std::abs(v) > 1e-4f);
  const auto& plan = res.plan;
  auto loss = [&](const std::vector<double>& x, const std::vector<double>& w) {
    double total = 0.0, l1 = 0.0;
    std::vector<double> out(d);
    for (index_t t = 0; t < T; ++t) {
      for (index_t e = 0; e < E; ++e) {
        double lg = 0.0;
        for (index_t i = 0; i < d; ++i) lg += x[t * d + i] * w[e * d + i];
        l1 += std::max(lg, 0.0) / T;
      }
      for (index_t j = 0; j < plan.counts[t]; ++j) {
        const index_t e = plan.id(t, j);
        double lg = 0.0;
        for (index_t i = 0; i < d; ++i) lg += x[t * d + i] * w[e * d + i];
        sy::test::ref_expert<A>(L, e, x.data() + t * d, out.data());
        for (index_t i = 0; i < d; ++i) total += dy[t * d + i] * std::max(lg, 0.0) * out[i];
      }
    }
    return total + coeffs.l1 * l1;
  };
  const auto x64 = sy::test::to64(L.x), w64 = sy::test::to64(wr);
  sy::test::check_gradient("layer dW_router", dwr, [&](const std::vector<double>& w) { return loss(x64, w); }, w64,
                           1e-4, 1e-3);
  sy::test::check_gradient("layer dx", dx, [&](const std::vector<double>& x) { return loss(x, w64); }, x64, 1e-4,
                           1e-3);
}
