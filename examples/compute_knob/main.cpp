// SPDX-License-Identifier: Apache-2.0
// Compute knob: one top-p MoE layer serves the same batch at three compute settings (p = 0.3,
// 0.6, 0.9, each a per-call copy of the router) and once with a per-token p from a view (the
// first half of the batch "easy", p = 0.3, the second half "hard", p = 0.9). Per setting it
// prints the achieved mean k, the expert FLOPs relative to top-2 routing, and a quality proxy
// it measures: the relative error of y against the all-experts dense output
// y_dense = Σ_e P_e · FFN_e(x) (what top-p tends to as p -> 1), computed here in double.
// It checks what it prints (the counts behind mean k and FLOPs, the top-p rule per token, the
// per-token setting row by row against the uniform ones, the trade-off's direction) and exits
// non-zero, naming the check on stderr, if any fails.
#include <switchyard/switchyard.hpp>

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <random>
#include <vector>

namespace {
int failed_checks = 0;
// Reports a failed check on stderr (printf-style message); main returns 1 if any failed.
void check(bool ok, const char* format, ...) {
  if (ok) return;
  ++failed_checks;
  std::va_list args;
  va_start(args, format);
  std::fprintf(stderr, "compute_knob CHECK FAILED: ");
  std::vfprintf(stderr, format, args);
  std::fprintf(stderr, "\n");
  va_end(args);
}
double silu(double h) { return h / (1.0 + std::exp(-h)); }
}  // namespace

int main() {
  namespace sy = switchyard;
  constexpr int tokens = 64, d = 32, d_ff = 64, experts = 8;
  std::mt19937 gen(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto randn = [&](std::size_t n, float scale) {
    std::vector<float> v(n);
    for (auto& x : v) x = normal(gen) * scale;
    return v;
  };
  const auto x = randn(tokens * d, 1.0f), gate = randn(experts * d, 0.3f);
  const auto w1 = randn(experts * 2 * d_ff * d, 0.18f), w2 = randn(experts * d * d_ff, 0.12f);

  using Layer = sy::MoELayer<sy::routers::TopP, sy::activation::swiglu, sy::dispatch::sorted_grouped>;
  const sy::expert_weights<float> weights{sy::make_view<const float>(w1.data(), experts, 2 * d_ff, d), {},
                                          sy::make_view<const float>(w2.data(), experts, d, d_ff), {}};
  const sy::matrix_view<const float> xv = sy::make_view<const float>(x.data(), tokens, d);
  const sy::host_context host{};

  // Every expert's output for every token, in double: the dense reference and the plain
  // formula of y for a plan.
  std::vector<double> ffn(static_cast<std::size_t>(tokens) * experts * d);
  for (int t = 0; t < tokens; ++t)
    for (int e = 0; e < experts; ++e) {
      std::vector<double> hidden(d_ff);
      for (int f = 0; f < d_ff; ++f) {
        double g = 0.0, u = 0.0;
        for (int i = 0; i < d; ++i) {
          g += static_cast<double>(w1[(static_cast<std::size_t>(e) * 2 * d_ff + f) * d + i]) * x[t * d + i];
          u += static_cast<double>(w1[(static_cast<std::size_t>(e) * 2 * d_ff + d_ff + f) * d + i]) * x[t * d + i];
        }
        hidden[f] = silu(g) * u;
      }
      for (int i = 0; i < d; ++i) {
        double o = 0.0;
        for (int f = 0; f < d_ff; ++f) o += static_cast<double>(w2[(static_cast<std::size_t>(e) * d + i) * d_ff + f]) * hidden[f];
        ffn[(static_cast<std::size_t>(t) * experts + e) * d + i] = o;
      }
    }

  struct outcome {
    const char* name;
    sy::routing::plan_compute_report cost;
    double flops_vs_top2, rel_error;
    Layer::result_type result;
  };
  const double slot_flops = sy::routing::ffn_flops_per_slot(d, d_ff, /*gated=*/true);
  const double top2_flops = 2.0 * tokens * slot_flops;
  std::vector<double> dense(static_cast<std::size_t>(tokens) * d, 0.0);
  auto serve = [&](const char* name, float p, const sy::routing::linear_router_params& params) {
    const Layer layer{.router = {.p = p}};
    std::vector<float> y(tokens * d);
    outcome o{name, {}, 0.0, 0.0, {}};
    layer.forward(host, xv, params, weights, sy::make_view(y.data(), tokens, d), o.result);
    o.cost = sy::routing::plan_compute(o.result.plan.ref(), experts);
    o.flops_vs_top2 = o.cost.expert_flops(slot_flops) / top2_flops;
    if (dense[0] == 0.0) {  // the dense output from the first call's probabilities
      for (int t = 0; t < tokens; ++t)
        for (int e = 0; e < experts; ++e)
          for (int i = 0; i < d; ++i)
            dense[t * d + i] += o.result.plan.probs[t * experts + e] *
                                ffn[(static_cast<std::size_t>(t) * experts + e) * d + i];
    }
    double err = 0.0, norm = 0.0, formula_err = 0.0;
    for (int t = 0; t < tokens; ++t)
      for (int i = 0; i < d; ++i) {
        double want = 0.0;
        for (int j = 0; j < o.result.plan.counts[t]; ++j) {
          const int e = o.result.plan.id(t, j);
          want += o.result.plan.weight(t, j) * ffn[(static_cast<std::size_t>(t) * experts + e) * d + i];
        }
        formula_err = std::max(formula_err, std::abs(y[t * d + i] - want));
        err += (y[t * d + i] - dense[t * d + i]) * (y[t * d + i] - dense[t * d + i]);
        norm += dense[t * d + i] * dense[t * d + i];
      }
    o.rel_error = std::sqrt(err / norm);
    check(formula_err <= 1e-4, "%s: y differs from the plain formula by %.3g", name, formula_err);
    return o;
  };

  const sy::routing::linear_router_params params{sy::make_view<const float>(gate.data(), experts, d)};
  const float settings[] = {0.3f, 0.6f, 0.9f};
  std::vector<outcome> runs;
  for (float p : settings) {
    static char names[3][16];
    char* name = names[runs.size()];
    std::snprintf(name, sizeof names[0], "p = %.1f", static_cast<double>(p));
    runs.push_back(serve(name, p, params));
  }
  // Per token: the first half easy (p = 0.3), the second half hard (p = 0.9), through the view.
  std::vector<float> token_p(tokens);
  for (int t = 0; t < tokens; ++t) token_p[t] = t < tokens / 2 ? 0.3f : 0.9f;
  sy::routing::linear_router_params mixed = params;
  mixed.token_threshold = sy::make_view<const float>(token_p.data(), tokens);
  runs.push_back(serve("per-token p", 0.6f, mixed));

  std::printf("Switchyard compute knob: top-p over %d experts, %d tokens, d = %d, d_ff = %d, SwiGLU\n",
              experts, tokens, d, d_ff);
  std::printf("%-12s %8s %18s %26s\n", "setting", "mean k", "FLOPs vs top-2", "rel. error vs dense");
  for (const auto& o : runs)
    std::printf("%-12s %8.3f %17.1f%% %26.4f\n", o.name, o.cost.mean_k, 100.0 * o.flops_vs_top2,
                o.rel_error);

  // ---- checks of what was printed ----------------------------------------------------------
  for (const auto& o : runs) {
    int pairs = 0;
    for (int t = 0; t < tokens; ++t) pairs += o.result.plan.counts[t];
    check(std::abs(o.cost.mean_k - static_cast<double>(pairs) / tokens) <= 1e-12,
          "%s: mean k %.6f is not %d pairs / %d tokens", o.name, o.cost.mean_k, pairs, tokens);
    check(std::abs(o.flops_vs_top2 - pairs / (2.0 * tokens)) <= 1e-12,
          "%s: FLOPs share %.6f is not %d pairs / (2 · %d)", o.name, o.flops_vs_top2, pairs, tokens);
    check(o.result.total_dropped() == 0, "%s: dropped pairs", o.name);
  }
  // The top-p rule per token for the uniform settings: the shortest prefix above p.
  for (std::size_t s = 0; s < 3; ++s) {
    const auto& plan = runs[s].result.plan;
    for (int t = 0; t < tokens; ++t) {
      float cumulative = 0.0f;
      for (int j = 0; j < plan.counts[t]; ++j) {
        check(j == 0 || cumulative <= settings[s], "%s token %d: more experts than top-p needs",
              runs[s].name, t);
        cumulative += plan.probs[t * experts + plan.id(t, j)];
      }
      check(cumulative > settings[s] || plan.counts[t] == experts,
            "%s token %d: kept mass %.4f does not exceed p", runs[s].name, t, cumulative);
    }
  }
  // The per-token run is the p = 0.3 run on the easy half and the p = 0.9 run on the hard half.
  for (int t = 0; t < tokens; ++t) {
    const auto& want = runs[t < tokens / 2 ? 0 : 2].result.plan;
    const auto& got = runs[3].result.plan;
    bool same = got.counts[t] == want.counts[t];
    for (int j = 0; same && j < got.counts[t]; ++j)
      same = got.id(t, j) == want.id(t, j) && got.weight(t, j) == want.weight(t, j);
    check(same, "per-token p: token %d differs from the uniform p = %.1f run", t, token_p[t]);
  }
  // The trade-off's direction: more compute, closer to the dense output.
  check(runs[0].cost.mean_k < runs[1].cost.mean_k && runs[1].cost.mean_k < runs[2].cost.mean_k,
        "mean k does not grow with p");
  check(runs[0].rel_error > runs[1].rel_error && runs[1].rel_error > runs[2].rel_error,
        "the error against the dense output does not shrink as p grows");
  check(runs[3].cost.mean_k > runs[0].cost.mean_k && runs[3].cost.mean_k < runs[2].cost.mean_k,
        "the per-token setting's mean k is not between p = 0.3's and p = 0.9's");
  if (failed_checks != 0) return 1;
  std::printf("all checks passed\n");
  return 0;
}
