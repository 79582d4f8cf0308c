// SPDX-License-Identifier: Apache-2.0
#pragma once
// The GPU layer's forward against the host layer: one templated body per layer type
// (`forward_matches_host<Layer, RouterKit, AddOnKit>`), run over the three storage types, a
// few shapes and the router's and dispatch's runtime variants, so that each layer type is
// instantiated once per translation unit.
//
// Each run: seeded random inputs (never zeros); the host layer's forward; the device forward
// twice (with a poisoned caller workspace, then with the convenience path) into outputs
// poisoned with 0xFF bytes; the two device runs must agree bitwise; the device's plan ids and
// counts must equal the host's (up to compare.cuh's near-tie allowance), logits, probs, plan
// weights and losses within the routing tolerance, the per-expert drops exactly and y within
// the storage type's tolerance (compare.cuh).
#include <boost/mp11/algorithm.hpp>
#include <boost/mp11/list.hpp>
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <cstring>
#include <exception>
#include <functional>
#include <utility>
#include <random>
#include <tuple>
#include <type_traits>
#include <vector>

#include <switchyard/backend/cuda.cuh>
#include <switchyard/switchyard.hpp>

#include "cuda/support/compare.cuh"
#include "cuda/support/device_mirror.cuh"
#include "cuda/support/layer_kits.cuh"
#include "host/layer/layer_reference.hpp"
#include "support/random.hpp"

namespace switchyard::test::gpu {

//! The storage types every layer test runs.
using dtypes = boost::mp11::mp_list<float, half, bfloat16>;

//! One problem size.
struct shape {
  index_t tokens, d, d_ff, experts;
  const char* name;
};

//! The forward shapes for a router of plan width `width`: decode (T = 1: at least E - width
//! experts get no token), a small odd-sized batch over 16 experts (several get none), and a
//! batch with T·width > 2048 (`tuning::block_sort_max_pairs`: the device radix-sort path).
inline std::vector<shape> forward_shapes(index_t width) {
  const index_t big = sy::cuda::tuning::block_sort_max_pairs / std::max<index_t>(width, 1) + 64;
  return {{1, 32, 24, 8, "decode T=1"},
          {37, 19, 13, 16, "T=37 d=19 d_ff=13 E=16"},
          {big, 64, 48, 8, "T*width > 2048 (radix sort)"}};
}

//! A layer of the given policies with one router and dispatch variant.
template <class Layer>
Layer make_layer(const typename Layer::router_type& r, const typename Layer::dispatch_type& d) {
  Layer l{};
  l.router = r;
  l.dispatch = d;
  l.addon = addon_kit<typename Layer::addon_type>::make();
  return l;
}

//! Sets the first projection of every masked expert to NaN (the device must never read it).
template <class RK, ElementType T>
void poison_masked_experts(const RK& rk, layer_data<T>& L) {
  for (index_t e = 0; e < L.experts; ++e) {
    if (!rk.masked(e)) continue;
    for (index_t i = 0; i < L.p * L.d; ++i) L.w1[e * L.p * L.d + i] = from_float<T>(NAN);
  }
}

//! What the runs of one test case saw (checked once at its end).
struct forward_coverage {
  bool empty_expert = false;   //!< some active expert received no token
  bool radix_path = false;     //!< some run had T·width > block_sort_max_pairs
  bool decode = false;         //!< some run had T = 1
  bool dropped = false;        //!< some run dropped pairs (capacity)
};

//! What one forward produced, as host data (the comparisons are not templates: one copy of
//! them serves every layer type and dtype).
struct forward_outputs {
  routing::routing_plan plan;
  std::vector<float> losses;
  std::vector<index_t> dropped;
  std::vector<double> y;             //!< y as double
  std::vector<unsigned char> y_bits;  //!< y's bytes (determinism)

  template <class Losses, ElementType T>
  static forward_outputs of(const moe_result<Losses>& r, const std::vector<T>& y) {
    return of(r.plan, r.losses, r.dropped, y);
  }
  template <class Losses, ElementType T>
  static forward_outputs of(routing::routing_plan plan, const Losses& losses,
                            std::vector<index_t> dropped, const std::vector<T>& y) {
    forward_outputs o;
    o.plan = std::move(plan);
    o.losses = loss_values(losses);
    o.dropped = std::move(dropped);
    o.y.reserve(y.size());
    for (const T& v : y) o.y.push_back(as_double(v));
    o.y_bits.resize(y.size() * sizeof(T));
    if (!y.empty()) std::memcpy(o.y_bits.data(), y.data(), o.y_bits.size());
    return o;
  }
};

//! The forward checks of the file comment: `dev` and `dev2` are two device runs, `host` the
//! host layer's; `host_on_plan(plan)` gives the host's y and drops on another plan (after a
//! near-tie flip); `masked` [E] marks experts no plan may use.
inline void compare_forward(const forward_outputs& dev, const forward_outputs& dev2,
                            const forward_outputs& host, tolerance y_tol,
                            const std::vector<char>& masked,
                            const std::function<forward_outputs(const routing::routing_plan&)>& host_on_plan,
                            forward_coverage& cov) {
  const routing::routing_plan& pd = dev.plan;
  const routing::routing_plan& ph = host.plan;
  const index_t tokens = ph.num_tokens, width = ph.width, experts = ph.num_experts;
  BOOST_TEST_REQUIRE((pd.num_tokens == tokens && pd.width == width && pd.num_experts == experts));

  // Determinism: the second run gives the same bits.
  BOOST_TEST(same_bits(dev.y_bits, dev2.y_bits), "y differs between two device forwards");
  BOOST_TEST(same_bits(pd.expert_ids, dev2.plan.expert_ids), "plan ids differ between runs");
  BOOST_TEST(same_bits(pd.counts, dev2.plan.counts), "plan counts differ between runs");
  BOOST_TEST(same_bits(pd.weights, dev2.plan.weights), "plan weights differ between runs");
  BOOST_TEST(same_bits(pd.logits, dev2.plan.logits), "logits differ between runs");
  BOOST_TEST(same_bits(pd.probs, dev2.plan.probs), "probs differ between runs");
  BOOST_TEST(same_bits(dev.losses, dev2.losses), "losses differ between runs");
  BOOST_TEST(same_bits(dev.dropped, dev2.dropped), "dropped differs between runs");

  // A masked expert is never used.
  for (index_t t = 0; t < tokens; ++t)
    for (index_t j = 0; j < pd.counts[t] && j < width; ++j) {
      const auto e = pd.id(t, j);
      if (e >= 0 && e < experts && masked[static_cast<std::size_t>(e)]) {
        BOOST_ERROR("token " << t << " routed to masked expert " << e);
      }
    }

  // The plan: ids and counts identical (near-tie allowance), scores and weights close.
  const std::vector<char> flips = selection_mismatch(pd, ph);
  index_t n_flips = 0;
  for (index_t t = 0; t < tokens; ++t) {
    if (!flips[static_cast<std::size_t>(t)]) continue;
    ++n_flips;
    if (n_flips <= 5) report_flip(pd, ph, t);
  }
  BOOST_TEST(n_flips <= allowed_flips(tokens),
             n_flips << " tokens select other experts than on the host (allowed "
                     << allowed_flips(tokens) << ")");
  expect_close("logits", pd.logits, ph.logits, routing_tolerance);
  expect_close("probs", pd.probs, ph.probs, routing_tolerance);
  expect_close("plan.weights", pd.weights, ph.weights, routing_tolerance, flips,
               static_cast<std::size_t>(width));
  const double slack = tokens > 0 ? 4.0 * static_cast<double>(n_flips) / static_cast<double>(tokens) : 0.0;
  for (std::size_t i = 0; i < dev.losses.size() && i < host.losses.size(); ++i) {
    const double got = dev.losses[i], want = host.losses[i];
    const double lim = loss_tolerance.rel * std::abs(want) + loss_tolerance.abs + slack * (1.0 + std::abs(want));
    BOOST_TEST(std::abs(got - want) <= lim, "losses field " << i << ": device " << got << ", host " << want);
  }

  // y and the drops on the same selection: the host forward, or (after a near-tie flip) the
  // host's forward_experts on the device's plan.
  if (n_flips > 0) {
    const forward_outputs ref = host_on_plan(pd);
    BOOST_TEST(dev.dropped == ref.dropped, boost::test_tools::per_element());
    expect_close("y", dev.y, ref.y, y_tol);
  } else {
    BOOST_TEST(dev.dropped == host.dropped, boost::test_tools::per_element());
    expect_close("y", dev.y, host.y, y_tol);
  }

  // Coverage of this run.
  std::vector<index_t> per_expert(static_cast<std::size_t>(experts), 0);
  for (index_t t = 0; t < tokens; ++t)
    for (index_t j = 0; j < ph.counts[t]; ++j) ++per_expert[static_cast<std::size_t>(ph.id(t, j))];
  for (index_t e = 0; e < experts; ++e)
    if (!masked[static_cast<std::size_t>(e)] && per_expert[static_cast<std::size_t>(e)] == 0) cov.empty_expert = true;
  if (tokens * width > sy::cuda::tuning::block_sort_max_pairs) cov.radix_path = true;
  if (tokens == 1) cov.decode = true;
  for (const index_t v : host.dropped)
    if (v > 0) cov.dropped = true;
}

//! One forward comparison (file comment).
template <class Layer, ElementType T, class RK, class AK>
void forward_run(sy::cuda::stream_context& sc, const Layer& layer, const shape& s,
                 std::uint64_t seed, forward_coverage& cov) {
  using Losses = typename Layer::losses_type;
  std::mt19937_64 g(seed);
  const index_t tokens = s.tokens, d = s.d, experts = s.experts;
  RK rk(g, tokens, d, experts);
  AK ak(g, experts, d);
  layer_data<T> L(g, tokens, d, s.d_ff, experts, Layer::gated, true);
  poison_masked_experts(rk, L);
  const auto rp_h = rk.host_params();
  const auto ap_h = ak.host_params();
  const index_t width = layer.router.width(rp_h);

  // Host reference.
  std::vector<T> y_h(static_cast<std::size_t>(tokens * d), from_float<T>(-7.0f));
  typename Layer::result_type r_h;
  layer.template forward<T>(host_context{}, L.xv(), rp_h, L.weights(), make_view(y_h.data(), tokens, d),
                            r_h, {}, ap_h);

  // Device: a caller workspace (poisoned), then the convenience path.
  const cudaStream_t st = sc.stream();
  device_mirror m(st);
  const auto x_d = m(L.xv());
  const auto w_d = L.weights(m);
  const auto rp_d = rk.device_params(m);
  const auto ap_d = ak.device_params(m);
  device_output<T> y1(static_cast<std::size_t>(tokens * d), st), y2(static_cast<std::size_t>(tokens * d), st);
  device_state<Losses> s1(tokens, width, experts, st), s2(tokens, width, experts, st);
  const std::size_t ws_bytes = layer.workspace_size(sc.get(), tokens, rp_d, w_d, ap_d);
  device_output<std::byte> ws(ws_bytes, st);
  layer.template forward<T>(sc.get(), x_d, rp_d, w_d, y1.view(tokens, d), s1.view(), ws.span(), ap_d);
  sy::cuda::check_status(sc.get(), ws.span());  // nothing recorded on valid data
  layer.template forward<T>(sc.get(), x_d, rp_d, w_d, y2.view(tokens, d), s2.view(), {}, ap_d);

  // Everything below compares host data: one non-template function for every layer type.
  std::vector<char> masked(static_cast<std::size_t>(experts), 0);
  for (index_t e = 0; e < experts; ++e) masked[static_cast<std::size_t>(e)] = rk.masked(e) ? 1 : 0;
  const auto host_on_plan = [&](const routing::routing_plan& plan) {
    std::vector<T> y_ref(static_cast<std::size_t>(tokens * d), from_float<T>(-7.0f));
    std::vector<index_t> drop(static_cast<std::size_t>(experts), -1);
    layer.template forward_experts<T>(host_context{}, L.xv(), plan.view(), L.weights(),
                                      make_view(y_ref.data(), tokens, d),
                                      span<index_t>(drop.data(), drop.size()), {}, ap_h);
    return forward_outputs::of(routing::routing_plan{}, Losses{}, drop, y_ref);
  };
  compare_forward(forward_outputs::of(s1.download(), y1.download()),
                  forward_outputs::of(s2.download(), y2.download()),
                  forward_outputs::of(r_h, y_h), forward_tolerance<T>(), masked, host_on_plan, cov);
}

//! Every dtype × shape × router variant × dispatch variant of one layer type.
template <class Layer, class RK = router_kit<typename Layer::router_type>,
          class AK = addon_kit<typename Layer::addon_type>>
void forward_matches_host(std::uint64_t seed_offset) {
  sy::cuda::stream_context sc;
  forward_coverage cov;
  boost::mp11::mp_for_each<dtypes>([&](auto tag) {
    using T = decltype(tag);
    for (const auto& rv : RK::variants()) {
      for (const auto& dv : dispatch_variants<typename Layer::dispatch_type>()) {
        const Layer layer = make_layer<Layer>(rv.value, dv.value);
        const index_t width_hint = RK::width(rv.value, 8);
        std::uint64_t k = 0;
        for (const auto& s : forward_shapes(width_hint)) {
          const std::uint64_t seed = base_seed() + seed_offset + 1000 * (++k);
          BOOST_TEST_CONTEXT(element_type_name<T>() << ", " << rv.name << ", " << dv.name << ", "
                                                    << s.name << " (T=" << s.tokens
                                                    << "), seed " << seed) {
            try {
              forward_run<Layer, T, RK, AK>(sc, layer, s, seed, cov);
            } catch (const std::exception& e) {  // report every failing combination
              BOOST_ERROR("exception: " << e.what());
            }
          }
        }
      }
    }
  });
  BOOST_TEST(cov.empty_expert, "no run had an expert without tokens");
  BOOST_TEST(cov.radix_path, "no run reached the radix-sort path");
  BOOST_TEST(cov.decode, "no decode (T = 1) run");
  if constexpr (std::is_same_v<typename Layer::dispatch_type, dispatch::padded_capacity>) {
    BOOST_TEST(cov.dropped, "no run dropped a pair: the capacity path was not exercised");
  }
}

}  // namespace switchyard::test::gpu
