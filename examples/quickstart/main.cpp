// Quickstart: a top-p Mixture-of-Experts layer (SwiGLU experts, sorted-grouped dispatch) on
// random tokens, on the host backend. Prints how many experts each token used, the mean k,
// the expert FLOPs as a share of top-2's, and the router's auxiliary losses; then runs one
// backward pass.
#include <switchyard/switchyard.hpp>

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

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

  // Workspace from the size query: forward itself then allocates nothing.
  std::vector<std::byte> workspace(layer.workspace_size<float>(tokens, params, weights));
  Layer::result_type result;
  layer.forward<float>(xv, params, weights, sy::make_view(y.data(), tokens, d), result,
                       {workspace.data(), workspace.size()});

  std::printf("Switchyard %d.%d.%d quickstart: top-p (p = %.2f) over %d experts, %d tokens, "
              "d = %d, d_ff = %d, SwiGLU, GEMMs: %s\n",
              sy::version.major, sy::version.minor, sy::version.patch, layer.router.p, experts,
              tokens, d, d_ff, sy::host::gemm_backend_name());
  std::vector<int> histogram(experts + 1, 0);
  for (int t = 0; t < tokens; ++t) {
    const int k = result.plan.counts[t];
    ++histogram[k];
    std::printf("token %2d: %d expert%s ", t, k, k == 1 ? " " : "s");
    for (int j = 0; j < k; ++j) std::printf(" %d (w=%.2f)", result.plan.id(t, j), result.plan.weight(t, j));
    std::printf("\n");
  }
  std::printf("tokens per expert count:");
  for (int k = 0; k <= experts; ++k)
    if (histogram[k] != 0) std::printf("  k=%d: %d", k, histogram[k]);
  const double mean_k = result.plan.mean_k();
  std::printf("\nmean k = %.3f; expert FLOPs = %.1f%% of top-2's\n", mean_k, 100.0 * mean_k / 2.0);
  std::printf("aux losses: dynamic (entropy) %.4f, load balance %.4f, z %.4f\n",
              result.losses.dynamic_loss, result.losses.lb_loss, result.losses.z_loss);

  // One backward pass: dy = y (the gradient of ½‖y‖²), aux-loss coefficients chosen here.
  std::vector<float> dx(tokens * d), dgate(gate.size()), dw1(w1.size()), dw2(w2.size());
  const sy::routing::topp_losses coeffs{.dynamic_loss = 1e-4f, .lb_loss = 1e-2f, .z_loss = 1e-3f};
  layer.backward<float>(xv, params, weights, result, sy::make_view<const float>(y.data(), tokens, d),
                        coeffs, sy::make_view(dx.data(), tokens, d),
                        {sy::make_view(dw1.data(), experts, 2 * d_ff, d), {},
                         sy::make_view(dw2.data(), experts, d, d_ff), {}},
                        {sy::make_view(dgate.data(), experts, d)});
  double norm = 0.0;
  for (float g : dgate) norm += static_cast<double>(g) * g;
  std::printf("backward: |d gate| = %.4f\n", std::sqrt(norm));
  return 0;
}
