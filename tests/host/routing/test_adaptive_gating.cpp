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

#include "support/random.hpp"

namespace sy = switchyard;
using sy::routing::routing_plan;

namespace {

struct problem {
  int tokens, d, experts;
  std::vector<float> x, w;
  problem(int t, int dd, int e, std::uint64_t seed, float wscale = 0.5f)
      : tokens(t), d(dd), experts(e) {
    std::mt19937_64 g(seed);
    x = sy::test::normal(g, static_cast<std::size_t>(t) * dd);
    w = sy::test::normal(g, static_cast<std::size_t>(e) * dd, wscale);
  }
  [[nodiscard]] sy::matrix_view<const float> xv() const {
    return sy::make_view(x.data(), tokens, d);
  }
  [[nodiscard]] sy::routing::linear_router_params params() const {
    return {sy::make_view(w.data(), experts, d)};
  }
};

routing_plan route(const sy::routers::AdaptiveGating& r, const problem& p,
                   sy::routing::adaptive_gating_losses* losses = nullptr) {
  routing_plan plan;
  sy::routing::adaptive_gating_losses l;
  switchyard::host::route(r, p.xv(), p.params(), plan, l);
  if (losses) *losses = l;
  return plan;
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

std::vector<double> logits64(const std::vector<double>& x, const std::vector<double>& w, int tokens,
                             int d, int e) {
  std::vector<double> lg(static_cast<std::size_t>(tokens) * e, 0.0);
  for (int t = 0; t < tokens; ++t)
    for (int i = 0; i < e; ++i)
      for (int q = 0; q < d; ++q) lg[t * e + i] += x[t * d + q] * w[i * d + q];
  return lg;
}

}  // namespace

BOOST_AUTO_TEST_CASE(plan_properties_on_random_inputs) {
  const auto seed = sy::test::base_seed();
  for (float thr : {0.0f, 0.05f, 0.1f, 0.3f, 1.0f}) {
    for (bool renorm : {true, false}) {
      BOOST_TEST_CONTEXT("threshold=" << thr << " renormalize=" << renorm) {
        const problem p(96, 16, 8, seed + static_cast<int>(thr * 100) + renorm, 0.4f);
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
  routing_plan plan;
  sy::routing::adaptive_gating_losses l;
  sy::routers::AdaptiveGating{.threshold = 0.0f}.forward(
      sy::matrix_view<const float>(sy::make_view(x.data(), 1, 4)),
      {sy::make_view<const float>(w.data(), 3, 4)}, plan, l);
  BOOST_TEST(plan.counts[0] == 2);
  BOOST_TEST(plan.id(0, 0) == 0);
  BOOST_TEST(plan.id(0, 1) == 1);
  BOOST_TEST(l.lb_loss == 0.0f);  // no top-1-only token
  BOOST_TEST(l.top2_fraction == 1.0f);
}

BOOST_AUTO_TEST_CASE(deterministic_and_batch_invariant) {
  const problem p(40, 16, 8, sy::test::base_seed() + 99);
  const sy::routers::AdaptiveGating r{.threshold = 0.15f};
  const auto a = route(r, p), b = route(r, p);
  BOOST_TEST(a.expert_ids == b.expert_ids);
  BOOST_TEST(std::memcmp(a.weights.data(), b.weights.data(), a.weights.size() * 4) == 0);
  for (int tok : {0, 21, 39}) {
    problem one = p;
    one.tokens = 1;
    one.x.assign(p.x.begin() + tok * p.d, p.x.begin() + (tok + 1) * p.d);
    const auto s = route(r, one);
    BOOST_TEST(s.counts[0] == a.counts[tok]);
    for (int j = 0; j < 2; ++j) {
      BOOST_TEST(s.id(0, j) == a.id(tok, j));
      BOOST_TEST(s.weight(0, j) == a.weight(tok, j));
    }
  }
}

BOOST_AUTO_TEST_CASE(losses_match_float64_reference) {
  const problem p(30, 12, 6, sy::test::base_seed() + 5, 0.3f);
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
  const problem p(12, 7, 5, sy::test::base_seed() + 7, 0.25f);
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
      std::vector<float> d_logits(plan.logits.size());
      r.backward_logits(plan, cot.data(), coeff, d_logits.data());
      std::vector<double> lg(plan.logits.begin(), plan.logits.end());
      const double h = 1e-6;
      for (std::size_t i = 0; i < lg.size(); ++i) {
        auto up = lg, dn = lg;
        up[i] += h;
        dn[i] -= h;
        const double fd = (objective_logits(up, plan, cot, renorm, coeff) -
                           objective_logits(dn, plan, cot, renorm, coeff)) /
                          (2 * h);
        BOOST_TEST(std::abs(d_logits[i] - fd) <= 2e-5 + 1e-4 * std::abs(fd),
                   "i=" << i << " fd=" << fd);
      }
      std::vector<float> dx(p.x.size(), 0.0f), dw(p.w.size(), 0.0f);
      switchyard::host::route_backward(r, p.xv(), p.params(), plan, cot.data(), coeff,
                 sy::make_view(dx.data(), p.tokens, p.d),
                 {sy::make_view(dw.data(), p.experts, p.d)});
      std::vector<double> x64(p.x.begin(), p.x.end()), w64(p.w.begin(), p.w.end());
      auto f = [&](const std::vector<double>& xx, const std::vector<double>& ww) {
        return objective_logits(logits64(xx, ww, p.tokens, p.d, p.experts), plan, cot, renorm,
                                coeff);
      };
      for (std::size_t i = 0; i < x64.size(); ++i) {
        auto up = x64, dn = x64;
        up[i] += h;
        dn[i] -= h;
        const double fd = (f(up, w64) - f(dn, w64)) / (2 * h);
        BOOST_TEST(std::abs(dx[i] - fd) <= 5e-5 + 2e-4 * std::abs(fd),
                   "dx i=" << i << " fd=" << fd);
      }
      for (std::size_t i = 0; i < w64.size(); ++i) {
        auto up = w64, dn = w64;
        up[i] += h;
        dn[i] -= h;
        const double fd = (f(x64, up) - f(x64, dn)) / (2 * h);
        BOOST_TEST(std::abs(dw[i] - fd) <= 5e-5 + 2e-4 * std::abs(fd),
                   "dw i=" << i << " fd=" << fd);
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(empty_batch_and_bad_threshold) {
  const problem p(0, 8, 4, 1);
  sy::routing::adaptive_gating_losses l{1, 1, 1};
  routing_plan plan;
  sy::routers::AdaptiveGating{}.forward(
      sy::matrix_view<const float>(sy::make_view(static_cast<const float*>(nullptr), 0, 8)),
      p.params(), plan, l);
  BOOST_TEST(plan.num_tokens == 0);
  BOOST_TEST(l.lb_loss == 0.0f);
  BOOST_TEST(l.z_loss == 0.0f);
  BOOST_TEST(l.top2_fraction == 0.0f);

  const problem q(4, 8, 4, 3);
  for (float bad : {-0.01f, std::numeric_limits<float>::quiet_NaN()}) {
    try {
      sy::routers::AdaptiveGating{.threshold = bad}.forward(q.xv(), q.params(), plan, l);
      BOOST_ERROR("no exception for threshold " << bad);
    } catch (const sy::range_error& e) {
      BOOST_TEST(e.argument() == "threshold");
      BOOST_TEST(std::string(e.what()).find("threshold must be >= 0") != std::string::npos,
                 e.what());
    }
  }
  auto nan_x = q.x;
  nan_x[5] = std::numeric_limits<float>::infinity();
  BOOST_CHECK_THROW(
      sy::routers::AdaptiveGating{}.forward(
          sy::matrix_view<const float>(sy::make_view(nan_x.data(), 4, 8)), q.params(), plan, l),
      sy::non_finite_error);
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

  auto expect = [](auto&& fn, const std::string& arg, const std::string& fragment, auto type_tag) {
    using E = decltype(type_tag);
    try {
      fn();
      BOOST_ERROR("no exception for " << arg);
    } catch (const E& e) {
      BOOST_TEST(e.argument() == arg);
      BOOST_TEST(std::string(e.what()).find(fragment) != std::string::npos, e.what());
    }
  };
  auto bad_len = len;
  bad_len[2] = 0;
  expect(
      [&] {
        sy::training::curriculum_order(
            sy::matrix_view<const std::int32_t>(sy::make_view(counts.data(), 4, 2)),
            sy::vector_view<const std::int32_t>(sy::make_view(bad_len.data(), 4)));
      },
      "seq_len", "seq_len[2] must be >= 1, got 0", sy::range_error("", ""));
  auto bad_counts = counts;
  bad_counts[5] = -1;
  expect(
      [&] {
        sy::training::curriculum_order(
            sy::matrix_view<const std::int32_t>(sy::make_view(bad_counts.data(), 4, 2)),
            sy::vector_view<const std::int32_t>(sy::make_view(len.data(), 4)));
      },
      "top2_counts", "top2_counts[2, 1] must be >= 0, got -1", sy::range_error("", ""));
  expect(
      [&] {
        sy::training::curriculum_order(
            sy::matrix_view<const std::int32_t>(sy::make_view(counts.data(), 4, 2)),
            sy::vector_view<const std::int32_t>(sy::make_view(len.data(), 3)));
      },
      "seq_len", "seq_len", sy::shape_error("", ""));
}
