// Quickstart: route a batch of random tokens with the top-k router on the host backend and
// print the plan. (The whole layer takes over this example once MoELayer lands.)
#include <switchyard/switchyard.hpp>

#include <cstdio>
#include <random>
#include <vector>

int main() {
  namespace sy = switchyard;
  constexpr int tokens = 8, d = 32, experts = 8;
  std::mt19937 gen(42);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> x(tokens * d), w(experts * d);
  for (auto& v : x) v = normal(gen);
  for (auto& v : w) v = normal(gen) * 0.2f;

  const sy::routers::TopK router{.k = 2, .renormalize = true};
  sy::routing::routing_plan plan;
  sy::routing::softmax_router_losses losses;
  router.forward(sy::matrix_view<const float>(sy::make_view(x.data(), tokens, d)),
                 {sy::make_view<const float>(w.data(), experts, d)}, plan, losses);

  std::printf("Switchyard %d.%d.%d quickstart: top-%d routing of %d tokens over %d experts\n",
              sy::version.major, sy::version.minor, sy::version.patch, router.k, tokens, experts);
  for (int t = 0; t < tokens; ++t) {
    std::printf("token %d:", t);
    for (int j = 0; j < plan.counts[t]; ++j)
      std::printf("  expert %d (w=%.3f)", plan.id(t, j), plan.weight(t, j));
    std::printf("\n");
  }
  std::printf("load-balance loss (Switch) %.4f, z-loss %.4f\n", losses.lb_switch, losses.z);
  return 0;
}
