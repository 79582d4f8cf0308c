// SPDX-License-Identifier: Apache-2.0
// Expert-choice routing (Zhou et al. 2022, routers::ExpertChoice): the capacity c, each expert
// taking exactly c tokens against a brute-force float64-free reference of the choice (every
// expert's tokens sorted by S[:, e], ties to the lower token), token rows in descending S with
// weights S, c > T, ties, a token left without expert, batch dependence, float64 central-
// difference gradients of dx and dW, errors naming their argument, and the router in
// MoELayer<ExpertChoice, swiglu, dense> forward and backward against a float64 layer reference.
#include <boost/test/unit_test.hpp>

#include <switchyard/switchyard.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <set>
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

// Brute force: chosen[t·E + e] = 1 when token t is among the c best of column e of `scores`
// (larger first, then the lower token), by a full stable sort per expert.
std::vector<char> brute_force_choice(const std::vector<float>& scores, int T, int E, int c) {
  std::vector<char> chosen(static_cast<std::size_t>(T) * E, 0);
  for (int e = 0; e < E; ++e) {
    std::vector<int> order(T);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return scores[a * E + e] > scores[b * E + e]; });
    for (int j = 0; j < c; ++j) chosen[order[j] * E + e] = 1;
  }
  return chosen;
}

// float64 objective of the logits with the plan's selection fixed: Σ cot ⊙ softmax(l)[selected].
double objective(const std::vector<double>& lg, const routing_plan& plan, const std::vector<float>& cot) {
  const int T = static_cast<int>(plan.num_tokens), E = static_cast<int>(plan.num_experts),
            W = static_cast<int>(plan.width);
  double total = 0.0;
  for (int t = 0; t < T; ++t) {
    const auto s = sy::test::softmax64(lg, t, E);
    for (int j = 0; j < plan.counts[t]; ++j) total += cot[t * W + j] * s[plan.id(t, j)];
  }
  return total;
}

void check_plan(const sy::routers::ExpertChoice& r, const router_problem& p, const routing_plan& plan,
                const sy::routing::expert_choice_losses& l) {
  const int T = p.tokens, E = p.experts;
  const index_t c = sy::routing::expert_choice_capacity(T, E, r.capacity_factor);
  BOOST_TEST(l.capacity == c);
  BOOST_TEST(l.routed_pairs == c * E);
  BOOST_TEST(plan.width == E);
  BOOST_TEST(plan.total_assignments() == c * E);
  const auto lg64 = sy::test::logits64(sy::test::to64(p.x), sy::test::to64(p.w), T, p.d, E);
  for (int t = 0; t < T; ++t) {
    const auto s64 = sy::test::softmax64(lg64, t, E);
    for (int e = 0; e < E; ++e) BOOST_TEST(std::abs(plan.probs[t * E + e] - s64[e]) <= 2e-6);
  }
  const auto chosen = brute_force_choice(plan.probs, T, E, static_cast<int>(c));
  std::vector<index_t> per_expert(E, 0);
  index_t unrouted = 0;
  for (int t = 0; t < T; ++t) {
    const float* s = plan.probs.data() + t * E;
    std::set<int> got;
    for (int j = 0; j < plan.counts[t]; ++j) {
      const int e = plan.id(t, j);
      BOOST_TEST_REQUIRE((e >= 0 && e < E));
      got.insert(e);
      ++per_expert[e];
      BOOST_TEST(plan.weight(t, j) == s[e]);
      if (j > 0) BOOST_TEST(sy::routing::ranks_before(s[plan.id(t, j - 1)], plan.id(t, j - 1), s[e], e));
    }
    BOOST_TEST(got.size() == static_cast<std::size_t>(plan.counts[t]));
    for (int e = 0; e < E; ++e) BOOST_TEST((got.count(e) == 1) == (chosen[t * E + e] == 1), "t=" << t << " e=" << e);
    for (int j = plan.counts[t]; j < E; ++j) BOOST_TEST(plan.id(t, j) == -1);
    unrouted += plan.counts[t] == 0;
  }
  for (int e = 0; e < E; ++e) BOOST_TEST(per_expert[e] == c, "expert " << e);
  BOOST_TEST(l.unrouted_tokens == unrouted);
}

}  // namespace

BOOST_AUTO_TEST_CASE(capacity_is_the_ceiling_capped_at_T) {
  using sy::routing::expert_choice_capacity;
  BOOST_TEST(expert_choice_capacity(64, 8, 2.0f) == 16);
  BOOST_TEST(expert_choice_capacity(10, 4, 1.0f) == 3);   // ceil(2.5)
  BOOST_TEST(expert_choice_capacity(12, 4, 1.0f) == 3);   // exact
  BOOST_TEST(expert_choice_capacity(5, 8, 0.1f) == 1);    // ceil(0.0625)
  BOOST_TEST(expert_choice_capacity(6, 2, 5.0f) == 6);    // 15 > T: capped
  BOOST_TEST(expert_choice_capacity(0, 4, 2.0f) == 0);
}

BOOST_AUTO_TEST_CASE(each_expert_takes_exactly_c_tokens_brute_force_reference) {
  const auto seed = sy::test::base_seed();
  for (float cf : {0.25f, 1.0f, 2.0f, 3.3f, 100.0f}) {
    for (const sy::test::router_shape s : {sy::test::router_shape{64, 16, 8}, sy::test::router_shape{37, 5, 6},
                                           sy::test::router_shape{3, 4, 8}, sy::test::router_shape{1, 3, 2}}) {
      BOOST_TEST_CONTEXT("cf=" << cf << " T=" << s.tokens << " E=" << s.experts) {
        const router_problem p(s, seed + static_cast<int>(cf * 10) + s.tokens, 0.6f);
        const sy::routers::ExpertChoice r{.capacity_factor = cf};
        sy::routing::expert_choice_losses l{};
        const auto plan = sy::test::route_plan(r, p.xv(), params_of(p), &l);
        check_plan(r, p, plan, l);
        if (cf == 100.0f) {  // c > T: every expert takes every token
          BOOST_TEST(l.capacity == s.tokens);
          for (int t = 0; t < p.tokens; ++t) BOOST_TEST(plan.counts[t] == p.experts);
        }
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(ties_go_to_the_lower_token_and_some_token_gets_no_expert) {
  // four identical tokens and one other: with c = 1 the identical ones tie in every column,
  // so each expert takes token 0 (or the odd one); tokens 1..3 get no expert
  const std::vector<float> x{1.0f, 0.0f, 1.0f, 0.0f, 1.0f, 0.0f, 1.0f, 0.0f, 0.0f, 1.0f};
  const std::vector<float> w{2.0f, 0.0f, 0.0f, 2.0f};
  const sy::routers::ExpertChoice r{.capacity_factor = 0.4f};  // c = ceil(5·0.4/2) = 1
  routing_plan plan;
  sy::routing::expert_choice_losses l{};
  sy::host::route(r, sy::make_view<const float>(x.data(), 5, 2),
                  sy::routing::linear_router_params{sy::make_view<const float>(w.data(), 2, 2)}, plan, l);
  BOOST_TEST(l.capacity == 1);
  BOOST_TEST(plan.counts[0] == 1);
  BOOST_TEST(plan.id(0, 0) == 0);
  BOOST_TEST(plan.counts[4] == 1);
  BOOST_TEST(plan.id(4, 0) == 1);
  for (int t = 1; t < 4; ++t) BOOST_TEST(plan.counts[t] == 0);
  BOOST_TEST(l.unrouted_tokens == 3);
}

BOOST_AUTO_TEST_CASE(the_choice_depends_on_the_batch) {
  // non-causal: token 0's experts change when only a later token changes
  const router_problem p({16, 8, 4}, sy::test::base_seed() + 3, 0.8f);
  const sy::routers::ExpertChoice r{.capacity_factor = 1.0f};
  const auto a = sy::test::route_plan(r, p.xv(), params_of(p));
  bool changed = false;
  for (int trial = 0; trial < 8 && !changed; ++trial) {
    router_problem q = p;
    // the later tokens copy token 0 scaled up: they outbid it in its own columns
    for (int t = 1; t < q.tokens; ++t)
      for (int i = 0; i < q.d; ++i) q.x[t * q.d + i] = q.x[i] * (1.5f + 0.1f * trial + 0.01f * t);
    const auto b = sy::test::route_plan(r, q.xv(), params_of(q));
    changed = a.counts[0] != b.counts[0] || (a.counts[0] > 0 && a.id(0, 0) != b.id(0, 0));
  }
  BOOST_TEST(changed);
}

BOOST_AUTO_TEST_CASE(gradients_match_float64_central_differences) {
  const auto seed = sy::test::base_seed();
  for (float cf : {0.5f, 2.0f}) {
    BOOST_TEST_CONTEXT("cf=" << cf) {
      const router_problem p({10, 6, 4}, seed + 41 + static_cast<int>(cf * 4), 0.5f);
      const sy::routers::ExpertChoice r{.capacity_factor = cf};
      const auto plan = sy::test::route_plan(r, p.xv(), params_of(p));
      std::mt19937_64 g(seed + 9);
      const auto cot = sy::test::normal(g, plan.expert_ids.size());
      sy::test::check_linear_backward(r, p, params_of(p), plan, cot, {},
                                      [&](const std::vector<double>& lg) { return objective(lg, plan, cot); });
    }
  }
}

BOOST_AUTO_TEST_CASE(empty_batch) {
  const sy::routers::ExpertChoice r{};
  const std::vector<float> w(4 * 3, 0.25f);
  const sy::routing::linear_router_params params{sy::make_view<const float>(w.data(), 4, 3)};
  routing_plan plan;
  sy::routing::expert_choice_losses l{.capacity = 7};
  sy::host::route(r, sy::make_view<const float>(nullptr, 0, 3), params, plan, l);
  BOOST_TEST(l.capacity == 0);
  BOOST_TEST(l.routed_pairs == 0);
  std::vector<float> dw(w.size(), 0.0f);
  sy::host::route_backward(r, sy::make_view<const float>(nullptr, 0, 3), params, plan, nullptr, {}, {},
                           {sy::make_view(dw.data(), 4, 3)});
  for (float v : dw) BOOST_TEST(v == 0.0f);
}

BOOST_AUTO_TEST_CASE(errors_name_their_argument) {
  const router_problem p({4, 3, 4}, sy::test::base_seed() + 98);
  auto run = [&](float cf) { (void)sy::test::route_plan(sy::routers::ExpertChoice{.capacity_factor = cf}, p.xv(), params_of(p)); };
  expect_error<sy::range_error>([&] { run(0.0f); }, "capacity_factor", "finite and > 0, got 0");
  expect_error<sy::range_error>([&] { run(-1.0f); }, "capacity_factor", "got -1");
  expect_error<sy::range_error>([&] { run(std::numeric_limits<float>::quiet_NaN()); }, "capacity_factor");
  expect_error<sy::range_error>([&] { run(std::numeric_limits<float>::infinity()); }, "capacity_factor");
  const std::vector<float> x_bad(5 * 2, 1.0f);
  expect_error<sy::shape_error>(
      [&] {
        routing_plan plan;
        sy::routing::expert_choice_losses l{};
        sy::host::route(sy::routers::ExpertChoice{}, sy::make_view<const float>(x_bad.data(), 5, 2), params_of(p), plan, l);
      },
      "x");
  auto x_nan = p.x;
  x_nan[7] = std::numeric_limits<float>::infinity();
  expect_error<sy::non_finite_error>(
      [&] {
        routing_plan plan;
        sy::routing::expert_choice_losses l{};
        sy::host::route(sy::routers::ExpertChoice{}, sy::make_view<const float>(x_nan.data(), 4, 3), params_of(p), plan, l);
      },
      "x", "token 2");
  const sy::routers::ExpertChoice r{};
  const auto plan = sy::test::route_plan(r, p.xv(), params_of(p));
  std::vector<float> dx(p.x.size());
  expect_error<sy::null_pointer_error>(
      [&] { sy::host::route_backward(r, p.xv(), params_of(p), plan, nullptr, {}, sy::make_view(dx.data(), p.tokens, p.d), {}); },
      "d_weights", "[T, E] = [4, 4]");
}

// ---- in a layer -------------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(moe_layer_forward_and_backward) {
  using A = sy::activation::swiglu;
  std::mt19937_64 g(sy::test::base_seed() + 32);
  const index_t T = 12, d = 6, f = 4, E = 4;
  const sy::test::layer_data<float> L(g, T, d, f, E, true, true);
  const auto wr = sy::test::normal(g, static_cast<std::size_t>(E * d), 0.6f);
  for (const bool sorted : {false, true}) {
    BOOST_TEST_CONTEXT((sorted ? "sorted_grouped" : "dense")) {
      const sy::routing::linear_router_params rp{sy::make_view<const float>(wr.data(), E, d)};
      std::vector<float> y(static_cast<std::size_t>(T * d));
      std::vector<float> dx(L.x.size(), 0.0f), dwr(wr.size(), 0.0f), dw1(L.w1.size(), 0.0f),
          dw2(L.w2.size(), 0.0f), db1(L.b1.size(), 0.0f), db2(L.b2.size(), 0.0f);
      const auto dy = sy::test::normal(g, y.size());
      sy::routing::routing_plan plan;
      auto run = [&](const auto& layer) {
        typename std::remove_cvref_t<decltype(layer)>::result_type res;
        layer.template forward<float>(sy::host_context{}, L.xv(), rp, L.weights(), sy::make_view(y.data(), T, d), res);
        layer.template backward<float>(sy::host_context{}, L.xv(), rp, L.weights(), res,
                                       sy::make_view<const float>(dy.data(), T, d), {}, sy::make_view(dx.data(), T, d),
                                       {sy::make_view(dw1.data(), E, 2 * f, d), sy::make_view(db1.data(), E, 2 * f),
                                        sy::make_view(dw2.data(), E, d, f), sy::make_view(db2.data(), E, d)},
                                       {sy::make_view(dwr.data(), E, d)});
        BOOST_TEST(res.losses.capacity == 5);  // ceil(12·1.5/4)
        plan = res.plan;
      };
      if (sorted)
        run(sy::MoELayer<sy::routers::ExpertChoice, A, sy::dispatch::sorted_grouped>{.router = {.capacity_factor = 1.5f}});
      else
        run(sy::MoELayer<sy::routers::ExpertChoice, A, sy::dispatch::dense>{.router = {.capacity_factor = 1.5f}});
      const auto y64 = sy::test::ref_layer<A>(L, plan, {}, false);
      for (std::size_t i = 0; i < y.size(); ++i) BOOST_TEST(std::abs(y[i] - y64[i]) <= 1e-4 * (1 + std::abs(y64[i])));
      auto loss = [&](const std::vector<double>& x, const std::vector<double>& w) {
        double total = 0.0;
        std::vector<double> out(d), lg(E);
        for (index_t t = 0; t < T; ++t) {
          double m = -1e300, z = 0.0;
          for (index_t e = 0; e < E; ++e) {
            lg[e] = 0.0;
            for (index_t i = 0; i < d; ++i) lg[e] += x[t * d + i] * w[e * d + i];
            m = std::max(m, lg[e]);
          }
          for (index_t e = 0; e < E; ++e) z += std::exp(lg[e] - m);
          for (index_t j = 0; j < plan.counts[t]; ++j) {
            const index_t e = plan.id(t, j);
            sy::test::ref_expert<A>(L, e, x.data() + t * d, out.data());
            for (index_t i = 0; i < d; ++i) total += dy[t * d + i] * std::exp(lg[e] - m) / z * out[i];
          }
        }
        return total;
      };
      const auto x64 = sy::test::to64(L.x), w64 = sy::test::to64(wr);
      sy::test::check_gradient("layer dW_router", dwr, [&](const std::vector<double>& w) { return loss(x64, w); },
                               w64, 1e-4, 1e-3);
      sy::test::check_gradient("layer dx", dx, [&](const std::vector<double>& x) { return loss(x, w64); }, x64,
                               1e-4, 1e-3);
    }
  }
}
