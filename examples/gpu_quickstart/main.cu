// SPDX-License-Identifier: Apache-2.0
// GPU quickstart: the quickstart's top-k SwiGLU layer on the GPU (CUDA backend), checked
// against the same layer on the host. Builds the weights on the host, copies them to the
// device, runs forward and backward under a cuda::stream_context with caller workspaces, and
// compares the plan (identical ids and counts), y and dx (within float tolerance). Without a
// GPU it prints why and exits 77 (CTest: Skipped).
#include <switchyard/backend/cuda.cuh>
#include <switchyard/switchyard.hpp>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace sy = switchyard;  // `using namespace switchyard;` would make `cuda::` ambiguous

namespace {
int failed_checks = 0;
void check(bool ok, const char* what) {
  if (ok) return;
  ++failed_checks;
  std::fprintf(stderr, "gpu_quickstart CHECK FAILED: %s\n", what);
}
float max_rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
  float m = 0.0f;
  for (std::size_t i = 0; i < a.size(); ++i)
    m = std::max(m, std::abs(a[i] - b[i]) / (1.0f + std::abs(b[i])));
  return m;
}
}  // namespace

int main() {
  int devices = 0;
  const cudaError_t st = cudaGetDeviceCount(&devices);
  if (st == cudaErrorNoDevice || st == cudaErrorInsufficientDriver || (st == cudaSuccess && devices == 0)) {
    std::printf("SKIPPED: no CUDA device (%s)\n", cudaGetErrorName(st));
    return 77;
  }
  sy::cuda::check(st, "cudaGetDeviceCount");

  constexpr int tokens = 64, d = 64, d_ff = 128, experts = 8;
  std::mt19937 gen(42);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto randn = [&](std::size_t n, float scale) {
    std::vector<float> v(n);
    for (auto& x : v) x = normal(gen) * scale;
    return v;
  };
  const auto x = randn(tokens * d, 1.0f), gate = randn(experts * d, 0.2f);
  const auto w1 = randn(experts * 2 * d_ff * d, 0.125f), w2 = randn(experts * d * d_ff, 0.09f);
  const auto dy = randn(tokens * d, 1.0f);

  using Layer = sy::MoELayer<sy::routers::TopK, sy::activation::swiglu, sy::dispatch::sorted_grouped>;
  const Layer layer{.router = {.k = 2}};
  using sy::make_view;

  // ---- host reference --------------------------------------------------------------------
  const sy::host_context host{};
  const sy::expert_weights<float> hw{make_view<const float>(w1.data(), experts, 2 * d_ff, d), {},
                                     make_view<const float>(w2.data(), experts, d, d_ff), {}};
  const sy::routing::linear_router_params hp{make_view<const float>(gate.data(), experts, d)};
  std::vector<float> y_host(tokens * d), dx_host(tokens * d, 0.0f);
  Layer::result_type ref;
  layer.forward(host, make_view<const float>(x.data(), tokens, d), hp, hw,
                make_view(y_host.data(), tokens, d), ref);
  layer.backward(host, make_view<const float>(x.data(), tokens, d), hp, hw, ref,
                 make_view<const float>(dy.data(), tokens, d), Layer::losses_type{},
                 make_view(dx_host.data(), tokens, d), sy::expert_grads{}, Layer::router_grads{});

  // ---- the same on the GPU ---------------------------------------------------------------
  sy::cuda::stream_context gpu;
  const sy::cuda::context& ctx = gpu.get();
  sy::cuda::device_array<float> x_d(x, ctx.stream), gate_d(gate, ctx.stream), w1_d(w1, ctx.stream),
      w2_d(w2, ctx.stream), dy_d(dy, ctx.stream), y_d(tokens * d, ctx.stream),
      dx_d(tokens * d, ctx.stream);
  dx_d.fill_bytes(0);
  const sy::expert_weights<float> w{make_view<const float>(w1_d.data(), experts, 2 * d_ff, d), {},
                                    make_view<const float>(w2_d.data(), experts, d, d_ff), {}};
  const sy::routing::linear_router_params p{make_view<const float>(gate_d.data(), experts, d)};
  const int width = layer.router.width(p);
  const auto n = sy::routing::plan_ref::required(tokens, width, experts);
  sy::cuda::device_array<std::int32_t> ids(n.slots, ctx.stream), counts(n.tokens, ctx.stream);
  sy::cuda::device_array<float> weights(n.slots, ctx.stream), logits(n.scores, ctx.stream),
      probs(n.scores, ctx.stream);
  sy::cuda::device_array<Layer::losses_type> losses(1, ctx.stream);
  sy::cuda::device_array<sy::index_t> dropped(experts, ctx.stream);
  const Layer::state_type state{{tokens, width, experts, ids.view(), weights.view(), counts.view(),
                                 logits.view(), probs.view()},
                                losses.data(),
                                dropped.view()};
  sy::cuda::device_array<std::byte> ws(
      std::max(layer.workspace_size(ctx, tokens, p, w), layer.backward_workspace_size(ctx, tokens, p, w)),
      ctx.stream);

  const auto xv = make_view<const float>(x_d.data(), tokens, d);
  layer.forward(ctx, xv, p, w, make_view(y_d.data(), tokens, d), state, ws.bytes());
  layer.backward(ctx, xv, p, w, state, make_view<const float>(dy_d.data(), tokens, d),
                 Layer::losses_type{}, make_view(dx_d.data(), tokens, d), sy::expert_grads{},
                 Layer::router_grads{}, ws.bytes());
  const auto y_gpu = y_d.to_host(), dx_gpu = dx_d.to_host();
  const auto ids_gpu = ids.to_host(), counts_gpu = counts.to_host();

  check(ids_gpu == ref.plan.expert_ids, "the GPU plan's expert ids equal the host's");
  check(counts_gpu == ref.plan.counts, "the GPU plan's counts equal the host's");
  const float ey = max_rel_diff(y_gpu, y_host), edx = max_rel_diff(dx_gpu, dx_host);
  check(ey <= 1e-4f, "y within 1e-4 of the host's");
  check(edx <= 1e-4f, "dx within 1e-4 of the host's");
  std::printf("Switchyard GPU quickstart: top-2 SwiGLU, %d experts, %d tokens, d = %d, d_ff = %d\n",
              experts, tokens, d, d_ff);
  std::printf("plan equal to the host's: %s; max relative difference y %.2e, dx %.2e\n",
              ids_gpu == ref.plan.expert_ids && counts_gpu == ref.plan.counts ? "yes" : "NO", ey, edx);
  return failed_checks == 0 ? 0 : 1;
}
