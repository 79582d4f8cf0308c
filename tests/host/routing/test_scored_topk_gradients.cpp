// SPDX-License-Identifier: Apache-2.0
// routers::ScoredTopK backward: the library's float dx, grads.w and grads.b against float64
// central finite differences of a float64 reference of the whole router output
// Σ d_w ⊙ weights + c_lb·lb + c_seq·sequence_balance + c_z·z (the selection fixed at the
// library's plan: no gradient flows through the choice, the selection bias, the groups or the
// hash table), for every score function × normalisation × softmax after top-k × with and
// without the router bias, plus the group limit, the selection bias and hash selection.
#include <boost/test/unit_test.hpp>

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
using sy::routing::normalization;
using sy::routing::routing_plan;
using sy::routing::score_function;

namespace {

struct setup {
  int tokens, d, experts, k;
  std::vector<float> x, w, b, sel, dw;
  std::vector<std::int32_t> table, ids;
  bool use_b;
};

//! float64 objective as a function of x, w, b (flattened into one vector θ = [x | w | b]) for
//! the fixed selection of `plan`.
double objective(const ScoredTopK& r, const setup& s, const routing_plan& plan,
                 const std::vector<double>& theta, const sy::routing::scored_router_losses& c) {
  const int T = s.tokens, d = s.d, E = s.experts, k = s.k;
  const double* x = theta.data();
  const double* w = x + T * d;
  const double* b = w + E * d;
  const score_function fn = r.softmax_after_topk ? score_function::softmax : r.scoring;
  std::vector<double> l(static_cast<std::size_t>(T * E)), sc(l.size());
  double total = 0, z = 0;
  for (int t = 0; t < T; ++t) {
    double* lt = &l[t * E];
    double* st = &sc[t * E];
    for (int e = 0; e < E; ++e) {
      double a = s.use_b ? b[e] : 0.0;
      for (int i = 0; i < d; ++i) a += x[t * d + i] * w[e * d + i];
      lt[e] = a;
    }
    const double m = *std::max_element(lt, lt + E);
    double zs = 0;
    for (int e = 0; e < E; ++e) zs += std::exp(lt[e] - m);
    const double lse = m + std::log(zs);
    z += lse * lse / T;
    for (int e = 0; e < E; ++e) {
      switch (fn) {
        case score_function::softmax: st[e] = std::exp(lt[e] - lse); break;
        case score_function::sigmoid: st[e] = 1.0 / (1.0 + std::exp(-lt[e])); break;
        case score_function::sqrt_softplus: st[e] = std::sqrt(std::log1p(std::exp(lt[e]))); break;
        case score_function::identity: st[e] = lt[e]; break;
      }
    }
    std::vector<double> raw;
    if (r.softmax_after_topk) {
      double mm = -1e300, zz = 0;
      for (int j = 0; j < k; ++j) mm = std::max(mm, lt[plan.id(t, j)]);
      for (int j = 0; j < k; ++j) zz += std::exp(lt[plan.id(t, j)] - mm);
      for (int j = 0; j < k; ++j) raw.push_back(std::exp(lt[plan.id(t, j)] - mm) / zz);
    } else {
      for (int j = 0; j < k; ++j) raw.push_back(st[plan.id(t, j)]);
    }
    double n = 1.0;
    const auto& nz = r.normalize;
    if (nz.kind == normalization::sum) {
      const double sum = std::accumulate(raw.begin(), raw.end(), 0.0);
      n = nz.eps == epsilon_kind::add ? sum + nz.eps_value
          : nz.eps == epsilon_kind::clamp_min ? std::max(sum, double(nz.eps_value))
                                               : sum;
    } else if (nz.kind == normalization::pnorm) {
      double sum = 0;
      for (double v : raw) sum += std::pow(std::abs(v), nz.p);
      n = std::pow(sum, 1.0 / nz.p);
    }
    for (int j = 0; j < k; ++j) total += s.dw[t * k + j] * raw[j] / n * r.scaling;
  }
  // lb: E · Σ_e f_e · mean_t s_{t,e}, f_e = tokens selecting e / T.
  double lb = 0, seq = 0;
  for (int e = 0; e < E; ++e) {
    double f = 0, pbar = 0;
    for (int t = 0; t < T; ++t) {
      pbar += sc[t * E + e] / T;
      for (int j = 0; j < k; ++j) f += plan.id(t, j) == e ? 1.0 / T : 0.0;
    }
    lb += E * f * pbar;
  }
  const int S = r.sequence_length == 0 ? T : static_cast<int>(r.sequence_length), B = T / S;
  for (int q = 0; q < B; ++q) {
    std::vector<double> f(static_cast<std::size_t>(E), 0), p(f.size(), 0);
    for (int t = q * S; t < (q + 1) * S; ++t) {
      double sum = 0;
      for (int e = 0; e < E; ++e) sum += sc[t * E + e];
      for (int e = 0; e < E; ++e) p[e] += sc[t * E + e] / sum / S;
      for (int j = 0; j < k; ++j) f[plan.id(t, j)] += double(E) / (k * S);
    }
    for (int e = 0; e < E; ++e) seq += f[e] * p[e] / B;
  }
  return total + c.lb * lb + c.sequence_balance * seq + c.z * z;
}

//! Runs the library's forward and backward and compares dx, grads.w, grads.b with central
//! differences of `objective`.
void check_gradients(const ScoredTopK& r, setup& s, std::uint64_t seed,
                     const sy::routing::scored_router_losses& c, const std::string& what,
                     bool use_sel = false, bool use_hash = false) {
  std::mt19937_64 g(seed);
  const int T = s.tokens, d = s.d, E = s.experts, k = s.k;
  s.dw = sy::test::normal(g, static_cast<std::size_t>(T * k));
  sy::routing::scored_router_params p{};
  p.w = make_view<const float>(s.w.data(), E, d);
  if (s.use_b) p.b = make_view<const float>(s.b.data(), E);
  if (use_sel) p.selection_bias = make_view<const float>(s.sel.data(), E);
  if (use_hash) {
    p.hash_table = make_view<const std::int32_t>(s.table.data(), 7, k);
    p.token_ids = make_view<const std::int32_t>(s.ids.data(), T);
  }
  routing_plan plan;
  sy::routing::scored_router_losses l{};
  const auto xv = make_view<const float>(s.x.data(), T, d);
  sy::host::route(r, xv, p, plan, l);
  std::vector<float> dx(static_cast<std::size_t>(T * d), 0.0f), gw(static_cast<std::size_t>(E * d), 0.0f),
      gb(static_cast<std::size_t>(E), 0.0f);
  sy::routing::scored_router_grads grads{make_view(gw.data(), E, d), {}};
  if (s.use_b) grads.b = make_view(gb.data(), E);
  sy::host::route_backward(r, xv, p, plan, s.dw.data(), c, make_view(dx.data(), T, d), grads);

  std::vector<double> theta;
  theta.insert(theta.end(), s.x.begin(), s.x.end());
  theta.insert(theta.end(), s.w.begin(), s.w.end());
  theta.insert(theta.end(), s.b.begin(), s.b.end());
  std::vector<double> fd(theta.size());
  const double h = 1e-6;
  for (std::size_t i = 0; i < theta.size(); ++i) {
    const double keep = theta[i];
    theta[i] = keep + h;
    const double up = objective(r, s, plan, theta, c);
    theta[i] = keep - h;
    const double down = objective(r, s, plan, theta, c);
    theta[i] = keep;
    fd[i] = (up - down) / (2 * h);
  }
  const auto compare = [&](const std::vector<float>& got, std::size_t offset, const char* name) {
    double scale = 0, err = 0;
    for (std::size_t i = 0; i < got.size(); ++i) {
      scale = std::max(scale, std::abs(fd[offset + i]));
      err = std::max(err, std::abs(got[i] - fd[offset + i]));
    }
    BOOST_TEST(err <= 2e-4 * std::max(scale, 1e-3),
               what << ": " << name << " max|Δ| = " << err << " (scale " << scale << ")");
  };
  compare(dx, 0, "dx");
  compare(gw, static_cast<std::size_t>(T * d), "grads.w");
  if (s.use_b) compare(gb, static_cast<std::size_t>(T * d + E * d), "grads.b");
}

setup make_setup(int T, int d, int E, int k, bool use_b, std::uint64_t seed) {
  std::mt19937_64 g(seed);
  setup s{T, d, E, k, sy::test::normal(g, static_cast<std::size_t>(T * d)),
          sy::test::normal(g, static_cast<std::size_t>(E * d), 0.5f),
          sy::test::normal(g, static_cast<std::size_t>(E), 0.5f),
          sy::test::normal(g, static_cast<std::size_t>(E), 0.3f), {}, {}, {}, use_b};
  std::vector<std::int32_t> perm(static_cast<std::size_t>(E));
  std::iota(perm.begin(), perm.end(), 0);
  for (int v = 0; v < 7; ++v) {
    std::shuffle(perm.begin(), perm.end(), g);
    s.table.insert(s.table.end(), perm.begin(), perm.begin() + k);
  }
  for (int t = 0; t < T; ++t) s.ids.push_back(static_cast<std::int32_t>(g() % 7));
  return s;
}

}  // namespace

BOOST_AUTO_TEST_CASE(every_score_function_normalisation_and_bias_matches_finite_differences) {
  const sy::routing::weight_normalization norms[] = {
      {},
      {.kind = normalization::sum},
      {.kind = normalization::sum, .eps = epsilon_kind::add, .eps_value = 0.3f},
      {.kind = normalization::sum, .eps = epsilon_kind::clamp_min, .eps_value = 1e-12f},
      {.kind = normalization::sum, .eps = epsilon_kind::clamp_min, .eps_value = 40.0f},
      {.kind = normalization::pnorm, .p = 1.0f},
      {.kind = normalization::pnorm, .p = 2.0f},
      {.kind = normalization::pnorm, .p = 3.0f}};
  const score_function fns[] = {score_function::softmax, score_function::sigmoid,
                                score_function::sqrt_softplus, score_function::identity};
  std::uint64_t seed = sy::test::base_seed() + 32001;
  for (auto fn : fns) {
    for (const auto& nz : norms) {
      for (bool sat : {false, true}) {
        if (sat && fn != score_function::softmax) continue;  // scoring is ignored after top-k
        for (bool use_b : {false, true}) {
          setup s = make_setup(12, 6, 8, 3, use_b, seed);
          // identity scores (the logits) have no positive sum: no sequence balance then.
          const sy::routing::scored_router_losses c{
              .lb = 0.05f, .sequence_balance = fn == score_function::identity ? 0.0f : 0.07f,
              .z = 0.02f};
          const ScoredTopK r{.k = 3, .scoring = fn, .softmax_after_topk = sat, .normalize = nz,
                             .scaling = 1.8f, .sequence_length = 4};
          check_gradients(r, s, seed++,
                          c,
                          std::string(fn == score_function::softmax ? "softmax"
                                      : fn == score_function::sigmoid ? "sigmoid"
                                      : fn == score_function::sqrt_softplus ? "sqrt_softplus"
                                                                            : "identity") +
                              " norm " + std::to_string(int(nz.kind)) + " eps " +
                              std::to_string(int(nz.eps)) + " p " + std::to_string(nz.p) +
                              (sat ? " softmax_after_topk" : "") + (use_b ? " bias" : ""));
        }
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(groups_selection_bias_and_hash_pass_no_gradient_through_the_choice) {
  std::uint64_t seed = sy::test::base_seed() + 32002;
  const sy::routing::scored_router_losses c{.lb = 0.03f, .sequence_balance = 0.05f, .z = 0.01f};
  {
    setup s = make_setup(10, 6, 16, 4, false, seed);
    const ScoredTopK r{.k = 4, .scoring = score_function::sigmoid,
                       .groups = {.n_group = 4, .topk_group = 2},
                       .normalize = {.kind = normalization::sum, .eps = epsilon_kind::add,
                                     .eps_value = 1e-20f},
                       .scaling = 2.5f};
    check_gradients(r, s, seed + 1, c, "deepseek_v3-like", true);
  }
  {
    setup s = make_setup(10, 6, 16, 4, true, seed + 2);
    const ScoredTopK r{.k = 4, .scoring = score_function::sqrt_softplus,
                       .selection = sy::routing::selection_kind::hash,
                       .normalize = {.kind = normalization::sum}, .scaling = 1.5f};
    check_gradients(r, s, seed + 3, c, "hash", false, true);
  }
  {
    setup s = make_setup(10, 6, 8, 2, false, seed + 4);
    const ScoredTopK r{.k = 2, .scoring = score_function::sigmoid, .select_on_logits = true};
    check_gradients(r, s, seed + 5, c, "llama4-like");
  }
}

BOOST_AUTO_TEST_CASE(zero_coefficients_add_no_loss_gradient) {
  setup s = make_setup(8, 5, 8, 2, true, sy::test::base_seed() + 32003);
  std::mt19937_64 g(1);
  sy::routing::scored_router_params p{make_view<const float>(s.w.data(), 8, 5),
                                      make_view<const float>(s.b.data(), 8), {}, {}, {}};
  const ScoredTopK r{.k = 2, .scoring = score_function::sigmoid};
  routing_plan plan;
  sy::routing::scored_router_losses l{};
  const auto xv = make_view<const float>(s.x.data(), 8, 5);
  sy::host::route(r, xv, p, plan, l);
  const std::vector<float> zeros(16, 0.0f);
  std::vector<float> dx(40, 0.0f), gw(40, 0.0f), gb(8, 0.0f);
  sy::host::route_backward(r, xv, p, plan, zeros.data(), {}, make_view(dx.data(), 8, 5),
                           {make_view(gw.data(), 8, 5), make_view(gb.data(), 8)});
  BOOST_TEST(std::all_of(dx.begin(), dx.end(), [](float v) { return v == 0.0f; }));
  BOOST_TEST(std::all_of(gw.begin(), gw.end(), [](float v) { return v == 0.0f; }));
  BOOST_TEST(std::all_of(gb.begin(), gb.end(), [](float v) { return v == 0.0f; }));
  BOOST_TEST(l.lb > 0.0f);
}
