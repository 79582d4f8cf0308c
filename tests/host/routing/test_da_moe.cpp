// SPDX-License-Identifier: Apache-2.0
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

#include "support/router_testbed.hpp"

namespace sy = switchyard;
using sy::routing::routing_plan;
using sy::test::expect_error;
using sy::test::router_problem;

namespace {

// x [T, d], w [E, d] and attention [H, T, T] (causal: keys j <= i only).
router_problem problem(int t, int d, int e, int h, std::uint64_t seed, bool causal = false) {
  return router_problem({t, d, e, h}, seed, 0.5f, causal);
}

sy::routing::da_moe_params params_of(const router_problem& p) {
  return {p.wv(), p.attention(), {}};
}

template <class R>
routing_plan route(const R& r, const sy::routing::da_moe_params& prm, const router_problem& p,
                   sy::routing::softmax_router_losses* losses = nullptr,
                   sy::routing::da_moe_importance* stats = nullptr) {
  routing_plan plan;
  sy::routing::softmax_router_losses l;
  sy::routing::da_moe_importance s;
  sy::host::route(r, p.xv(), prm, plan, l, s);
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
      const auto p = problem(14, 8, 6, 3, sy::test::base_seed() + causal, causal);
      sy::routing::da_moe_importance cm, cr;
      sy::routers::DAMoE<col_mean>{}.token_importance(params_of(p), p.tokens, cm);
      sy::routers::DAMoE<cls_row>{}.token_importance(params_of(p), p.tokens, cr);
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
            const auto p = problem(24, 12, 6, 2, seed + 10 * k_max + k_min + causal, causal);
            const sy::routers::DAMoE r{.k_rule = ceil_relative_to_max{k_min, k_max},
                                       .renormalize = renorm};
            sy::routing::da_moe_importance st;
            const auto plan = route(r, params_of(p), p, nullptr, &st);
            check_plan(plan, st, k_min, k_max, renorm);
            const sy::routers::DAMoE rc{.importance = cls_row{},
                                        .k_rule = ceil_relative_to_max{k_min, k_max},
                                        .renormalize = renorm};
            const auto plan_c = route(rc, params_of(p), p, nullptr, &st);
            check_plan(plan_c, st, k_min, k_max, renorm);
          }
        }
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(precomputed_importance_is_scale_free_and_matches_attention_policy) {
  const auto p = problem(20, 8, 8, 4, sy::test::base_seed() + 3);
  const sy::routers::DAMoE r{.k_rule = ceil_relative_to_max{1, 4}};
  sy::routing::da_moe_importance st;
  const auto a = route(r, params_of(p), p, nullptr, &st);
  const auto b = route(r, params_of(p), p);  // determinism
  BOOST_TEST(a.expert_ids == b.expert_ids);
  BOOST_TEST(std::memcmp(a.weights.data(), b.weights.data(), a.weights.size() * 4) == 0);
  // The same importance supplied by the caller (times a power of two, which keeps every
  // ratio bit-exact) gives the same plan; attention is not needed then.
  std::vector<float> imp = st.importance;
  for (auto& v : imp) v *= 8.0f;
  auto prm = params_of(p);
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
  const auto one = p.token(5);
  auto prm1 = prm;
  prm1.importance = sy::make_view<const float>(single.data(), 1);
  const auto s = route(rp, prm1, one);
  for (int j = 0; j < 4; ++j) BOOST_TEST(s.id(0, j) == z.id(5, j));
}

BOOST_AUTO_TEST_CASE(gradients_match_float64_central_differences) {
  const auto p = problem(10, 7, 6, 2, sy::test::base_seed() + 7);
  for (bool renorm : {true, false}) {
    BOOST_TEST_CONTEXT("renormalize=" << renorm) {
      const sy::routers::DAMoE r{.k_rule = ceil_relative_to_max{1, 3}, .renormalize = renorm};
      const auto plan = route(r, params_of(p), p);
      std::mt19937_64 g(sy::test::base_seed() + 8);
      const auto cot = sy::test::normal(g, plan.weights.size());
      const sy::routing::softmax_router_losses coeff{
          .lb_switch = 0.3f, .lb_topk = 0.2f, .z = 0.05f};
      const auto obj = [&](const std::vector<double>& lg) {
        return objective_logits(lg, plan, cot, renorm, coeff);
      };
      sy::test::check_gradient("d_logits", sy::test::backward_logits(r, plan, cot, coeff), obj,
                               sy::test::to64(plan.logits), 2e-5, 1e-4);
      sy::test::check_linear_backward(r, p, params_of(p), plan, cot, coeff, obj);
    }
  }
}

BOOST_AUTO_TEST_CASE(empty_batch_is_not_an_error) {
  const auto p = problem(0, 8, 4, 2, 1);
  sy::routing::softmax_router_losses l{1, 1, 1};
  const auto plan = sy::test::route_plan(
      sy::routers::DAMoE{},
      sy::matrix_view<const float>(sy::make_view(static_cast<const float*>(nullptr), 0, 8)),
      params_of(p), &l);
  BOOST_TEST(plan.num_tokens == 0);
  BOOST_TEST(l.lb_switch == 0.0f);
  BOOST_TEST(l.lb_topk == 0.0f);
  BOOST_TEST(l.z == 0.0f);
}

BOOST_AUTO_TEST_CASE(bad_input_is_rejected_with_named_arguments) {
  const auto p = problem(5, 8, 4, 2, 3);
  auto run = [&](auto r, sy::routing::da_moe_params prm) {
    return [&, r, prm] { (void)sy::test::route_plan(r, p.xv(), prm); };
  };
  using R = sy::routers::DAMoE<>;
  expect_error<sy::range_error>(run(R{.k_rule = {0, 2}}, params_of(p)), "k_rule.k_min", "must be >= 1, got 0");
  expect_error<sy::range_error>(run(R{.k_rule = {3, 2}}, params_of(p)), "k_rule.k_min", "<= k_rule.k_max = 2, got 3");
  expect_error<sy::range_error>(run(R{.k_rule = {1, 5}}, params_of(p)), "k_rule.k_max", "[k_min, E] = [1, 4], got 5");
  BOOST_CHECK_NO_THROW(run(R{.k_rule = {4, 4}}, params_of(p))());

  auto prm = params_of(p);
  prm.attention = sy::make_view<const float>(p.attn.data(), 2, 4, 4);  // T = 4, x has 5 tokens
  expect_error<sy::shape_error>(run(R{}, prm), "params.attention", "[H, T, T]");
  std::vector<float> wide(2 * 5 * 6, 1.0f / 6);
  prm.attention = sy::make_view<const float>(wide.data(), 2, 5, 6);
  expect_error<sy::shape_error>(run(R{}, prm), "params.attention", "[H, T, T]");
  prm.attention = sy::make_view<const float>(p.attn.data(), 0, 5, 5);
  expect_error<sy::shape_error>(run(R{}, prm), "params.attention", "at least one head");

  auto attn = p.attn;
  attn[(1 * 5 + 2) * 5 + 3] += 0.01f;  // row [1, 2, :] sums to 1.01
  prm.attention = sy::make_view<const float>(attn.data(), 2, 5, 5);
  expect_error<sy::range_error>(run(R{}, prm), "params.attention", "row [1, 2, :] must sum to 1");
  attn = p.attn;
  attn[(1 * 5 + 2) * 5 + 3] += 5e-4f;  // within the documented 1e-3 tolerance
  prm.attention = sy::make_view<const float>(attn.data(), 2, 5, 5);
  BOOST_CHECK_NO_THROW(run(R{}, prm)());
  attn = p.attn;
  attn[(0 * 5 + 1) * 5 + 0] -= 2.0f;
  attn[(0 * 5 + 1) * 5 + 1] += 2.0f;  // row still sums to 1, one entry negative
  prm.attention = sy::make_view<const float>(attn.data(), 2, 5, 5);
  expect_error<sy::range_error>(run(R{}, prm), "params.attention", "must be >= 0");
  attn = p.attn;
  attn[7] = std::numeric_limits<float>::quiet_NaN();
  prm.attention = sy::make_view<const float>(attn.data(), 2, 5, 5);
  expect_error<sy::non_finite_error>(run(R{}, prm), "params.attention", "must be finite");
  expect_error<sy::non_finite_error>(run(sy::routers::DAMoE<cls_row>{}, prm), "params.attention", "must be finite");

  using RP = sy::routers::DAMoE<precomputed>;
  auto prm_i = params_of(p);
  std::vector<float> imp{0.1f, 0.5f, -0.2f, 0.3f, 0.0f};
  prm_i.importance = sy::make_view<const float>(imp.data(), 5);
  expect_error<sy::range_error>(run(RP{}, prm_i), "params.importance",
         "params.importance[2] (token importance) must be >= 0, got -0.2");
  imp[2] = std::numeric_limits<float>::quiet_NaN();
  expect_error<sy::non_finite_error>(run(RP{}, prm_i), "params.importance", "must be finite");
  prm_i.importance = sy::make_view<const float>(imp.data(), 4);
  expect_error<sy::shape_error>(run(RP{}, prm_i), "params.importance", "[T]");
}
