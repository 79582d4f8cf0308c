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
#include <exception>
#include <random>
#include <tuple>
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
};

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
  const std::vector<T> y_d = y1.download();
  const auto r_d = s1.download();

  // Determinism: the second run gives the same bits.
  {
    const auto r2 = s2.download();
    BOOST_TEST(same_bits(y_d, y2.download()), "y differs between two device forwards");
    BOOST_TEST(same_bits(r_d.plan.expert_ids, r2.plan.expert_ids), "plan ids differ between runs");
    BOOST_TEST(same_bits(r_d.plan.counts, r2.plan.counts), "plan counts differ between runs");
    BOOST_TEST(same_bits(r_d.plan.weights, r2.plan.weights), "plan weights differ between runs");
    BOOST_TEST(same_bits(r_d.plan.logits, r2.plan.logits), "logits differ between runs");
    BOOST_TEST(same_bits(r_d.plan.probs, r2.plan.probs), "probs differ between runs");
    BOOST_TEST(same_bits(loss_values(r_d.losses), loss_values(r2.losses)), "losses differ between runs");
    BOOST_TEST(same_bits(r_d.dropped, r2.dropped), "dropped differs between runs");
  }

  // The plan: ids and counts identical (near-tie allowance), scores and weights close.
  const std::vector<char> flips = selection_mismatch(r_d.plan, r_h.plan);
  index_t n_flips = 0;
  for (index_t t = 0; t < tokens; ++t) {
    if (!flips[static_cast<std::size_t>(t)]) continue;
    ++n_flips;
    if (n_flips <= 5) report_flip(r_d.plan, r_h.plan, t);
  }
  BOOST_TEST(n_flips <= allowed_flips(tokens),
             n_flips << " tokens select other experts than on the host (allowed "
                     << allowed_flips(tokens) << ")");
  expect_close("logits", r_d.plan.logits, r_h.plan.logits, routing_tolerance);
  expect_close("probs", r_d.plan.probs, r_h.plan.probs, routing_tolerance);
  expect_close("plan.weights", r_d.plan.weights, r_h.plan.weights, routing_tolerance, flips,
               static_cast<std::size_t>(width));
  {
    const auto got = loss_values(r_d.losses), want = loss_values(r_h.losses);
    const double slack = 4.0 * static_cast<double>(n_flips) / static_cast<double>(tokens);
    for (std::size_t i = 0; i < got.size(); ++i) {
      const double lim = loss_tolerance.rel * std::abs(want[i]) + loss_tolerance.abs +
                         slack * (1.0 + std::abs(want[i]));
      BOOST_TEST(std::abs(double(got[i]) - want[i]) <= lim,
                 "losses field " << i << ": device " << got[i] << ", host " << want[i]);
    }
  }

  // y and the drops on the same selection: the host forward, or (after a near-tie flip) the
  // host's forward_experts on the device's plan.
  std::vector<T> y_ref = y_h;
  std::vector<index_t> dropped_ref = r_h.dropped;
  if (n_flips > 0) {
    std::vector<index_t> drop(static_cast<std::size_t>(experts), -1);
    layer.template forward_experts<T>(host_context{}, L.xv(), r_d.plan.view(), L.weights(),
                                      make_view(y_ref.data(), tokens, d),
                                      span<index_t>(drop.data(), drop.size()), {}, ap_h);
    dropped_ref = drop;
  }
  BOOST_TEST(r_d.dropped == dropped_ref, boost::test_tools::per_element());
  expect_close("y", y_d, y_ref, forward_tolerance<T>());

  // Coverage of this run.
  std::vector<index_t> per_expert(static_cast<std::size_t>(experts), 0);
  for (index_t t = 0; t < tokens; ++t)
    for (index_t j = 0; j < r_h.plan.counts[t]; ++j) ++per_expert[r_h.plan.id(t, j)];
  for (index_t e = 0; e < experts; ++e)
    if (!rk.masked(e) && per_expert[e] == 0) cov.empty_expert = true;
  if (tokens * width > sy::cuda::tuning::block_sort_max_pairs) cov.radix_path = true;
  if (tokens == 1) cov.decode = true;
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
}

}  // namespace switchyard::test::gpu
