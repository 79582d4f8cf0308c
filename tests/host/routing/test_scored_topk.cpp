// SPDX-License-Identifier: Apache-2.0
// routers::ScoredTopK (the production routers, README steps 1-8): properties on fresh random
// inputs against float64 / brute-force references written here, the losses' values, the
// presets, and every error path naming its argument.
#include <boost/test/unit_test.hpp>

#include <switchyard/routing/routers/presets.hpp>
#include <switchyard/routing/routers/scored_topk.hpp>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "support/random.hpp"
#include "support/router_testbed.hpp"

namespace sy = switchyard;
using sy::index_t;
using sy::make_view;
using sy::routers::ScoredTopK;
using sy::routing::epsilon_kind;
using sy::routing::group_score;
using sy::routing::normalization;
using sy::routing::routing_plan;
using sy::routing::score_function;
using sy::routing::selection_kind;
using sy::test::expect_error;

namespace {

//! A random router problem: x [T, d], w [E, d], router bias b [E], selection bias [E], and a
//! hash table [vocab, k] with token ids [T].
struct problem {
  int tokens, d, experts, k, vocab = 11;
  std::vector<float> x, w, b, sel;
  std::vector<std::int32_t> table, ids;
  bool use_b = false, use_sel = false, use_hash = false;

  problem(int t, int dd, int e, int kk, std::uint64_t seed)
      : tokens(t), d(dd), experts(e), k(kk) {
    std::mt19937_64 g(seed);
    x = sy::test::normal(g, static_cast<std::size_t>(t * dd));
    w = sy::test::normal(g, static_cast<std::size_t>(e * dd), 0.6f);
    b = sy::test::normal(g, static_cast<std::size_t>(e), 0.5f);
    sel = sy::test::normal(g, static_cast<std::size_t>(e), 0.3f);
    std::vector<std::int32_t> perm(static_cast<std::size_t>(e));
    std::iota(perm.begin(), perm.end(), 0);
    for (int v = 0; v < vocab; ++v) {
      std::shuffle(perm.begin(), perm.end(), g);
      table.insert(table.end(), perm.begin(), perm.begin() + kk);
    }
    std::uniform_int_distribution<int> tok(0, vocab - 1);
    for (int i = 0; i < t; ++i) ids.push_back(tok(g));
  }
  [[nodiscard]] sy::routing::scored_router_params params() const {
    sy::routing::scored_router_params p{};
    p.w = make_view<const float>(w.data(), experts, d);
    if (use_b) p.b = make_view<const float>(b.data(), experts);
    if (use_sel) p.selection_bias = make_view<const float>(sel.data(), experts);
    if (use_hash) {
      p.hash_table = make_view<const std::int32_t>(table.data(), vocab, k);
      p.token_ids = make_view<const std::int32_t>(ids.data(), tokens);
    }
    return p;
  }
  [[nodiscard]] sy::matrix_view<const float> xv() const {
    return make_view<const float>(x.data(), tokens, d);
  }
};

routing_plan route(const ScoredTopK& r, const problem& p,
                   sy::routing::scored_router_losses* losses = nullptr) {
  routing_plan plan;
  sy::routing::scored_router_losses l{};
  sy::host::route(r, p.xv(), p.params(), plan, l);
  if (losses != nullptr) *losses = l;
  return plan;
}

double score_ref(score_function fn, double l) {
  switch (fn) {
    case score_function::sigmoid: return 1.0 / (1.0 + std::exp(-l));
    case score_function::sqrt_softplus: return std::sqrt(std::log1p(std::exp(l)));
    case score_function::identity: return l;
    default: return 0.0;
  }
}

//! float64 logits and scores of token t.
void reference_scores(const problem& p, int t, score_function fn, std::vector<double>& l,
                      std::vector<double>& s) {
  l.assign(static_cast<std::size_t>(p.experts), 0.0);
  s.assign(l.size(), 0.0);
  for (int e = 0; e < p.experts; ++e) {
    double a = p.use_b ? p.b[e] : 0.0;
    for (int i = 0; i < p.d; ++i) a += double(p.x[t * p.d + i]) * p.w[e * p.d + i];
    l[e] = a;
  }
  if (fn == score_function::softmax) {
    const double m = *std::max_element(l.begin(), l.end());
    double z = 0;
    for (int e = 0; e < p.experts; ++e) z += std::exp(l[e] - m);
    for (int e = 0; e < p.experts; ++e) s[e] = std::exp(l[e] - m) / z;
  } else {
    for (int e = 0; e < p.experts; ++e) s[e] = score_ref(fn, l[e]);
  }
}

//! Brute force of steps 3-5 over the plan's float scores and logits (the values the library
//! selected from): sorts groups and experts instead of scanning.
std::vector<int> brute_force_ids(const ScoredTopK& r, const problem& p, const routing_plan& plan,
                                 int t) {
  const int e_count = p.experts;
  std::vector<float> c(static_cast<std::size_t>(e_count));
  for (int e = 0; e < e_count; ++e) {
    const float base = r.select_on_logits || r.softmax_after_topk ? plan.logits[t * e_count + e]
                                                                  : plan.probs[t * e_count + e];
    c[e] = p.use_sel ? base + p.sel[e] : base;
  }
  if (r.groups.n_group > 1) {
    const int g_count = r.groups.n_group, size = e_count / g_count;
    std::vector<std::pair<float, int>> gs;
    for (int g = 0; g < g_count; ++g) {
      std::vector<float> v(c.begin() + g * size, c.begin() + (g + 1) * size);
      std::sort(v.rbegin(), v.rend());
      gs.push_back({r.groups.score == group_score::max ? v[0] : v[0] + v[1], g});
    }
    std::stable_sort(gs.begin(), gs.end(),
                     [](auto a, auto b) { return a.first > b.first; });  // ties: lower group first
    std::vector<bool> keep(static_cast<std::size_t>(g_count), false);
    for (int i = 0; i < r.groups.topk_group; ++i) keep[gs[i].second] = true;
    for (int e = 0; e < e_count; ++e)
      if (!keep[e / size]) c[e] = r.groups.excluded_fill;
  }
  std::vector<int> order(static_cast<std::size_t>(e_count));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return c[a] > c[b]; });
  order.resize(static_cast<std::size_t>(r.k));
  return order;
}

//! float64 reference of steps 6-8 for the given ids.
std::vector<double> reference_weights(const ScoredTopK& r, const std::vector<double>& l,
                                      const std::vector<double>& s, const std::vector<int>& ids) {
  std::vector<double> w;
  if (r.softmax_after_topk) {
    double m = -1e300, z = 0;
    for (int e : ids) m = std::max(m, l[e]);
    for (int e : ids) z += std::exp(l[e] - m);
    for (int e : ids) w.push_back(std::exp(l[e] - m) / z);
  } else {
    for (int e : ids) w.push_back(s[e]);
  }
  double n = 1.0;
  const auto& nz = r.normalize;
  if (nz.kind == normalization::sum) {
    const double sum = std::accumulate(w.begin(), w.end(), 0.0);
    n = nz.eps == epsilon_kind::add ? sum + nz.eps_value
        : nz.eps == epsilon_kind::clamp_min ? std::max(sum, double(nz.eps_value))
                                             : sum;
  } else if (nz.kind == normalization::pnorm) {
    double sum = 0;
    for (double v : w) sum += std::pow(std::abs(v), nz.p);
    n = std::pow(sum, 1.0 / nz.p);
  }
  for (double& v : w) v = v / n * r.scaling;
  return w;
}

//! Checks every token of `plan` against the brute-force selection (or the hash table) and
//! the float64 weights.
void check_against_reference(const ScoredTopK& r, const problem& p, const routing_plan& plan) {
  const score_function fn = r.softmax_after_topk ? score_function::softmax : r.scoring;
  std::vector<double> l, s;
  for (int t = 0; t < p.tokens; ++t) {
    reference_scores(p, t, fn, l, s);
    for (int e = 0; e < p.experts; ++e) {
      BOOST_TEST(std::abs(plan.logits[t * p.experts + e] - l[e]) <= 1e-5 * (1 + std::abs(l[e])));
      BOOST_TEST(std::abs(plan.probs[t * p.experts + e] - s[e]) <= 1e-5 * (1 + std::abs(s[e])));
    }
    std::vector<int> want;
    if (r.selection == selection_kind::hash) {
      for (int j = 0; j < p.k; ++j) want.push_back(p.table[p.ids[t] * p.k + j]);
    } else {
      want = brute_force_ids(r, p, plan, t);
    }
    BOOST_TEST(plan.counts[t] == r.k);
    std::vector<int> got;
    for (int j = 0; j < r.k; ++j) got.push_back(plan.id(t, j));
    BOOST_TEST(got == want, "token " << t);
    const auto wr = reference_weights(r, l, s, want);
    for (int j = 0; j < r.k; ++j) {
      BOOST_TEST(std::abs(plan.weight(t, j) - wr[j]) <= 2e-6 * std::max(1.0, std::abs(wr[j])),
                 "token " << t << " slot " << j << ": " << plan.weight(t, j) << " vs " << wr[j]);
    }
  }
}

const score_function all_scores[] = {score_function::softmax, score_function::sigmoid,
                                     score_function::sqrt_softplus, score_function::identity};

}  // namespace

BOOST_AUTO_TEST_CASE(logits_scores_selection_and_weights_match_the_reference) {
  std::uint64_t seed = sy::test::base_seed() + 31001;
  for (auto fn : all_scores) {
    for (bool on_logits : {false, true}) {
      for (bool bias : {false, true}) {
        problem p(23, 12, 16, 4, seed++);
        p.use_b = bias;
        p.use_sel = true;
        ScoredTopK r{.k = 4, .scoring = fn, .select_on_logits = on_logits, .scaling = 1.7f};
        check_against_reference(r, p, route(r, p));
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(selection_bias_changes_the_selection_but_not_the_weights_source) {
  problem p(29, 10, 8, 2, sy::test::base_seed() + 31002);
  ScoredTopK r{.k = 2, .scoring = score_function::sigmoid};
  const auto plain = route(r, p);
  // A large bias on expert 5: every token selects it first, with its unbiased score.
  std::fill(p.sel.begin(), p.sel.end(), 0.0f);
  p.sel[5] = 100.0f;
  p.use_sel = true;
  const auto biased = route(r, p);
  int changed = 0;
  for (int t = 0; t < p.tokens; ++t) {
    BOOST_TEST(biased.id(t, 0) == 5);
    BOOST_TEST(biased.weight(t, 0) == biased.probs[t * 8 + 5]);  // the score, not score + 100
    BOOST_TEST(biased.weight(t, 0) < 1.0f);
    changed += plain.id(t, 0) != 5 || plain.id(t, 1) != biased.id(t, 1) ? 1 : 0;
  }
  BOOST_TEST(changed > 0);
  // Random biases: the brute force (which adds them) agrees, the weights stay scores.
  std::mt19937_64 g(sy::test::base_seed() + 7);
  p.sel = sy::test::normal(g, 8, 0.3f);
  check_against_reference(r, p, route(r, p));
}

BOOST_AUTO_TEST_CASE(group_limit_keeps_only_the_best_groups_and_equals_the_brute_force) {
  std::uint64_t seed = sy::test::base_seed() + 31003;
  struct gcase {
    int experts, n_group, topk_group, k;
    group_score score;
    float fill;
    score_function fn;
  };
  const gcase cases[] = {{16, 4, 2, 4, group_score::top2_sum, -INFINITY, score_function::sigmoid},
                         {32, 8, 3, 6, group_score::top2_sum, -INFINITY, score_function::sigmoid},
                         {16, 4, 2, 4, group_score::max, 0.0f, score_function::softmax},
                         {16, 4, 1, 3, group_score::max, 0.0f, score_function::softmax},
                         {12, 3, 2, 5, group_score::top2_sum, -INFINITY, score_function::sqrt_softplus}};
  for (const auto& c : cases) {
    for (bool sel : {false, true}) {
      problem p(31, 8, c.experts, c.k, seed++);
      p.use_sel = sel;
      ScoredTopK r{.k = c.k,
                   .scoring = c.fn,
                   .groups = {.n_group = c.n_group, .topk_group = c.topk_group, .score = c.score,
                              .excluded_fill = c.fill},
                   .normalize = {.kind = normalization::sum}};
      const auto plan = route(r, p);
      check_against_reference(r, p, plan);
      // Only kept groups, and the group limit changes some token's selection.
      const int size = c.experts / c.n_group;
      int changed = 0;
      ScoredTopK free = r;
      free.groups = {};
      const auto unlimited = route(free, p);
      for (int t = 0; t < p.tokens; ++t) {
        std::vector<bool> used(static_cast<std::size_t>(c.n_group), false);
        for (int j = 0; j < c.k; ++j) used[plan.id(t, j) / size] = true;
        // (A fill of 0 under a negative selection bias may rank an excluded expert above a
        // kept one, as in HF: DeepSeek-V2, whose fill it is, has no selection bias.)
        if (std::isinf(c.fill) || !sel)
          BOOST_TEST(std::count(used.begin(), used.end(), true) <= c.topk_group, "token " << t);
        for (int j = 0; j < c.k; ++j) changed += plan.id(t, j) != unlimited.id(t, j) ? 1 : 0;
      }
      BOOST_TEST(changed > 0);
      // The diagnostic selection scores: exactly topk_group groups keep their values.
      std::vector<float> cs(static_cast<std::size_t>(c.experts));
      const auto rule = [&] {
        auto ru = r.rule_options();
        if (sel) ru.selection_bias = p.sel.data();
        return ru;
      }();
      rule.selection_scores({plan.probs.data(), static_cast<std::size_t>(c.experts)},
                            {plan.logits.data(), static_cast<std::size_t>(c.experts)},
                            {cs.data(), cs.size()});
      int kept = 0;
      for (int g = 0; g < c.n_group; ++g) kept += cs[g * size] != c.fill ? 1 : 0;
      BOOST_TEST(kept == c.topk_group);
    }
  }
}

BOOST_AUTO_TEST_CASE(hash_selection_follows_the_table) {
  problem p(21, 8, 16, 4, sy::test::base_seed() + 31004);
  p.use_hash = true;
  p.use_sel = true;  // read by nothing under hash selection
  auto r = sy::routers::presets::deepseek_v4_hash(4, 1.5f);
  const auto plan = route(r, p);
  check_against_reference(r, p, plan);
}

BOOST_AUTO_TEST_CASE(every_normalisation_and_the_scaling) {
  std::uint64_t seed = sy::test::base_seed() + 31005;
  const sy::routing::weight_normalization norms[] = {
      {},
      {.kind = normalization::sum},
      {.kind = normalization::sum, .eps = epsilon_kind::add, .eps_value = 0.25f},
      {.kind = normalization::sum, .eps = epsilon_kind::clamp_min, .eps_value = 1e-12f},
      {.kind = normalization::sum, .eps = epsilon_kind::clamp_min, .eps_value = 50.0f},
      {.kind = normalization::pnorm, .p = 1.0f},
      {.kind = normalization::pnorm, .p = 2.0f},
      {.kind = normalization::pnorm, .p = 3.0f}};
  for (const auto& nz : norms) {
    for (bool sat : {false, true}) {
      problem p(17, 8, 8, 3, seed++);
      p.use_b = sat;
      ScoredTopK r{.k = 3, .scoring = score_function::sigmoid, .softmax_after_topk = sat,
                   .normalize = nz, .scaling = 2.5f};
      const auto plan = route(r, p);
      check_against_reference(r, p, plan);
      r.scaling = 1.0f;
      const auto unscaled = route(r, p);
      for (int i = 0; i < p.tokens * 3; ++i)
        BOOST_TEST(plan.weights[i] == unscaled.weights[i] * 2.5f);
      if (nz.kind == normalization::sum && nz.eps == epsilon_kind::none)
        for (int t = 0; t < p.tokens; ++t)
          BOOST_TEST(std::abs(unscaled.weight(t, 0) + unscaled.weight(t, 1) +
                              unscaled.weight(t, 2) - 1.0f) <= 1e-6f);
    }
  }
}

BOOST_AUTO_TEST_CASE(softmax_after_topk_stores_the_softmax_and_weights_the_selected_logits) {
  problem p(13, 8, 8, 4, sy::test::base_seed() + 31006);
  p.use_b = true;
  auto r = sy::routers::presets::gpt_oss(4);
  const auto plan = route(r, p);
  check_against_reference(r, p, plan);
  for (int t = 0; t < p.tokens; ++t) {
    float s = 0;
    for (int e = 0; e < 8; ++e) s += plan.probs[t * 8 + e];
    BOOST_TEST(std::abs(s - 1.0f) <= 1e-6f);
    BOOST_TEST(std::abs(plan.weight(t, 0) + plan.weight(t, 1) + plan.weight(t, 2) +
                        plan.weight(t, 3) - 1.0f) <= 1e-6f);
  }
}

BOOST_AUTO_TEST_CASE(ties_go_to_the_lower_id_and_the_lower_group) {
  // Experts 2 and 5 have the same router row, so the same logit and score at every token.
  problem p(9, 6, 8, 2, sy::test::base_seed() + 31007);
  for (int i = 0; i < p.d; ++i) p.w[5 * p.d + i] = p.w[2 * p.d + i];
  for (int i = 0; i < p.d; ++i) p.w[3 * p.d + i] = p.w[2 * p.d + i] * 3.0f;  // far above
  ScoredTopK r{.k = 2, .scoring = score_function::sigmoid};
  // Make 2 and 5 the best two after expert 3: a large bias only on them and on 3.
  p.use_sel = true;
  std::fill(p.sel.begin(), p.sel.end(), -50.0f);
  p.sel[2] = p.sel[5] = 10.0f;
  p.sel[3] = 20.0f;
  auto plan = route(r, p);
  for (int t = 0; t < p.tokens; ++t) {
    BOOST_TEST(plan.id(t, 0) == 3);
    BOOST_TEST(plan.id(t, 1) == 2);  // tied with 5
  }
  // Groups of 2: experts 2, 3, 6, 7 share one router row and a large bias, so groups 1 and 3
  // tie at the top: the lower group is kept, and inside it the lower id comes first.
  problem q(9, 6, 8, 2, sy::test::base_seed() + 31008);
  for (int e : {3, 6, 7})
    for (int i = 0; i < q.d; ++i) q.w[e * q.d + i] = q.w[2 * q.d + i];
  ScoredTopK g{.k = 2, .scoring = score_function::sigmoid,
               .groups = {.n_group = 4, .topk_group = 1, .score = group_score::max}};
  q.use_sel = true;
  std::fill(q.sel.begin(), q.sel.end(), 0.0f);
  q.sel[2] = q.sel[3] = q.sel[6] = q.sel[7] = 30.0f;
  plan = route(g, q);
  for (int t = 0; t < q.tokens; ++t) {
    BOOST_TEST(plan.id(t, 0) == 2);
    BOOST_TEST(plan.id(t, 1) == 3);
  }
}

BOOST_AUTO_TEST_CASE(losses_match_the_reference) {
  problem p(24, 8, 8, 3, sy::test::base_seed() + 31009);
  p.use_sel = true;
  for (index_t s : {index_t{0}, index_t{6}, index_t{8}}) {
    ScoredTopK r{.k = 3, .scoring = score_function::sigmoid,
                 .normalize = {.kind = normalization::sum}, .sequence_length = s};
    sy::routing::scored_router_losses l{};
    const auto plan = route(r, p, &l);
    const int S = s == 0 ? p.tokens : static_cast<int>(s), B = p.tokens / S, E = 8;
    double seq = 0, z = 0;
    std::vector<double> f(E, 0), pbar(E, 0);
    for (int b = 0; b < B; ++b) {
      std::vector<double> fs(E, 0), ps(E, 0);
      for (int t = b * S; t < (b + 1) * S; ++t) {
        double sum = 0;
        for (int e = 0; e < E; ++e) sum += plan.probs[t * E + e];
        for (int e = 0; e < E; ++e) ps[e] += plan.probs[t * E + e] / sum / S;
        for (int j = 0; j < 3; ++j) fs[plan.id(t, j)] += double(E) / (3.0 * S);
      }
      for (int e = 0; e < E; ++e) seq += fs[e] * ps[e] / B;
    }
    for (int t = 0; t < p.tokens; ++t) {
      double m = -1e300, zz = 0;
      for (int e = 0; e < E; ++e) m = std::max(m, double(plan.logits[t * E + e]));
      for (int e = 0; e < E; ++e) zz += std::exp(plan.logits[t * E + e] - m);
      z += std::pow(m + std::log(zz), 2) / p.tokens;
      for (int e = 0; e < E; ++e) pbar[e] += plan.probs[t * E + e] / p.tokens;
      for (int j = 0; j < 3; ++j) f[plan.id(t, j)] += 1.0 / p.tokens;
    }
    double lb = 0;
    for (int e = 0; e < E; ++e) lb += E * f[e] * pbar[e];
    BOOST_TEST(std::abs(l.sequence_balance - seq) <= 1e-5 * seq);
    BOOST_TEST(std::abs(l.z - z) <= 1e-5 * z);
    BOOST_TEST(std::abs(l.lb - lb) <= 1e-5 * lb);
  }
}

BOOST_AUTO_TEST_CASE(presets_configure_each_family) {
  namespace ps = sy::routers::presets;
  const auto v3 = ps::deepseek_v3(8, 8, 4, true, 2.5f);
  BOOST_TEST((v3.scoring == score_function::sigmoid && v3.groups.n_group == 8 &&
              v3.groups.topk_group == 4 && v3.normalize.eps == epsilon_kind::add &&
              v3.scaling == 2.5f && std::isinf(v3.groups.excluded_fill)));
  const auto v2 = ps::deepseek_v2(6, 8, 3, 16.0f);
  BOOST_TEST((v2.scoring == score_function::softmax && v2.groups.score == group_score::max &&
              v2.groups.excluded_fill == 0.0f && v2.normalize.kind == normalization::none));
  BOOST_TEST((ps::deepseek_v4(4).scoring == score_function::sqrt_softplus));
  BOOST_TEST((ps::deepseek_v4_hash(4).selection == selection_kind::hash));
  BOOST_TEST(ps::llama4(1).select_on_logits);
  BOOST_TEST(ps::gpt_oss(4).softmax_after_topk);
  BOOST_TEST(ps::granite(2).softmax_after_topk);
  BOOST_TEST((ps::qwen_moe(4, false).normalize.kind == normalization::none));
  BOOST_TEST((ps::minimax_m2(8).normalize.kind == normalization::sum));
  BOOST_TEST((ps::ernie45(4).normalize.eps == epsilon_kind::clamp_min));
  BOOST_TEST((ps::dbrx(4, 2.0f).normalize.kind == normalization::pnorm));
  BOOST_TEST(ps::longcat_flash(6, 3.0f).scaling == 3.0f);
  BOOST_TEST((sy::routing::presets::glm4_moe(4).scoring == score_function::sigmoid));
  BOOST_TEST(ps::dots1(4, 4, 2).groups.n_group == 4);
}

BOOST_AUTO_TEST_CASE(every_error_names_its_argument) {
  problem p(8, 6, 8, 2, sy::test::base_seed() + 31010);
  const auto run = [&](const ScoredTopK& r, const problem& q) { (void)route(r, q); };
  using sy::range_error;
  using sy::shape_error;
  expect_error<range_error>([&] { run({.k = 9}, p); }, "k", "[1, E] = [1, 8], got 9");
  expect_error<range_error>([&] { run({.k = 0}, p); }, "k", "got 0");
  expect_error<range_error>([&] { run({.k = 2, .groups = {.n_group = 3}}, p); }, "groups.n_group",
                            "divide E = 8, got 3");
  expect_error<range_error>([&] { run({.k = 2, .groups = {.n_group = 4, .topk_group = 5}}, p); },
                            "groups.topk_group", "got 5");
  expect_error<range_error>([&] { run({.k = 2, .groups = {.n_group = 8, .topk_group = 2}}, p); },
                            "groups.n_group", "at least 2 experts per group");
  expect_error<range_error>(
      [&] { run({.k = 3, .groups = {.n_group = 4, .topk_group = 1, .score = group_score::max}}, p); },
      "k", "got 3");
  expect_error<range_error>(
      [&] { run({.k = 2, .normalize = {.kind = normalization::pnorm, .p = 0.0f}}, p); },
      "normalize.p", "got 0");
  expect_error<range_error>(
      [&] {
        run({.k = 2, .normalize = {.kind = normalization::pnorm, .eps = epsilon_kind::add}}, p);
      },
      "normalize.eps", "sum only");
  expect_error<range_error>(
      [&] {
        run({.k = 2,
             .normalize = {.kind = normalization::sum, .eps = epsilon_kind::add, .eps_value = -1.0f}},
            p);
      },
      "normalize.eps_value", "got -1");
  expect_error<range_error>([&] { run({.k = 2, .scaling = NAN}, p); }, "scaling", "finite");
  expect_error<range_error>([&] { run({.k = 2, .sequence_length = -1}, p); }, "sequence_length",
                            "got -1");
  expect_error<range_error>([&] { run({.k = 2, .sequence_length = 3}, p); }, "sequence_length",
                            "divide T = 8");
  {
    problem q = p;
    q.use_b = true;
    auto prm = q.params();
    prm.b = make_view<const float>(q.b.data(), 7);
    expect_error<shape_error>(
        [&] {
          routing_plan plan;
          sy::routing::scored_router_losses l{};
          sy::host::route(ScoredTopK{.k = 2}, q.xv(), prm, plan, l);
        },
        "params.b", "[E]");
    prm = q.params();
    prm.selection_bias = make_view<const float>(q.sel.data(), 9);
    expect_error<shape_error>(
        [&] {
          routing_plan plan;
          sy::routing::scored_router_losses l{};
          sy::host::route(ScoredTopK{.k = 2}, q.xv(), prm, plan, l);
        },
        "params.selection_bias", "got [9]");
  }
  {
    problem q = p;
    q.use_sel = true;
    q.sel[4] = NAN;
    expect_error<sy::non_finite_error>([&] { run({.k = 2}, q); }, "params.selection_bias",
                                       "params.selection_bias[4]");
  }
  {
    problem q = p;
    q.x[3 * q.d + 1] = INFINITY;
    expect_error<sy::non_finite_error>([&] { run({.k = 2}, q); }, "x", "token 3");
  }
  const ScoredTopK hash{.k = 2, .selection = selection_kind::hash};
  expect_error<shape_error>([&] { run(hash, p); }, "params.hash_table", "required");
  {
    problem q = p;
    q.use_hash = true;
    q.ids[5] = q.vocab;
    expect_error<range_error>([&] { run(hash, q); }, "params.token_ids",
                              "params.token_ids[5] must be in [0, vocab) = [0, 11), got 11");
    q.ids[5] = -1;
    expect_error<range_error>([&] { run(hash, q); }, "params.token_ids", "got -1");
  }
  {
    problem q = p;
    q.use_hash = true;
    q.table[q.ids[2] * 2 + 1] = 8;
    expect_error<range_error>([&] { run(hash, q); }, "params.hash_table",
                              "must be in [0, E) = [0, 8), got 8");
    q.table[q.ids[2] * 2 + 1] = q.table[q.ids[2] * 2];
    expect_error<range_error>([&] { run(hash, q); }, "params.hash_table", "repeats expert");
  }
  {
    problem q = p;
    q.use_hash = true;
    auto prm = q.params();
    prm.hash_table = make_view<const std::int32_t>(q.table.data(), 5, 3);
    expect_error<shape_error>(
        [&] {
          routing_plan plan;
          sy::routing::scored_router_losses l{};
          sy::host::route(hash, q.xv(), prm, plan, l);
        },
        "params.hash_table", "[vocab, k]");
    prm = q.params();
    prm.token_ids = make_view<const std::int32_t>(q.ids.data(), 7);
    expect_error<shape_error>(
        [&] {
          routing_plan plan;
          sy::routing::scored_router_losses l{};
          sy::host::route(hash, q.xv(), prm, plan, l);
        },
        "params.token_ids", "[T]");
  }
}

BOOST_AUTO_TEST_CASE(an_empty_batch_routes_nothing_and_has_zero_losses) {
  for (auto sel : {selection_kind::topk, selection_kind::hash}) {
    problem p(0, 6, 8, 2, sy::test::base_seed() + 31011);
    p.use_hash = sel == selection_kind::hash;
    p.use_sel = true;
    sy::routing::scored_router_losses l{.lb = 1, .sequence_balance = 1, .z = 1};
    const auto plan = route({.k = 2, .selection = sel, .sequence_length = 4}, p, &l);
    BOOST_TEST(plan.num_tokens == 0);
    BOOST_TEST((l.lb == 0.0f && l.sequence_balance == 0.0f && l.z == 0.0f));
  }
}
