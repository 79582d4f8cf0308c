// SPDX-License-Identifier: Apache-2.0
// Switchyard's side of scripts/bench-compare (benchmarks/compare/README.md).
//
// Reads a case description written by benchmarks/compare/compare.py (JSON: family, shape,
// raw little-endian float32 files for x [T, d], the router weight [E, d], w1 [E, P, d],
// w2 [E, d, d_ff] and the cotangent g [T, d]), builds the MoELayer of that family with the
// router preset of routing/routers/presets.hpp, times forward and forward + backward
// (median of `reps` after `warmup` runs, on `threads` OpenMP threads, caller workspaces),
// and writes y, dx, the gradients, the expert ids and a result.json with the timings.
//
//   switchyard_compare --info              print host::blas_runtime() and the OpenMP threads
//   switchyard_compare CASE.json OUT_DIR   run one case
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>
#ifdef _OPENMP
#include <omp.h>
#endif

#include <switchyard/backend/host/blas_info.hpp>
#include <switchyard/routing/routers/presets.hpp>
#include <switchyard/switchyard.hpp>

namespace sy = switchyard;
using sy::index_t;
using json = nlohmann::json;
namespace fs = std::filesystem;

namespace {

std::vector<float> read_f32(const fs::path& p, std::size_t count) {
  std::ifstream in(p, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + p.string());
  std::vector<float> v(count);
  in.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(count * sizeof(float)));
  if (static_cast<std::size_t>(in.gcount()) != count * sizeof(float)) {
    throw std::runtime_error(p.string() + ": expected " + std::to_string(count * sizeof(float)) +
                             " bytes, got " + std::to_string(in.gcount()));
  }
  return v;
}

template <class V>
void write_raw(const fs::path& p, const V& v) {
  std::ofstream out(p, std::ios::binary);
  out.write(reinterpret_cast<const char*>(v.data()),
            static_cast<std::streamsize>(v.size() * sizeof(typename V::value_type)));
  if (!out) throw std::runtime_error("cannot write " + p.string());
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

double now_ms() {
  return std::chrono::duration<double, std::milli>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

json blas_json() {
  const auto& b = sy::host::blas_runtime();
  int omp = 1;
#ifdef _OPENMP
  omp = omp_get_max_threads();
#endif
  return {{"library", b.library},       {"kernel", b.kernel},   {"cpu_isa", b.cpu_isa},
          {"generic_kernels", b.generic_kernels}, {"blas_threads", b.threads},
          {"advice", b.advice},         {"omp_max_threads", omp}};
}

//! The timings: `warmup` untimed runs, then `reps` timed ones, stopping early (after at
//! least one) once `budget_ms` is spent. A warm-up run longer than the budget is the only
//! sample (compare.py does the same on the PyTorch side).
template <class F>
std::vector<double> time_runs(F&& f, int warmup, int reps, double budget_ms) {
  for (int i = 0; i < warmup; ++i) {
    const double t0 = now_ms();
    f();
    const double first = now_ms() - t0;
    if (first > budget_ms) return {first};
  }
  std::vector<double> out;
  const double start = now_ms();
  for (int i = 0; i < reps; ++i) {
    const double t0 = now_ms();
    f();
    out.push_back(now_ms() - t0);
    if (now_ms() - start > budget_ms) break;
  }
  return out;
}

template <class Act>
json run_case(const json& c, const fs::path& out_dir, const Act& act) {
  const index_t T = c.at("T").get<index_t>(), d = c.at("d").get<index_t>(),
                F = c.at("d_ff").get<index_t>(), E = c.at("E").get<index_t>(),
                k = c.at("k").get<index_t>();
  const bool gated = c.at("activation").get<std::string>() != "relu";
  const index_t P = gated ? 2 * F : F;
  const std::string family = c.at("family").get<std::string>();
  const json& files = c.at("files");
  const auto file = [&](const char* name) { return fs::path(files.at(name).get<std::string>()); };

  // x and g hold `rows` ≥ T tokens (one file for every token count): the first T are used.
  const index_t rows = c.value("token_rows", T);
  std::vector<float> x = read_f32(file("x"), static_cast<std::size_t>(rows * d));
  std::vector<float> g = read_f32(file("g"), static_cast<std::size_t>(rows * d));
  x.resize(static_cast<std::size_t>(T * d));
  g.resize(static_cast<std::size_t>(T * d));
  const std::vector<float> rw = read_f32(file("router_w"), static_cast<std::size_t>(E * d));
  const std::vector<float> w1 = read_f32(file("w1"), static_cast<std::size_t>(E * P * d));
  const std::vector<float> w2 = read_f32(file("w2"), static_cast<std::size_t>(E * d * F));

  sy::routers::ScoredTopK router;
  if (family == "deepseek_v2") {
    router = sy::routers::presets::deepseek_v2(static_cast<int>(k), 1, 1,
                                               c.value("routed_scaling_factor", 1.0f));
  } else if (family == "mixtral" || family == "qwen3_moe" || family == "olmoe" ||
             family == "switch_transformers") {
    router = sy::routers::presets::qwen_moe(static_cast<int>(k), c.at("norm_topk_prob").get<bool>());
  } else {
    throw std::runtime_error("unknown family " + family);
  }
  using Layer = sy::MoELayer<sy::routers::ScoredTopK, Act, sy::dispatch::sorted_grouped>;
  const Layer layer{.router = router, .activation = act};

  const sy::routing::scored_router_params rp{.w = sy::make_view<const float>(rw.data(), E, d)};
  const sy::expert_weights<float> w{sy::make_view<const float>(w1.data(), E, P, d), {},
                                    sy::make_view<const float>(w2.data(), E, d, F), {}};
  const auto xv = sy::make_view<const float>(x.data(), T, d);
  const auto gv = sy::make_view<const float>(g.data(), T, d);
  std::vector<float> y(static_cast<std::size_t>(T * d)), dx(y.size()), grw(rw.size()),
      gw1(w1.size()), gw2(w2.size());
  const auto yv = sy::make_view<float>(y.data(), T, d);
  const auto dxv = sy::make_view<float>(dx.data(), T, d);
  const sy::expert_grads grads{sy::make_view<float>(gw1.data(), E, P, d), {},
                               sy::make_view<float>(gw2.data(), E, d, F), {}};
  const sy::routing::scored_router_grads rg{.w = sy::make_view<float>(grw.data(), E, d)};
  const sy::host_context host{};

  typename Layer::result_type res;
  res.resize(T, k, E);
  std::vector<std::byte> fws(layer.template workspace_size<float>(host, T, rp, w));
  std::vector<std::byte> bws(layer.template backward_workspace_size<float>(host, T, rp, w));
  const sy::routing::scored_router_losses no_aux{};

  const auto forward = [&] {
    layer.template forward<float>(host, xv, rp, w, yv, res, {fws.data(), fws.size()});
  };
  // Backward accumulates (+=): the gradients are zeroed inside the timed region (PyTorch's
  // zero_grad(set_to_none) + fresh allocations are inside its timed region too).
  const auto forward_backward = [&] {
    forward();
    std::fill(dx.begin(), dx.end(), 0.0f);
    std::fill(grw.begin(), grw.end(), 0.0f);
    std::fill(gw1.begin(), gw1.end(), 0.0f);
    std::fill(gw2.begin(), gw2.end(), 0.0f);
    layer.template backward<float>(host, xv, rp, w, res, gv, no_aux, dxv, grads, rg,
                                   {bws.data(), bws.size()});
  };

  const json& timing = c.at("timing");
  const int warmup = timing.value("warmup", 1), reps = timing.value("reps", 5);
  const double budget = timing.value("budget_ms", 1e18);
  json r;
  r["forward_reps_ms"] = time_runs(forward, warmup, reps, budget);
  r["forward_ms"] = median(r["forward_reps_ms"].get<std::vector<double>>());
  if (c.value("backward", true)) {
    r["forward_backward_reps_ms"] = time_runs(forward_backward, warmup, reps, budget);
    r["forward_backward_ms"] = median(r["forward_backward_reps_ms"].get<std::vector<double>>());
  } else {
    forward_backward();  // one untimed run for the outputs
  }

  fs::create_directories(out_dir);
  write_raw(out_dir / "y.f32", y);
  write_raw(out_dir / "dx.f32", dx);
  write_raw(out_dir / "grad_router_w.f32", grw);
  write_raw(out_dir / "grad_w1.f32", gw1);
  write_raw(out_dir / "grad_w2.f32", gw2);
  std::vector<std::int32_t> ids(static_cast<std::size_t>(T * k));
  for (index_t t = 0; t < T; ++t)
    for (index_t j = 0; j < k; ++j) ids[static_cast<std::size_t>(t * k + j)] = res.plan.id(t, j);
  write_raw(out_dir / "expert_ids.i32", ids);
  r["workspace_bytes"] = {{"forward", fws.size()}, {"backward", bws.size()}};
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc == 2 && std::string(argv[1]) == "--info") {
      std::cout << blas_json().dump(2) << "\n";
      return 0;
    }
    if (argc != 3) {
      std::cerr << "usage: switchyard_compare --info | switchyard_compare CASE.json OUT_DIR\n";
      return 2;
    }
    json c;
    {
      std::ifstream in(argv[1]);
      if (!in) throw std::runtime_error(std::string("cannot open ") + argv[1]);
      in >> c;
    }
    const int threads = c.value("threads", 0);
#ifdef _OPENMP
    if (threads > 0) omp_set_num_threads(threads);
#endif
    const std::string act = c.at("activation").get<std::string>();
    json r = act == "relu" ? run_case(c, argv[2], sy::activation::relu{})
                           : run_case(c, argv[2], sy::activation::swiglu{});
    r["threads"] = threads;
    r["blas"] = blas_json();
    std::ofstream(fs::path(argv[2]) / "result.json") << r.dump(2) << "\n";
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "switchyard_compare: " << e.what() << "\n";
    return 1;
  }
}
