// Host MoE layer on a small Qwen-like shape: d = 1024, d_ff = 512, E = 64, k = 8, T = 1024,
// SwiGLU experts, top-k routing, sorted-grouped dispatch.
//
// BM_expert_gemm_phase times the layer's expert phase for a fixed plan (forward_experts:
// dispatch, gather, per-expert [n_e, d]·W1ᵀ → SwiGLU → ·W2ᵀ, combine) and, in the same
// iterations, one dense sgemm of equal FLOPs ([T·k, d] × [d, 2·d_ff + d_ff]); the counter
// `ratio` = dense time / phase time is the grouped phase's efficiency relative to one large
// GEMM (target >= 0.7 for the default layer). BM_layer_forward times the whole forward
// (routing, dispatch, gather, experts, combine) with a caller workspace.
#include <benchmark/benchmark.h>

#include <chrono>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <switchyard/switchyard.hpp>

namespace sy = switchyard;
using sy::index_t;

namespace {

constexpr index_t T = 1024, D = 1024, F = 512, E = 64, K = 8, P = 2 * F;

struct fixture {
  std::vector<float> x, gate, w1, w2, y;
  std::mt19937 gen{2026};
  fixture() : x(T * D), gate(E * D), w1(E * P * D), w2(E * D * F), y(T * D) {
    std::normal_distribution<float> n(0.0f, 1.0f);
    for (auto& v : x) v = n(gen);
    for (auto& v : gate) v = n(gen) * 0.03f;
    for (auto& v : w1) v = n(gen) * 0.03f;
    for (auto& v : w2) v = n(gen) * 0.04f;
  }
  sy::expert_weights<float> weights() const {
    return {sy::make_view<const float>(w1.data(), E, P, D), {},
            sy::make_view<const float>(w2.data(), E, D, F), {}};
  }
  sy::routing::linear_router_params params() const {
    return {sy::make_view<const float>(gate.data(), E, D)};
  }
};

using Layer = sy::MoELayer<sy::routers::TopK, sy::activation::swiglu, sy::dispatch::sorted_grouped>;

// The expert phase as a user runs it for a given plan (`forward_experts`: dispatch planning,
// gather into row panels, the per-expert GEMMs with SwiGLU, combine) and, in the same
// iterations, one dense sgemm of equal FLOPs at OpenBLAS's default threading. Arg 0: the
// default (BLAS) layer; arg 1: `batch_invariant` (fixed-order kernels for the token rows).
void BM_expert_gemm_phase(benchmark::State& state) {
  fixture f;
  Layer layer{.router = {.k = static_cast<int>(K)}};
  layer.batch_invariant = state.range(0) != 0;
  Layer::result_type res;
  layer.forward<float>(sy::host_context{}, sy::make_view<const float>(f.x.data(), T, D), f.params(), f.weights(),
                       sy::make_view(f.y.data(), T, D), res);
  const auto plan = std::as_const(res.plan).view();
  const index_t rows = res.plan.total_assignments();
  std::vector<index_t> dropped(E);
  std::vector<std::byte> ws(layer.experts_workspace_size<float>(sy::host_context{}, T, K, f.weights()));
  // Dense sgemm of equal FLOPs: [rows, D] × [D, P + F].
  std::vector<float> a(rows * D, 0.5f), b(D * (P + F), 0.01f), c(rows * (P + F));
  double phase_s = 0.0, dense_s = 0.0;
  for (auto _ : state) {
    auto t0 = std::chrono::steady_clock::now();
    layer.forward_experts<float>(sy::host_context{}, sy::make_view<const float>(f.x.data(), T, D), plan, f.weights(),
                                 sy::make_view(f.y.data(), T, D), {dropped.data(), dropped.size()},
                                 {ws.data(), ws.size()});
    auto t1 = std::chrono::steady_clock::now();
    sy::host::sgemm(sy::host::op::none, sy::host::op::none, rows, P + F, D, 1.0f, a.data(), D,
                    b.data(), P + F, 0.0f, c.data(), P + F);
    auto t2 = std::chrono::steady_clock::now();
    phase_s += std::chrono::duration<double>(t1 - t0).count();
    dense_s += std::chrono::duration<double>(t2 - t1).count();
    benchmark::DoNotOptimize(f.y.data());
    benchmark::DoNotOptimize(c.data());
  }
  const double flops = 2.0 * static_cast<double>(rows) * D * (P + F);
  const double n = static_cast<double>(state.iterations());
  state.counters["phase_ms"] = 1e3 * phase_s / n;
  state.counters["dense_ms"] = 1e3 * dense_s / n;
  state.counters["phase_GFLOPs"] = flops * n / phase_s * 1e-9;
  state.counters["dense_GFLOPs"] = flops * n / dense_s * 1e-9;
  state.counters["ratio"] = dense_s / phase_s;
  state.SetLabel(std::string(sy::host::gemm_backend_name()) +
                 (layer.batch_invariant ? ", batch_invariant" : "") +
                 ", blas_batch_invariant=" + (sy::host::blas_batch_invariant() ? "yes" : "no"));
}
BENCHMARK(BM_expert_gemm_phase)->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(3.0);

void BM_layer_forward(benchmark::State& state) {
  fixture f;
  const Layer layer{.router = {.k = static_cast<int>(K)}};
  Layer::result_type res;
  std::vector<std::byte> ws(layer.workspace_size<float>(sy::host_context{}, T, f.params(), f.weights()));
  for (auto _ : state) {
    layer.forward<float>(sy::host_context{}, sy::make_view<const float>(f.x.data(), T, D), f.params(), f.weights(),
                         sy::make_view(f.y.data(), T, D), res, {ws.data(), ws.size()});
    benchmark::DoNotOptimize(f.y.data());
  }
  state.counters["GFLOPs_experts"] = benchmark::Counter(
      2.0 * T * K * D * (P + F), benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_layer_forward)->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(2.0);

}  // namespace

BENCHMARK_MAIN();
