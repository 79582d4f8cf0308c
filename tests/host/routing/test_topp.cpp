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

routing_plan route(const sy::routers::TopP& r, const problem& p,
                   sy::routing::topp_losses* losses = nullptr) {
  routing_plan plan;
  sy::routing::topp_losses l;
  switchyard::host::route(r, p.xv(), p.params(), plan, l);
  if (losses) *losses = l;
  return plan;
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
  for (float p_thr : {0.1f, 0.4f, 0.7f, 0.95f, 1.0f}) {
    for (int max_k : {0, 1, 3}) {
      BOOST_TEST_CONTEXT("p=" << p_thr << " max_k=" << max_k) {
        const problem p(64, 24, 8, seed + static_cast<int>(p_thr * 100) + max_k, 0.4f);
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
  routing_plan plan;
  sy::routing::topp_losses l;
  sy::routers::TopP{.p = 1.0f}.forward(xv, prm, plan, l);
  BOOST_TEST(plan.counts[0] == e);
  for (int j = 0; j < e; ++j) BOOST_TEST(plan.id(0, j) == j);  // ties to the lower index
  const float q = plan.probs[0];
  const float half = q + q;  // the float32 sum of the first two sorted probabilities
  sy::routers::TopP{.p = half}.forward(xv, prm, plan, l);
  BOOST_TEST(plan.counts[0] == 3);
  sy::routers::TopP{.p = std::nextafter(half, 0.0f)}.forward(xv, prm, plan, l);
  BOOST_TEST(plan.counts[0] == 2);
}

BOOST_AUTO_TEST_CASE(deterministic_and_batch_invariant) {
  const problem p(40, 16, 8, sy::test::base_seed() + 99);
  const sy::routers::TopP r{.p = 0.6f};
  const auto a = route(r, p), b = route(r, p);
  BOOST_TEST(a.expert_ids == b.expert_ids);
  BOOST_TEST(a.counts == b.counts);
  BOOST_TEST(std::memcmp(a.weights.data(), b.weights.data(), a.weights.size() * 4) == 0);
  for (int tok : {0, 17, 39}) {
    problem one = p;
    one.tokens = 1;
    one.x.assign(p.x.begin() + tok * p.d, p.x.begin() + (tok + 1) * p.d);
    const auto s = route(r, one);
    BOOST_TEST(s.counts[0] == a.counts[tok]);
    for (int j = 0; j < a.width; ++j) {
      BOOST_TEST(s.id(0, j) == a.id(tok, j));
      BOOST_TEST(s.weight(0, j) == a.weight(tok, j));
    }
  }
}

BOOST_AUTO_TEST_CASE(losses_match_float64_reference) {
  const problem p(20, 12, 6, sy::test::base_seed() + 5);
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
  const problem p(10, 7, 6, sy::test::base_seed() + 7);
  for (int max_k : {0, 2}) {
    BOOST_TEST_CONTEXT("max_k=" << max_k) {
      const sy::routers::TopP r{.p = 0.55f, .max_k = max_k};
      const auto plan = route(r, p);
      std::mt19937_64 g(sy::test::base_seed() + 8);
      const auto cot = sy::test::normal(g, plan.weights.size());
      const sy::routing::topp_losses coeff{.dynamic_loss = 0.3f, .lb_loss = 0.2f, .z_loss = 0.05f};
      std::vector<float> d_logits(plan.logits.size());
      r.backward_logits(plan, cot.data(), coeff, d_logits.data());
      std::vector<double> lg(plan.logits.begin(), plan.logits.end());
      const double h = 1e-6;
      for (std::size_t i = 0; i < lg.size(); ++i) {
        auto up = lg, dn = lg;
        up[i] += h;
        dn[i] -= h;
        const double fd =
            (objective_logits(up, plan, cot, coeff) - objective_logits(dn, plan, cot, coeff)) /
            (2 * h);
        BOOST_TEST(std::abs(d_logits[i] - fd) <= 2e-5 + 1e-4 * std::abs(fd),
                   "i=" << i << " fd=" << fd);
      }
      // dx and dw: central differences of the float64 forward through x and w.
      std::vector<float> dx(p.x.size(), 0.0f), dw(p.w.size(), 0.0f);
      switchyard::host::route_backward(r, p.xv(), p.params(), plan, cot.data(), coeff,
                 sy::make_view(dx.data(), p.tokens, p.d),
                 {sy::make_view(dw.data(), p.experts, p.d)});
      std::vector<double> x64(p.x.begin(), p.x.end()), w64(p.w.begin(), p.w.end());
      auto f = [&](const std::vector<double>& xx, const std::vector<double>& ww) {
        return objective_logits(logits64(xx, ww, p.tokens, p.d, p.experts), plan, cot, coeff);
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

BOOST_AUTO_TEST_CASE(empty_batch_is_not_an_error) {
  const problem p(0, 8, 4, 1);
  sy::routing::topp_losses l{1, 1, 1};
  routing_plan plan;
  sy::routers::TopP{.p = 0.5f}.forward(
      sy::matrix_view<const float>(sy::make_view(static_cast<const float*>(nullptr), 0, 8)),
      p.params(), plan, l);
  BOOST_TEST(plan.num_tokens == 0);
  BOOST_TEST(plan.counts.empty());
  BOOST_TEST(l.dynamic_loss == 0.0f);
  BOOST_TEST(l.lb_loss == 0.0f);
  BOOST_TEST(l.z_loss == 0.0f);
}

BOOST_AUTO_TEST_CASE(bad_input_is_rejected_with_named_arguments) {
  const problem p(4, 8, 4, 3);
  routing_plan plan;
  sy::routing::topp_losses l;
  auto expect = [&](auto&& fn, const std::string& arg, const std::string& fragment) {
    try {
      fn();
      BOOST_ERROR("no exception for " << arg);
    } catch (const sy::range_error& e) {
      BOOST_TEST(e.argument() == arg);
      BOOST_TEST(std::string(e.what()).find(arg) != std::string::npos, e.what());
      BOOST_TEST(std::string(e.what()).find(fragment) != std::string::npos, e.what());
    }
  };
  const auto run = [&](sy::routers::TopP r) {
    return [&, r] { switchyard::host::route(r, p.xv(), p.params(), plan, l); };
  };
  expect(run({.p = 0.0f}), "p", "(0, 1], got 0");
  expect(run({.p = -0.5f}), "p", "got -0.5");
  expect(run({.p = 1.5f}), "p", "got 1.5");
  expect(run({.p = std::numeric_limits<float>::quiet_NaN()}), "p", "got nan");
  expect(run({.p = 0.5f, .max_k = -1}), "max_k", "got -1");
  expect(run({.p = 0.5f, .max_k = 5}), "max_k", "[1, E] = [1, 4], got 5");
  BOOST_CHECK_NO_THROW(run({.p = 0.5f, .max_k = 4})());
  auto nan_x = p.x;
  nan_x[1 * 8 + 3] = std::numeric_limits<float>::quiet_NaN();
  BOOST_CHECK_THROW(
      sy::routers::TopP{.p = 0.5f}.forward(
          sy::matrix_view<const float>(sy::make_view(nan_x.data(), 4, 8)), p.params(), plan, l),
      sy::non_finite_error);
  std::vector<float> x7(4 * 7, 1.0f);
  BOOST_CHECK_THROW(
      sy::routers::TopP{.p = 0.5f}.forward(
          sy::matrix_view<const float>(sy::make_view(x7.data(), 4, 7)), p.params(), plan, l),
      sy::shape_error);
}
