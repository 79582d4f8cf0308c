// SPDX-License-Identifier: Apache-2.0
// Routing replay (host::route_replay / host::router_replay): a caller's selection (an RL
// rollout's routing) for which the router recomputes its logits, scores, combine weights and
// losses. Replaying the router's own choice gives its plan and losses bit for bit (TopK, TopP,
// AdaptiveGating, ScoredTopK), and through the layer (replay, forward_experts,
// backward_experts, router_backward) the y and every gradient of forward/backward bit for bit;
// a different selection gets the rule's weights for those ids and gradients that match
// float64 central finite differences; a malformed selection is refused naming ids / counts.
#include <boost/test/unit_test.hpp>

#include <switchyard/switchyard.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "support/random.hpp"
#include "support/router_testbed.hpp"

namespace sy = switchyard;
namespace st = switchyard::test;
using sy::index_t;
using sy::make_view;
using sy::routing::routing_plan;

namespace {

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

template <class R>
void replay_own_choice_is_bitwise(const R& r, const typename R::params_type& params,
                                  const st::router_problem& p) {
  typename R::losses_type la{}, lb{};
  const auto plan = st::route_plan(r, p.xv(), params, &la);
  routing_plan again;
  sy::host::route_replay(r, p.xv(), params,
                         make_view<const std::int32_t>(plan.expert_ids.data(), plan.num_tokens,
                                                       plan.width),
                         make_view<const std::int32_t>(plan.counts.data(), plan.num_tokens), again,
                         lb);
  BOOST_TEST(again.expert_ids == plan.expert_ids);
  BOOST_TEST(again.counts == plan.counts);
  BOOST_TEST(same_bits(again.weights, plan.weights));
  BOOST_TEST(same_bits(again.logits, plan.logits));
  BOOST_TEST(same_bits(again.probs, plan.probs));
  BOOST_TEST(std::memcmp(&la, &lb, sizeof la) == 0);
}

//! A different selection of `count` experts per token: the router's ranking reversed
//! (the least likely experts), so no slot agrees with the router's own choice.
void reversed_choice(const routing_plan& plan, int count, std::vector<std::int32_t>& ids,
                     std::vector<std::int32_t>& counts, std::mt19937_64& g) {
  const index_t T = plan.num_tokens, E = plan.num_experts;
  ids.assign(static_cast<std::size_t>(T * count), -1);
  counts.assign(static_cast<std::size_t>(T), 0);
  for (index_t t = 0; t < T; ++t) {
    std::vector<int> order(static_cast<std::size_t>(E));
    for (int e = 0; e < E; ++e) order[e] = e;
    std::stable_sort(order.begin(), order.end(),
                     [&](int a, int b) { return plan.probs[t * E + a] < plan.probs[t * E + b]; });
    const int c = 1 + static_cast<int>(g() % count);
    counts[t] = c;
    for (int j = 0; j < c; ++j) ids[t * count + j] = order[j];
  }
}

}  // namespace

BOOST_AUTO_TEST_CASE(replaying_the_routers_own_choice_is_bitwise) {
  const st::router_problem p({40, 8, 8}, st::base_seed() + 1, 0.6f);
  const sy::routing::linear_router_params lp{p.wv()};
  replay_own_choice_is_bitwise(sy::routers::TopK{.k = 2}, lp, p);
  replay_own_choice_is_bitwise(sy::routers::TopK{.k = 1, .renormalize = false}, lp, p);
  replay_own_choice_is_bitwise(sy::routers::TopP{.p = 0.5f}, lp, p);
  replay_own_choice_is_bitwise(sy::routers::AdaptiveGating{.threshold = 0.2f}, lp, p);
  const sy::routing::scored_router_params sp{.w = p.wv()};
  replay_own_choice_is_bitwise(
      sy::routers::ScoredTopK{.k = 3,
                              .scoring = sy::routing::score_function::sigmoid,
                              .normalize = {.kind = sy::routing::normalization::sum},
                              .scaling = 2.0f},
      sp, p);
  replay_own_choice_is_bitwise(sy::routers::ScoredTopK{.k = 2, .softmax_after_topk = true}, sp, p);
}

BOOST_AUTO_TEST_CASE(replayed_selection_gets_the_rules_weights_and_fd_gradients) {
  const st::router_problem p({12, 5, 6}, st::base_seed() + 2, 0.8f);
  const sy::routing::linear_router_params lp{p.wv()};
  std::mt19937_64 g(st::base_seed() + 3);
  const sy::routers::TopK r{.k = 3, .renormalize = true};
  const auto own = st::route_plan(r, p.xv(), lp);
  std::vector<std::int32_t> ids, counts;
  reversed_choice(own, 3, ids, counts, g);
  routing_plan plan;
  sy::routing::softmax_router_losses losses{};
  sy::host::route_replay(r, p.xv(), lp, make_view<const std::int32_t>(ids.data(), 12, 3),
                         make_view<const std::int32_t>(counts.data(), 12), plan, losses);
  const auto lg = st::logits64(st::to64(p.x), st::to64(p.w), 12, 5, 6);
  for (int t = 0; t < 12; ++t) {
    BOOST_TEST(plan.counts[t] == counts[t]);
    const auto pr = st::softmax64(lg, t, 6);
    double sum = 0.0;
    for (int j = 0; j < counts[t]; ++j) sum += pr[ids[t * 3 + j]];
    for (int j = 0; j < counts[t]; ++j) {
      BOOST_TEST(plan.id(t, j) == ids[t * 3 + j]);
      BOOST_TEST(plan.weight(t, j) == pr[ids[t * 3 + j]] / sum, boost::test_tools::tolerance(1e-5));
    }
  }
  const auto cot = st::normal(g, plan.weights.size());
  const sy::routing::softmax_router_losses coeff{.lb_switch = 0.4f, .lb_topk = 0.9f, .z = 0.1f};
  st::check_linear_backward(r, p, lp, plan, cot, coeff, [&](const std::vector<double>& l) {
    double s = 0.0, z = 0.0;
    std::vector<double> f1(6, 0.0), fk(6, 0.0), pbar(6, 0.0);
    for (int t = 0; t < 12; ++t) {
      const auto pr = st::softmax64(l, t, 6);
      double sum = 0.0;
      for (int j = 0; j < counts[t]; ++j) sum += pr[ids[t * 3 + j]];
      for (int j = 0; j < counts[t]; ++j) {
        s += cot[t * 3 + j] * pr[ids[t * 3 + j]] / sum;
        fk[ids[t * 3 + j]] += 1.0;
      }
      f1[ids[t * 3]] += 1.0;
      for (int e = 0; e < 6; ++e) pbar[e] += pr[e];
      z += std::pow(st::lse64(l, t, 6), 2) / 12;
    }
    double a = 0.0, b = 0.0;
    for (int e = 0; e < 6; ++e) {
      a += f1[e] / 12 * pbar[e] / 12;
      b += fk[e] / 12 * pbar[e] / 12;
    }
    return s + 0.4 * 6 * a + 0.9 * 6 * b + 0.1 * z;
  });
}

BOOST_AUTO_TEST_CASE(scored_replay_gradients_match_finite_differences) {
  const st::router_problem p({10, 5, 8}, st::base_seed() + 4, 0.8f);
  const sy::routing::scored_router_params sp{.w = p.wv()};
  const sy::routers::ScoredTopK r{.k = 3,
                                  .scoring = sy::routing::score_function::sigmoid,
                                  .normalize = {.kind = sy::routing::normalization::sum},
                                  .scaling = 1.5f};
  std::mt19937_64 g(st::base_seed() + 5);
  const auto own = st::route_plan(r, p.xv(), sp);
  std::vector<std::int32_t> ids, counts;
  reversed_choice(own, 3, ids, counts, g);
  routing_plan plan;
  sy::routing::scored_router_losses losses{};
  sy::host::route_replay(r, p.xv(), sp, make_view<const std::int32_t>(ids.data(), 10, 3),
                         make_view<const std::int32_t>(counts.data(), 10), plan, losses);
  const auto cot = st::normal(g, plan.weights.size());
  const auto d_logits = st::backward_logits(r, plan, cot, {.lb = 0.5f});
  const auto lg = st::logits64(st::to64(p.x), st::to64(p.w), 10, 5, 8);
  st::check_gradient(
      "d_logits", d_logits,
      [&](const std::vector<double>& l) {
        double s = 0.0;
        std::vector<double> f(8, 0.0), pbar(8, 0.0);
        for (int t = 0; t < 10; ++t) {
          std::vector<double> sc(8);
          for (int e = 0; e < 8; ++e) sc[e] = 1.0 / (1.0 + std::exp(-l[t * 8 + e]));
          double sum = 0.0;
          for (int j = 0; j < counts[t]; ++j) sum += sc[ids[t * 3 + j]];
          for (int j = 0; j < counts[t]; ++j) {
            s += cot[t * 3 + j] * 1.5 * sc[ids[t * 3 + j]] / sum;
            f[ids[t * 3 + j]] += 1.0;
          }
          for (int e = 0; e < 8; ++e) pbar[e] += sc[e];
        }
        double lb = 0.0;
        for (int e = 0; e < 8; ++e) lb += f[e] / 10 * pbar[e] / 10;
        return s + 0.5 * 8 * lb;
      },
      lg, 1e-6, 1e-4);
}

BOOST_AUTO_TEST_CASE(malformed_selections_are_refused) {
  const st::router_problem p({3, 4, 5}, st::base_seed() + 6);
  const sy::routing::linear_router_params lp{p.wv()};
  const sy::routers::TopK r{.k = 2};
  routing_plan plan;
  sy::routing::softmax_router_losses losses{};
  const auto replay = [&](std::vector<std::int32_t> ids, std::vector<std::int32_t> counts,
                          index_t w) {
    sy::host::route_replay(r, p.xv(), lp, make_view<const std::int32_t>(ids.data(), 3, w),
                           make_view<const std::int32_t>(counts.data(), 3), plan, losses);
  };
  st::expect_error<sy::range_error>([&] { replay({0, 1, 2, 5, 3, 4}, {2, 2, 2}, 2); }, "ids",
                                    "ids[1, 1] must be in [0, E) = [0, 5), got 5");
  st::expect_error<sy::range_error>([&] { replay({0, 1, 2, 2, 3, 4}, {2, 2, 2}, 2); }, "ids",
                                    "ids[1, 1] repeats expert 2");
  st::expect_error<sy::range_error>([&] { replay({0, 1, 2, 3, 4, 0, 1, 2, 3}, {3, 1, 1}, 3); },
                                    "counts", "counts[0] must be in [0, min(W, width)] = [0, 2]");
  st::expect_error<sy::range_error>([&] { replay({0, 1, 2}, {1, -1, 1}, 1); }, "counts",
                                    "got -1");
  std::vector<std::int32_t> ids{0, 1, 2, 3}, counts{1, 1};
  st::expect_error<sy::shape_error>(
      [&] {
        sy::host::route_replay(r, p.xv(), lp, make_view<const std::int32_t>(ids.data(), 2, 2),
                               make_view<const std::int32_t>(counts.data(), 2), plan, losses);
      },
      "counts", "[T]");
  // Unused slots past a count are ignored; a token may have no expert.
  replay({4, 7, 1, 9, 2, 3}, {1, 0, 2}, 2);
  BOOST_TEST(plan.counts == (std::vector<std::int32_t>{1, 0, 2}));
  BOOST_TEST(plan.id(0, 1) == -1);
  BOOST_TEST(plan.weight(0, 0) == 1.0f);  // renormalised over one expert
}

// The whole replay training step through the layer: route_replay into the result's plan,
// forward_experts, backward_experts, router_backward; with the router's own choice it is the
// layer's forward/backward bit for bit.
BOOST_AUTO_TEST_CASE(layer_replay_step_is_the_forward_backward_bitwise) {
  constexpr int T = 24, d = 16, dff = 24, E = 6;
  std::mt19937_64 g(st::base_seed() + 7);
  const auto x = st::normal(g, T * d), gate = st::normal(g, E * d, 0.5f);
  const auto w1 = st::normal(g, E * 2 * dff * d, 0.2f), w2 = st::normal(g, E * d * dff, 0.2f);
  const auto dy = st::normal(g, T * d);
  using Layer = sy::MoELayer<sy::routers::TopK, sy::activation::swiglu, sy::dispatch::sorted_grouped>;
  const Layer layer{.router = {.k = 2}};
  const sy::expert_weights<float> w{make_view<const float>(w1.data(), E, 2 * dff, d), {},
                                    make_view<const float>(w2.data(), E, d, dff), {}};
  const sy::routing::linear_router_params rp{make_view<const float>(gate.data(), E, d)};
  const auto xv = make_view<const float>(x.data(), T, d);
  const auto dyv = make_view<const float>(dy.data(), T, d);
  const sy::host_context host{};
  const sy::routing::softmax_router_losses coeff{.lb_switch = 0.01f, .lb_topk = 0.02f, .z = 0.001f};

  struct grads {
    std::vector<float> y, dx, dw1, dw2, dgate;
    grads() : y(T * d), dx(T * d, 0.0f), dw1(E * 2 * dff * d, 0.0f), dw2(E * d * dff, 0.0f),
              dgate(E * d, 0.0f) {}
    sy::expert_grads eg() {
      return {make_view(dw1.data(), E, 2 * dff, d), {}, make_view(dw2.data(), E, d, dff), {}};
    }
  };
  // The layer's own forward/backward.
  grads a;
  Layer::result_type fwd;
  layer.forward(host, xv, rp, w, make_view(a.y.data(), T, d), fwd);
  layer.backward(host, xv, rp, w, fwd, dyv, coeff, make_view(a.dx.data(), T, d), a.eg(),
                 {make_view(a.dgate.data(), E, d)});

  // Replay of the same ids (e.g. recorded by the rollout's sampler).
  const std::vector<std::int32_t> ids = fwd.plan.expert_ids, counts = fwd.plan.counts;
  grads b;
  Layer::result_type rep;
  rep.resize(T, layer.router.width(rp), E);
  sy::host::route_replay(layer.router, xv, rp, make_view<const std::int32_t>(ids.data(), T, 2),
                         make_view<const std::int32_t>(counts.data(), T), rep.plan, rep.losses);
  const auto plan_view = rep.plan.ref().const_view();
  layer.forward_experts(host, xv, plan_view, w, make_view(b.y.data(), T, d),
                        sy::span<index_t>(rep.dropped.data(), rep.dropped.size()));
  std::vector<float> d_weights(T * 2);
  layer.backward_experts(host, xv, plan_view, w, dyv, make_view(b.dx.data(), T, d), b.eg(),
                         sy::span<float>(d_weights.data(), d_weights.size()));
  sy::host::route_backward(layer.router, xv, rp, rep.plan, d_weights.data(), coeff,
                           make_view(b.dx.data(), T, d), {make_view(b.dgate.data(), E, d)});
  BOOST_TEST(same_bits(a.y, b.y));
  BOOST_TEST(same_bits(a.dx, b.dx));
  BOOST_TEST(same_bits(a.dw1, b.dw1));
  BOOST_TEST(same_bits(a.dw2, b.dw2));
  BOOST_TEST(same_bits(a.dgate, b.dgate));
  BOOST_TEST(std::memcmp(&fwd.losses, &rep.losses, sizeof rep.losses) == 0);
}
