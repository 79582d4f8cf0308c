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
// Shapes (T, d, d_ff, E): prefill 4096 × 1024 × 2816 with E = 8 and E = 64; decode T = 16
// with E = 8 and E = 64. Inputs are random (a hash of the index), never zeros.
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
constexpr int k_top = 2;
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
  index_t tokens, d, d_ff, experts, p;
  sy::cuda::stream_context sc;
  sy::cuda::device_array<storage> x, w1, w2, y, dy;
  sy::cuda::device_array<float> gate, dx, gw1, gw2, ggate;
  problem(index_t t, index_t d_, index_t f, index_t e)
      : tokens(t), d(d_), d_ff(f), experts(e), p(2 * f), sc(e),
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
    return 2.0 * tokens * k_top * d * p + 2.0 * tokens * k_top * d_ff * d;
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
  const index_t rows = pb.tokens * k_top;
  const index_t rows_e = std::max<index_t>(1, rows / pb.experts);
  sy::cuda::device_array<storage> a(rows * pb.d, s), hbuf(rows * pb.p, s), out(rows * pb.d, s);
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
layer_type<Dispatch> make_layer() {
  layer_type<Dispatch> l{};
  l.router = {.k = k_top, .renormalize = true};
  if constexpr (std::is_same_v<Dispatch, sy::dispatch::padded_capacity>) {
    l.dispatch.capacity_factor = 1.25f;
  }
  return l;
}

void set_counters(benchmark::State& state, double flops, double seconds, const baselines& b,
                  double baseline_factor) {
  state.counters["TFLOPs"] = flops / seconds * 1e-12;
  state.counters["ms"] = 1e3 * seconds;
  state.counters["vs_dense"] = baseline_factor * b.dense / seconds;
  state.counters["vs_loop"] = baseline_factor * b.loop / seconds;
  state.counters["dense_ms"] = 1e3 * baseline_factor * b.dense;
  state.counters["loop_ms"] = 1e3 * baseline_factor * b.loop;
}

//! Args: T, d, d_ff, E. Forward with a caller workspace (routing, dispatch, experts, combine).
template <class Dispatch>
void BM_forward(benchmark::State& state) try {
  problem pb(state.range(0), state.range(1), state.range(2), state.range(3));
  const auto layer = make_layer<Dispatch>();
  const auto& ctx = pb.sc.get();
  const auto w = pb.weights();
  const auto rp = pb.params();
  const auto x = sy::make_view<const storage>(pb.x.data(), pb.tokens, pb.d);
  const auto y = sy::make_view(pb.y.data(), pb.tokens, pb.d);
  const auto n = sy::routing::plan_ref::required(pb.tokens, k_top, pb.experts);
  sy::cuda::device_array<std::int32_t> ids(n.slots, ctx.stream), counts(n.tokens, ctx.stream);
  sy::cuda::device_array<float> weights(n.slots, ctx.stream), logits(n.scores, ctx.stream),
      probs(n.scores, ctx.stream);
  sy::cuda::device_array<sy::routing::softmax_router_losses> losses(1, ctx.stream);
  sy::cuda::device_array<index_t> dropped(pb.experts, ctx.stream);
  const typename layer_type<Dispatch>::state_type st{
      {pb.tokens, k_top, pb.experts, ids.view(), weights.view(), counts.view(), logits.view(), probs.view()},
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
  set_counters(state, pb.forward_flops(), total / static_cast<double>(iters), time_baselines(pb, 10), 1.0);
} catch (const std::exception& e) {  // a backend error skips this benchmark, not the run
  state.SkipWithError(e.what());
}

//! Args: T, d, d_ff, E. Backward (dx, expert weight gradients, router gradients) of a forward.
template <class Dispatch>
void BM_backward(benchmark::State& state) try {
  problem pb(state.range(0), state.range(1), state.range(2), state.range(3));
  const auto layer = make_layer<Dispatch>();
  const auto& ctx = pb.sc.get();
  const auto w = pb.weights();
  const auto rp = pb.params();
  const auto x = sy::make_view<const storage>(pb.x.data(), pb.tokens, pb.d);
  const auto n = sy::routing::plan_ref::required(pb.tokens, k_top, pb.experts);
  sy::cuda::device_array<std::int32_t> ids(n.slots, ctx.stream), counts(n.tokens, ctx.stream);
  sy::cuda::device_array<float> weights(n.slots, ctx.stream), logits(n.scores, ctx.stream),
      probs(n.scores, ctx.stream);
  sy::cuda::device_array<sy::routing::softmax_router_losses> losses(1, ctx.stream);
  sy::cuda::device_array<index_t> dropped(pb.experts, ctx.stream);
  const typename layer_type<Dispatch>::state_type st{
      {pb.tokens, k_top, pb.experts, ids.view(), weights.view(), counts.view(), logits.view(), probs.view()},
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
  b->ArgNames({"T", "d", "d_ff", "E"});
  for (int e : {8, 64}) b->Args({4096, 1024, 2816, e});
  for (int e : {8, 64}) b->Args({16, 1024, 2816, e});
  b->UseManualTime()->Unit(benchmark::kMillisecond);
}

BENCHMARK(BM_forward<sy::dispatch::sorted_grouped>)->Apply(shapes);
BENCHMARK(BM_forward<sy::dispatch::padded_capacity>)->Apply(shapes);
BENCHMARK(BM_backward<sy::dispatch::sorted_grouped>)->Apply(shapes);
BENCHMARK(BM_backward<sy::dispatch::padded_capacity>)->Apply(shapes);

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
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
