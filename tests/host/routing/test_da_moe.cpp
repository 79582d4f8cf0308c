// DA-MoE router (spec §2): importance policies vs float64 references, per-token K from the
// relative importance, plan properties, determinism, gradients (d_logits with every aux loss,
// dx, dw) against float64 central differences, and every bad-input error.
#include <boost/test/unit_test.hpp>

#include <switchyard/routing/routers/da_moe.hpp>

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
  int tokens, d, experts, heads;
  std::vector<float> x, w, attn;
  problem(int t, int dd, int e, int h, std::uint64_t seed, bool causal = false, float wscale = 0.5f)
      : tokens(t), d(dd), experts(e), heads(h) {
    std::mt19937_64 g(seed);
    x = sy::test::normal(g, static_cast<std::size_t>(t) * dd);
    w = sy::test::normal(g, static_cast<std::size_t>(e) * dd, wscale);
    // attention rows: softmax of random scores (causal: keys j <= i only)
    const auto s = sy::test::normal(g, static_cast<std::size_t>(h) * t * t, 1.5f);
    attn.assign(s.size(), 0.0f);
    for (int hh = 0; hh < h; ++hh)
      for (int i = 0; i < t; ++i) {
        const int n = causal ? i + 1 : t;
        double z = 0;
        for (int j = 0; j < n; ++j) z += std::exp(double(s[(hh * t + i) * t + j]));
        for (int j = 0; j < n; ++j)
          attn[(hh * t + i) * t + j] =
              static_cast<float>(std::exp(double(s[(hh * t + i) * t + j])) / z);
      }
  }
  [[nodiscard]] sy::matrix_view<const float> xv() const {
    return sy::make_view(x.data(), tokens, d);
  }
  [[nodiscard]] sy::routing::da_moe_params params() const {
    return {
        sy::make_view(w.data(), experts, d), sy::make_view(attn.data(), heads, tokens, tokens), {}};
  }
};

template <class R>
routing_plan route(const R& r, const sy::routing::da_moe_params& prm, const problem& p,
                   sy::routing::softmax_router_losses* losses = nullptr,
                   sy::routing::da_moe_importance* stats = nullptr) {
  routing_plan plan;
  sy::routing::softmax_router_losses l;
  sy::routing::da_moe_importance s;
  switchyard::host::route(r, p.xv(), prm, plan, l, s);
  if (losses) *losses = l;
  if (stats) *stats = s;
  return plan;
}

// float64 reference of Σ cot ⊙ weights + c.lb_switch·lb1 + c.lb_topk·lb_any + c.z·z, as a
// function of the logits, for the plan's (fixed) selection.
double objective_logits(const std::vector<double>& logits, const routing_plan& plan,
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
    const double lse = m + std::log(s);
    std::vector<double> p(e);
    for (int i = 0; i < e; ++i) p[i] = std::exp(logits[t * e + i] - lse), pbar[i] += p[i] / tokens;
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

std::vector<double> logits64(const std::vector<double>& x, const std::vector<double>& w, int tokens,
                             int d, int e) {
  std::vector<double> lg(static_cast<std::size_t>(tokens) * e, 0.0);
  for (int t = 0; t < tokens; ++t)
    for (int i = 0; i < e; ++i)
      for (int q = 0; q < d; ++q) lg[t * e + i] += x[t * d + q] * w[i * d + q];
  return lg;
}

void check_plan(const routing_plan& plan, const sy::routing::da_moe_importance& st, int k_min,
                int k_max, bool renorm) {
  const int e = static_cast<int>(plan.num_experts);
  BOOST_TEST(plan.width == k_max);
  float peak = 0;
  for (float v : st.importance) peak = std::max(peak, v);
  for (int t = 0; t < plan.num_tokens; ++t) {
    const int n = plan.counts[t];
    BOOST_TEST_REQUIRE((n >= k_min && n <= k_max));
    BOOST_TEST(std::abs(st.relative[t] - st.importance[t] / peak) <= 1e-7f);
    const float kf = std::ceil(st.relative[t] * static_cast<float>(k_max));
    BOOST_TEST(n == std::clamp(static_cast<int>(kf), k_min, k_max));
    if (st.importance[t] == peak) BOOST_TEST(n == k_max);
    const float* pr = plan.probs.data() + t * e;
    double sum = 0;
    for (int j = 0; j < n; ++j) {
      const int id = plan.id(t, j);
      BOOST_TEST_REQUIRE((id >= 0 && id < e));
      BOOST_TEST(plan.weight(t, j) >= 0.0f);
      sum += plan.weight(t, j);
      if (j > 0) {
        const int prev = plan.id(t, j - 1);
        BOOST_TEST((pr[prev] > pr[id] || (pr[prev] == pr[id] && prev < id)));
      }
      if (!renorm) BOOST_TEST(plan.weight(t, j) == pr[id]);
    }
    if (renorm) BOOST_TEST(std::abs(sum - 1.0) < 1e-6);
    for (int j = n; j < k_max; ++j) {
      BOOST_TEST(plan.id(t, j) == -1);
      BOOST_TEST(plan.weight(t, j) == 0.0f);
    }
    const int last = plan.id(t, n - 1);
    for (int ex = 0; ex < e; ++ex) {
      bool selected = false;
      for (int j = 0; j < n; ++j) selected |= plan.id(t, j) == ex;
      if (!selected) BOOST_TEST((pr[ex] < pr[last] || (pr[ex] == pr[last] && ex > last)));
    }
  }
}

using sy::routing::importance::cls_row;
using sy::routing::importance::col_mean;
using sy::routing::importance::precomputed;
using sy::routing::k_rules::ceil_relative_to_max;

}  // namespace

BOOST_AUTO_TEST_CASE(importance_policies_match_float64_reference) {
  for (bool causal : {false, true}) {
    BOOST_TEST_CONTEXT("causal=" << causal) {
      const problem p(14, 8, 6, 3, sy::test::base_seed() + causal, causal);
      sy::routing::da_moe_importance cm, cr;
      sy::routers::DAMoE<col_mean>{}.token_importance(p.params(), p.tokens, cm);
      sy::routers::DAMoE<cls_row>{}.token_importance(p.params(), p.tokens, cr);
      for (int j = 0; j < p.tokens; ++j) {
        double a = 0, b = 0;
        for (int h = 0; h < p.heads; ++h) {
          for (int i = 0; i < p.tokens; ++i) a += p.attn[(h * p.tokens + i) * p.tokens + j];
          b += p.attn[(h * p.tokens + 0) * p.tokens + j];
        }
        a /= p.heads * p.tokens;
        b /= p.heads;
        BOOST_TEST(std::abs(cm.importance[j] - a) <= 1e-6 * a + 1e-9);
        BOOST_TEST(std::abs(cr.importance[j] - b) <= 1e-6 * b + 1e-9);
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(plan_properties_on_random_inputs) {
  const auto seed = sy::test::base_seed();
  for (int k_max : {1, 2, 4, 6}) {
    for (int k_min : {1, 2}) {
      if (k_min > k_max) continue;
      for (bool renorm : {true, false}) {
        for (bool causal : {false, true}) {
          BOOST_TEST_CONTEXT("k=[" << k_min << "," << k_max << "] renorm=" << renorm
                                   << " causal=" << causal) {
            const problem p(24, 12, 6, 2, seed + 10 * k_max + k_min + causal, causal);
            const sy::routers::DAMoE r{.k_rule = ceil_relative_to_max{k_min, k_max},
                                       .renormalize = renorm};
            sy::routing::da_moe_importance st;
            const auto plan = route(r, p.params(), p, nullptr, &st);
            check_plan(plan, st, k_min, k_max, renorm);
            const sy::routers::DAMoE rc{.importance = cls_row{},
                                        .k_rule = ceil_relative_to_max{k_min, k_max},
                                        .renormalize = renorm};
            const auto plan_c = route(rc, p.params(), p, nullptr, &st);
            check_plan(plan_c, st, k_min, k_max, renorm);
          }
        }
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(precomputed_importance_is_scale_free_and_matches_attention_policy) {
  const problem p(20, 8, 8, 4, sy::test::base_seed() + 3);
  const sy::routers::DAMoE r{.k_rule = ceil_relative_to_max{1, 4}};
  sy::routing::da_moe_importance st;
  const auto a = route(r, p.params(), p, nullptr, &st);
  const auto b = route(r, p.params(), p);  // determinism
  BOOST_TEST(a.expert_ids == b.expert_ids);
  BOOST_TEST(std::memcmp(a.weights.data(), b.weights.data(), a.weights.size() * 4) == 0);
  // The same importance supplied by the caller (times a power of two, which keeps every
  // ratio bit-exact) gives the same plan; attention is not needed then.
  std::vector<float> imp = st.importance;
  for (auto& v : imp) v *= 8.0f;
  auto prm = p.params();
  prm.attention = {};
  prm.importance = sy::make_view<const float>(imp.data(), p.tokens);
  const sy::routers::DAMoE<precomputed> rp{.k_rule = ceil_relative_to_max{1, 4}};
  const auto c = route(rp, prm, p);
  BOOST_TEST(a.expert_ids == c.expert_ids);
  BOOST_TEST(a.counts == c.counts);
  // All-zero importance: every token is "equally important" and gets k_max.
  std::vector<float> zeros(p.tokens, 0.0f);
  prm.importance = sy::make_view<const float>(zeros.data(), p.tokens);
  const auto z = route(rp, prm, p);
  for (int t = 0; t < p.tokens; ++t) BOOST_TEST(z.counts[t] == 4);
  // A token's plan depends on the batch only through its K: same K -> same row.
  std::vector<float> single{1.0f};
  problem one = p;
  one.tokens = 1;
  one.x.assign(p.x.begin() + 5 * p.d, p.x.begin() + 6 * p.d);
  auto prm1 = prm;
  prm1.importance = sy::make_view<const float>(single.data(), 1);
  const auto s = route(rp, prm1, one);
  for (int j = 0; j < 4; ++j) BOOST_TEST(s.id(0, j) == z.id(5, j));
}

BOOST_AUTO_TEST_CASE(gradients_match_float64_central_differences) {
  const problem p(10, 7, 6, 2, sy::test::base_seed() + 7);
  for (bool renorm : {true, false}) {
    BOOST_TEST_CONTEXT("renormalize=" << renorm) {
      const sy::routers::DAMoE r{.k_rule = ceil_relative_to_max{1, 3}, .renormalize = renorm};
      const auto plan = route(r, p.params(), p);
      std::mt19937_64 g(sy::test::base_seed() + 8);
      const auto cot = sy::test::normal(g, plan.weights.size());
      const sy::routing::softmax_router_losses coeff{
          .lb_switch = 0.3f, .lb_topk = 0.2f, .z = 0.05f};
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

BOOST_AUTO_TEST_CASE(empty_batch_is_not_an_error) {
  const problem p(0, 8, 4, 2, 1);
  sy::routing::softmax_router_losses l{1, 1, 1};
  routing_plan plan;
  sy::routers::DAMoE{}.forward(
      sy::matrix_view<const float>(sy::make_view(static_cast<const float*>(nullptr), 0, 8)),
      p.params(), plan, l);
  BOOST_TEST(plan.num_tokens == 0);
  BOOST_TEST(l.lb_switch == 0.0f);
  BOOST_TEST(l.lb_topk == 0.0f);
  BOOST_TEST(l.z == 0.0f);
}

BOOST_AUTO_TEST_CASE(bad_input_is_rejected_with_named_arguments) {
  const problem p(5, 8, 4, 2, 3);
  routing_plan plan;
  sy::routing::softmax_router_losses l;
  auto expect = [&](auto&& fn, const std::string& arg, const std::string& fragment, auto type_tag) {
    using E = decltype(type_tag);
    try {
      fn();
      BOOST_ERROR("no exception for " << arg << " (" << fragment << ")");
    } catch (const E& e) {
      BOOST_TEST(e.argument() == arg);
      BOOST_TEST(std::string(e.what()).find(arg) != std::string::npos, e.what());
      BOOST_TEST(std::string(e.what()).find(fragment) != std::string::npos, e.what());
    } catch (const std::exception& e) {
      BOOST_ERROR("wrong exception type for " << arg << ": " << e.what());
    }
  };
  const sy::range_error range_tag("", "");
  const sy::shape_error shape_tag("", "");
  const sy::non_finite_error nonfinite_tag("", "");
  auto run = [&](auto r, sy::routing::da_moe_params prm) {
    return [&, r, prm] { switchyard::host::route(r, p.xv(), prm, plan, l); };
  };
  using R = sy::routers::DAMoE<>;
  expect(run(R{.k_rule = {0, 2}}, p.params()), "k_rule.k_min", "must be >= 1, got 0", range_tag);
  expect(run(R{.k_rule = {3, 2}}, p.params()), "k_rule.k_min", "<= k_rule.k_max = 2, got 3",
         range_tag);
  expect(run(R{.k_rule = {1, 5}}, p.params()), "k_rule.k_max", "[k_min, E] = [1, 4], got 5",
         range_tag);
  BOOST_CHECK_NO_THROW(run(R{.k_rule = {4, 4}}, p.params())());

  auto prm = p.params();
  prm.attention = sy::make_view<const float>(p.attn.data(), 2, 4, 4);  // T = 4, x has 5 tokens
  expect(run(R{}, prm), "params.attention", "[H, T, T]", shape_tag);
  std::vector<float> wide(2 * 5 * 6, 1.0f / 6);
  prm.attention = sy::make_view<const float>(wide.data(), 2, 5, 6);
  expect(run(R{}, prm), "params.attention", "[H, T, T]", shape_tag);
  prm.attention = sy::make_view<const float>(p.attn.data(), 0, 5, 5);
  expect(run(R{}, prm), "params.attention", "at least one head", shape_tag);

  auto attn = p.attn;
  attn[(1 * 5 + 2) * 5 + 3] += 0.01f;  // row [1, 2, :] sums to 1.01
  prm.attention = sy::make_view<const float>(attn.data(), 2, 5, 5);
  expect(run(R{}, prm), "params.attention", "row [1, 2, :] must sum to 1", range_tag);
  attn = p.attn;
  attn[(1 * 5 + 2) * 5 + 3] += 5e-4f;  // within the documented 1e-3 tolerance
  prm.attention = sy::make_view<const float>(attn.data(), 2, 5, 5);
  BOOST_CHECK_NO_THROW(run(R{}, prm)());
  attn = p.attn;
  attn[(0 * 5 + 1) * 5 + 0] -= 2.0f;
  attn[(0 * 5 + 1) * 5 + 1] += 2.0f;  // row still sums to 1, one entry negative
  prm.attention = sy::make_view<const float>(attn.data(), 2, 5, 5);
  expect(run(R{}, prm), "params.attention", "must be >= 0", range_tag);
  attn = p.attn;
  attn[7] = std::numeric_limits<float>::quiet_NaN();
  prm.attention = sy::make_view<const float>(attn.data(), 2, 5, 5);
  expect(run(R{}, prm), "params.attention", "must be finite", nonfinite_tag);
  expect(run(sy::routers::DAMoE<cls_row>{}, prm), "params.attention", "must be finite",
         nonfinite_tag);

  using RP = sy::routers::DAMoE<precomputed>;
  auto prm_i = p.params();
  std::vector<float> imp{0.1f, 0.5f, -0.2f, 0.3f, 0.0f};
  prm_i.importance = sy::make_view<const float>(imp.data(), 5);
  expect(run(RP{}, prm_i), "params.importance",
         "params.importance[2] (token importance) must be >= 0, got -0.2", range_tag);
  imp[2] = std::numeric_limits<float>::quiet_NaN();
  expect(run(RP{}, prm_i), "params.importance", "must be finite", nonfinite_tag);
  prm_i.importance = sy::make_view<const float>(imp.data(), 4);
  expect(run(RP{}, prm_i), "params.importance", "[T]", shape_tag);
}
