// SPDX-License-Identifier: Apache-2.0
// Regression tests of the #17 hardening follow-ups for callers that skip MoELayer and call
// the pieces directly: the routing plan's size arithmetic (plan_ref::required,
// routing_plan::resize) rejects sizes whose products overflow index_t, and a router's
// backward checks every gradient view before it writes dx or any gradient.
#include <boost/test/unit_test.hpp>

#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include <switchyard/backend/host/route.hpp>
#include <switchyard/routing/routers/scored_topk.hpp>

#include "host/hardening/hardening_setup.hpp"

namespace sy = switchyard;
using sy::index_t;
using sy::make_view;

namespace {

constexpr index_t huge_tokens = index_t{1} << 62;
constexpr index_t int64_max = std::numeric_limits<index_t>::max();

constexpr index_t T = 9, D = 6, E = 5, EP = 3, K = 2;

//! Seeded inputs of a scored router with a bias and the gating residual, and seeded
//! gradient buffers (dx, grads.w, grads.residual_w, grads.prev_logits).
struct scored_case {
  std::vector<float> x, w, b, wg, prev;
  std::vector<float> dx, dw, dwg, dprev;
  std::vector<float> d_weights;
  sy::routing::routing_plan plan;
  const sy::routers::ScoredTopK router{.k = K,
                                       .scoring = sy::routing::score_function::sigmoid,
                                       .normalize = {.kind = sy::routing::normalization::sum}};

  explicit scored_case(std::uint64_t salt) {
    std::mt19937_64 g(sy::test::base_seed() + salt);
    x = sy::test::normal(g, T * D);
    w = sy::test::normal(g, E * D, 0.6f);
    b = sy::test::normal(g, E, 0.3f);
    wg = sy::test::normal(g, E * EP, 0.5f);
    prev = sy::test::normal(g, T * EP);
    sy::routing::scored_router_losses losses{};
    sy::host::route(router, xv(), params(), plan, losses);
    d_weights = sy::test::normal(g, plan.weights.size());
    // Gradients accumulate (+=): seeded O(1) contents show an addition in their bits (the
    // poison value would absorb one).
    dx = sy::test::normal(g, T * D);
    dw = sy::test::normal(g, E * D);
    dwg = sy::test::normal(g, E * EP);
    dprev = sy::test::normal(g, T * EP);
  }
  [[nodiscard]] sy::matrix_view<const float> xv() const { return make_view(x.data(), T, D); }
  [[nodiscard]] sy::routing::scored_router_params params() const {
    return {.w = make_view(w.data(), E, D),
            .b = make_view(b.data(), E),
            .prev_logits = make_view(prev.data(), T, EP),
            .residual_w = make_view(wg.data(), E, EP)};
  }
  [[nodiscard]] sy::routing::scored_router_grads grads(sy::vector_view<float> gb) {
    return {.w = make_view(dw.data(), E, D),
            .b = gb,
            .residual_w = make_view(dwg.data(), E, EP),
            .prev_logits = make_view(dprev.data(), T, EP)};
  }
  //! The gradient buffers as they are now (to compare bit for bit after a failed call).
  [[nodiscard]] std::vector<std::vector<float>> outputs() const { return {dx, dw, dwg, dprev}; }
};

void expect_unchanged(const std::vector<std::vector<float>>& before,
                      const std::vector<std::vector<float>>& after) {
  const char* names[] = {"dx", "grads.w", "grads.residual_w", "grads.prev_logits"};
  for (std::size_t i = 0; i < before.size(); ++i)
    BOOST_TEST(sy::test::same_bits(before[i], after[i]), names[i] << " was written");
}

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
  sy::test::expect_named<sy::range_error>([] { (void)plan_ref::required(4, 2, int64_max); }, "E");
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

// ScoredTopK's backward (host::route_backward: the generic route, then
// scored_linear::backward) checked grads.b, grads.residual_w and grads.prev_logits only
// after it had added into dx and grads.w.
BOOST_AUTO_TEST_CASE(scored_router_backward_checks_every_gradient_before_writing) {
  scored_case c(101);
  std::mt19937_64 g(sy::test::base_seed() + 102);
  std::vector<float> db = sy::test::normal(g, E + 1);
  const auto before = c.outputs();
  const std::vector<float> db_before = db;
  sy::test::expect_named<sy::shape_error>(
      [&] {
        sy::host::route_backward(c.router, c.xv(), c.params(), c.plan, c.d_weights.data(),
                                 sy::routing::scored_router_losses{.lb = 0.5f},
                                 make_view(c.dx.data(), T, D),
                                 c.grads(make_view(db.data(), E + 1)));
      },
      "grads.b");
  expect_unchanged(before, c.outputs());
  BOOST_TEST(sy::test::same_bits(db_before, db));

  // The same through the scoring part's own backward, and its check alone.
  const std::vector<float> d_logits = sy::test::normal(g, T * E);
  const auto scoring = sy::routing::scored_linear{sy::routing::score_function::sigmoid};
  const auto sp = sy::routing::scored_linear::params(c.params());
  sy::test::expect_named<sy::shape_error>(
      [&] {
        scoring.backward(c.xv(), sp, d_logits.data(), make_view(c.dx.data(), T, D),
                         c.grads(make_view(db.data(), E + 1)));
      },
      "grads.b");
  expect_unchanged(before, c.outputs());
  sy::test::expect_named<sy::shape_error>(
      [&] {
        sy::routing::scored_linear::check_grads(c.xv(), sp, make_view(c.dx.data(), T, D),
                                                c.grads(make_view(db.data(), E + 1)));
      },
      "grads.b");

  // A gating-residual gradient of the wrong shape, and one without the residual in the
  // params, with a good grads.b.
  std::vector<float> good_b = sy::test::normal(g, E);
  auto bad_residual = c.grads(make_view(good_b.data(), E));
  bad_residual.residual_w = make_view(c.dwg.data(), EP, E);
  sy::test::expect_named<sy::shape_error>(
      [&] {
        scoring.backward(c.xv(), sp, d_logits.data(), make_view(c.dx.data(), T, D), bad_residual);
      },
      "grads.residual_w");
  auto no_residual = sp;
  no_residual.prev_logits = {};
  no_residual.residual_w = {};
  auto only_prev = c.grads(make_view(good_b.data(), E));
  only_prev.residual_w = {};
  sy::test::expect_named<sy::shape_error>(
      [&] {
        scoring.backward(c.xv(), no_residual, d_logits.data(), make_view(c.dx.data(), T, D),
                         only_prev);
      },
      "grads.prev_logits");
  expect_unchanged(before, c.outputs());

  // Good views pass the checks: grads.b gets Σ_t d_logits (the same float order).
  for (auto* v : {&c.dx, &c.dw, &c.dwg, &c.dprev}) std::fill(v->begin(), v->end(), 0.0f);
  std::fill(good_b.begin(), good_b.end(), 0.0f);
  scoring.backward(c.xv(), sp, d_logits.data(), make_view(c.dx.data(), T, D),
                   c.grads(make_view(good_b.data(), E)));
  float dx_norm = 0.0f;
  for (float v : c.dx) dx_norm += std::abs(v);
  BOOST_TEST(dx_norm > 0.0f);  // dx was written too
  for (int e = 0; e < E; ++e) {
    float acc = 0.0f;
    for (int t = 0; t < T; ++t) acc += d_logits[t * E + e];
    BOOST_TEST(good_b[e] == acc);  // grads.b += Σ_t d_logits, the same float order
  }
}

// linear_backward (TopK, TopP, ..., expert choice, ReMoE) checked grads.w after adding into dx.
BOOST_AUTO_TEST_CASE(linear_router_backward_checks_grads_w_before_dx) {
  std::mt19937_64 g(sy::test::base_seed() + 103);
  const auto x = sy::test::normal(g, T * D);
  const auto w = sy::test::normal(g, E * D, 0.6f);
  const auto d_logits = sy::test::normal(g, T * E);
  // Seeded O(1) contents: an accumulation (+=) shows in their bits.
  std::vector<float> dx = sy::test::normal(g, T * D), dw = sy::test::normal(g, E * D);
  const auto dx_before = dx, dw_before = dw;
  const sy::routing::linear_router_params p{make_view(w.data(), E, D)};
  sy::test::expect_named<sy::shape_error>(
      [&] {
        sy::routing::linear_backward(make_view(x.data(), T, D), p, d_logits.data(),
                                     make_view(dx.data(), T, D), {make_view(dw.data(), D, E)});
      },
      "grads.w");
  BOOST_TEST(sy::test::same_bits(dx_before, dx));
  BOOST_TEST(sy::test::same_bits(dw_before, dw));

  // Through a router: routers::TopK's generic backward.
  const sy::routers::TopK topk{.k = K};
  sy::routing::routing_plan plan;
  sy::routing::softmax_router_losses losses{};
  sy::host::route(topk, make_view(x.data(), T, D), p, plan, losses);
  const auto d_weights = sy::test::normal(g, plan.weights.size());
  sy::test::expect_named<sy::shape_error>(
      [&] {
        sy::host::route_backward(topk, make_view(x.data(), T, D), p, plan, d_weights.data(),
                                 sy::routing::softmax_router_losses{}, make_view(dx.data(), T, D),
                                 {make_view(dw.data(), E, D + 1)});
      },
      "grads.w");
  BOOST_TEST(sy::test::same_bits(dx_before, dx));
  BOOST_TEST(sy::test::same_bits(dw_before, dw));
}

// MoELayer runs the scoring part's check_grads first (the router's own words: "[E, d]"), so
// a router that adds a gradient view has it checked before any write without a new member
// name in the layer; the layer's matching still adds the aliasing checks.
BOOST_AUTO_TEST_CASE(layer_runs_the_scoring_parts_own_gradient_check) {
  sy::test::small_layer s(104);
  std::mt19937_64 g(sy::test::base_seed() + 105);
  const auto b = sy::test::normal(g, static_cast<std::size_t>(s.experts), 0.3f);
  std::vector<float> gb = sy::test::normal(g, static_cast<std::size_t>(s.experts));
  const sy::routing::scored_router_params rp{
      .w = make_view<const float>(s.rs.w.data(), s.experts, s.d),
      .b = make_view(b.data(), s.experts)};
  using Layer = sy::MoELayer<sy::routers::ScoredTopK, sy::activation::swiglu>;
  Layer layer{.router = {.k = 2,
                         .scoring = sy::routing::score_function::sigmoid,
                         .normalize = {.kind = sy::routing::normalization::sum}}};
  std::vector<float> y(static_cast<std::size_t>(s.tokens * s.d));
  Layer::result_type res;
  layer.forward<float>(sy::host_context{}, s.L.xv(), rp, s.L.weights(),
                       make_view(y.data(), s.tokens, s.d), res);
  const std::vector<float> before = s.all_grads(), gb_before = gb;
  const sy::routing::scored_router_grads bad{.w = make_view(s.gwr.data(), s.d, s.experts),
                                             .b = make_view(gb.data(), s.experts)};
  try {
    layer.backward<float>(sy::host_context{}, s.L.xv(), rp, s.L.weights(), res, s.dyv(), {},
                          s.dxv(), s.grads(), bad);
    BOOST_ERROR("no exception for a transposed grads.w");
  } catch (const sy::shape_error& e) {
    BOOST_TEST(e.argument() == "grads.w");
    BOOST_TEST(std::string(e.what()).find("[E, d]") != std::string::npos, e.what());
  }
  BOOST_TEST(sy::test::same_bits(before, s.all_grads()));
  BOOST_TEST(sy::test::same_bits(gb_before, gb));
}
