// SPDX-License-Identifier: Apache-2.0
// A DeepSeek-V3-style MoE layer on the host backend: sigmoid scores, an aux-loss-free
// selection bias, group-limited top-k (8 groups, the best 3 kept by the sum of their top-2
// scores), sum-normalised weights scaled by routed_scaling_factor, and one shared expert that
// every token runs. Prints what it routed (experts and weights per token, groups used, load per
// expert, what the selection bias changed) and checks it: the group limit, the weights' sum,
// that the bias moves the choice but never the weights' source, and y against the plain
// formula in double. Exits non-zero naming a failed check on stderr.
#include <switchyard/routing/routers/presets.hpp>
#include <switchyard/training/selection_bias.hpp>
#include <switchyard/switchyard.hpp>

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <random>
#include <set>
#include <vector>

namespace {
int failed_checks = 0;
void check(bool ok, const char* format, ...) {
  if (ok) return;
  ++failed_checks;
  std::va_list args;
  va_start(args, format);
  std::fprintf(stderr, "deepseek_v3 CHECK FAILED: ");
  std::vfprintf(stderr, format, args);
  std::fprintf(stderr, "\n");
  va_end(args);
}
double silu(double h) { return h / (1.0 + std::exp(-h)); }
}  // namespace

int main() {
  namespace sy = switchyard;
  constexpr int tokens = 12, d = 32, d_ff = 16, experts = 32, k = 6, groups = 8, kept_groups = 3;
  constexpr int d_ff_shared = 32;  // one shared expert, twice an expert's width
  constexpr float scaling = 2.5f;
  std::mt19937 gen(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto randn = [&](std::size_t n, float scale) {
    std::vector<float> v(n);
    for (auto& a : v) a = normal(gen) * scale;
    return v;
  };
  const auto x = randn(tokens * d, 1.0f), gate = randn(experts * d, 0.3f);
  auto bias = randn(experts, 0.05f);  // e_score_correction_bias, updated between steps
  const auto w1 = randn(experts * 2 * d_ff * d, 0.15f), w2 = randn(experts * d * d_ff, 0.2f);
  const auto s1 = randn(2 * d_ff_shared * d, 0.15f), s2 = randn(d * d_ff_shared, 0.2f);

  // The router: DeepSeek-V3's (also GLM-4.5's and dots1's), from its preset: sigmoid scores,
  // groups scored by the sum of their top-2, weights normalised (+1e-20) and scaled.
  const sy::routers::ScoredTopK router =
      sy::routers::presets::deepseek_v3(k, groups, kept_groups, /*norm_topk_prob=*/true, scaling);
  using Layer = sy::MoELayer<sy::routers::ScoredTopK, sy::activation::swiglu>;
  const Layer layer{.router = router};

  sy::expert_weights<float> weights{sy::make_view<const float>(w1.data(), experts, 2 * d_ff, d), {},
                                    sy::make_view<const float>(w2.data(), experts, d, d_ff), {}};
  weights.shared.w1 = sy::make_view<const float>(s1.data(), 1, 2 * d_ff_shared, d);
  weights.shared.w2 = sy::make_view<const float>(s2.data(), 1, d, d_ff_shared);
  sy::routing::scored_router_params params;
  params.w = sy::make_view<const float>(gate.data(), experts, d);
  params.selection_bias = sy::make_view<const float>(bias.data(), experts);
  const auto xv = sy::make_view<const float>(x.data(), tokens, d);

  const sy::host_context host{};
  std::vector<float> y(tokens * d);
  Layer::result_type result;
  layer.forward(host, xv, params, weights, sy::make_view(y.data(), tokens, d), result);
  // The same tokens with the selection bias removed: what balancing changed.
  sy::routing::scored_router_params unbiased = params;
  unbiased.selection_bias = {};
  std::vector<float> y0(tokens * d);
  Layer::result_type plain;
  layer.forward(host, xv, unbiased, weights, sy::make_view(y0.data(), tokens, d), plain);

  std::printf("DeepSeek-V3-style layer: %d experts in %d groups (best %d kept), top-%d, sigmoid "
              "scores + selection bias, weights normalised and scaled by %.1f, 1 shared expert "
              "(d_ff %d)\n", experts, groups, kept_groups, k, scaling, d_ff_shared);
  std::vector<int> load(experts, 0);
  int moved = 0;
  for (int t = 0; t < tokens; ++t) {
    std::set<int> used_groups;
    double sum = 0.0;
    std::printf("token %2d:", t);
    for (int j = 0; j < k; ++j) {
      const int e = result.plan.id(t, j);
      const float w = result.plan.weight(t, j);
      std::printf(" %2d (w=%.3f)", e, w);
      used_groups.insert(e / (experts / groups));
      ++load[e];
      sum += w;
      // The weight is the unbiased sigmoid score, normalised: the bias only picks experts.
      double denom = 0.0;
      for (int i = 0; i < k; ++i) denom += result.plan.probs[t * experts + result.plan.id(t, i)];
      const double want = scaling * result.plan.probs[t * experts + e] / (denom + 1e-20);
      check(std::abs(w - want) <= 1e-6 * scaling, "token %d expert %d: weight %.7f, expected %.7f",
            t, e, w, want);
    }
    std::printf("  groups {");
    for (int g : used_groups) std::printf(" %d", g);
    std::printf(" }\n");
    check(static_cast<int>(used_groups.size()) <= kept_groups,
          "token %d uses %zu groups, more than topk_group = %d", t, used_groups.size(), kept_groups);
    check(std::abs(sum - scaling) <= 1e-5, "token %d: weights sum to %.6f, not %.1f", t, sum,
          scaling);
    std::set<int> a, b;
    for (int j = 0; j < k; ++j) {
      a.insert(result.plan.id(t, j));
      b.insert(plain.plan.id(t, j));
    }
    moved += a != b;
  }
  std::printf("load per expert:");
  for (int e = 0; e < experts; ++e) std::printf(" %d", load[e]);
  std::printf("\nthe selection bias changed the experts of %d of %d tokens\n", moved, tokens);

  // y against the plain formula in double: Σ_j w_j · FFN_e(x) + FFN_shared(x).
  auto ffn = [&](const float* a, const float* b, int width, int t, std::vector<double>& out,
                 double scale) {
    for (int f = 0; f < width; ++f) {
      double g = 0.0, u = 0.0;
      for (int i = 0; i < d; ++i) {
        g += static_cast<double>(a[static_cast<std::size_t>(f) * d + i]) * x[t * d + i];
        u += static_cast<double>(a[static_cast<std::size_t>(width + f) * d + i]) * x[t * d + i];
      }
      const double h = silu(g) * u;
      for (int i = 0; i < d; ++i) out[i] += scale * b[static_cast<std::size_t>(i) * width + f] * h;
    }
  };
  double err = 0.0, scale = 0.0;
  for (int t = 0; t < tokens; ++t) {
    std::vector<double> want(d, 0.0);
    for (int j = 0; j < k; ++j) {
      const int e = result.plan.id(t, j);
      ffn(&w1[static_cast<std::size_t>(e) * 2 * d_ff * d], &w2[static_cast<std::size_t>(e) * d * d_ff],
          d_ff, t, want, result.plan.weight(t, j));
    }
    ffn(s1.data(), s2.data(), d_ff_shared, t, want, 1.0);
    for (int i = 0; i < d; ++i) {
      err = std::max(err, std::abs(y[t * d + i] - want[i]));
      scale = std::max(scale, std::abs(want[i]));
    }
  }
  // Aux-loss-free balancing between steps: b_e += γ·sign(mean load − load_e).
  const std::vector<float> before = bias;
  sy::training::update_selection_bias(result.plan, sy::span<float>(bias.data(), bias.size()), 1e-3f);
  int raised = 0, lowered = 0;
  const double mean_load = static_cast<double>(tokens) * k / experts;
  for (int e = 0; e < experts; ++e) {
    const double step = static_cast<double>(bias[e]) - before[e];
    raised += step > 0;
    lowered += step < 0;
    check((load[e] < mean_load && step > 0) || (load[e] > mean_load && step < 0) ||
              (load[e] == mean_load && step == 0),
          "expert %d (load %d, mean %.2f): bias moved by %.3g", e, load[e], mean_load, step);
  }
  std::printf("selection-bias update (gamma 1e-3): %d under-loaded experts raised, %d over-loaded "
              "lowered\n", raised, lowered);
  std::printf("y vs the formula in double: max|Δ| = %.2g (output scale %.2f)\n", err, scale);
  check(err <= 1e-5 * scale, "y differs from the formula by %.3g", err);
  check(result.total_dropped() == 0, "dropped %d pairs", static_cast<int>(result.total_dropped()));
  return failed_checks == 0 ? 0 : 1;
}
