// SPDX-License-Identifier: Apache-2.0
// MoE++'s gating residual (Jin et al. 2024) in routers::ScoredTopK's scoring: logits =
// x · wᵀ + prev_logits · residual_wᵀ. The logits against float64; dx, grads.w,
// grads.residual_w and grads.prev_logits against float64 central finite differences of the
// whole router objective (selection fixed at the library's plan); a two-layer chain whose
// prev_logits gradient is carried into the first router's logits gradient; the argument
// checks.
#include <boost/test/unit_test.hpp>

#include <switchyard/backend/host/route.hpp>
#include <switchyard/routing/routers/scored_topk.hpp>

#include <cmath>
#include <vector>

#include "support/random.hpp"
#include "support/router_testbed.hpp"

namespace sy = switchyard;
namespace st = switchyard::test;
using sy::make_view;
using sy::routing::routing_plan;

namespace {

constexpr int T = 10, D = 5, E = 6, EP = 4, K = 2;

//! logits64 + prev · W_gᵀ.
std::vector<double> residual_logits64(const std::vector<double>& x, const std::vector<double>& w,
                                      const std::vector<double>& wg,
                                      const std::vector<double>& prev) {
  auto lg = st::logits64(x, w, T, D, E);
  for (int t = 0; t < T; ++t)
    for (int e = 0; e < E; ++e)
      for (int j = 0; j < EP; ++j) lg[t * E + e] += prev[t * EP + j] * wg[e * EP + j];
  return lg;
}

//! The router objective of the fixed selection of `plan` from float64 logits: Σ cot · w with
//! w = scaling · sigmoid_id / Σ_sel sigmoid, + c_lb · E Σ f P̄ (sigmoid scores, any slot)
//! + c_z · mean lse².
double objective64(const std::vector<double>& lg, const routing_plan& plan,
                   const std::vector<float>& cot, double scaling, double c_lb, double c_z) {
  double total = 0.0;
  std::vector<double> f(E, 0.0), pbar(E, 0.0);
  for (int t = 0; t < T; ++t) {
    std::vector<double> s(E);
    for (int e = 0; e < E; ++e) s[e] = 1.0 / (1.0 + std::exp(-lg[t * E + e]));
    double sum = 0.0;
    for (int j = 0; j < plan.counts[t]; ++j) sum += s[plan.id(t, j)];
    for (int j = 0; j < plan.counts[t]; ++j) {
      total += cot[t * plan.width + j] * scaling * s[plan.id(t, j)] / sum;
      f[plan.id(t, j)] += 1.0;
    }
    for (int e = 0; e < E; ++e) pbar[e] += s[e];
    total += c_z * std::pow(st::lse64(lg, t, E), 2) / T;
  }
  double lb = 0.0;
  for (int e = 0; e < E; ++e) lb += (f[e] / T) * (pbar[e] / T);
  return total + c_lb * E * lb;
}

struct problem {
  std::vector<float> x, w, wg, prev;
  problem(std::uint64_t seed) {
    std::mt19937_64 g(seed);
    x = st::normal(g, T * D);
    w = st::normal(g, E * D, 0.6f);
    wg = st::normal(g, E * EP, 0.5f);
    prev = st::normal(g, T * EP, 1.2f);
  }
  [[nodiscard]] sy::routing::scored_router_params params() const {
    return {.w = make_view(w.data(), E, D),
            .prev_logits = make_view(prev.data(), T, EP),
            .residual_w = make_view(wg.data(), E, EP)};
  }
};

const sy::routers::ScoredTopK router{.k = K,
                                     .scoring = sy::routing::score_function::sigmoid,
                                     .normalize = {.kind = sy::routing::normalization::sum},
                                     .scaling = 2.5f};

}  // namespace

BOOST_AUTO_TEST_CASE(logits_include_the_projected_previous_logits) {
  const problem p(st::base_seed() + 1);
  routing_plan plan;
  sy::routing::scored_router_losses losses{};
  sy::host::route(router, make_view<const float>(p.x.data(), T, D), p.params(), plan, losses);
  const auto lg = residual_logits64(st::to64(p.x), st::to64(p.w), st::to64(p.wg), st::to64(p.prev));
  for (int i = 0; i < T * E; ++i)
    BOOST_TEST(plan.logits[i] == lg[i], boost::test_tools::tolerance(1e-5));
  // The residual changes the choice for some token (else it would not be tested through it).
  routing_plan plain;
  sy::host::route(router, make_view<const float>(p.x.data(), T, D),
                  sy::routing::scored_router_params{.w = make_view<const float>(p.w.data(), E, D)},
                  plain, losses);
  BOOST_TEST(plain.expert_ids != plan.expert_ids);
}

BOOST_AUTO_TEST_CASE(gradients_match_finite_differences) {
  const problem p(st::base_seed() + 2);
  routing_plan plan;
  sy::routing::scored_router_losses losses{};
  const auto xv = make_view<const float>(p.x.data(), T, D);
  sy::host::route(router, xv, p.params(), plan, losses);
  std::mt19937_64 g(st::base_seed() + 3);
  const auto cot = st::normal(g, plan.weights.size());
  const sy::routing::scored_router_losses coeff{.lb = 0.8f, .sequence_balance = 0.0f, .z = 0.2f};
  std::vector<float> dx(T * D, 0.0f), dw(E * D, 0.0f), dwg(E * EP, 0.0f), dprev(T * EP, 0.0f);
  sy::host::route_backward(router, xv, p.params(), plan, cot.data(), coeff,
                           make_view(dx.data(), T, D),
                           {.w = make_view(dw.data(), E, D),
                            .residual_w = make_view(dwg.data(), E, EP),
                            .prev_logits = make_view(dprev.data(), T, EP)});
  const auto x = st::to64(p.x), w = st::to64(p.w), wg = st::to64(p.wg), prev = st::to64(p.prev);
  const auto obj = [&](const std::vector<double>& lg) {
    return objective64(lg, plan, cot, 2.5, 0.8, 0.2);
  };
  st::check_gradient("dx", dx, [&](const auto& v) { return obj(residual_logits64(v, w, wg, prev)); },
                     x, 5e-5, 2e-4);
  st::check_gradient("dw", dw, [&](const auto& v) { return obj(residual_logits64(x, v, wg, prev)); },
                     w, 5e-5, 2e-4);
  st::check_gradient("d residual_w", dwg,
                     [&](const auto& v) { return obj(residual_logits64(x, w, v, prev)); }, wg, 5e-5,
                     2e-4);
  st::check_gradient("d prev_logits", dprev,
                     [&](const auto& v) { return obj(residual_logits64(x, w, wg, v)); }, prev, 5e-5,
                     2e-4);
}

// Two layers: layer 1's logits (a plain linear router, E_prev = EP experts) feed layer 2's
// residual. The caller chains layer 2's grads.prev_logits into layer 1's d_logits before
// layer 1's scoring backward (routing::scored_linear::backward).
BOOST_AUTO_TEST_CASE(chained_layers_carry_the_previous_logits_gradient) {
  std::mt19937_64 g(st::base_seed() + 4);
  const auto x = st::normal(g, T * D), w1 = st::normal(g, EP * D, 0.6f);
  const problem p(st::base_seed() + 5);
  const sy::routers::ScoredTopK first{.k = 1, .scoring = sy::routing::score_function::softmax};
  const sy::routing::scored_router_params p1{.w = make_view<const float>(w1.data(), EP, D)};
  const auto xv = make_view<const float>(x.data(), T, D);
  routing_plan plan1, plan2;
  sy::routing::scored_router_losses losses{};
  sy::host::route(first, xv, p1, plan1, losses);
  auto p2 = p.params();
  p2.prev_logits = make_view<const float>(plan1.logits.data(), T, EP);
  sy::host::route(router, xv, p2, plan2, losses);
  const auto cot1 = st::normal(g, plan1.weights.size()), cot2 = st::normal(g, plan2.weights.size());
  // Layer 2 backward: dx, and d prev_logits.
  std::vector<float> dx(T * D, 0.0f), dprev(T * EP, 0.0f), dw1(EP * D, 0.0f);
  sy::host::route_backward(router, xv, p2, plan2, cot2.data(), {}, make_view(dx.data(), T, D),
                           {.prev_logits = make_view(dprev.data(), T, EP)});
  // Layer 1: its own d_logits plus the carried gradient, then its scoring backward.
  std::vector<float> d_logits1(T * EP);
  sy::host::route_backward_logits(first, plan1, cot1.data(), {}, d_logits1.data());
  for (int i = 0; i < T * EP; ++i) d_logits1[i] += dprev[i];
  sy::routing::scored_linear::backward(xv, sy::routing::scored_linear::params(p1), d_logits1.data(),
                                       make_view(dx.data(), T, D),
                                       {.w = make_view(dw1.data(), EP, D)});
  const auto x64 = st::to64(x), w164 = st::to64(w1), w = st::to64(p.w), wg = st::to64(p.wg);
  const auto total = [&](const std::vector<double>& xx, const std::vector<double>& ww1) {
    const auto lg1 = st::logits64(xx, ww1, T, D, EP);
    double o1 = 0.0;  // layer 1: softmax top-1, raw weight P_id
    for (int t = 0; t < T; ++t) o1 += cot1[t] * st::softmax64(lg1, t, EP)[plan1.id(t, 0)];
    return o1 + objective64(residual_logits64(xx, w, wg, lg1), plan2, cot2, 2.5, 0.0, 0.0);
  };
  st::check_gradient("dx (both layers)", dx, [&](const auto& v) { return total(v, w164); }, x64,
                     5e-5, 2e-4);
  st::check_gradient("dw1 (through layer 2's residual)", dw1,
                     [&](const auto& v) { return total(x64, v); }, w164, 5e-5, 2e-4);
}

BOOST_AUTO_TEST_CASE(residual_arguments_are_checked) {
  const problem p(st::base_seed() + 6);
  const auto xv = make_view<const float>(p.x.data(), T, D);
  routing_plan plan;
  sy::routing::scored_router_losses losses{};
  auto only_prev = p.params();
  only_prev.residual_w = {};
  st::expect_error<sy::shape_error>([&] { sy::host::route(router, xv, only_prev, plan, losses); },
                                    "params.residual_w", "together");
  auto bad = p.params();
  bad.residual_w = make_view<const float>(p.wg.data(), E - 1, EP);
  st::expect_error<sy::shape_error>([&] { sy::host::route(router, xv, bad, plan, losses); },
                                    "params.residual_w", "[E, E_prev]");
  auto short_prev = p.params();
  short_prev.prev_logits = make_view<const float>(p.prev.data(), T - 1, EP);
  st::expect_error<sy::shape_error>([&] { sy::host::route(router, xv, short_prev, plan, losses); },
                                    "params.prev_logits", "[T, E_prev]");
  // A residual gradient without the residual in the params.
  sy::routing::scored_router_params plain{.w = make_view<const float>(p.w.data(), E, D)};
  sy::host::route(router, xv, plain, plan, losses);
  std::vector<float> cot(plan.weights.size(), 0.5f), dwg(E * EP, 0.0f);
  st::expect_error<sy::shape_error>(
      [&] {
        sy::host::route_backward(router, xv, plain, plan, cot.data(), {}, {},
                                 {.residual_w = make_view(dwg.data(), E, EP)});
      },
      "grads.residual_w", "gating residual");
}
