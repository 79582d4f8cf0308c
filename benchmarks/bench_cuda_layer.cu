// SPDX-License-Identifier: Apache-2.0
// The CUDA MoE layer (TopK k = 2, SwiGLU experts, bfloat16 storage, float accumulation) on a
// GPU, against what a user would run instead, measured in the same run:
// - `dense`: one cuBLAS GEMM pair of equal FLOPs ([T·k, d]·[d, 2·d_ff] then [T·k, d_ff]·[d_ff, d],
//   cublasGemmEx, bf16 in/out, CUBLAS_COMPUTE_32F): the ceiling a grouped layer can approach;
// - `loop`: a per-expert loop of the same two cublasGemmEx calls on T·k/E rows each (balanced
//   routing, no gather, activation or combine: a lower bound for a hand-written loop).
//
// Every benchmark times with CUDA events around its region (manual time, the median-free mean
// Google Benchmark reports over its iterations) after a warm-up. Counters:
// - `TFLOPs`: useful FLOPs per second (forward 2·T·k·d·(2·d_ff) + 2·T·k·d_ff·d; backward three
//   times that: the recomputed forward plus the two gradient GEMMs of each projection);
// - `vs_dense` = dense time / layer time (1 = as fast as one GEMM pair of equal FLOPs);
// - `vs_loop` = loop time / layer time (> 1: the layer beats the per-expert loop).
// The baselines' times come from the same process, right after the layer's iterations.
// Backward's baselines are three times the forward baselines' (equal FLOPs).
//
// Shapes (T, d, d_ff, E, k): prefill 4096 × 1024 × 2816 with E = 8 and E = 64; decode T = 16
// with E = 8 and E = 64 (k = 2), both dispatch policies. Then the issue-14 sweep, sorted-grouped
// dispatch, real model sizes (docs/benchmarks/README.md): Mixtral-8x7B (4096, 14336, 8, 2),
// Qwen3-30B-A3B (2048, 768, 128, 8), DeepSeek-V2-Lite routed (2048, 1408, 64, 6), OLMoE-1B-7B
// (2048, 1024, 64, 8) at T = 1, 16, 64, 256, 1024, 4096, 16384 (Switch-Base-128 is left out:
// its experts are ReLU, this binary's layer SwiGLU). Inputs are random (a hash of the index),
// never zeros.
//
// Roofline (from cudaGetDeviceProperties / cudaDeviceGetAttribute, in the context and as
// counters): HBM bandwidth = 2 · memory clock · bus width; peak dense BF16 = SMs · clock · the
// tensor-core FLOPs per SM per clock of the architecture (sm_80 2048, sm_86/89 1024, sm_90 4096,
// sm_100 8192; 0 = unknown). `roofline_flops` = achieved / peak FLOP/s; `roofline_hbm` = the
// time to read the experts' weights the batch touches once (min(E, T·k) experts, bf16) and x, y
// at peak bandwidth / the measured time (the decode target: >= 0.7 at T = 1).
//
// Without a GPU it prints why and exits 0 (nothing to measure; not a failure).
#include <benchmark/benchmark.h>

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstdint>
#include <exception>
#include <type_traits>
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include <switchyard/backend/cuda.cuh>
#include <switchyard/switchyard.hpp>

namespace sy = switchyard;
using sy::index_t;

namespace {

using storage = sy::bfloat16;
constexpr int k_default = 2;
constexpr int fill_block = 256;  // threads per block of the random fill

//! x[i] = scale · u(i), u uniform in [-1, 1) from a hash of (seed, i): random, never all zeros.
template <class T>
__global__ void fill_random(T* x, index_t n, std::uint32_t seed, float scale) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    std::uint64_t h = (static_cast<std::uint64_t>(seed) << 40) ^ static_cast<std::uint64_t>(i);
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 33;
    const float u = static_cast<float>(h >> 40) * (1.0f / 8388608.0f) - 1.0f;
    x[i] = sy::from_float<T>(u * scale);
  }
}

template <class T>
void randomize(sy::cuda::device_array<T>& a, std::uint32_t seed, float scale, cudaStream_t s) {
  const index_t n = static_cast<index_t>(a.size());
  const unsigned grid = static_cast<unsigned>(std::min<index_t>((n + fill_block - 1) / fill_block, 65535));
  fill_random<<<grid, fill_block, 0, s>>>(a.data(), n, seed, scale);
  sy::cuda::check_launch("fill_random");
}

//! CUDA events around a region on a stream.
struct event_timer {
  cudaEvent_t start{}, stop{};
  event_timer() {
    sy::cuda::check(cudaEventCreate(&start), "cudaEventCreate");
    sy::cuda::check(cudaEventCreate(&stop), "cudaEventCreate");
  }
  ~event_timer() {
    (void)cudaEventDestroy(start);
    (void)cudaEventDestroy(stop);
  }
  template <class F>
  double seconds(cudaStream_t s, F&& f) {
    sy::cuda::check(cudaEventRecord(start, s), "cudaEventRecord");
    f();
    sy::cuda::check(cudaEventRecord(stop, s), "cudaEventRecord");
    sy::cuda::check(cudaEventSynchronize(stop), "cudaEventSynchronize");
    float ms = 0.0f;
    sy::cuda::check(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
    return 1e-3 * ms;
  }
};

//! One shape's weights, inputs and outputs on the device.
struct problem {
  index_t tokens, d, d_ff, experts, k, p;
  sy::cuda::stream_context sc;
  sy::cuda::device_array<storage> x, w1, w2, y, dy;
  sy::cuda::device_array<float> gate, dx, gw1, gw2, ggate;
  problem(index_t t, index_t d_, index_t f, index_t e, index_t k_)
      : tokens(t), d(d_), d_ff(f), experts(e), k(k_), p(2 * f), sc(e),
        x(t * d_, sc.stream()), w1(e * 2 * f * d_, sc.stream()), w2(e * d_ * f, sc.stream()),
        y(t * d_, sc.stream()), dy(t * d_, sc.stream()), gate(e * d_, sc.stream()),
        dx(t * d_, sc.stream()), gw1(e * 2 * f * d_, sc.stream()), gw2(e * d_ * f, sc.stream()),
        ggate(e * d_, sc.stream()) {
    const cudaStream_t s = sc.stream();
    randomize(x, 1, 1.0f, s);
    randomize(w1, 2, 1.7f / std::sqrt(static_cast<float>(d)), s);
    randomize(w2, 3, 1.7f / std::sqrt(static_cast<float>(d_ff)), s);
    randomize(dy, 4, 1.0f, s);
    randomize(gate, 5, 1.7f / std::sqrt(static_cast<float>(d)), s);
    for (auto* g : {&dx, &gw1, &gw2, &ggate}) g->fill_bytes(0);
    sc.synchronize();
  }
  [[nodiscard]] sy::expert_weights<storage> weights() const {
    return {sy::make_view<const storage>(w1.data(), experts, p, d), {},
            sy::make_view<const storage>(w2.data(), experts, d, d_ff), {}};
  }
  [[nodiscard]] sy::routing::linear_router_params params() const {
    return {sy::make_view<const float>(gate.data(), experts, d)};
  }
  [[nodiscard]] double forward_flops() const {
    return 2.0 * tokens * k * d * p + 2.0 * tokens * k * d_ff * d;
  }
  //! Bytes a forward must move at least: the weights of the experts the batch can touch (each
  //! once), x and y.
  [[nodiscard]] double forward_bytes() const {
    const double touched = static_cast<double>(std::min<index_t>(experts, tokens * k));
    return touched * static_cast<double>(p + d_ff) * d * sizeof(storage) +
           2.0 * static_cast<double>(tokens) * d * sizeof(storage);
  }
};

//! Row-major C [m, n] = A [m, k] · B[n, k]ᵀ in bf16 (float accumulation) as cuBLAS's
//! column-major Cᵀ = B · Aᵀ.
void gemm_nt(cublasHandle_t h, index_t m, index_t n, index_t k, const storage* a, const storage* b,
             storage* c) {
  const float one = 1.0f, zero = 0.0f;
  sy::cuda::check(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m),
                               static_cast<int>(k), &one, b, CUDA_R_16BF, static_cast<int>(k), a,
                               CUDA_R_16BF, static_cast<int>(k), &zero, c, CUDA_R_16BF,
                               static_cast<int>(n), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                  "cublasGemmEx");
}

//! The two baselines' seconds per forward (each the mean of `reps` timed runs after a warm-up).
struct baselines {
  double dense = 0.0, loop = 0.0;
};

baselines time_baselines(problem& pb, int reps) {
  const cudaStream_t s = pb.sc.stream();
  cublasHandle_t h = pb.sc.get().blas;
  sy::cuda::check(cublasSetStream(h, s), "cublasSetStream");
  const index_t rows = pb.tokens * pb.k;
  const index_t rows_e = std::max<index_t>(1, rows / pb.experts);
  // The loop gives every expert rows_e >= 1 rows: E·rows_e can exceed T·k (T = 16, E = 64).
  const index_t rows_all = std::max(rows, pb.experts * rows_e);
  sy::cuda::device_array<storage> a(rows_all * pb.d, s), hbuf(rows_all * pb.p, s),
      out(rows_all * pb.d, s);
  randomize(a, 6, 1.0f, s);
  randomize(hbuf, 7, 1.0f, s);
  auto dense = [&] {
    gemm_nt(h, rows, pb.p, pb.d, a.data(), pb.w1.data(), hbuf.data());
    gemm_nt(h, rows, pb.d, pb.d_ff, hbuf.data(), pb.w2.data(), out.data());
  };
  auto loop = [&] {
    for (index_t e = 0; e < pb.experts; ++e) {
      gemm_nt(h, rows_e, pb.p, pb.d, a.data() + e * rows_e * pb.d, pb.w1.data() + e * pb.p * pb.d,
              hbuf.data() + e * rows_e * pb.p);
      gemm_nt(h, rows_e, pb.d, pb.d_ff, hbuf.data() + e * rows_e * pb.p,
              pb.w2.data() + e * pb.d * pb.d_ff, out.data() + e * rows_e * pb.d);
    }
  };
  event_timer t;
  baselines b;
  dense();
  loop();
  b.dense = t.seconds(s, [&] {
    for (int i = 0; i < reps; ++i) dense();
  }) / reps;
  b.loop = t.seconds(s, [&] {
    for (int i = 0; i < reps; ++i) loop();
  }) / reps;
  return b;
}

template <class Dispatch>
using layer_type = sy::MoELayer<sy::routers::TopK, sy::activation::swiglu, Dispatch>;

template <class Dispatch>
layer_type<Dispatch> make_layer(index_t k) {
  layer_type<Dispatch> l{};
  l.router = {.k = static_cast<int>(k), .renormalize = true};
  if constexpr (std::is_same_v<Dispatch, sy::dispatch::padded_capacity>) {
    l.dispatch.capacity_factor = 1.25f;
  }
  return l;
}

//! The device's peaks (0 when unknown), read once.
struct roofline {
  double hbm_bytes_per_s = 0.0, bf16_flops_per_s = 0.0;
  std::string device;
};

const roofline& device_roofline() {
  static const roofline r = [] {
    roofline out;
    int dev = 0;
    cudaDeviceProp prop{};
    if (cudaGetDevice(&dev) != cudaSuccess || cudaGetDeviceProperties(&prop, dev) != cudaSuccess) return out;
    int mem_khz = 0, sm_khz = 0, bus_bits = prop.memoryBusWidth;
    (void)cudaDeviceGetAttribute(&mem_khz, cudaDevAttrMemoryClockRate, dev);
    (void)cudaDeviceGetAttribute(&sm_khz, cudaDevAttrClockRate, dev);
    out.device = prop.name;
    out.hbm_bytes_per_s = 2.0 * mem_khz * 1e3 * bus_bits / 8.0;
    const int cc = prop.major * 10 + prop.minor;
    // Dense BF16 tensor-core FLOPs per SM per clock (vendor peak / (SMs · boost clock)).
    const double per_sm_clk = cc == 80 ? 2048.0 : (cc == 86 || cc == 87 || cc == 89) ? 1024.0
                              : cc == 90 ? 4096.0 : cc == 100 ? 8192.0 : 0.0;
    out.bf16_flops_per_s = per_sm_clk * prop.multiProcessorCount * sm_khz * 1e3;
    return out;
  }();
  return r;
}

void set_counters(benchmark::State& state, double flops, double seconds, const baselines& b,
                  double baseline_factor, double bytes = 0.0) {
  const roofline& r = device_roofline();
  state.counters["TFLOPs"] = flops / seconds * 1e-12;
  if (r.bf16_flops_per_s > 0.0) state.counters["roofline_flops"] = flops / seconds / r.bf16_flops_per_s;
  if (bytes > 0.0 && r.hbm_bytes_per_s > 0.0) {
    state.counters["roofline_hbm"] = bytes / r.hbm_bytes_per_s / seconds;
    state.counters["GBs"] = bytes / seconds * 1e-9;
  }
  state.counters["ms"] = 1e3 * seconds;
  state.counters["vs_dense"] = baseline_factor * b.dense / seconds;
  state.counters["vs_loop"] = baseline_factor * b.loop / seconds;
  state.counters["dense_ms"] = 1e3 * baseline_factor * b.dense;
  state.counters["loop_ms"] = 1e3 * baseline_factor * b.loop;
}

//! Args: T, d, d_ff, E, k. Forward with a caller workspace (routing, dispatch, experts, combine).
template <class Dispatch>
void BM_forward(benchmark::State& state) try {
  problem pb(state.range(0), state.range(1), state.range(2), state.range(3), state.range(4));
  const auto layer = make_layer<Dispatch>(pb.k);
  const auto& ctx = pb.sc.get();
  const auto w = pb.weights();
  const auto rp = pb.params();
  const auto x = sy::make_view<const storage>(pb.x.data(), pb.tokens, pb.d);
  const auto y = sy::make_view(pb.y.data(), pb.tokens, pb.d);
  const auto n = sy::routing::plan_ref::required(pb.tokens, pb.k, pb.experts);
  sy::cuda::device_array<std::int32_t> ids(n.slots, ctx.stream), counts(n.tokens, ctx.stream);
  sy::cuda::device_array<float> weights(n.slots, ctx.stream), logits(n.scores, ctx.stream),
      probs(n.scores, ctx.stream);
  sy::cuda::device_array<sy::routing::softmax_router_losses> losses(1, ctx.stream);
  sy::cuda::device_array<index_t> dropped(pb.experts, ctx.stream);
  const typename layer_type<Dispatch>::state_type st{
      {pb.tokens, pb.k, pb.experts, ids.view(), weights.view(), counts.view(), logits.view(), probs.view()},
      losses.data(), dropped.view()};
  sy::cuda::device_array<std::byte> ws(layer.workspace_size(ctx, pb.tokens, rp, w), ctx.stream);
  auto run = [&] { layer.forward(ctx, x, rp, w, y, st, ws.bytes()); };
  run();  // warm-up (handles, module load)
  pb.sc.synchronize();
  event_timer t;
  double total = 0.0;
  std::int64_t iters = 0;
  for (auto _ : state) {
    const double sec = t.seconds(ctx.stream, run);
    state.SetIterationTime(sec);
    total += sec;
    ++iters;
  }
  sy::cuda::check_status(ctx, ws.bytes());
  set_counters(state, pb.forward_flops(), total / static_cast<double>(iters), time_baselines(pb, 10), 1.0,
               pb.forward_bytes());
} catch (const std::exception& e) {  // a backend error skips this benchmark, not the run
  state.SkipWithError(e.what());
}

//! Args: T, d, d_ff, E, k. Backward (dx, expert weight gradients, router gradients) of a forward.
template <class Dispatch>
void BM_backward(benchmark::State& state) try {
  problem pb(state.range(0), state.range(1), state.range(2), state.range(3), state.range(4));
  const auto layer = make_layer<Dispatch>(pb.k);
  const auto& ctx = pb.sc.get();
  const auto w = pb.weights();
  const auto rp = pb.params();
  const auto x = sy::make_view<const storage>(pb.x.data(), pb.tokens, pb.d);
  const auto n = sy::routing::plan_ref::required(pb.tokens, pb.k, pb.experts);
  sy::cuda::device_array<std::int32_t> ids(n.slots, ctx.stream), counts(n.tokens, ctx.stream);
  sy::cuda::device_array<float> weights(n.slots, ctx.stream), logits(n.scores, ctx.stream),
      probs(n.scores, ctx.stream);
  sy::cuda::device_array<sy::routing::softmax_router_losses> losses(1, ctx.stream);
  sy::cuda::device_array<index_t> dropped(pb.experts, ctx.stream);
  const typename layer_type<Dispatch>::state_type st{
      {pb.tokens, pb.k, pb.experts, ids.view(), weights.view(), counts.view(), logits.view(), probs.view()},
      losses.data(), dropped.view()};
  sy::cuda::device_array<std::byte> ws(
      std::max(layer.workspace_size(ctx, pb.tokens, rp, w), layer.backward_workspace_size(ctx, pb.tokens, rp, w)),
      ctx.stream);
  layer.forward(ctx, x, rp, w, sy::make_view(pb.y.data(), pb.tokens, pb.d), st, ws.bytes());
  const sy::expert_grads grads{sy::make_view(pb.gw1.data(), pb.experts, pb.p, pb.d), {},
                               sy::make_view(pb.gw2.data(), pb.experts, pb.d, pb.d_ff), {}};
  const sy::routing::linear_router_grads rgrads{sy::make_view(pb.ggate.data(), pb.experts, pb.d)};
  const sy::routing::softmax_router_losses coeffs{0.01f, 0.0f, 0.001f};
  auto run = [&] {
    layer.backward(ctx, x, rp, w, st, sy::make_view<const storage>(pb.dy.data(), pb.tokens, pb.d), coeffs,
                   sy::make_view(pb.dx.data(), pb.tokens, pb.d), grads, rgrads, ws.bytes());
  };
  run();
  pb.sc.synchronize();
  event_timer t;
  double total = 0.0;
  std::int64_t iters = 0;
  for (auto _ : state) {
    const double sec = t.seconds(ctx.stream, run);
    state.SetIterationTime(sec);
    total += sec;
    ++iters;
  }
  sy::cuda::check_status(ctx, ws.bytes());
  set_counters(state, 3.0 * pb.forward_flops(), total / static_cast<double>(iters), time_baselines(pb, 10), 3.0);
} catch (const std::exception& e) {  // a backend error skips this benchmark, not the run
  state.SkipWithError(e.what());
}

void shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"T", "d", "d_ff", "E", "k"});
  for (int e : {8, 64}) b->Args({4096, 1024, 2816, e, k_default});
  for (int e : {8, 64}) b->Args({16, 1024, 2816, e, k_default});
  b->UseManualTime()->Unit(benchmark::kMillisecond);
}

//! The issue-14 model shapes (real sizes) over T = 1 … 16384.
void model_sweep(benchmark::internal::Benchmark* b) {
  b->ArgNames({"T", "d", "d_ff", "E", "k"});
  constexpr index_t models[][4] = {{4096, 14336, 8, 2},    // Mixtral-8x7B
                                   {2048, 768, 128, 8},    // Qwen3-30B-A3B
                                   {2048, 1408, 64, 6},    // DeepSeek-V2-Lite routed experts
                                   {2048, 1024, 64, 8}};   // OLMoE-1B-7B
  for (const auto& m : models)
    for (index_t t : {1, 16, 64, 256, 1024, 4096, 16384}) b->Args({t, m[0], m[1], m[2], m[3]});
  b->UseManualTime()->Unit(benchmark::kMillisecond);
}

BENCHMARK(BM_forward<sy::dispatch::sorted_grouped>)->Apply(shapes);
BENCHMARK(BM_forward<sy::dispatch::padded_capacity>)->Apply(shapes);
BENCHMARK(BM_backward<sy::dispatch::sorted_grouped>)->Apply(shapes);
BENCHMARK(BM_backward<sy::dispatch::padded_capacity>)->Apply(shapes);
BENCHMARK(BM_forward<sy::dispatch::sorted_grouped>)->Name("BM_forward_models")->Apply(model_sweep);
BENCHMARK(BM_backward<sy::dispatch::sorted_grouped>)->Name("BM_backward_models")->Apply(model_sweep);

}  // namespace

int main(int argc, char** argv) {
  int devices = 0;
  const cudaError_t st = cudaGetDeviceCount(&devices);
  if (st != cudaSuccess || devices == 0) {
    std::printf("bench_cuda_layer: no CUDA device (%s); nothing to measure\n",
                st == cudaSuccess ? "device count 0" : cudaGetErrorName(st));
    return 0;
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  const roofline& r = device_roofline();
  benchmark::AddCustomContext("switchyard_device", r.device);
  benchmark::AddCustomContext("switchyard_hbm_GBs", std::to_string(r.hbm_bytes_per_s * 1e-9));
  benchmark::AddCustomContext("switchyard_peak_bf16_TFLOPs",
                              r.bf16_flops_per_s > 0.0 ? std::to_string(r.bf16_flops_per_s * 1e-12) : "unknown");
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
