// SPDX-License-Identifier: Apache-2.0
// AdaMoE null experts (Zeng et al. 2024) on the router side: `null_experts` = N makes the
// load-balance terms of TopK, TopP and ScoredTopK balance the E − N true experts only. Values
// against a float64 reference, gradients (dx, dw, d_logits) against float64 central finite
// differences with the selection fixed at the library's plan, N = 0 bit for bit the plain
// loss, the range check, and the mean number of true experts per token (plan_compute).
#include <boost/test/unit_test.hpp>

#include <switchyard/backend/host/route.hpp>
#include <switchyard/routing/compute.hpp>
#include <switchyard/routing/routers/scored_topk.hpp>
#include <switchyard/routing/routers/topk.hpp>
#include <switchyard/routing/routers/topp.hpp>
#include <switchyard/switchyard.hpp>

#include <algorithm>

#include <cmath>
#include <cstring>
#include <vector>

#include "support/random.hpp"
#include "support/router_testbed.hpp"

namespace sy = switchyard;
namespace st = switchyard::test;
using sy::make_view;
using sy::routing::routing_plan;

namespace {

//! float64 AdaMoE load balance from logits: E'·Σ_{e<E'} f_e·P̄_e, f_e the share of tokens
//! whose counted slots (the first one, or all with any_slot) name true expert e.
double null_lb64(const std::vector<double>& lg, const routing_plan& plan, int tokens, int e,
                 int nulls, bool any_slot, bool softmax_scores = true) {
  const int true_e = e - nulls;
  std::vector<double> f(e, 0.0), pbar(e, 0.0);
  for (int t = 0; t < tokens; ++t) {
    const int slots = any_slot ? plan.counts[t] : (plan.counts[t] > 0 ? 1 : 0);
    for (int j = 0; j < slots; ++j)
      if (plan.id(t, j) < true_e) f[plan.id(t, j)] += 1.0;
    if (softmax_scores) {
      const auto p = st::softmax64(lg, t, e);
      for (int i = 0; i < e; ++i) pbar[i] += p[i];
    } else {
      for (int i = 0; i < e; ++i) pbar[i] += 1.0 / (1.0 + std::exp(-lg[t * e + i]));
    }
  }
  double s = 0.0;
  for (int i = 0; i < true_e; ++i) s += (f[i] / tokens) * (pbar[i] / tokens);
  return true_e * s;
}

double z64(const std::vector<double>& lg, int tokens, int e) {
  double z = 0.0;
  for (int t = 0; t < tokens; ++t) z += std::pow(st::lse64(lg, t, e), 2) / tokens;
  return z;
}

//! Σ_t Σ_j cot_tj · w_tj for softmax weights P_id (renormalised over the used slots or raw).
double weights_dot64(const std::vector<double>& lg, const routing_plan& plan,
                     const std::vector<float>& cot, int tokens, int e, bool renorm) {
  double s = 0.0;
  for (int t = 0; t < tokens; ++t) {
    const auto p = st::softmax64(lg, t, e);
    double sum = 0.0;
    for (int j = 0; j < plan.counts[t]; ++j) sum += p[plan.id(t, j)];
    for (int j = 0; j < plan.counts[t]; ++j)
      s += cot[t * plan.width + j] * p[plan.id(t, j)] / (renorm ? sum : 1.0);
  }
  return s;
}

}  // namespace

BOOST_AUTO_TEST_CASE(topk_null_lb_value_and_gradients) {
  for (const int nulls : {1, 3}) {
    const st::router_problem p({24, 6, 8}, st::base_seed() + nulls, 0.8f);
    const sy::routers::TopK r{.k = 3, .renormalize = true, .null_experts = nulls};
    const sy::routing::linear_router_params params{p.wv()};
    sy::routing::softmax_router_losses losses{};
    const auto plan = st::route_plan(r, p.xv(), params, &losses);
    const auto lg = st::logits64(st::to64(p.x), st::to64(p.w), p.tokens, p.d, p.experts);
    // Some token must use a null expert, or the test checks nothing new.
    int null_slots = 0;
    for (int t = 0; t < p.tokens; ++t)
      for (int j = 0; j < plan.counts[t]; ++j) null_slots += plan.id(t, j) >= 8 - nulls;
    BOOST_TEST_REQUIRE(null_slots > 0);
    BOOST_TEST(losses.lb_switch == null_lb64(lg, plan, p.tokens, 8, nulls, false),
               boost::test_tools::tolerance(1e-5));
    BOOST_TEST(losses.lb_topk == null_lb64(lg, plan, p.tokens, 8, nulls, true),
               boost::test_tools::tolerance(1e-5));

    std::mt19937_64 g(st::base_seed() + 7);
    const auto cot = st::normal(g, plan.weights.size());
    const sy::routing::softmax_router_losses coeff{.lb_switch = 0.7f, .lb_topk = 1.3f, .z = 0.1f};
    st::check_linear_backward(r, p, params, plan, cot, coeff, [&](const std::vector<double>& l) {
      return weights_dot64(l, plan, cot, p.tokens, 8, true) +
             0.7 * null_lb64(l, plan, p.tokens, 8, nulls, false) +
             1.3 * null_lb64(l, plan, p.tokens, 8, nulls, true) + 0.1 * z64(l, p.tokens, 8);
    });

    // The mean number of true (FFN) experts per token.
    const auto cost = sy::routing::plan_compute(plan.ref(), 8 - nulls);
    BOOST_TEST(cost.mean_k == 3.0);
    BOOST_TEST(cost.mean_ffn_k == (3.0 * p.tokens - null_slots) / p.tokens);
    BOOST_TEST(cost.ffn_assignments == 3 * p.tokens - null_slots);
  }
}

BOOST_AUTO_TEST_CASE(topp_null_lb_gradient) {
  const st::router_problem p({20, 5, 6}, st::base_seed() + 11, 0.7f);
  const sy::routers::TopP r{.p = 0.6f, .max_k = 0, .null_experts = 2};
  const sy::routing::linear_router_params params{p.wv()};
  sy::routing::topp_losses losses{};
  const auto plan = st::route_plan(r, p.xv(), params, &losses);
  const auto lg = st::logits64(st::to64(p.x), st::to64(p.w), p.tokens, p.d, p.experts);
  BOOST_TEST(losses.lb_loss == null_lb64(lg, plan, p.tokens, 6, 2, true),
             boost::test_tools::tolerance(1e-5));
  std::mt19937_64 g(st::base_seed() + 12);
  const auto cot = st::normal(g, plan.weights.size());
  const sy::routing::topp_losses coeff{.dynamic_loss = 0.0f, .lb_loss = 2.0f, .z_loss = 0.0f};
  st::check_linear_backward(r, p, params, plan, cot, coeff, [&](const std::vector<double>& l) {
    return weights_dot64(l, plan, cot, p.tokens, 6, false) +
           2.0 * null_lb64(l, plan, p.tokens, 6, 2, true);
  });
}

BOOST_AUTO_TEST_CASE(scored_topk_null_lb_gradient) {
  const st::router_problem p({16, 5, 8}, st::base_seed() + 21, 0.8f);
  const sy::routers::ScoredTopK r{.k = 2, .scoring = sy::routing::score_function::sigmoid,
                                  .null_experts = 2};
  const sy::routing::scored_router_params params{.w = p.wv()};
  sy::routing::scored_router_losses losses{};
  const auto plan = st::route_plan(r, p.xv(), params, &losses);
  const auto lg = st::logits64(st::to64(p.x), st::to64(p.w), p.tokens, p.d, p.experts);
  BOOST_TEST(losses.lb == null_lb64(lg, plan, p.tokens, 8, 2, true, false),
             boost::test_tools::tolerance(1e-5));
  // d_logits of the load balance alone (zero weight cotangent) against finite differences.
  const std::vector<float> zero_cot(plan.weights.size(), 0.0f);
  const auto d_logits = st::backward_logits(r, plan, zero_cot, {.lb = 1.5f});
  st::check_gradient("d_logits", d_logits,
                     [&](const std::vector<double>& l) {
                       return 1.5 * null_lb64(l, plan, p.tokens, 8, 2, true, false);
                     },
                     lg, 1e-6, 1e-4);
  // The null experts' logits get no load-balance gradient.
  for (int t = 0; t < p.tokens; ++t)
    for (int e = 6; e < 8; ++e) BOOST_TEST(d_logits[t * 8 + e] == 0.0f);
}

BOOST_AUTO_TEST_CASE(zero_null_experts_is_the_plain_loss_bit_for_bit) {
  const st::router_problem p({32, 6, 8}, st::base_seed() + 31, 0.6f);
  const sy::routing::linear_router_params params{p.wv()};
  sy::routing::softmax_router_losses a{}, b{};
  const auto pa = st::route_plan(sy::routers::TopK{.k = 2}, p.xv(), params, &a);
  const auto pb = st::route_plan(sy::routers::TopK{.k = 2, .null_experts = 0}, p.xv(), params, &b);
  BOOST_TEST(std::memcmp(&a, &b, sizeof a) == 0);
  std::mt19937_64 g(st::base_seed() + 32);
  const auto cot = st::normal(g, pa.weights.size());
  const sy::routing::softmax_router_losses coeff{.lb_switch = 0.5f, .lb_topk = 0.5f, .z = 0.1f};
  const auto da = st::backward_logits(sy::routers::TopK{.k = 2}, pa, cot, coeff);
  const auto db = st::backward_logits(sy::routers::TopK{.k = 2, .null_experts = 0}, pb, cot, coeff);
  BOOST_TEST(std::memcmp(da.data(), db.data(), da.size() * sizeof(float)) == 0);
}

BOOST_AUTO_TEST_CASE(null_experts_range_is_checked) {
  const st::router_problem p({4, 3, 4}, st::base_seed() + 41);
  const sy::routing::linear_router_params params{p.wv()};
  for (const int n : {-1, 4, 9}) {
    st::expect_error<sy::range_error>(
        [&] { (void)st::route_plan(sy::routers::TopK{.k = 1, .null_experts = n}, p.xv(), params); },
        "null_experts", "[0, E) = [0, 4)");
    st::expect_error<sy::range_error>(
        [&] { (void)st::route_plan(sy::routers::TopP{.null_experts = n}, p.xv(), params); },
        "null_experts", "[0, E)");
  }
  st::expect_error<sy::range_error>(
      [&] {
        (void)st::route_plan(sy::routers::ScoredTopK{.k = 1, .null_experts = 4}, p.xv(),
                             sy::routing::scored_router_params{.w = p.wv()});
      },
      "null_experts", "[0, E)");
}

// AdaMoE end to end: TopK over 6 FFN experts + 2 null experts, the layer's zero experts at ids
// 6 and 7. The true experts per token and the FFN FLOPs from plan_compute agree with the
// layer's own accounting (MoELayer::compute), y is the float64 sum over the true slots only,
// and the load balance sees the true experts only.
BOOST_AUTO_TEST_CASE(adamoe_layer_with_zero_experts) {
  constexpr int T = 20, d = 8, dff = 12, E = 6, N = 2;
  std::mt19937_64 g(st::base_seed() + 51);
  const auto x = st::normal(g, T * d), gate = st::normal(g, (E + N) * d, 0.7f);
  const auto w1 = st::normal(g, E * 2 * dff * d, 0.3f), w2 = st::normal(g, E * d * dff, 0.3f);
  using Layer = sy::MoELayer<sy::routers::TopK, sy::activation::swiglu>;
  Layer layer{.router = {.k = 3, .null_experts = N}};
  layer.zero_experts = N;
  const sy::expert_weights<float> w{make_view<const float>(w1.data(), E, 2 * dff, d), {},
                                    make_view<const float>(w2.data(), E, d, dff), {}};
  const sy::routing::linear_router_params rp{make_view<const float>(gate.data(), E + N, d)};
  std::vector<float> y(T * d);
  Layer::result_type res;
  layer.forward(sy::host_context{}, make_view<const float>(x.data(), T, d), rp, w,
                make_view(y.data(), T, d), res);
  const auto cost = sy::routing::plan_compute(res.plan.ref(), E);
  const auto acct = layer.compute(w, res.plan.ref().const_view());
  BOOST_TEST(cost.ffn_assignments == acct.ffn_pairs);
  BOOST_TEST(cost.assignments - cost.ffn_assignments == acct.non_ffn_pairs);
  BOOST_TEST(cost.expert_flops(sy::routing::ffn_flops_per_slot(d, dff, true)) == acct.ffn_flops);
  BOOST_TEST(cost.mean_ffn_k < 3.0);  // some token used a null expert
  double max_err = 0.0;
  for (int t = 0; t < T; ++t) {
    std::vector<double> want(d, 0.0);
    for (int j = 0; j < res.plan.counts[t]; ++j) {
      const int e = res.plan.id(t, j);
      if (e >= E) continue;  // null: outputs 0
      std::vector<double> h(dff);
      for (int f = 0; f < dff; ++f) {
        double a = 0.0, u = 0.0;
        for (int i = 0; i < d; ++i) {
          a += double(w1[(e * 2 * dff + f) * d + i]) * x[t * d + i];
          u += double(w1[(e * 2 * dff + dff + f) * d + i]) * x[t * d + i];
        }
        h[f] = a / (1.0 + std::exp(-a)) * u;
      }
      for (int i = 0; i < d; ++i) {
        double o = 0.0;
        for (int f = 0; f < dff; ++f) o += double(w2[(e * d + i) * dff + f]) * h[f];
        want[i] += res.plan.weight(t, j) * o;
      }
    }
    for (int i = 0; i < d; ++i) max_err = std::max(max_err, std::abs(y[t * d + i] - want[i]));
  }
  BOOST_TEST(max_err <= 1e-4);
  const auto lg = st::logits64(st::to64(x), st::to64(gate), T, d, E + N);
  BOOST_TEST(res.losses.lb_topk == null_lb64(lg, res.plan, T, E + N, N, true),
             boost::test_tools::tolerance(1e-5));
}
