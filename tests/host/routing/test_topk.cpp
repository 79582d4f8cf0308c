// Top-k router: properties on fresh random inputs, gradients against float64 central
// differences, and every bad-input error.
#include <boost/test/unit_test.hpp>

#include <switchyard/routing/routers/topk.hpp>

#include <algorithm>
#include <cmath>
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
  problem(int t, int dd, int e, std::uint64_t seed) : tokens(t), d(dd), experts(e) {
    std::mt19937_64 g(seed);
    x = sy::test::normal(g, static_cast<std::size_t>(t) * dd);
    w = sy::test::normal(g, static_cast<std::size_t>(e) * dd, 0.5f);
  }
  [[nodiscard]] sy::matrix_view<const float> xv() const {
    return sy::make_view(x.data(), tokens, d);
  }
  [[nodiscard]] sy::routing::linear_router_params params() const {
    return {sy::make_view(w.data(), experts, d)};
  }
};

routing_plan route(const sy::routers::TopK& r, const problem& p,
                   sy::routing::softmax_router_losses* losses = nullptr) {
  routing_plan plan;
  sy::routing::softmax_router_losses l;
  switchyard::host::route(r, p.xv(), p.params(), plan, l);
  if (losses) *losses = l;
  return plan;
}

// float64 reference of Σ cot ⊙ w + c_sw·lb_switch + c_any·lb_topk + c_z·z as a function of
// the logits, for a fixed selection (selection is piecewise constant).
double objective(const std::vector<double>& logits, const routing_plan& plan,
                 const std::vector<float>& cot, bool renorm,
                 const sy::routing::softmax_router_losses& c) {
  const int tokens = static_cast<int>(plan.num_tokens), e = static_cast<int>(plan.num_experts),
            k = static_cast<int>(plan.width);
  double total = 0, z = 0;
  std::vector<double> pbar(e, 0), f1(e, 0), fa(e, 0);
  for (int t = 0; t < tokens; ++t) {
    double m = -1e300;
    for (int i = 0; i < e; ++i) m = std::max(m, logits[t * e + i]);
    double s = 0;
    for (int i = 0; i < e; ++i) s += std::exp(logits[t * e + i] - m);
    std::vector<double> p(e);
    for (int i = 0; i < e; ++i) p[i] = std::exp(logits[t * e + i] - m) / s, pbar[i] += p[i] / tokens;
    const double lse = m + std::log(s);
    z += lse * lse / tokens;
    double sel = 0;
    for (int j = 0; j < plan.counts[t]; ++j) sel += p[plan.id(t, j)];
    for (int j = 0; j < plan.counts[t]; ++j) {
      const int id = plan.id(t, j);
      total += cot[t * k + j] * (renorm ? p[id] / sel : p[id]);
      fa[id] += 1.0 / tokens;
    }
    f1[plan.id(t, 0)] += 1.0 / tokens;
  }
  double lb1 = 0, lba = 0;
  for (int i = 0; i < e; ++i) lb1 += e * f1[i] * pbar[i], lba += e * fa[i] * pbar[i];
  return total + c.lb_switch * lb1 + c.lb_topk * lba + c.z * z;
}

}  // namespace

BOOST_AUTO_TEST_CASE(plan_properties_on_random_inputs) {
  const auto seed = sy::test::base_seed();
  for (int k : {1, 2, 3, 8}) {
    for (bool renorm : {true, false}) {
      BOOST_TEST_CONTEXT("k=" << k << " renormalize=" << renorm) {
        const problem p(64, 24, 8, seed + k);
        const sy::routers::TopK r{.k = k, .renormalize = renorm};
        const auto plan = route(r, p);
        for (int t = 0; t < p.tokens; ++t) {
          BOOST_TEST(plan.counts[t] == k);
          double sum = 0;
          for (int j = 0; j < k; ++j) {
            const int id = plan.id(t, j);
            BOOST_TEST_REQUIRE((id >= 0 && id < p.experts));
            BOOST_TEST(plan.weight(t, j) >= 0.0f);
            sum += plan.weight(t, j);
            if (j > 0) {  // descending probability, ties to the lower index
              const float prev = plan.probs[t * p.experts + plan.id(t, j - 1)];
              const float cur = plan.probs[t * p.experts + id];
              BOOST_TEST((prev > cur || (prev == cur && plan.id(t, j - 1) < id)));
            }
          }
          // every unselected expert ranks below the last selected one
          const int last = plan.id(t, k - 1);
          for (int e = 0; e < p.experts; ++e) {
            bool selected = false;
            for (int j = 0; j < k; ++j) selected |= plan.id(t, j) == e;
            if (!selected) BOOST_TEST(plan.probs[t * p.experts + e] <= plan.probs[t * p.experts + last]);
          }
          if (renorm) BOOST_TEST(std::abs(sum - 1.0) < 1e-6);
        }
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(ties_go_to_the_lower_expert_index) {
  // Identical router rows give identical probabilities: the plan must pick 0, 1, ...
  std::vector<float> x{0.3f, -1.2f, 0.7f, 0.1f};
  std::vector<float> w(4 * 4);
  for (int e = 0; e < 4; ++e)
    for (int i = 0; i < 4; ++i) w[e * 4 + i] = 0.25f * static_cast<float>(i + 1);
  routing_plan plan;
  sy::routing::softmax_router_losses l;
  sy::routers::TopK{.k = 3}.forward(sy::matrix_view<const float>(sy::make_view(x.data(), 1, 4)),
                                     {sy::make_view<const float>(w.data(), 4, 4)}, plan, l);
  BOOST_TEST(plan.expert_ids == (std::vector<std::int32_t>{0, 1, 2}), boost::test_tools::per_element());
}

BOOST_AUTO_TEST_CASE(deterministic_and_batch_invariant) {
  const problem p(40, 16, 8, sy::test::base_seed() + 99);
  const sy::routers::TopK r{.k = 2};
  const auto a = route(r, p), b = route(r, p);
  BOOST_TEST(a.expert_ids == b.expert_ids);
  BOOST_TEST(std::memcmp(a.weights.data(), b.weights.data(), a.weights.size() * 4) == 0);
  // Token 17 alone gives the same plan row as inside the batch.
  problem one = p;
  one.tokens = 1;
  one.x.assign(p.x.begin() + 17 * p.d, p.x.begin() + 18 * p.d);
  const auto s = route(r, one);
  for (int j = 0; j < 2; ++j) {
    BOOST_TEST(s.id(0, j) == a.id(17, j));
    BOOST_TEST(s.weight(0, j) == a.weight(17, j));
  }
}

BOOST_AUTO_TEST_CASE(gradients_match_float64_central_differences) {
  const problem p(12, 10, 6, sy::test::base_seed() + 7);
  for (bool renorm : {true, false}) {
    BOOST_TEST_CONTEXT("renormalize=" << renorm) {
      const sy::routers::TopK r{.k = 2, .renormalize = renorm};
      const auto plan = route(r, p);
      std::mt19937_64 g(sy::test::base_seed() + 8);
      const auto cot = sy::test::normal(g, plan.weights.size());
      const sy::routing::softmax_router_losses coeff{.lb_switch = 0.3f, .lb_topk = 0.2f, .z = 0.05f};
      // d_logits from the library
      std::vector<float> d_logits(plan.logits.size());
      r.backward_logits(plan, cot.data(), coeff, d_logits.data());
      std::vector<double> lg(plan.logits.begin(), plan.logits.end());
      const double h = 1e-6;
      for (std::size_t i = 0; i < lg.size(); ++i) {
        auto up = lg, dn = lg;
        up[i] += h;
        dn[i] -= h;
        const double fd = (objective(up, plan, cot, renorm, coeff) -
                           objective(dn, plan, cot, renorm, coeff)) / (2 * h);
        BOOST_TEST(std::abs(d_logits[i] - fd) <= 2e-5 + 1e-4 * std::abs(fd), "i=" << i << " fd=" << fd);
      }
      // dx, dw through the linear map: compare with the chain rule in float64.
      std::vector<float> dx(p.x.size(), 0.0f), dw(p.w.size(), 0.0f);
      switchyard::host::route_backward(r, p.xv(), p.params(), plan, cot.data(), coeff, sy::make_view(dx.data(), p.tokens, p.d),
                 {sy::make_view(dw.data(), p.experts, p.d)});
      for (int t = 0; t < p.tokens; ++t)
        for (int i = 0; i < p.d; ++i) {
          double ref = 0;
          for (int e = 0; e < p.experts; ++e) ref += double(d_logits[t * p.experts + e]) * p.w[e * p.d + i];
          BOOST_TEST(std::abs(dx[t * p.d + i] - ref) <= 1e-5 + 1e-4 * std::abs(ref));
        }
      for (int e = 0; e < p.experts; ++e)
        for (int i = 0; i < p.d; ++i) {
          double ref = 0;
          for (int t = 0; t < p.tokens; ++t) ref += double(d_logits[t * p.experts + e]) * p.x[t * p.d + i];
          BOOST_TEST(std::abs(dw[e * p.d + i] - ref) <= 1e-5 + 1e-4 * std::abs(ref));
        }
    }
  }
}

BOOST_AUTO_TEST_CASE(empty_batch_is_not_an_error) {
  const problem p(0, 8, 4, 1);
  sy::routing::softmax_router_losses l{1, 1, 1};
  routing_plan plan;
  sy::routers::TopK{.k = 2}.forward(sy::matrix_view<const float>(sy::make_view(static_cast<const float*>(nullptr), 0, 8)),
                                    p.params(), plan, l);
  BOOST_TEST(plan.num_tokens == 0);
  BOOST_TEST(plan.counts.empty());
  BOOST_TEST(l.lb_switch == 0.0f);
  BOOST_TEST(l.z == 0.0f);
}

BOOST_AUTO_TEST_CASE(bad_input_is_rejected_with_named_arguments) {
  const problem p(4, 8, 4, 3);
  routing_plan plan;
  sy::routing::softmax_router_losses l;
  auto expect = [&](auto&& fn, const std::string& arg, const std::string& fragment) {
    try {
      fn();
      BOOST_ERROR("no exception for " << arg);
    } catch (const sy::invalid_argument& e) {
      BOOST_TEST(e.argument() == arg);
      BOOST_TEST(std::string(e.what()).find(fragment) != std::string::npos, e.what());
    }
  };
  expect([&] { sy::routers::TopK{.k = 0}.forward(p.xv(), p.params(), plan, l); }, "k", "got 0");
  expect([&] { sy::routers::TopK{.k = 5}.forward(p.xv(), p.params(), plan, l); }, "k",
         "[1, E] = [1, 4], got 5");
  std::vector<float> x7(4 * 7, 1.0f);
  expect([&] {
    sy::routers::TopK{.k = 2}.forward(sy::matrix_view<const float>(sy::make_view(x7.data(), 4, 7)),
                                      p.params(), plan, l);
  }, "x", "[4, 7]");
  expect([&] {
    sy::routers::TopK{.k = 2}.forward(
        sy::matrix_view<const float>(sy::make_view(static_cast<const float*>(nullptr), 4, 8)),
        p.params(), plan, l);
  }, "x", "null");
  auto nan_x = p.x;
  nan_x[2 * 8 + 3] = std::numeric_limits<float>::quiet_NaN();
  expect([&] {
    sy::routers::TopK{.k = 2}.forward(sy::matrix_view<const float>(sy::make_view(nan_x.data(), 4, 8)),
                                      p.params(), plan, l);
  }, "x", "token 2");
  BOOST_CHECK_THROW(sy::routers::TopK{.k = 2}.forward(
                        sy::matrix_view<const float>(sy::make_view(nan_x.data(), 4, 8)), p.params(), plan, l),
                    sy::non_finite_error);
}
