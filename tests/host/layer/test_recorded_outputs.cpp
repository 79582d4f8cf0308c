// SPDX-License-Identifier: Apache-2.0
// Outputs recorded before the execution-context refactor (issue #10), compared bit for bit:
// every router × dispatch (with and without capacity drops) × element type, on toy shapes
// (blocked loops) and on batch_invariant shapes (fixed-order kernels), forward and backward,
// plus the HyperMoE add-on. Inputs come from a fixed seed (not SWITCHYARD_TEST_SEED), and
// every path measured gives the same bits on any x86-64 CPU (checked with OPENBLAS_CORETYPE
// and SWITCHYARD_FIXED_GEMM_PORTABLE), so the record holds on CI.
//
// Each output is stored as a 64-bit FNV-1a hash of its bytes (recorded_outputs.inc). To
// re-record after an intended change: SWITCHYARD_RECORD_OUTPUTS=path/to/recorded_outputs.inc
// ./host.layer.test_recorded_outputs, and say why in the commit.
#include <boost/test/unit_test.hpp>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include <switchyard/layer/hypermoe_addon.hpp>
#include <switchyard/switchyard.hpp>

#include "host/layer/hyper_setup.hpp"
#include "host/layer/layer_reference.hpp"
#include "support/random.hpp"

using namespace switchyard;

namespace {

struct recorded {
  const char* name;
  std::uint64_t hash;
};

const recorded record[] = {
#include "host/layer/recorded_outputs.inc"
};

std::uint64_t fnv1a(const void* p, std::size_t n, std::uint64_t h = 1469598103934665603ull) {
  const auto* b = static_cast<const unsigned char*>(p);
  for (std::size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 1099511628211ull;
  return h;
}
template <class V>
std::uint64_t hash_of(const V& v) {
  return fnv1a(v.data(), v.size() * sizeof(v[0]));
}

//! name → hash of everything the cases produced this run.
std::map<std::string, std::uint64_t>& produced() {
  static std::map<std::string, std::uint64_t> m;
  return m;
}

template <class R>
typename R::losses_type coefficients() {
  using L = typename R::losses_type;
  if constexpr (std::is_same_v<L, routing::softmax_router_losses>) return {0.01f, 0.02f, 0.001f};
  else if constexpr (std::is_same_v<L, routing::topp_losses>) return {0.01f, 0.02f, 0.001f};
  else if constexpr (std::is_same_v<L, routing::adaptive_gating_losses>) return {0.01f, 0.001f, 0.0f};
  else return L::uniform(0.01f);
}

template <class R>
R make_router() {
  if constexpr (std::is_same_v<R, routers::TopK>) return {.k = 2};
  else if constexpr (std::is_same_v<R, routers::TopP>) return {.p = 0.5f};
  else if constexpr (std::is_same_v<R, routers::AdaptiveGating>) return {.threshold = 0.2f};
  else return R{};
}

//! Router gradient storage: w [E, d] (or DynMoE's w_gate [d, E] and thresholds [E]).
template <class R>
struct router_grads_storage {
  std::vector<float> w, th;
  router_grads_storage(index_t experts, index_t d)
      : w(static_cast<std::size_t>(experts * d), 0.25f), th(static_cast<std::size_t>(experts), 0.25f) {}
  typename R::grads_type view(index_t experts, index_t d) {
    if constexpr (std::is_same_v<R, routers::DynMoE>) {
      return {make_view(w.data(), d, experts), make_view(th.data(), experts)};
    } else {
      return {make_view(w.data(), experts, d)};
    }
  }
};

//! One forward + backward; records the hash of every output under `name/<output>`.
template <class R, class Act, class D, class AddOn, ElementType T>
void run_case(const std::string& name, std::uint64_t seed, index_t tokens, index_t d, index_t f,
              bool fixed, const D& dispatch) {
  constexpr index_t experts = 6;
  constexpr bool gated = activation_traits<Act>::is_gated;
  constexpr bool hyper = !std::is_same_v<AddOn, no_addon>;
  std::mt19937_64 g(seed);
  test::layer_data<T> L(g, tokens, d, f, experts, gated, true);
  test::router_setup<R> rs(g, make_router<R>(), tokens, d, experts);
  const auto dyf = test::normal(g, static_cast<std::size_t>(tokens * d));
  std::vector<T> dy;
  for (float v : dyf) dy.push_back(from_float<T>(v));
  MoELayer<R, Act, D, AddOn> layer{.router = rs.router, .dispatch = dispatch, .batch_invariant = fixed};
  if constexpr (hyper) layer.addon = {.hyper = {.layer_idx = 1, .adapter_dim = 3}};
  std::vector<float> hyper_dummy;
  const test::hyper_parameters hp(g, experts, d, 4, 7, 3, 2, 2, 5, 3);
  auto hgs = hp.zeros();
  typename AddOn::params_type ap{};
  typename AddOn::grads_type ag{};
  if constexpr (hyper) {
    ap = hp.params();
    ag = hp.grads(hgs);
  }

  std::vector<T> y(static_cast<std::size_t>(tokens * d), from_float<T>(-7.0f));
  std::vector<float> dx(y.size(), 0.5f), dw1(L.w1.size(), 0.25f), db1(L.b1.size(), 0.25f),
      dw2(L.w2.size(), 0.25f), db2(L.b2.size(), 0.25f);
  router_grads_storage<R> rg(experts, d);
  typename decltype(layer)::result_type res;
  const auto xv = L.xv();
  layer.template forward<T>(switchyard::host_context{}, xv, rs.params(d), L.weights(), make_view(y.data(), tokens, d), res, {}, ap);
  layer.template backward<T>(switchyard::host_context{}, xv, rs.params(d), L.weights(), res, make_view<const T>(dy.data(), tokens, d), coefficients<R>(),
      make_view(dx.data(), tokens, d),
      {make_view(dw1.data(), experts, L.p, d), make_view(db1.data(), experts, L.p),
       make_view(dw2.data(), experts, d, f), make_view(db2.data(), experts, d)},
      rg.view(experts, d), {}, ap, ag);

  auto& out = produced();
  out[name + "/y"] = hash_of(y);
  out[name + "/dx"] = hash_of(dx);
  // Weight gradients are BLAS products over tokens even under batch_invariant (their bits
  // follow the CPU's BLAS kernels): recorded on the toy shapes only.
  if (!fixed) out[name + "/dw"] = hash_of(dw1) ^ (hash_of(db1) * 3) ^ (hash_of(dw2) * 5) ^ (hash_of(db2) * 7);
  out[name + "/router_grads"] = hash_of(rg.w) ^ (hash_of(rg.th) * 3);
  out[name + "/losses"] = fnv1a(&res.losses, sizeof(res.losses));
  out[name + "/dropped"] = hash_of(res.dropped);
  out[name + "/plan"] = hash_of(res.plan.expert_ids) ^ (hash_of(res.plan.weights) * 3) ^
                        (hash_of(res.plan.counts) * 5) ^ (hash_of(res.plan.logits) * 7) ^
                        (hash_of(res.plan.probs) * 11);
  if constexpr (hyper) {
    std::uint64_t h = 0;
    for (std::size_t i = 0; i < hgs.size(); ++i) h ^= hash_of(hgs[i]) * (2 * i + 1);
    out[name + "/addon_grads"] = h;
  }
}

template <class R, class D, ElementType T>
void cases_for(const std::string& base, std::uint64_t seed, const D& dispatch) {
  const std::string t = std::is_same_v<T, float> ? "f32" : std::is_same_v<T, switchyard::half> ? "f16" : "bf16";
  run_case<R, activation::swiglu, D, no_addon, T>(base + "/" + t + "/toy", seed, 12, 16, 24, false, dispatch);
  run_case<R, activation::swiglu, D, no_addon, T>(base + "/" + t + "/fixed", seed + 1, 40, 64, 48, true, dispatch);
}

template <class R>
void router_cases(const std::string& base, std::uint64_t seed) {
  const dispatch::padded_capacity tight{.capacity_factor = 1.0f, .min_capacity = 1, .capacity_multiple = 1};
  const dispatch::padded_capacity pass{.capacity_factor = 1.0f, .min_capacity = 1, .capacity_multiple = 1,
                                       .drop = dispatch::dropped_output::scaled_input};
  cases_for<R, dispatch::sorted_grouped, float>(base + "/sorted", seed, {});
  cases_for<R, dispatch::sorted_grouped, switchyard::half>(base + "/sorted", seed + 10, {});
  cases_for<R, dispatch::sorted_grouped, switchyard::bfloat16>(base + "/sorted", seed + 20, {});
  cases_for<R, dispatch::padded_capacity, float>(base + "/capacity", seed + 30, tight);
  cases_for<R, dispatch::padded_capacity, switchyard::half>(base + "/capacity", seed + 40, tight);
  cases_for<R, dispatch::padded_capacity, float>(base + "/pass_through", seed + 50, pass);
  cases_for<R, dispatch::dense, float>(base + "/dense", seed + 60, {});
  cases_for<R, dispatch::dense, switchyard::bfloat16>(base + "/dense", seed + 70, {});
}

void run_all() {
  if (!produced().empty()) return;
  router_cases<routers::TopK>("topk", 1000);
  router_cases<routers::TopP>("topp", 2000);
  router_cases<routers::AdaptiveGating>("adaptive", 3000);
  router_cases<routers::DynMoE>("dynmoe", 4000);
  router_cases<routers::DAMoE<routing::importance::precomputed>>("da_moe", 5000);
  run_case<routers::TopK, activation::gelu, dispatch::sorted_grouped, no_addon, float>(
      "topk/gelu/toy", 6000, 12, 16, 24, false, {});
  run_case<routers::TopK, activation::relu, dispatch::sorted_grouped, no_addon, switchyard::half>(
      "topk/relu/fixed", 6001, 40, 64, 48, true, {});
  run_case<routers::TopK, activation::swiglu, dispatch::sorted_grouped, layer::hypermoe_addon, float>(
      "hypermoe/toy", 7000, 12, 16, 24, false, {});
  run_case<routers::TopK, activation::swiglu, dispatch::sorted_grouped, layer::hypermoe_addon, float>(
      "hypermoe/fixed", 7001, 40, 64, 48, true, {});
}

}  // namespace

BOOST_AUTO_TEST_CASE(outputs_equal_the_recorded_bits) {
  run_all();
  if (const char* path = std::getenv("SWITCHYARD_RECORD_OUTPUTS")) {
    std::ofstream f(path);
    f << "// Recorded by test_recorded_outputs.cpp (SWITCHYARD_RECORD_OUTPUTS); see its header.\n";
    for (const auto& [name, h] : produced()) f << "{\"" << name << "\", " << h << "ull},\n";
    BOOST_TEST_MESSAGE("recorded " << produced().size() << " outputs to " << path);
    return;
  }
  std::map<std::string, std::uint64_t> want;
  for (const auto& r : record) want[r.name] = r.hash;
  BOOST_TEST(want.size() == produced().size(), "recorded " << want.size() << " outputs, produced "
                                                           << produced().size());
  for (const auto& [name, h] : produced()) {
    const auto it = want.find(name);
    BOOST_TEST((it != want.end()), name << " was not recorded");
    if (it != want.end()) BOOST_TEST((h == it->second), name << " differs from the recorded bits");
  }
}
