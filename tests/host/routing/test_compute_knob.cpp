// SPDX-License-Identifier: Apache-2.0
// The per-token compute knob (linear_router_params::token_max_k / token_threshold) of TopK,
// TopP and AdaptiveGating: each token's selection is the member's rule with the token's cap
// and threshold (bitwise the router with that member on the token alone), a knob equal to the
// members changes no bit, the gradients of a knobbed plan against float64 central finite
// differences, the range checks, the refusal by a router without the knob, and
// routing::plan_compute (mean k, FFN slots, FLOPs).
#include <boost/test/unit_test.hpp>

#include <switchyard/backend/host/route.hpp>
#include <switchyard/routing/compute.hpp>
#include <switchyard/routing/routers/adaptive_gating.hpp>
#include <switchyard/routing/routers/scored_topk.hpp>
#include <switchyard/routing/routers/topk.hpp>
#include <switchyard/routing/routers/topp.hpp>

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

//! Token t's row of `plan` equals the one-token plan `one` bit for bit (ids, weights, counts,
//! padding included; `one` may be narrower: the rest of the row must be unused).
void same_row(const routing_plan& plan, int t, const routing_plan& one) {
  BOOST_TEST(plan.counts[t] == one.counts[0], "token " << t);
  for (int j = 0; j < plan.width; ++j) {
    const auto id = j < one.width ? one.id(0, j) : -1;
    const float w = j < one.width ? one.weight(0, j) : 0.0f;
    BOOST_TEST(plan.id(t, j) == id, "token " << t << " slot " << j);
    BOOST_TEST(std::memcmp(&plan.weights[t * plan.width + j], &w, sizeof w) == 0,
               "token " << t << " slot " << j);
  }
}

//! A composed router over linear_router_params without the knob (a user's router).
struct NoKnob {
  using policy_kind = sy::router_tag;
  using params_type = sy::routing::linear_router_params;
  using grads_type = sy::routing::linear_router_grads;
  using losses_type = sy::routing::softmax_router_losses;
  [[nodiscard]] sy::index_t num_experts(const params_type& p) const { return p.w.extent(0); }
  [[nodiscard]] sy::index_t width(const params_type&) const { return 2; }
  void validate(sy::index_t) const {}
  [[nodiscard]] sy::routing::topk_rule rule() const { return {2, true}; }
  [[nodiscard]] sy::routing::linear_softmax scoring() const { return {}; }
  [[nodiscard]] bool renormalized() const { return true; }
  [[nodiscard]] auto loss_terms() const {
    return std::tuple{sy::routing::bind_loss<&losses_type::z>(sy::routing::terms::z_loss{})};
  }
};

}  // namespace

BOOST_AUTO_TEST_CASE(topk_cap_per_token_is_top_k_t) {
  const st::router_problem p({12, 6, 8}, st::base_seed() + 1);
  const sy::routers::TopK r{.k = 4};
  std::vector<std::int32_t> caps(12);
  for (int t = 0; t < 12; ++t) caps[t] = 1 + t % 4;
  sy::routing::linear_router_params params{p.wv()};
  params.token_max_k = make_view<const std::int32_t>(caps.data(), 12);
  const auto plan = st::route_plan(r, p.xv(), params);
  BOOST_TEST(plan.width == 4);
  for (int t = 0; t < 12; ++t) {
    const auto one = p.token(t);
    same_row(plan, t, st::route_plan(sy::routers::TopK{.k = caps[t]}, one.xv(), {one.wv()}));
  }
  const auto cost = sy::routing::plan_compute(plan.ref());
  BOOST_TEST(cost.mean_k == 2.5);  // (1 + 2 + 3 + 4) / 4
  BOOST_TEST(cost.relative_to_topk(2) == 1.25);
}

BOOST_AUTO_TEST_CASE(topp_threshold_and_cap_per_token) {
  const st::router_problem p({16, 6, 8}, st::base_seed() + 2, 1.0f);
  const sy::routers::TopP r{.p = 0.5f};
  std::mt19937_64 g(st::base_seed() + 3);
  const auto ps = st::uniform(g, 16, 0.05f, 1.0f);
  std::vector<std::int32_t> caps(16);
  for (int t = 0; t < 16; ++t) caps[t] = 1 + (t * 3) % 8;
  sy::routing::linear_router_params params{p.wv()};
  params.token_threshold = make_view<const float>(ps.data(), 16);
  params.token_max_k = make_view<const std::int32_t>(caps.data(), 16);
  const auto plan = st::route_plan(r, p.xv(), params);
  double sum_k = 0;
  for (int t = 0; t < 16; ++t) {
    const auto one = p.token(t);
    same_row(plan, t,
             st::route_plan(sy::routers::TopP{.p = ps[t], .max_k = caps[t]}, one.xv(), {one.wv()}));
    sum_k += plan.counts[t];
  }
  BOOST_TEST(sy::routing::plan_compute(plan.ref()).mean_k == sum_k / 16);
}

BOOST_AUTO_TEST_CASE(adaptive_threshold_per_token_and_cap_one) {
  const st::router_problem p({20, 5, 6}, st::base_seed() + 4, 0.4f);
  const sy::routers::AdaptiveGating r{.threshold = 0.1f};
  std::mt19937_64 g(st::base_seed() + 5);
  const auto th = st::uniform(g, 20, 0.0f, 0.4f);
  std::vector<std::int32_t> caps(20);
  for (int t = 0; t < 20; ++t) caps[t] = t % 3 == 0 ? 1 : 2;
  sy::routing::linear_router_params params{p.wv()};
  params.token_threshold = make_view<const float>(th.data(), 20);
  params.token_max_k = make_view<const std::int32_t>(caps.data(), 20);
  sy::routing::adaptive_gating_losses losses{};
  const auto plan = st::route_plan(r, p.xv(), params, &losses);
  int twos = 0;
  for (int t = 0; t < 20; ++t) {
    const auto one = p.token(t);
    if (caps[t] == 1) {  // top-1, renormalised: weight P/P = 1
      same_row(plan, t, st::route_plan(sy::routers::TopK{.k = 1}, one.xv(), {one.wv()}));
    } else {
      same_row(plan, t, st::route_plan(sy::routers::AdaptiveGating{.threshold = th[t]}, one.xv(),
                                       {one.wv()}));
    }
    if (caps[t] == 1) BOOST_TEST(plan.counts[t] == 1);
    twos += plan.counts[t] == 2;
  }
  BOOST_TEST(twos > 0);
  BOOST_TEST(losses.top2_fraction == twos / 20.0f);
}

BOOST_AUTO_TEST_CASE(a_knob_equal_to_the_members_changes_no_bit) {
  const st::router_problem p({24, 6, 8}, st::base_seed() + 6);
  std::vector<std::int32_t> caps(24, 3);
  std::vector<float> ps(24, 0.6f);
  sy::routing::linear_router_params knob{p.wv()};
  knob.token_max_k = make_view<const std::int32_t>(caps.data(), 24);
  knob.token_threshold = make_view<const float>(ps.data(), 24);
  const auto check = [&](const auto& r, const sy::routing::linear_router_params& kp) {
    using L = typename std::remove_cvref_t<decltype(r)>::losses_type;
    L la{}, lb{};
    const auto a = st::route_plan(r, p.xv(), {p.wv()}, &la);
    const auto b = st::route_plan(r, p.xv(), kp, &lb);
    BOOST_TEST(a.expert_ids == b.expert_ids);
    BOOST_TEST(std::memcmp(a.weights.data(), b.weights.data(), a.weights.size() * 4) == 0);
    BOOST_TEST(std::memcmp(&la, &lb, sizeof la) == 0);
  };
  sy::routing::linear_router_params caps_only{p.wv()};
  caps_only.token_max_k = knob.token_max_k;
  check(sy::routers::TopK{.k = 3}, caps_only);
  check(sy::routers::TopP{.p = 0.6f, .max_k = 3}, knob);
}

BOOST_AUTO_TEST_CASE(knobbed_plan_gradients_match_finite_differences) {
  const st::router_problem p({10, 5, 6}, st::base_seed() + 7, 0.8f);
  const sy::routers::TopK r{.k = 3, .renormalize = true};
  std::vector<std::int32_t> caps(10);
  for (int t = 0; t < 10; ++t) caps[t] = 1 + t % 3;
  sy::routing::linear_router_params params{p.wv()};
  params.token_max_k = make_view<const std::int32_t>(caps.data(), 10);
  const auto plan = st::route_plan(r, p.xv(), params);
  std::mt19937_64 g(st::base_seed() + 8);
  const auto cot = st::normal(g, plan.weights.size());
  const sy::routing::softmax_router_losses coeff{.lb_switch = 0.3f, .lb_topk = 0.6f, .z = 0.1f};
  st::check_linear_backward(r, p, params, plan, cot, coeff, [&](const std::vector<double>& lg) {
    double s = 0.0, z = 0.0;
    std::vector<double> f1(6, 0.0), fk(6, 0.0), pbar(6, 0.0);
    for (int t = 0; t < 10; ++t) {
      const auto pr = st::softmax64(lg, t, 6);
      double sum = 0.0;
      for (int j = 0; j < plan.counts[t]; ++j) sum += pr[plan.id(t, j)];
      for (int j = 0; j < plan.counts[t]; ++j) {
        s += cot[t * plan.width + j] * pr[plan.id(t, j)] / sum;
        fk[plan.id(t, j)] += 1.0;
      }
      f1[plan.id(t, 0)] += 1.0;
      for (int e = 0; e < 6; ++e) pbar[e] += pr[e];
      z += std::pow(st::lse64(lg, t, 6), 2) / 10;
    }
    double l1 = 0.0, lk = 0.0;
    for (int e = 0; e < 6; ++e) {
      l1 += f1[e] / 10 * pbar[e] / 10;
      lk += fk[e] / 10 * pbar[e] / 10;
    }
    return s + 0.3 * 6 * l1 + 0.6 * 6 * lk + 0.1 * z;
  });
}

BOOST_AUTO_TEST_CASE(knob_ranges_are_checked) {
  const st::router_problem p({4, 3, 5}, st::base_seed() + 9);
  std::vector<std::int32_t> caps{1, 2, 5, 1};
  std::vector<float> ps{0.5f, 0.0f, 0.5f, 0.5f};
  sy::routing::linear_router_params params{p.wv()};
  params.token_max_k = make_view<const std::int32_t>(caps.data(), 4);
  st::expect_error<sy::range_error>(
      [&] { (void)st::route_plan(sy::routers::TopK{.k = 2}, p.xv(), params); },
      "params.token_max_k", "params.token_max_k[2] must be in [1, width] = [1, 2], got 5");
  caps[2] = 0;
  st::expect_error<sy::range_error>(
      [&] { (void)st::route_plan(sy::routers::TopP{}, p.xv(), params); }, "params.token_max_k",
      "got 0");
  params.token_max_k = make_view<const std::int32_t>(caps.data(), 3);
  st::expect_error<sy::shape_error>(
      [&] { (void)st::route_plan(sy::routers::TopK{.k = 2}, p.xv(), params); },
      "params.token_max_k", "[T]");
  params.token_max_k = {};
  params.token_threshold = make_view<const float>(ps.data(), 4);
  st::expect_error<sy::range_error>(
      [&] { (void)st::route_plan(sy::routers::TopP{}, p.xv(), params); },
      "params.token_threshold", "params.token_threshold[1] must be in (0, 1]");
  ps[1] = -0.5f;
  st::expect_error<sy::range_error>(
      [&] { (void)st::route_plan(sy::routers::AdaptiveGating{}, p.xv(), params); },
      "params.token_threshold", "[0, inf)");
  st::expect_error<sy::shape_error>(
      [&] { (void)st::route_plan(sy::routers::TopK{.k = 2}, p.xv(), params); },
      "params.token_threshold", "no threshold");
  // A router without the knob refuses it rather than ignoring it.
  BOOST_CHECK_THROW((void)st::route_plan(NoKnob{}, p.xv(), params), sy::unsupported_error);
  // Without the knob it routes as before.
  BOOST_CHECK_NO_THROW((void)st::route_plan(NoKnob{}, p.xv(), {p.wv()}));
}

BOOST_AUTO_TEST_CASE(plan_compute_counts_ffn_slots_and_flops) {
  routing_plan plan;
  plan.resize(3, 3, 6);
  const std::int32_t ids[] = {0, 4, 5, 2, -1, -1, 5, -1, -1};
  const std::int32_t counts[] = {3, 1, 1};
  std::copy(std::begin(ids), std::end(ids), plan.expert_ids.begin());
  std::copy(std::begin(counts), std::end(counts), plan.counts.begin());
  const auto all = sy::routing::plan_compute(plan.ref());
  BOOST_TEST(all.assignments == 5);
  BOOST_TEST(all.ffn_assignments == 5);
  const auto ffn = sy::routing::plan_compute(plan.ref(), 4);  // ids 4, 5 are not FFN experts
  BOOST_TEST(ffn.ffn_assignments == 2);
  BOOST_TEST(ffn.mean_k == 5.0 / 3);
  BOOST_TEST(ffn.mean_ffn_k == 2.0 / 3);
  BOOST_TEST(sy::routing::ffn_flops_per_slot(64, 128, true) == 6.0 * 64 * 128);
  BOOST_TEST(sy::routing::ffn_flops_per_slot(64, 128, false) == 4.0 * 64 * 128);
  BOOST_TEST(ffn.expert_flops(10.0) == 20.0);
  BOOST_TEST(ffn.relative_to_topk(2) == 1.0 / 3);
}

BOOST_AUTO_TEST_CASE(scored_topk_cap_per_token) {
  const st::router_problem p({12, 6, 8}, st::base_seed() + 10, 0.7f);
  const auto make = [](int k) {
    return sy::routers::ScoredTopK{.k = k,
                                   .scoring = sy::routing::score_function::sigmoid,
                                   .normalize = {.kind = sy::routing::normalization::sum},
                                   .scaling = 2.0f};
  };
  std::vector<std::int32_t> caps(12);
  for (int t = 0; t < 12; ++t) caps[t] = 1 + t % 3;
  sy::routing::scored_router_params params{.w = p.wv()};
  params.token_max_k = make_view<const std::int32_t>(caps.data(), 12);
  const auto plan = st::route_plan(make(3), p.xv(), params);
  for (int t = 0; t < 12; ++t) {
    const auto one = p.token(t);
    same_row(plan, t, st::route_plan(make(caps[t]), one.xv(),
                                     sy::routing::scored_router_params{.w = one.wv()}));
  }
  BOOST_TEST(sy::routing::plan_compute(plan.ref()).mean_k == 2.0);
  caps[4] = 4;
  st::expect_error<sy::range_error>([&] { (void)st::route_plan(make(3), p.xv(), params); },
                                    "params.token_max_k",
                                    "params.token_max_k[4] must be in [1, k] = [1, 3], got 4");
}
