// SPDX-License-Identifier: Apache-2.0
// Adaptive Gating router (spec §5) and the curriculum ordering: plan properties on fresh random
// inputs, determinism and batch invariance, losses and gradients (d_logits with the aux-loss
// coefficients, dx, dw) against float64 references / central differences, and bad input.
#include <boost/test/unit_test.hpp>

#include <switchyard/routing/routers/adaptive_gating.hpp>
#include <switchyard/training/curriculum.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
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

routing_plan route(const sy::routers::AdaptiveGating& r, const router_problem& p,
                   sy::routing::adaptive_gating_losses* losses = nullptr) {
  return sy::test::route_plan(r, p.xv(), params_of(p), losses);
}

// float64 reference: Σ cot ⊙ weights + c.lb·E·Σ f¹·P̄ + c.z·z as a function of the logits, for
// the plan's (fixed) selection.
double objective_logits(const std::vector<double>& logits, const routing_plan& plan,
                        const std::vector<float>& cot, bool renorm,
                        const sy::routing::adaptive_gating_losses& c) {
  const int tokens = static_cast<int>(plan.num_tokens), e = static_cast<int>(plan.num_experts),
            k = static_cast<int>(plan.width);
  double total = 0, z = 0;
  std::vector<double> pbar(e, 0), f1(e, 0);
  int singles = 0;
  for (int t = 0; t < tokens; ++t) {
    double m = -1e300;
    for (int i = 0; i < e; ++i) m = std::max(m, logits[t * e + i]);
    double s = 0;
    for (int i = 0; i < e; ++i) s += std::exp(logits[t * e + i] - m);
    const double lse = m + std::log(s);
    std::vector<double> p(e);
    for (int i = 0; i < e; ++i) p[i] = std::exp(logits[t * e + i] - lse), pbar[i] += p[i] / tokens;
    z += lse * lse / tokens;
    double sel = 0;
    for (int j = 0; j < plan.counts[t]; ++j) sel += p[plan.id(t, j)];
    for (int j = 0; j < plan.counts[t]; ++j) {
      const int id = plan.id(t, j);
      total += cot[t * k + j] * (renorm ? p[id] / sel : p[id]);
    }
    if (plan.counts[t] == 1) f1[plan.id(t, 0)] += 1, ++singles;
  }
  double lb = 0;
  if (singles > 0)
    for (int i = 0; i < e; ++i) lb += e * (f1[i] / singles) * pbar[i];
  return total + c.lb_loss * lb + c.z_loss * z;
}

}  // namespace

BOOST_AUTO_TEST_CASE(plan_properties_on_random_inputs) {
  const auto seed = sy::test::base_seed();
  for (float thr : {0.0f, 0.05f, 0.1f, 0.3f, 1.0f}) {
    for (bool renorm : {true, false}) {
      BOOST_TEST_CONTEXT("threshold=" << thr << " renormalize=" << renorm) {
        const router_problem p({96, 16, 8}, seed + static_cast<int>(thr * 100) + renorm, 0.4f);
        const sy::routers::AdaptiveGating r{.threshold = thr, .renormalize = renorm};
        sy::routing::adaptive_gating_losses l;
        const auto plan = route(r, p, &l);
        BOOST_TEST(plan.width == 2);
        int twos = 0;
        for (int t = 0; t < p.tokens; ++t) {
          const float* pr = plan.probs.data() + t * p.experts;
          // the two largest probabilities, ties to the lower index
          int e1 = 0;
          for (int e = 1; e < p.experts; ++e)
            if (pr[e] > pr[e1]) e1 = e;
          int e2 = e1 == 0 ? 1 : 0;
          for (int e = 0; e < p.experts; ++e)
            if (e != e1 && pr[e] > pr[e2]) e2 = e;
          const int n = plan.counts[t];
          BOOST_TEST(n == (pr[e1] - pr[e2] <= thr ? 2 : 1));
          BOOST_TEST(plan.id(t, 0) == e1);
          twos += n == 2;
          double sum = 0;
          for (int j = 0; j < n; ++j) {
            BOOST_TEST(plan.weight(t, j) >= 0.0f);
            sum += plan.weight(t, j);
          }
          if (n == 2) {
            BOOST_TEST(plan.id(t, 1) == e2);
          } else {
            BOOST_TEST(plan.id(t, 1) == -1);
            BOOST_TEST(plan.weight(t, 1) == 0.0f);
          }
          if (renorm) {
            BOOST_TEST(std::abs(sum - 1.0) < 1e-6);
          } else {
            for (int j = 0; j < n; ++j) BOOST_TEST(plan.weight(t, j) == pr[plan.id(t, j)]);
          }
        }
        BOOST_TEST(l.top2_fraction == static_cast<float>(double(twos) / p.tokens));
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(exact_ties_use_two_experts_even_at_threshold_zero) {
  // Identical router rows: all probabilities equal, so p1 - p2 = 0 <= 0 and experts 0, 1.
  std::vector<float> x{0.3f, -1.2f, 0.7f, 0.1f};
  std::vector<float> w(3 * 4);
  for (int e = 0; e < 3; ++e)
    for (int q = 0; q < 4; ++q) w[e * 4 + q] = 0.2f * static_cast<float>(q + 1);
  sy::routing::adaptive_gating_losses l;
  const auto plan = sy::test::route_plan(
      sy::routers::AdaptiveGating{.threshold = 0.0f},
      sy::matrix_view<const float>(sy::make_view(x.data(), 1, 4)),
      {sy::make_view<const float>(w.data(), 3, 4)}, &l);
  BOOST_TEST(plan.counts[0] == 2);
  BOOST_TEST(plan.id(0, 0) == 0);
  BOOST_TEST(plan.id(0, 1) == 1);
  BOOST_TEST(l.lb_loss == 0.0f);  // no top-1-only token
  BOOST_TEST(l.top2_fraction == 1.0f);
}

BOOST_AUTO_TEST_CASE(deterministic_and_batch_invariant) {
  const router_problem p({40, 16, 8}, sy::test::base_seed() + 99);
  const sy::routers::AdaptiveGating r{.threshold = 0.15f};
  const auto a = route(r, p), b = route(r, p);
  BOOST_TEST(a.expert_ids == b.expert_ids);
  BOOST_TEST(std::memcmp(a.weights.data(), b.weights.data(), a.weights.size() * 4) == 0);
  for (int tok : {0, 21, 39}) {
    const auto s = route(r, p.token(tok));
    BOOST_TEST(s.counts[0] == a.counts[tok]);
    for (int j = 0; j < 2; ++j) {
      BOOST_TEST(s.id(0, j) == a.id(tok, j));
      BOOST_TEST(s.weight(0, j) == a.weight(tok, j));
    }
  }
}

BOOST_AUTO_TEST_CASE(losses_match_float64_reference) {
  const router_problem p({30, 12, 6}, sy::test::base_seed() + 5, 0.3f);
  sy::routing::adaptive_gating_losses l;
  const sy::routers::AdaptiveGating r{.threshold = 0.1f};
  const auto plan = route(r, p, &l);
  std::vector<double> lg(plan.logits.begin(), plan.logits.end());
  const std::vector<float> zero(plan.weights.size(), 0.0f);
  const double lb = objective_logits(lg, plan, zero, true, {.lb_loss = 1});
  const double z = objective_logits(lg, plan, zero, true, {.z_loss = 1});
  BOOST_TEST(std::abs(l.lb_loss - lb) <= 1e-5 * std::abs(lb) + 1e-6);
  BOOST_TEST(std::abs(l.z_loss - z) <= 1e-5 * std::abs(z) + 1e-6);
}

BOOST_AUTO_TEST_CASE(gradients_match_float64_central_differences) {
  const router_problem p({12, 7, 5}, sy::test::base_seed() + 7, 0.25f);
  for (bool renorm : {true, false}) {
    BOOST_TEST_CONTEXT("renormalize=" << renorm) {
      const sy::routers::AdaptiveGating r{.threshold = 0.2f, .renormalize = renorm};
      const auto plan = route(r, p);
      BOOST_TEST_REQUIRE(plan.total_assignments() > p.tokens);  // both kinds of token present
      BOOST_TEST_REQUIRE(plan.total_assignments() < 2 * p.tokens);
      std::mt19937_64 g(sy::test::base_seed() + 8);
      const auto cot = sy::test::normal(g, plan.weights.size());
      const sy::routing::adaptive_gating_losses coeff{
          .lb_loss = 0.3f, .z_loss = 0.05f, .top2_fraction = 123.0f /*ignored*/};
      const auto obj = [&](const std::vector<double>& lg) {
        return objective_logits(lg, plan, cot, renorm, coeff);
      };
      sy::test::check_gradient("d_logits", sy::test::backward_logits(r, plan, cot, coeff), obj,
                               sy::test::to64(plan.logits), 2e-5, 1e-4);
      sy::test::check_linear_backward(r, p, params_of(p), plan, cot, coeff, obj);
    }
  }
}

BOOST_AUTO_TEST_CASE(empty_batch_and_bad_threshold) {
  const router_problem p({0, 8, 4}, 1);
  sy::routing::adaptive_gating_losses l{1, 1, 1};
  const auto plan = sy::test::route_plan(
      sy::routers::AdaptiveGating{},
      sy::matrix_view<const float>(sy::make_view(static_cast<const float*>(nullptr), 0, 8)),
      params_of(p), &l);
  BOOST_TEST(plan.num_tokens == 0);
  BOOST_TEST(l.lb_loss == 0.0f);
  BOOST_TEST(l.z_loss == 0.0f);
  BOOST_TEST(l.top2_fraction == 0.0f);

  const router_problem q({4, 8, 4}, 3);
  const auto run = [&](sy::routers::AdaptiveGating r, sy::matrix_view<const float> x) {
    return [&, r, x] { (void)sy::test::route_plan(r, x, params_of(q)); };
  };
  for (float bad : {-0.01f, std::numeric_limits<float>::quiet_NaN()}) {
    BOOST_TEST_CONTEXT("threshold=" << bad) {
      expect_error<sy::range_error>(run({.threshold = bad}, q.xv()), "threshold",
                                    "threshold must be >= 0");
    }
  }
  auto nan_x = q.x;
  nan_x[5] = std::numeric_limits<float>::infinity();
  expect_error<sy::non_finite_error>(run({}, sy::make_view<const float>(nan_x.data(), 4, 8)), "x",
                                     "token 0");
}

// ---- curriculum ordering -----------------------------------------------------------------

BOOST_AUTO_TEST_CASE(curriculum_order_matches_float64_reference) {
  std::mt19937_64 g(sy::test::base_seed() + 11);
  const int n = 40, layers = 5;
  std::vector<std::int32_t> len(n), counts(n * layers);
  for (int d = 0; d < n; ++d) {
    len[d] = 5 + static_cast<int>(g() % 60);
    for (int l = 0; l < layers; ++l) counts[d * layers + l] = static_cast<int>(g() % (len[d] + 1));
  }
  const auto r = sy::training::curriculum_order(
      sy::matrix_view<const std::int32_t>(sy::make_view(counts.data(), n, layers)),
      sy::vector_view<const std::int32_t>(sy::make_view(len.data(), n)));
  // reference: smallest total, ties to the lower index
  int ref = 0;
  auto total = [&](int d) {
    return std::accumulate(&counts[d * layers], &counts[d * layers] + layers, 0);
  };
  for (int d = 1; d < n; ++d)
    if (total(d) < total(ref)) ref = d;
  BOOST_TEST(r.reference == ref);
  BOOST_TEST(r.cosine_to_reference[ref] == 1.0f);
  for (int d = 0; d < n; ++d) {
    double dot = 0, a = 0, b = 0;
    for (int l = 0; l < layers; ++l) {
      const double c = double(counts[d * layers + l]) / len[d],
                   c0 = double(counts[ref * layers + l]) / len[ref];
      BOOST_TEST(std::abs(r.complexity[d * layers + l] - c) <= 1e-6 * c + 1e-7);
      dot += c * c0, a += c * c, b += c0 * c0;
    }
    const double want = (a == 0 && b == 0)   ? 1.0
                        : (a == 0 || b == 0) ? 0.0
                                             : dot / std::sqrt(a * b);
    BOOST_TEST(std::abs(r.cosine_to_reference[d] - want) <= 1e-6);
  }
  // order: a permutation, non-increasing similarity, ties to the lower index
  std::vector<std::int32_t> sorted = r.order;
  std::sort(sorted.begin(), sorted.end());
  for (int d = 0; d < n; ++d) BOOST_TEST(sorted[d] == d);
  for (int i = 1; i < n; ++i) {
    const float prev = r.cosine_to_reference[r.order[i - 1]],
                cur = r.cosine_to_reference[r.order[i]];
    BOOST_TEST((prev > cur || (prev == cur && r.order[i - 1] < r.order[i])));
  }
}

BOOST_AUTO_TEST_CASE(curriculum_zero_vectors_and_bad_input) {
  // Reference with no top-2 token: cos(0, 0) = 1 and cos(0, v) = 0.
  std::vector<std::int32_t> counts{3, 1, 0, 0, 2, 2, 0, 0}, len{10, 10, 10, 10};
  const auto r = sy::training::curriculum_order(
      sy::matrix_view<const std::int32_t>(sy::make_view(counts.data(), 4, 2)),
      sy::vector_view<const std::int32_t>(sy::make_view(len.data(), 4)));
  BOOST_TEST(r.reference == 1);
  BOOST_TEST(r.cosine_to_reference[1] == 1.0f);
  BOOST_TEST(r.cosine_to_reference[3] == 1.0f);
  BOOST_TEST(r.cosine_to_reference[0] == 0.0f);
  BOOST_TEST(r.order[0] == 1);
  BOOST_TEST(r.order[1] == 3);  // tie in similarity -> lower index first
  BOOST_TEST(r.order[2] == 0);

  const auto empty = sy::training::curriculum_order(
      sy::matrix_view<const std::int32_t>(sy::make_view(counts.data(), 0, 2)),
      sy::vector_view<const std::int32_t>(sy::make_view(len.data(), 0)));
  BOOST_TEST(empty.order.empty());

  auto bad_len = len;
  bad_len[2] = 0;
  expect_error<sy::range_error>(
      [&] {
        sy::training::curriculum_order(
            sy::matrix_view<const std::int32_t>(sy::make_view(counts.data(), 4, 2)),
            sy::vector_view<const std::int32_t>(sy::make_view(bad_len.data(), 4)));
      },
      "seq_len", "seq_len[2] must be >= 1, got 0");
  auto bad_counts = counts;
  bad_counts[5] = -1;
  expect_error<sy::range_error>(
      [&] {
        sy::training::curriculum_order(
            sy::matrix_view<const std::int32_t>(sy::make_view(bad_counts.data(), 4, 2)),
            sy::vector_view<const std::int32_t>(sy::make_view(len.data(), 4)));
      },
      "top2_counts", "top2_counts[2, 1] must be >= 0, got -1");
  expect_error<sy::shape_error>(
      [&] {
        sy::training::curriculum_order(
            sy::matrix_view<const std::int32_t>(sy::make_view(counts.data(), 4, 2)),
            sy::vector_view<const std::int32_t>(sy::make_view(len.data(), 3)));
      },
      "seq_len", "seq_len");
}
