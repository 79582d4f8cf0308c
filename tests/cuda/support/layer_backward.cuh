// SPDX-License-Identifier: Apache-2.0
#pragma once
// The GPU layer's backward against the host layer's backward on the DEVICE's forward state
// (downloaded into a host moe_result, so both sides differentiate the same selection): dx,
// the expert gradients (w1, b1, w2, b2), the router's gradients and the add-on's, with
// non-zero aux-loss coefficients and accumulators that start from random values (backward
// adds). Two device backwards on the same inputs must give the same bits.
#include <boost/mp11/algorithm.hpp>
#include <boost/mp11/list.hpp>
#include <boost/test/unit_test.hpp>

#include <cstring>
#include <exception>
#include <random>
#include <string>
#include <vector>

#include "cuda/support/layer_forward.cuh"

namespace switchyard::test::gpu {

//! Gradient arrays of the given shapes, on the host and the device, from one start value set.
struct grad_set {
  std::vector<grad_shape> shapes;
  std::vector<std::vector<float>> start, host;
  std::vector<device_output<float>> dev;

  grad_set(std::mt19937_64& g, std::vector<grad_shape> s, cudaStream_t st) : shapes(std::move(s)) {
    for (const auto& sh : shapes) {
      start.push_back(normal(g, grad_elems(sh), 0.5f));
      dev.emplace_back(grad_elems(sh), st);
    }
    host = start;
  }
  //! Device arrays back to the start values (before each device backward).
  void reset_device() {
    for (std::size_t i = 0; i < dev.size(); ++i) dev[i].set(start[i]);
  }
  [[nodiscard]] std::vector<float*> host_ptrs() {
    std::vector<float*> p;
    for (auto& v : host) p.push_back(v.data());
    return p;
  }
  [[nodiscard]] std::vector<float*> device_ptrs() const {
    std::vector<float*> p;
    for (const auto& v : dev) p.push_back(v.a.data());
    return p;
  }
  [[nodiscard]] std::vector<std::vector<float>> download() const {
    std::vector<std::vector<float>> out;
    for (const auto& v : dev) out.push_back(v.download());
    return out;
  }
};

//! A losses struct with every coefficient set to `c` (all members are float).
template <class Losses>
Losses uniform_coefficients(float c) {
  Losses l{};
  std::vector<float> v(sizeof(Losses) / sizeof(float), c);
  std::memcpy(static_cast<void*>(&l), v.data(), sizeof(Losses));
  return l;
}

//! The backward checks: `run0` and `run1` are two device backwards' gradient sets (dx,
//! expert, router, add-on; each a list of arrays), `host` the host's. Not a template: one copy
//! serves every layer type.
inline void compare_backward(const std::vector<std::vector<std::vector<float>>>& run0,
                             const std::vector<std::vector<std::vector<float>>>& run1,
                             const std::vector<std::vector<std::vector<float>>>& host, tolerance tol) {
  static const char* const names[4] = {"dx", "grads", "router grads", "add-on grads"};
  static const char* const expert_names[4] = {"w1", "b1", "w2", "b2"};
  BOOST_TEST_REQUIRE((run0.size() == 4 && run1.size() == 4 && host.size() == 4));
  for (std::size_t k = 0; k < 4; ++k) {
    BOOST_TEST_REQUIRE((run0[k].size() == host[k].size() && run1[k].size() == host[k].size()));
    for (std::size_t i = 0; i < host[k].size(); ++i) {
      const std::string what = std::string(names[k]) + (k == 1 ? std::string(".") + expert_names[i]
                                                                : "[" + std::to_string(i) + "]");
      expect_close(what, run0[k][i], host[k][i], tol);
      BOOST_TEST(same_bits(run0[k][i], run1[k][i]), what << " differs between two device backwards");
    }
  }
}

//! One backward comparison (file comment).
template <class Layer, ElementType T, class RK, class AK>
void backward_run(sy::cuda::stream_context& sc, const Layer& layer, const shape& s,
                  std::uint64_t seed) {
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
  const cudaStream_t st = sc.stream();
  device_mirror m(st);
  const auto x_d = m(L.xv());
  const auto w_d = L.weights(m);
  const auto rp_d = rk.device_params(m);
  const auto ap_d = ak.device_params(m);

  // The device forward whose state both backwards differentiate.
  device_output<T> y(static_cast<std::size_t>(tokens * d), st);
  device_state<Losses> state(tokens, width, experts, st);
  {
    device_output<std::byte> fws(layer.workspace_size(sc.get(), tokens, rp_d, w_d, ap_d), st);
    layer.template forward<T>(sc.get(), x_d, rp_d, w_d, y.view(tokens, d), state.view(), fws.span(), ap_d);
    sy::cuda::check_status(sc.get(), fws.span());
  }
  const auto fwd = state.download();

  std::vector<T> dy(static_cast<std::size_t>(tokens * d));
  {
    const auto v = normal(g, dy.size(), 1.0f);
    for (std::size_t i = 0; i < dy.size(); ++i) dy[i] = from_float<T>(v[i]);
  }
  const auto dy_h = make_view<const T>(dy.data(), tokens, d);
  const auto dy_d = m(dy_h);
  const Losses coeffs = uniform_coefficients<Losses>(0.1f);
  const index_t p = L.p, f = L.d_ff;
  grad_set dx(g, {{tokens, d}}, st);
  grad_set eg(g, {{experts * p, d}, {experts, p}, {experts * d, f}, {experts, d}}, st);
  grad_set rg(g, rk.grad_shapes(), st);
  grad_set ag(g, ak.grad_shapes(), st);
  auto expert_views = [&](const std::vector<float*>& q) {
    return expert_grads{make_view(q[0], experts, p, d), make_view(q[1], experts, p),
                        make_view(q[2], experts, d, f), make_view(q[3], experts, d)};
  };

  // Host backward on the device's state.
  layer.template backward<T>(host_context{}, L.xv(), rp_h, L.weights(), fwd, dy_h, coeffs,
                             make_view(dx.host[0].data(), tokens, d), expert_views(eg.host_ptrs()),
                             rk.grads(rg.host_ptrs()), {}, ap_h, ak.grads(ag.host_ptrs()));

  // Device backward, twice (determinism), with a poisoned caller workspace.
  device_output<std::byte> bws(layer.backward_workspace_size(sc.get(), tokens, rp_d, w_d, ap_d), st);
  std::vector<std::vector<std::vector<float>>> runs[2];
  for (auto& run : runs) {
    bws.poison();
    for (grad_set* gs : {&dx, &eg, &rg, &ag}) gs->reset_device();
    layer.template backward<T>(sc.get(), x_d, rp_d, w_d, state.view(), dy_d, coeffs,
                               make_view(dx.dev[0].a.data(), tokens, d),
                               expert_views(eg.device_ptrs()), rk.grads(rg.device_ptrs()),
                               bws.span(), ap_d, ak.grads(ag.device_ptrs()));
    sy::cuda::check_status(sc.get(), bws.span());
    for (const grad_set* gs : {&dx, &eg, &rg, &ag}) run.push_back(gs->download());
  }

  compare_backward(runs[0], runs[1], {dx.host, eg.host, rg.host, ag.host}, backward_tolerance<T>());
}

//! The storage types of the backward tests.
using backward_dtypes = boost::mp11::mp_list<float, bfloat16>;

//! Every backward dtype × shape × router variant × dispatch variant of one layer type.
template <class Layer, class RK = router_kit<typename Layer::router_type>,
          class AK = addon_kit<typename Layer::addon_type>>
void backward_matches_host(std::uint64_t seed_offset) {
  sy::cuda::stream_context sc;
  boost::mp11::mp_for_each<backward_dtypes>([&](auto tag) {
    using T = decltype(tag);
    for (const auto& rv : RK::variants()) {
      for (const auto& dv : dispatch_variants<typename Layer::dispatch_type>()) {
        const Layer layer = make_layer<Layer>(rv.value, dv.value);
        std::uint64_t k = 0;
        for (const auto& s : forward_shapes(RK::width(rv.value, 8))) {
          const std::uint64_t seed = base_seed() + seed_offset + 1000 * (++k);
          BOOST_TEST_CONTEXT(element_type_name<T>() << ", " << rv.name << ", " << dv.name << ", "
                                                    << s.name << " (T=" << s.tokens
                                                    << "), seed " << seed) {
            try {
              backward_run<Layer, T, RK, AK>(sc, layer, s, seed);
            } catch (const std::exception& e) {  // report every failing combination
              BOOST_ERROR("exception: " << e.what());
            }
          }
        }
      }
    }
  });
}

}  // namespace switchyard::test::gpu
