// SPDX-License-Identifier: Apache-2.0
// Quickstart: a top-p Mixture-of-Experts layer (SwiGLU experts, sorted-grouped dispatch) on
// random tokens, on the host backend. Prints how many experts each token used, the tokens
// each expert got, the mean k, the expert FLOPs as a share of top-2's, and the router's
// auxiliary losses; then runs one backward pass. It checks what it prints (the top-p rule, the
// counts, the output against the plain formula, the gradient against a finite difference)
// and exits non-zero, naming the check on stderr, if any fails.
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
  std::fprintf(stderr, "quickstart CHECK FAILED: ");
  std::vfprintf(stderr, format, args);
  std::fprintf(stderr, "\n");
  va_end(args);
}
double silu(double h) { return h / (1.0 + std::exp(-h)); }
}  // namespace

int main() {
  namespace sy = switchyard;
  constexpr int tokens = 16, d = 64, d_ff = 128, experts = 8;
  std::mt19937 gen(42);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto randn = [&](std::size_t n, float scale) {
    std::vector<float> v(n);
    for (auto& x : v) x = normal(gen) * scale;
    return v;
  };
  // Tokens, router gate [E, d], experts' fused [gate | up] W1 [E, 2·d_ff, d] and W2 [E, d, d_ff].
  const auto x = randn(tokens * d, 1.0f), gate = randn(experts * d, 0.2f);
  const auto w1 = randn(experts * 2 * d_ff * d, 0.125f), w2 = randn(experts * d * d_ff, 0.09f);
  std::vector<float> y(tokens * d);

  using Layer = sy::MoELayer<sy::routers::TopP, sy::activation::swiglu, sy::dispatch::sorted_grouped>;
  const Layer layer{.router = {.p = 0.4f}};
  const sy::expert_weights<float> weights{sy::make_view<const float>(w1.data(), experts, 2 * d_ff, d), {},
                                          sy::make_view<const float>(w2.data(), experts, d, d_ff), {}};
  const sy::routing::linear_router_params params{sy::make_view<const float>(gate.data(), experts, d)};
  const sy::matrix_view<const float> xv = sy::make_view<const float>(x.data(), tokens, d);

  // The execution context picks the backend: the host here (a CUDA stream + cuBLAS handle
  // would run the same calls on the GPU). Workspace from the size query: forward itself then
  // allocates nothing.
  const sy::host_context host{};
  std::vector<std::byte> workspace(layer.workspace_size(host, tokens, params, weights));
  Layer::result_type result;
  layer.forward(host, xv, params, weights, sy::make_view(y.data(), tokens, d), result, workspace);

  std::printf("Switchyard %d.%d.%d quickstart: top-p (p = %.2f) over %d experts, %d tokens, "
              "d = %d, d_ff = %d, SwiGLU, GEMMs: %s\n",
              sy::version.major, sy::version.minor, sy::version.patch, layer.router.p, experts,
              tokens, d, d_ff, sy::host::gemm_backend_name());
  std::vector<int> histogram(experts + 1, 0), per_expert(experts, 0);
  for (int t = 0; t < tokens; ++t) {
    const int k = result.plan.counts[t];
    ++histogram[k];
    std::printf("token %2d: %d expert%s ", t, k, k == 1 ? " " : "s");
    for (int j = 0; j < k; ++j) {
      std::printf(" %d (w=%.2f)", result.plan.id(t, j), result.plan.weight(t, j));
      const int e = result.plan.id(t, j);
      if (e >= 0 && e < experts) ++per_expert[e];  // range: checked below
    }
    std::printf("\n");
  }
  std::printf("tokens using k experts:");
  for (int k = 0; k <= experts; ++k)
    if (histogram[k] != 0) std::printf("  k=%d: %d", k, histogram[k]);
  std::printf("\ntokens per expert:     ");
  for (int e = 0; e < experts; ++e) std::printf("  e%d: %d", e, per_expert[e]);
  const double mean_k = result.plan.mean_k();
  std::printf("\nmean k = %.3f; expert FLOPs = %.1f%% of top-2's\n", mean_k, 100.0 * mean_k / 2.0);
  std::printf("aux losses: dynamic (entropy) %.4f, load balance %.4f, z %.4f\n",
              result.losses.dynamic_loss, result.losses.lb_loss, result.losses.z_loss);

  // ---- checks of what was printed ----------------------------------------------------------
  // Top-p's promise per token: the experts in descending probability, weights = their raw
  // probabilities (not renormalised), the shortest prefix whose float32 running sum exceeds p.
  for (int t = 0; t < tokens; ++t) {
    const int k = result.plan.counts[t];
    const float* probs = &result.plan.probs[static_cast<std::size_t>(t * experts)];
    float cumulative = 0.0f, prob_sum = 0.0f;
    for (int e = 0; e < experts; ++e) prob_sum += probs[e];
    check(std::abs(prob_sum - 1.0f) <= 1e-5f, "token %d: router probabilities sum to %.7f, not 1", t,
          prob_sum);
    check(k >= 1 && k <= experts, "token %d: %d experts, expected 1..%d", t, k, experts);
    for (int j = 0; j < k; ++j) {
      const int e = result.plan.id(t, j);
      check(e >= 0 && e < experts, "token %d slot %d: expert %d outside [0, %d)", t, j, e, experts);
      if (e < 0 || e >= experts) continue;
      check(result.plan.weight(t, j) == probs[e], "token %d slot %d: weight %.7f is not P = %.7f", t,
            j, result.plan.weight(t, j), probs[e]);
      if (j > 0)
        check(result.plan.weight(t, j) <= result.plan.weight(t, j - 1),
              "token %d: weights not in descending order at slot %d", t, j);
      check(j + 1 == k || cumulative + probs[e] <= layer.router.p,
            "token %d: the first %d experts already hold more than p, yet %d were taken", t, j + 1, k);
      cumulative += probs[e];
    }
    check(cumulative > layer.router.p || k == experts,
          "token %d: selected probability %.4f does not exceed p = %.2f", t, cumulative,
          layer.router.p);
  }
  // The histograms count every token once and every (token, expert) pair once; mean k and the
  // FLOPs share are those counts divided out (an expert FFN costs the same for every pair).
  int hist_tokens = 0, hist_pairs = 0, expert_pairs = 0;
  for (int k = 0; k <= experts; ++k) {
    hist_tokens += histogram[k];
    hist_pairs += k * histogram[k];
  }
  for (int e = 0; e < experts; ++e) expert_pairs += per_expert[e];
  check(hist_tokens == tokens, "the k histogram counts %d tokens, not %d", hist_tokens, tokens);
  check(hist_pairs == result.plan.total_assignments() && expert_pairs == hist_pairs,
        "pairs: %d by k, %d by expert, %d in the plan", hist_pairs, expert_pairs,
        static_cast<int>(result.plan.total_assignments()));
  check(std::abs(mean_k * tokens - hist_pairs) <= 1e-9, "mean k %.6f != %d pairs / %d tokens",
        mean_k, hist_pairs, tokens);
  // Every (token, expert) pair runs one expert FFN of the same cost; top-2 runs 2·T of them.
  check(std::abs(100.0 * mean_k / 2.0 - 100.0 * hist_pairs / (2.0 * tokens)) <= 1e-9,
        "FLOPs share %.4f%% is not %d pairs / (2 · %d tokens)", 100.0 * mean_k / 2.0, hist_pairs,
        tokens);
  check(result.total_dropped() == 0, "sorted_grouped dropped %d pairs",
        static_cast<int>(result.total_dropped()));
  // y against the plain formula y_t = Σ_j w_tj · W2_e (silu(W1_gate,e x_t) ⊙ W1_up,e x_t), in double.
  double max_err = 0.0;
  for (int t = 0; t < tokens; ++t) {
    std::vector<double> want(d, 0.0), hidden(d_ff);
    for (int j = 0; j < result.plan.counts[t]; ++j) {
      const int e = result.plan.id(t, j);
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
        want[i] += result.plan.weight(t, j) * o;
      }
    }
    for (int i = 0; i < d; ++i) max_err = std::max(max_err, std::abs(y[t * d + i] - want[i]));
  }
  check(max_err <= 1e-4, "y differs from the plain formula by %.3g", max_err);

  // One backward pass: dy = y (the gradient of ½‖y‖²), aux-loss coefficients chosen here.
  std::vector<float> dx(tokens * d), dgate(gate.size()), dw1(w1.size()), dw2(w2.size());
  const sy::routing::topp_losses coeffs{.dynamic_loss = 1e-4f, .lb_loss = 1e-2f, .z_loss = 1e-3f};
  layer.backward(host, xv, params, weights, result, sy::make_view<const float>(y.data(), tokens, d),
                        coeffs, sy::make_view(dx.data(), tokens, d),
                        {sy::make_view(dw1.data(), experts, 2 * d_ff, d), {},
                         sy::make_view(dw2.data(), experts, d, d_ff), {}},
                        {sy::make_view(dgate.data(), experts, d)});
  double norm = 0.0;
  for (float g : dgate) norm += static_cast<double>(g) * g;
  std::printf("backward: |d gate| = %.4f\n", std::sqrt(norm));

  // ---- checks of backward ------------------------------------------------------------------
  auto finite_nonzero = [](const std::vector<float>& v, const char* name) {
    bool finite = true, nonzero = false;
    for (float a : v) {
      finite = finite && std::isfinite(a);
      nonzero = nonzero || a != 0.0f;
    }
    check(finite, "%s has a non-finite entry", name);
    check(nonzero, "%s is all zero", name);
  };
  finite_nonzero(dx, "dx");
  finite_nonzero(dgate, "d gate");
  finite_nonzero(dw1, "dW1");
  finite_nonzero(dw2, "dW2");
  // ½‖y‖² is quadratic in W2 (the routing does not depend on it), so its central difference
  // along a random direction v equals <dW2, v> up to rounding.
  const auto v = randn(w2.size(), 0.09f);
  auto half_sq_norm = [&](float s) {
    std::vector<float> w2s(w2.size()), ys(y.size());
    for (std::size_t i = 0; i < w2.size(); ++i) w2s[i] = w2[i] + s * v[i];
    const sy::expert_weights<float> ws{weights.w1, {}, sy::make_view<const float>(w2s.data(), experts, d, d_ff), {}};
    Layer::result_type r;
    layer.forward(host, xv, params, ws, sy::make_view(ys.data(), tokens, d), r);
    double n2 = 0.0;
    for (float a : ys) n2 += 0.5 * static_cast<double>(a) * a;
    return n2;
  };
  const float step = 0.5f;
  const double fd = (half_sq_norm(step) - half_sq_norm(-step)) / (2.0 * step);
  double analytic = 0.0;
  for (std::size_t i = 0; i < w2.size(); ++i) analytic += static_cast<double>(dw2[i]) * v[i];
  std::printf("d(½|y|²) along a random W2 direction: %.5f (backward), %.5f (finite difference)\n",
              analytic, fd);
  check(std::abs(analytic - fd) <= 1e-3 * (std::abs(fd) + 1.0),
        "dW2 disagrees with the finite difference: %.6f vs %.6f", analytic, fd);

  if (failed_checks != 0) {
    std::fprintf(stderr, "quickstart: %d check(s) failed\n", failed_checks);
    return 1;
  }
  std::printf("all checks passed\n");
  return 0;
}
