// SPDX-License-Identifier: Apache-2.0
// Host MoE layer benchmarks (issue #14): the model shapes of docs/benchmarks/README.md, token
// counts 1, 16, 256, 4096, uniform and Zipf-skewed routing, each phase a user can call, and two
// baselines timed in the same iterations: one dense sgemm of equal FLOPs and the per-expert
// GEMM loop a user writes by hand. `scripts/bench` runs this binary and turns its JSON into
// docs/benchmarks/host-<date>.{json,md,png}; `--quick` (CTest `bench.quick`) runs tiny shapes.
//
// Benchmarks (Google Benchmark names; filter with --benchmark_filter=<regex>):
//   fwd/<shape>/<routing>/T:<T>     forward phases; the row's time is the whole layer forward
//   bwd/<shape>/<routing>/T:<T>     backward phases; the row's time is the whole layer backward
//   router/<shape>/<router>/T:<T>   a dynamic router's layer forward beside TopK at the same
//                                   mean k (k = round(measured mean k)); OLMoE, T = 256, 1024
// Every phase time is a user counter in milliseconds (mean over the iterations); ratios are
// counters too (`*_vs_dense` = dense time / phase time: above 1 the phase beats the dense GEMM;
// `*_vs_loop` = loop time / phase time: the speed-up over the hand-written loop). Nothing here
// asserts anything about time.
//
// Flags besides Google Benchmark's: --quick (tiny shapes, a fraction of a second each),
// --full (the models' real sizes instead of the host-scaled ones; tens of GB and hours).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <switchyard/backend/host/blas_info.hpp>
#include <switchyard/switchyard.hpp>

namespace sy = switchyard;
using sy::index_t;
using clk = std::chrono::steady_clock;

namespace {

double seconds(clk::time_point a, clk::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// ---- shapes --------------------------------------------------------------------------------

enum class mode { host, quick, full };

//! One model's MoE layer as benchmarked: the full sizes and the ones run here.
struct shape {
  std::string name;
  index_t d, d_ff, experts, k;
  bool gated;         // SwiGLU (fused [gate | up] W1) or ReLU (Switch)
  std::string scaled; // "1" or how d / d_ff were divided on the host ("d/2, d_ff/4")
  double flop_scale;  // host FLOPs per token / full-size FLOPs per token
};

shape make_shape(std::string name, index_t d, index_t f, index_t e, index_t k, bool gated,
                 index_t d_div, index_t f_div) {
  std::string s = "1";
  if (d_div > 1 || f_div > 1) {
    s.clear();
    if (d_div > 1) s += "d/" + std::to_string(d_div);
    if (f_div > 1) s += std::string(s.empty() ? "" : ", ") + "d_ff/" + std::to_string(f_div);
  }
  return {std::move(name), d / d_div, f / f_div, e, k, gated, s,
          1.0 / (static_cast<double>(d_div) * static_cast<double>(f_div))};
}

//! The shapes, scaled so that the whole host run fits in about ten minutes on 2 cores
//! (docs/benchmarks/README.md gives the reasoning); `full` keeps the real sizes.
std::vector<shape> shapes_for(mode m) {
  if (m == mode::quick) {
    return {make_shape("tiny-swiglu", 64, 128, 8, 2, true, 1, 1),
            make_shape("tiny-relu", 64, 128, 8, 1, false, 1, 1)};
  }
  const bool full = m == mode::full;
  const auto div = [&](index_t v) { return full ? index_t{1} : v; };
  return {make_shape("Mixtral-8x7B", 4096, 14336, 8, 2, true, div(4), div(8)),
          make_shape("Qwen3-30B-A3B", 2048, 768, 128, 8, true, div(2), div(1)),
          make_shape("DeepSeek-V2-Lite", 2048, 1408, 64, 6, true, div(2), div(2)),
          make_shape("OLMoE-1B-7B", 2048, 1024, 64, 8, true, div(2), div(2)),
          make_shape("Switch-Base-128", 768, 3072, 128, 1, false, div(1), div(2))};
}

std::vector<index_t> tokens_for(mode m) {
  if (m == mode::quick) return {1, 16, 64};
  return {1, 16, 256, 4096};
}

// ---- data ----------------------------------------------------------------------------------

//! Uniform floats in [-a, a] from a counter hash (splitmix64): fast enough to fill GBs.
void fill_uniform(std::vector<float>& v, float a, std::uint64_t seed) {
  for (std::size_t i = 0; i < v.size(); ++i) {
    std::uint64_t z = seed + 0x9E3779B97F4A7C15ull * (i + 1);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    const float u = static_cast<float>(z >> 40) * (1.0f / 16777216.0f);  // [0, 1)
    v[i] = a * (2.0f * u - 1.0f);
  }
}

//! Tokens, gates and expert weights of one shape for up to `tmax` tokens (kept while the
//! benchmarks of that shape run: they are registered shape by shape).
//!
//! Routing: logits = x·gᵀ with x[t][0] = 1 and g[e][0] = the expert's bias b_e, the other
//! columns random (logit spread σ = 1). Uniform: b = 0. Zipf: b_e = −s · ln(e + 1) · σ /
//! sqrt(2 ln E), s = 1.2: the Gumbel approximation of the max of E normals makes expert e the
//! top-1 choice with probability ∝ (e + 1)^−s; the benchmarks report the loads they measured.
struct data {
  shape s;
  index_t tmax, p;
  std::vector<float> x, dy, gate_uniform, gate_zipf, w1, w2;
  std::vector<float> gw1, gw2, ggate;  // gradients (allocated by the first backward)

  data(shape sh, index_t t) : s(std::move(sh)), tmax(t), p(s.gated ? 2 * s.d_ff : s.d_ff) {
    const index_t d = s.d, e = s.experts;
    x.resize(static_cast<std::size_t>(tmax * d));
    dy.resize(x.size());
    fill_uniform(x, std::sqrt(3.0f), 1);
    fill_uniform(dy, 0.01f * std::sqrt(3.0f), 2);
    for (index_t i = 0; i < tmax; ++i) x[static_cast<std::size_t>(i * d)] = 1.0f;
    gate_uniform.resize(static_cast<std::size_t>(e * d));
    // std(g) = 1/sqrt(d) and std(x) = 1: logit spread ≈ 1.
    fill_uniform(gate_uniform, std::sqrt(3.0f / static_cast<float>(d)), 3);
    gate_zipf = gate_uniform;
    const float beta = 1.0f / std::sqrt(2.0f * std::log(static_cast<float>(std::max<index_t>(e, 2))));
    for (index_t r = 0; r < e; ++r) {
      gate_uniform[static_cast<std::size_t>(r * d)] = 0.0f;
      gate_zipf[static_cast<std::size_t>(r * d)] = -1.2f * std::log(static_cast<float>(r + 1)) * beta;
    }
    w1.resize(static_cast<std::size_t>(e * p * d));
    w2.resize(static_cast<std::size_t>(e * d * s.d_ff));
    fill_uniform(w1, std::sqrt(3.0f / static_cast<float>(d)), 4);
    fill_uniform(w2, std::sqrt(3.0f / static_cast<float>(s.d_ff)), 5);
  }

  sy::expert_weights<float> weights() const {
    return {sy::make_view<const float>(w1.data(), s.experts, p, s.d), {},
            sy::make_view<const float>(w2.data(), s.experts, s.d, s.d_ff), {}};
  }
  sy::expert_grads grads() {
    if (gw1.empty()) {
      gw1.assign(w1.size(), 0.0f);
      gw2.assign(w2.size(), 0.0f);
      ggate.assign(gate_uniform.size(), 0.0f);
    }
    return {sy::make_view<float>(gw1.data(), s.experts, p, s.d), {},
            sy::make_view<float>(gw2.data(), s.experts, s.d, s.d_ff), {}};
  }
  sy::routing::linear_router_params params(bool zipf) const {
    return {sy::make_view<const float>((zipf ? gate_zipf : gate_uniform).data(), s.experts, s.d)};
  }
  sy::matrix_view<const float> tokens(index_t t) const {
    return sy::make_view<const float>(x.data(), t, s.d);
  }
};

//! The data of the shape now benchmarked (rebuilt when the shape changes; one at a time so
//! that the largest shape alone decides the memory).
data& data_for(const shape& s, index_t tmax) {
  static std::unique_ptr<data> current;
  if (!current || current->s.name != s.name || current->tmax < tmax) {
    current.reset();
    current = std::make_unique<data>(s, tmax);
  }
  return *current;
}

// ---- plan statistics -----------------------------------------------------------------------

struct plan_stats {
  index_t pairs = 0;
  double mean_k = 0.0;
  double max_load_over_mean = 0.0;  // busiest expert's rows / mean rows per expert
  double top_share = 0.0;           // share of the pairs that went to the busiest expert
  index_t touched = 0;              // experts with at least one pair (their weights are read)
};

template <class Plan>
plan_stats stats_of(const Plan& plan, index_t experts) {
  std::vector<index_t> load(static_cast<std::size_t>(experts), 0);
  plan_stats r;
  for (index_t t = 0; t < plan.num_tokens(); ++t) {
    for (index_t j = 0; j < static_cast<index_t>(plan.counts(t)); ++j) {
      const index_t e = plan.expert_ids(t, j);
      if (e >= 0 && e < experts) ++load[static_cast<std::size_t>(e)], ++r.pairs;
    }
  }
  const index_t mx = load.empty() ? 0 : *std::max_element(load.begin(), load.end());
  r.touched = static_cast<index_t>(std::count_if(load.begin(), load.end(), [](index_t v) { return v > 0; }));
  r.mean_k = plan.num_tokens() > 0 ? static_cast<double>(r.pairs) / static_cast<double>(plan.num_tokens()) : 0.0;
  if (r.pairs > 0) {
    r.max_load_over_mean = static_cast<double>(mx) * static_cast<double>(experts) / static_cast<double>(r.pairs);
    r.top_share = static_cast<double>(mx) / static_cast<double>(r.pairs);
  }
  return r;
}

// ---- baselines -----------------------------------------------------------------------------

//! One dense sgemm C [m, n] = A [m, k] · B [k, n] at the BLAS's default threads: the equal-FLOP
//! baseline (m = the plan's (token, expert) pairs, k = d, n = the expert GEMMs' total width).
struct dense_gemm {
  index_t m, n, k;
  std::vector<float> a, b, c;
  dense_gemm(index_t m_, index_t n_, index_t k_)
      : m(std::max<index_t>(m_, 1)), n(n_), k(k_),
        a(static_cast<std::size_t>(m * k)), b(static_cast<std::size_t>(k * n)),
        c(static_cast<std::size_t>(m * n)) {
    fill_uniform(a, 1.0f, 11);
    fill_uniform(b, 0.02f, 12);
  }
  double run() {
    const auto t0 = clk::now();
    sy::host::sgemm(sy::host::op::none, sy::host::op::none, m, n, k, 1.0f, a.data(), k, b.data(), n,
                    0.0f, c.data(), n);
    const auto t1 = clk::now();
    benchmark::DoNotOptimize(c.data());
    return seconds(t0, t1);
  }
};

//! The loop a user writes without Switchyard: bucket the plan's pairs by expert, and per expert
//! gather its token rows, H = X·W1ᵀ (cblas through host::sgemm, BLAS default threads), the
//! activation, Y = A·W2ᵀ, and add w · Y to the tokens' outputs. Backward: the same buckets,
//! H recomputed, dA = dY·W2, dW2 += dYᵀ·A, dH, dW1 += dHᵀ·X, dX = dH·W1, scattered into dx
//! (the combine weights' gradient ⟨dy, y_e⟩ is left out: it is O(T·k·d)).
struct expert_loop {
  index_t d, f, p, experts;
  bool gated;
  std::vector<std::vector<std::pair<index_t, float>>> bucket;
  std::vector<float> xe, he, ye, ae, dae;

  expert_loop(const shape& s, index_t tmax)
      : d(s.d), f(s.d_ff), p(s.gated ? 2 * s.d_ff : s.d_ff), experts(s.experts), gated(s.gated),
        bucket(static_cast<std::size_t>(s.experts)) {
    const auto n = static_cast<std::size_t>(tmax);
    xe.resize(n * static_cast<std::size_t>(d));
    ye.resize(n * static_cast<std::size_t>(d));
    he.resize(n * static_cast<std::size_t>(p));
    ae.resize(n * static_cast<std::size_t>(f));
    dae.resize(n * static_cast<std::size_t>(p));
  }

  template <class Plan>
  void fill_buckets(const Plan& plan) {
    for (auto& b : bucket) b.clear();
    for (index_t t = 0; t < plan.num_tokens(); ++t)
      for (index_t j = 0; j < static_cast<index_t>(plan.counts(t)); ++j)
        bucket[static_cast<std::size_t>(plan.expert_ids(t, j))].emplace_back(t, plan.weights(t, j));
  }

  static float silu(float g) { return g / (1.0f + std::exp(-g)); }

  // A [n, f] from H [n, p].
  void activate(index_t n) {
    for (index_t r = 0; r < n; ++r) {
      const float* h = he.data() + r * p;
      float* a = ae.data() + r * f;
      if (gated) {
        for (index_t i = 0; i < f; ++i) a[i] = silu(h[i]) * h[f + i];
      } else {
        for (index_t i = 0; i < f; ++i) a[i] = std::max(h[i], 0.0f);
      }
    }
  }

  template <class Plan>
  double forward(const Plan& plan, const float* x, const float* w1, const float* w2, float* y,
                 index_t tokens) {
    using sy::host::op;
    const auto t0 = clk::now();
    fill_buckets(plan);
    std::fill(y, y + tokens * d, 0.0f);
    for (index_t e = 0; e < experts; ++e) {
      const auto& b = bucket[static_cast<std::size_t>(e)];
      const auto n = static_cast<index_t>(b.size());
      if (n == 0) continue;
      for (index_t r = 0; r < n; ++r) std::copy_n(x + b[r].first * d, d, xe.data() + r * d);
      sy::host::sgemm(op::none, op::transpose, n, p, d, 1.0f, xe.data(), d, w1 + e * p * d, d, 0.0f,
                      he.data(), p);
      activate(n);
      sy::host::sgemm(op::none, op::transpose, n, d, f, 1.0f, ae.data(), f, w2 + e * d * f, f, 0.0f,
                      ye.data(), d);
      for (index_t r = 0; r < n; ++r) {
        float* out = y + b[r].first * d;
        const float wt = b[r].second;
        const float* in = ye.data() + r * d;
        for (index_t i = 0; i < d; ++i) out[i] += wt * in[i];
      }
    }
    const auto t1 = clk::now();
    benchmark::DoNotOptimize(y);
    return seconds(t0, t1);
  }

  template <class Plan>
  double backward(const Plan& plan, const float* x, const float* dy, const float* w1,
                  const float* w2, float* dx, float* gw1, float* gw2) {
    using sy::host::op;
    const auto t0 = clk::now();
    fill_buckets(plan);
    for (index_t e = 0; e < experts; ++e) {
      const auto& b = bucket[static_cast<std::size_t>(e)];
      const auto n = static_cast<index_t>(b.size());
      if (n == 0) continue;
      for (index_t r = 0; r < n; ++r) {
        std::copy_n(x + b[r].first * d, d, xe.data() + r * d);
        const float* g = dy + b[r].first * d;
        for (index_t i = 0; i < d; ++i) ye[static_cast<std::size_t>(r * d + i)] = b[r].second * g[i];
      }
      sy::host::sgemm(op::none, op::transpose, n, p, d, 1.0f, xe.data(), d, w1 + e * p * d, d, 0.0f,
                      he.data(), p);
      activate(n);
      // dA [n, f] = dY · W2 (W2 [d, f]), into dae's first f columns of each row (ld p).
      sy::host::sgemm(op::none, op::none, n, f, d, 1.0f, ye.data(), d, w2 + e * d * f, f, 0.0f,
                      dae.data(), p);
      if (gw2 != nullptr)
        sy::host::sgemm(op::transpose, op::none, d, f, n, 1.0f, ye.data(), d, ae.data(), f, 1.0f,
                        gw2 + e * d * f, f);
      for (index_t r = 0; r < n; ++r) {  // dH [n, p] in place of dA
        const float* h = he.data() + r * p;
        float* dh = dae.data() + r * p;
        for (index_t i = 0; i < f; ++i) {
          const float da = dh[i];
          if (gated) {
            const float g = h[i], sg = 1.0f / (1.0f + std::exp(-g));
            dh[i] = da * h[f + i] * sg * (1.0f + g * (1.0f - sg));
            dh[f + i] = da * g * sg;
          } else {
            dh[i] = h[i] > 0.0f ? da : 0.0f;
          }
        }
      }
      if (gw1 != nullptr)
        sy::host::sgemm(op::transpose, op::none, p, d, n, 1.0f, dae.data(), p, xe.data(), d, 1.0f,
                        gw1 + e * p * d, d);
      sy::host::sgemm(op::none, op::none, n, d, p, 1.0f, dae.data(), p, w1 + e * p * d, d, 0.0f,
                      ye.data(), d);
      for (index_t r = 0; r < n; ++r) {
        float* out = dx + b[r].first * d;
        const float* in = ye.data() + r * d;
        for (index_t i = 0; i < d; ++i) out[i] += in[i];
      }
    }
    const auto t1 = clk::now();
    benchmark::DoNotOptimize(dx);
    return seconds(t0, t1);
  }
};

// ---- timing helpers ------------------------------------------------------------------------

//! Sums of per-phase seconds over the iterations, reported as mean milliseconds.
struct phase_sums {
  std::vector<std::pair<std::string, double>> sums;
  void add(const std::string& name, double s) {
    for (auto& [n, v] : sums) {
      if (n == name) {
        v += s;
        return;
      }
    }
    sums.emplace_back(name, s);
  }
  double mean(const std::string& name, double iters) const {
    for (const auto& [n, v] : sums)
      if (n == name) return v / iters;
    return 0.0;
  }
  void report(benchmark::State& st) const {
    const double n = static_cast<double>(std::max<benchmark::IterationCount>(st.iterations(), 1));
    for (const auto& [name, v] : sums) st.counters[name + "_ms"] = 1e3 * v / n;
  }
};

template <class F>
double timed(F&& f) {
  const auto t0 = clk::now();
  f();
  return seconds(t0, clk::now());
}

void shape_counters(benchmark::State& st, const shape& s, index_t tokens, const plan_stats& ps) {
  st.counters["d"] = static_cast<double>(s.d);
  st.counters["d_ff"] = static_cast<double>(s.d_ff);
  st.counters["E"] = static_cast<double>(s.experts);
  st.counters["k"] = static_cast<double>(s.k);
  st.counters["T"] = static_cast<double>(tokens);
  st.counters["flop_scale"] = s.flop_scale;
  st.counters["pairs"] = static_cast<double>(ps.pairs);
  st.counters["mean_k"] = ps.mean_k;
  st.counters["max_load_over_mean"] = ps.max_load_over_mean;
  st.counters["top_expert_share"] = ps.top_share;
  st.counters["experts_touched"] = static_cast<double>(ps.touched);
  st.SetLabel(s.scaled == "1" ? "full size" : "scaled " + s.scaled);
}

// ---- forward -------------------------------------------------------------------------------

//! Forward, every phase a user can call, in the same iterations:
//!   route    host::router_forward (the router's GEMM, softmax, top-k), caller workspace
//!   permute  host::plan_groups (sorted_grouped counting sort) + ops::gather_rows of the token
//!            rows into expert order (the layer additionally pads each expert's rows to its row
//!            panels)
//!   experts  MoELayer::forward_experts: permute + expert GEMMs + activation + combine
//!   combine  ops::combine_slots over the tokens (detail::combine)
//!   gemm     experts − permute − combine (derived: the GEMMs and the activation)
//!   layer    MoELayer::forward, caller workspace: the row's (manual) time
//!   dense    one sgemm of the expert GEMMs' FLOPs; loop: the hand-written per-expert loop
template <class Act>
void bm_forward(benchmark::State& st, const shape& s, index_t tokens, index_t tmax, bool zipf) {
  using Layer = sy::MoELayer<sy::routers::TopK, Act>;
  data& D = data_for(s, tmax);
  const sy::host_context ctx{};
  const Layer layer{.router = {.k = static_cast<int>(s.k)}};
  const auto x = D.tokens(tokens);
  const auto rp = D.params(zipf);
  const auto w = D.weights();
  const index_t d = s.d, width = s.k, E = s.experts;
  std::vector<float> y(static_cast<std::size_t>(tokens * d));
  const auto yv = sy::make_view(y.data(), tokens, d);
  typename Layer::result_type res;
  std::vector<std::byte> ws(layer.template workspace_size<float>(ctx, tokens, rp, w));
  std::vector<std::byte> ews(layer.template experts_workspace_size<float>(ctx, tokens, width, w));
  std::vector<index_t> dropped(static_cast<std::size_t>(E));
  // route
  sy::routing::routing_plan plan;
  plan.resize(tokens, layer.router.width(rp), E);
  sy::routers::TopK::losses_type losses{};
  std::vector<std::byte> rws(std::max<std::size_t>(1, sy::host::router_workspace_size(layer.router, tokens, rp)));
  // permute / combine
  const auto npairs = static_cast<std::size_t>(tokens * width);
  std::vector<index_t> row_begin(static_cast<std::size_t>(E)), row_count(row_begin.size()),
      drop(row_begin.size()), pair_row(npairs), row_pair(npairs);
  std::vector<float> rows(npairs * static_cast<std::size_t>(d));
  sy::dispatch::expert_groups g{{row_begin.data(), row_begin.size()}, {row_count.data(), row_count.size()},
                                {drop.data(), drop.size()}, {pair_row.data(), pair_row.size()},
                                {row_pair.data(), row_pair.size()}};

  // One forward to size the baselines from the plan the layer runs.
  layer.template forward<float>(ctx, x, rp, w, yv, res, {ws.data(), ws.size()});
  const auto fplan = std::as_const(res.plan).view();
  const plan_stats ps = stats_of(fplan, E);
  const index_t p = D.p;
  dense_gemm dense(ps.pairs, p + s.d_ff, d);
  expert_loop loop(s, tokens);
  std::vector<float> y_loop(y.size());
  const double expert_flops = 2.0 * static_cast<double>(ps.pairs) * static_cast<double>(p + s.d_ff) * d;
  const double router_flops = 2.0 * static_cast<double>(tokens) * E * d;
  // The loop computes what the layer computes: max |y_loop − y| / max |y| (a counter, so a
  // baseline that drifted from the layer's math shows in the table; float32: ~1e-6).
  {
    loop.forward(fplan, D.x.data(), D.w1.data(), D.w2.data(), y_loop.data(), tokens);
    double diff = 0.0, mag = 0.0;
    for (std::size_t i = 0; i < y.size(); ++i) {
      diff = std::max(diff, static_cast<double>(std::abs(y_loop[i] - y[i])));
      mag = std::max(mag, static_cast<double>(std::abs(y[i])));
    }
    st.counters["loop_rel_diff"] = mag > 0.0 ? diff / mag : diff;
  }

  phase_sums ph;
  for (auto _ : st) {
    ph.add("route", timed([&] {
      sy::workspace_arena a({rws.data(), rws.size()});
      sy::host::router_forward(layer.router, x, rp, plan.ref(), losses, a);
    }));
    const auto pv = std::as_const(plan).view();
    ph.add("permute", timed([&] {
      sy::host::plan_groups(layer.dispatch, pv, g);
      sy::detail::run_static(g.num_rows, g.num_rows * d > (1 << 15),
                             sy::ops::gather_rows<float>{x, row_pair.data(), width, d, rows.data()});
    }));
    ph.add("experts", timed([&] {
      layer.template forward_experts<float>(ctx, x, pv, w, yv, {dropped.data(), dropped.size()},
                                            {ews.data(), ews.size()});
    }));
    ph.add("combine", timed([&] {
      sy::detail::combine<float>(pv, g, rows.data(), x, nullptr, yv);
    }));
    const double layer_s = timed([&] {
      layer.template forward<float>(ctx, x, rp, w, yv, res, {ws.data(), ws.size()});
    });
    ph.add("layer", layer_s);
    ph.add("dense", dense.run());
    ph.add("loop", loop.forward(fplan, D.x.data(), D.w1.data(), D.w2.data(), y_loop.data(), tokens));
    benchmark::DoNotOptimize(y.data());
    st.SetIterationTime(layer_s);
  }
  const double n = static_cast<double>(std::max<benchmark::IterationCount>(st.iterations(), 1));
  ph.report(st);
  const double gemm = ph.mean("experts", n) - ph.mean("permute", n) - ph.mean("combine", n);
  st.counters["gemm_ms"] = 1e3 * gemm;
  st.counters["expert_flops"] = expert_flops;
  st.counters["router_flops"] = router_flops;
  st.counters["experts_vs_dense"] = ph.mean("dense", n) / ph.mean("experts", n);
  st.counters["gemm_vs_dense"] = gemm > 0 ? ph.mean("dense", n) / gemm : 0.0;
  st.counters["layer_vs_dense"] = ph.mean("dense", n) / ph.mean("layer", n);
  st.counters["experts_vs_loop"] = ph.mean("loop", n) / ph.mean("experts", n);
  st.counters["layer_vs_loop"] = ph.mean("loop", n) / ph.mean("layer", n);
  st.counters["GFLOPs_layer"] = (expert_flops + router_flops) / ph.mean("layer", n) * 1e-9;
  // The expert weights the phase must read at least once (memory-bound at small T, where the
  // equal-FLOP dense sgemm reads one weight matrix instead of one per touched expert).
  const double weight_bytes = static_cast<double>(ps.touched) * static_cast<double>(p + s.d_ff) * d * sizeof(float);
  st.counters["weight_bytes"] = weight_bytes;
  st.counters["experts_weight_GBs"] = weight_bytes / ph.mean("experts", n) * 1e-9;
  shape_counters(st, s, tokens, ps);
}

// ---- backward ------------------------------------------------------------------------------

//! Backward of a forward done once before the loop, in the same iterations:
//!   route    host::router_backward (softmax / top-k backward and the router GEMMs' dx, dW)
//!   experts  MoELayer::backward_experts: activations recomputed, dA, dH, dX, dW1, dW2 and the
//!            combine weights' gradient (its permute and combine are not callable apart)
//!   layer    MoELayer::backward: the row's (manual) time
//!   dense    one sgemm of the expert backward's FLOPs (2 · pairs · (3P + 2 d_ff) · d: H
//!            recomputed, dX and dW1 over P, dA and dW2 over d_ff); loop: the hand-written one
template <class Act>
void bm_backward(benchmark::State& st, const shape& s, index_t tokens, index_t tmax, bool zipf) {
  using Layer = sy::MoELayer<sy::routers::TopK, Act>;
  data& D = data_for(s, tmax);
  const sy::host_context ctx{};
  const Layer layer{.router = {.k = static_cast<int>(s.k)}};
  const auto x = D.tokens(tokens);
  const auto rp = D.params(zipf);
  const auto w = D.weights();
  const auto grads = D.grads();
  const index_t d = s.d, width = s.k, E = s.experts, p = D.p;
  std::vector<float> y(static_cast<std::size_t>(tokens * d)), dx(y.size());
  const auto yv = sy::make_view(y.data(), tokens, d);
  const auto dxv = sy::make_view(dx.data(), tokens, d);
  const auto dyv = sy::make_view<const float>(D.dy.data(), tokens, d);
  const sy::routing::linear_router_grads rg{sy::make_view(D.ggate.data(), E, d)};
  typename Layer::result_type res;
  {
    std::vector<std::byte> fws(layer.template workspace_size<float>(ctx, tokens, rp, w));
    layer.template forward<float>(ctx, x, rp, w, yv, res, {fws.data(), fws.size()});
  }
  std::vector<std::byte> ws(layer.template backward_workspace_size<float>(ctx, tokens, rp, w));
  std::vector<std::byte> ews(layer.template experts_backward_workspace_size<float>(ctx, tokens, width, w));
  std::vector<std::byte> rws(std::max<std::size_t>(1, sy::host::router_workspace_size(layer.router, tokens, rp)));
  std::vector<float> d_weights(static_cast<std::size_t>(tokens * width));
  const typename Layer::losses_type coeffs{};
  const auto fplan = std::as_const(res.plan).view();
  const plan_stats ps = stats_of(fplan, E);
  dense_gemm dense(ps.pairs, 3 * p + 2 * s.d_ff, d);
  expert_loop loop(s, tokens);
  const double expert_flops = 2.0 * static_cast<double>(ps.pairs) * static_cast<double>(3 * p + 2 * s.d_ff) * d;
  const double router_flops = 4.0 * static_cast<double>(tokens) * E * d;
  // The loop computes what the layer computes: dx of the expert phase alone (no weight
  // gradients on either side), max |dx_loop − dx| / max |dx|.
  {
    std::vector<float> dx_layer(dx.size(), 0.0f), dx_loop(dx.size(), 0.0f);
    layer.template backward_experts<float>(ctx, x, fplan, w, dyv, sy::make_view(dx_layer.data(), tokens, d),
                                           sy::expert_grads{}, {d_weights.data(), d_weights.size()},
                                           {ews.data(), ews.size()});
    loop.backward(fplan, D.x.data(), D.dy.data(), D.w1.data(), D.w2.data(), dx_loop.data(), nullptr, nullptr);
    double diff = 0.0, mag = 0.0;
    for (std::size_t i = 0; i < dx.size(); ++i) {
      diff = std::max(diff, static_cast<double>(std::abs(dx_loop[i] - dx_layer[i])));
      mag = std::max(mag, static_cast<double>(std::abs(dx_layer[i])));
    }
    st.counters["loop_rel_diff"] = mag > 0.0 ? diff / mag : diff;
  }

  phase_sums ph;
  for (auto _ : st) {
    ph.add("experts", timed([&] {
      layer.template backward_experts<float>(ctx, x, fplan, w, dyv, dxv, grads,
                                             {d_weights.data(), d_weights.size()},
                                             {ews.data(), ews.size()});
    }));
    ph.add("route", timed([&] {
      sy::workspace_arena a({rws.data(), rws.size()});
      sy::host::router_backward(layer.router, x, rp, res.plan.ref(), d_weights.data(), coeffs, dxv,
                                rg, a);
    }));
    const double layer_s = timed([&] {
      layer.template backward<float>(ctx, x, rp, w, res, dyv, coeffs, dxv, grads, rg,
                                     {ws.data(), ws.size()});
    });
    ph.add("layer", layer_s);
    ph.add("dense", dense.run());
    ph.add("loop", loop.backward(fplan, D.x.data(), D.dy.data(), D.w1.data(), D.w2.data(), dx.data(),
                                 D.gw1.data(), D.gw2.data()));
    benchmark::DoNotOptimize(dx.data());
    st.SetIterationTime(layer_s);
  }
  const double n = static_cast<double>(std::max<benchmark::IterationCount>(st.iterations(), 1));
  ph.report(st);
  st.counters["expert_flops"] = expert_flops;
  st.counters["router_flops"] = router_flops;
  st.counters["experts_vs_dense"] = ph.mean("dense", n) / ph.mean("experts", n);
  st.counters["layer_vs_dense"] = ph.mean("dense", n) / ph.mean("layer", n);
  st.counters["experts_vs_loop"] = ph.mean("loop", n) / ph.mean("experts", n);
  st.counters["layer_vs_loop"] = ph.mean("loop", n) / ph.mean("layer", n);
  st.counters["GFLOPs_layer"] = (expert_flops + router_flops) / ph.mean("layer", n) * 1e-9;
  shape_counters(st, s, tokens, ps);
}

// ---- dynamic routers -----------------------------------------------------------------------

enum class dyn { topp04, topp06, dynmoe, adaptive };

const char* dyn_name(dyn r) {
  switch (r) {
    case dyn::topp04: return "TopP-0.4";
    case dyn::topp06: return "TopP-0.6";
    case dyn::dynmoe: return "DynMoE";
    case dyn::adaptive: return "AdaptiveGating-0.1";
  }
  return "?";
}

//! Times `layer.forward` with router policy R and the TopK layer at k = round(mean k of R's
//! plan) in the same iterations. `dyn_vs_topk_same_flops` = (TopK time / k) / (dynamic time /
//! mean k): 1 means the dynamic router costs what TopK costs per routed pair.
template <class Layer>
void run_dynamic(benchmark::State& st, const shape& s, index_t tokens, const Layer& layer,
                 const typename Layer::router_params& rp, data& D) {
  const sy::host_context ctx{};
  const auto x = D.tokens(tokens);
  const auto w = D.weights();
  std::vector<float> y(static_cast<std::size_t>(tokens * s.d));
  const auto yv = sy::make_view(y.data(), tokens, s.d);
  typename Layer::result_type res;
  std::vector<std::byte> ws(layer.template workspace_size<float>(ctx, tokens, rp, w));
  layer.template forward<float>(ctx, x, rp, w, yv, res, {ws.data(), ws.size()});
  const plan_stats ps = stats_of(std::as_const(res.plan).view(), s.experts);
  const index_t k = std::clamp<index_t>(static_cast<index_t>(std::lround(ps.mean_k)), 1, s.experts);
  using TopKLayer = sy::MoELayer<sy::routers::TopK, sy::activation::swiglu>;
  const TopKLayer topk{.router = {.k = static_cast<int>(k)}};
  const auto trp = D.params(false);
  typename TopKLayer::result_type tres;
  std::vector<std::byte> tws(topk.template workspace_size<float>(ctx, tokens, trp, w));
  phase_sums ph;
  for (auto _ : st) {
    const double dyn_s = timed([&] {
      layer.template forward<float>(ctx, x, rp, w, yv, res, {ws.data(), ws.size()});
    });
    ph.add("layer", dyn_s);
    ph.add("topk_layer", timed([&] {
      topk.template forward<float>(ctx, x, trp, w, yv, tres, {tws.data(), tws.size()});
    }));
    benchmark::DoNotOptimize(y.data());
    st.SetIterationTime(dyn_s);
  }
  const double n = static_cast<double>(std::max<benchmark::IterationCount>(st.iterations(), 1));
  ph.report(st);
  const double expert_flops = 2.0 * static_cast<double>(ps.pairs) * static_cast<double>(D.p + s.d_ff) * s.d;
  st.counters["expert_flops"] = expert_flops;
  st.counters["router_flops"] = 2.0 * static_cast<double>(tokens) * s.experts * s.d;
  st.counters["topk_k"] = static_cast<double>(k);
  st.counters["dyn_vs_topk_same_flops"] =
      (ph.mean("topk_layer", n) / static_cast<double>(k)) / (ph.mean("layer", n) / std::max(ps.mean_k, 1e-9));
  st.counters["GFLOPs_layer"] = expert_flops / ph.mean("layer", n) * 1e-9;
  shape_counters(st, s, tokens, ps);
}

void bm_dynamic(benchmark::State& st, const shape& s, index_t tokens, index_t tmax, dyn r) {
  data& D = data_for(s, tmax);
  const auto rp = D.params(false);
  using sw = sy::activation::swiglu;
  switch (r) {
    case dyn::topp04:
    case dyn::topp06: {
      const sy::MoELayer<sy::routers::TopP, sw> layer{.router = {.p = r == dyn::topp04 ? 0.4f : 0.6f}};
      run_dynamic(st, s, tokens, layer, rp, D);
      return;
    }
    case dyn::adaptive: {
      const sy::MoELayer<sy::routers::AdaptiveGating, sw> layer{.router = {.threshold = 0.1f}};
      run_dynamic(st, s, tokens, layer, rp, D);
      return;
    }
    case dyn::dynmoe: {
      // DynMoE's gate is [d, E] (one column per expert, cosine scores). Thresholds G_e = the
      // (1 − k/E) quantile of the tokens' cosines, so that its mean k lands near the shape's k;
      // eval mode (a token above no threshold goes to its best expert).
      const index_t d = s.d, E = s.experts;
      std::vector<float> wg(static_cast<std::size_t>(d * E));
      for (index_t e = 0; e < E; ++e)
        for (index_t i = 0; i < d; ++i) wg[static_cast<std::size_t>(i * E + e)] = D.gate_uniform[static_cast<std::size_t>(e * d + i)];
      std::vector<double> cosv;
      for (index_t t = 0; t < tokens; ++t) {
        const float* xt = D.x.data() + t * d;
        double xx = 0.0;
        for (index_t i = 0; i < d; ++i) xx += static_cast<double>(xt[i]) * xt[i];
        for (index_t e = 0; e < E; ++e) {
          const float* ge = D.gate_uniform.data() + e * d;
          double xg = 0.0, gg = 0.0;
          for (index_t i = 0; i < d; ++i) xg += static_cast<double>(xt[i]) * ge[i], gg += static_cast<double>(ge[i]) * ge[i];
          cosv.push_back(xg / std::sqrt(xx * gg + 1e-30));
        }
      }
      const auto q = static_cast<std::size_t>(std::clamp<double>(
          static_cast<double>(cosv.size()) * (1.0 - static_cast<double>(s.k) / static_cast<double>(E)), 0.0,
          static_cast<double>(cosv.size() - 1)));
      std::nth_element(cosv.begin(), cosv.begin() + static_cast<std::ptrdiff_t>(q), cosv.end());
      std::vector<float> thr(static_cast<std::size_t>(E), static_cast<float>(cosv[q]));
      std::vector<std::int32_t> mask(static_cast<std::size_t>(E), 1);
      const sy::routing::dynmoe_params dp{sy::make_view<const float>(wg.data(), d, E),
                                          sy::make_view<const float>(thr.data(), E),
                                          sy::make_view<const std::int32_t>(mask.data(), E), 0.0f};
      const sy::MoELayer<sy::routers::DynMoE, sw> layer{.router = {.training = false}};
      run_dynamic(st, s, tokens, layer, dp, D);
      return;
    }
  }
}

// ---- registration and context --------------------------------------------------------------

//! Per-benchmark min time: a few iterations of the small cases, one of the large ones (the
//! whole host run stays under about ten minutes on 2 cores).
double min_time_for(mode m, index_t tokens) {
  if (m == mode::quick) return 0.002;
  return tokens >= 4096 ? 0.05 : tokens >= 256 ? 0.2 : 0.3;
}

void register_all(mode m) {
  const auto shapes = shapes_for(m);
  const auto toks = tokens_for(m);
  const index_t tmax = toks.back();
  for (const shape& s : shapes) {
    for (const bool zipf : {false, true}) {
      for (const index_t t : toks) {
        const std::string name = s.name + "/" + (zipf ? "zipf" : "uniform") + "/T:" + std::to_string(t);
        auto* f = benchmark::RegisterBenchmark(("fwd/" + name).c_str(), [s, t, tmax, zipf](benchmark::State& st) {
          if (s.gated) bm_forward<sy::activation::swiglu>(st, s, t, tmax, zipf);
          else bm_forward<sy::activation::relu>(st, s, t, tmax, zipf);
        });
        f->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(min_time_for(m, t));
        // Backward on both routings but, at 4096 tokens, on uniform routing only (time budget).
        if (zipf && t >= 4096 && m != mode::full) continue;
        auto* b = benchmark::RegisterBenchmark(("bwd/" + name).c_str(), [s, t, tmax, zipf](benchmark::State& st) {
          if (s.gated) bm_backward<sy::activation::swiglu>(st, s, t, tmax, zipf);
          else bm_backward<sy::activation::relu>(st, s, t, tmax, zipf);
        });
        b->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(min_time_for(m, t));
      }
    }
    // Dynamic routers on one shape: OLMoE (k = 8 of 64), or the first quick shape; T = 256
    // and 1024 (4096 would add about half a minute per router: the time budget).
    if (s.name != "OLMoE-1B-7B" && s.name != "tiny-swiglu") continue;
    for (const dyn r : {dyn::topp04, dyn::topp06, dyn::dynmoe, dyn::adaptive}) {
      for (const index_t t : m == mode::quick ? std::vector<index_t>{64} : std::vector<index_t>{256, 1024}) {
        const std::string name = "router/" + s.name + "/" + dyn_name(r) + "/T:" + std::to_string(t);
        benchmark::RegisterBenchmark(name.c_str(), [s, t, tmax, r](benchmark::State& st) {
          bm_dynamic(st, s, t, tmax, r);
        })->UseManualTime()->Unit(benchmark::kMillisecond)->MinTime(min_time_for(m, t));
      }
    }
  }
}

std::string cpu_model() {
  std::ifstream in("/proc/cpuinfo");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind("model name", 0) == 0) {
      const auto c = line.find(':');
      if (c != std::string::npos) return line.substr(line.find_first_not_of(' ', c + 1));
    }
  }
  return "unknown";
}

void add_context(mode m) {
  const auto& b = sy::host::blas_runtime();
  benchmark::AddCustomContext("switchyard_blas", b.library);
  benchmark::AddCustomContext("switchyard_blas_kernel", b.kernel.empty() ? "unknown" : b.kernel);
  benchmark::AddCustomContext("switchyard_blas_generic_kernels", b.generic_kernels ? "yes" : "no");
  benchmark::AddCustomContext("switchyard_blas_threads", std::to_string(b.threads));
  benchmark::AddCustomContext("switchyard_cpu_isa", b.cpu_isa);
  benchmark::AddCustomContext("switchyard_cpu_model", cpu_model());
#ifdef _OPENMP
  benchmark::AddCustomContext("switchyard_omp_threads", std::to_string(omp_get_max_threads()));
#else
  benchmark::AddCustomContext("switchyard_omp_threads", "1 (no OpenMP)");
#endif
  benchmark::AddCustomContext("switchyard_compiler",
#if defined(__clang__)
                              std::string("clang ") + __clang_version__
#elif defined(__GNUC__)
                              std::string("g++ ") + __VERSION__
#else
                              std::string("unknown")
#endif
  );
  benchmark::AddCustomContext("switchyard_shapes", m == mode::quick ? "quick" : m == mode::full ? "full" : "host-scaled");
  if (const char* c = std::getenv("SWITCHYARD_BENCH_COMMIT")) benchmark::AddCustomContext("switchyard_git_commit", c);
  if (b.generic_kernels) benchmark::AddCustomContext("switchyard_blas_advice", b.advice);
}

}  // namespace

int main(int argc, char** argv) {
  mode m = mode::host;
  int out = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--quick") m = mode::quick;
    else if (a == "--full") m = mode::full;
    else argv[out++] = argv[i];
  }
  argc = out;
  register_all(m);
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  add_context(m);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
