// SPDX-License-Identifier: Apache-2.0
#pragma once
// Per-router and per-add-on set-ups of the GPU layer tests: seeded random parameters in host
// memory, the same parameters as device views (through a device_mirror), the router
// variants a test runs (runtime hyperparameters of one layer type, so each layer type is
// instantiated once), and gradient storage shapes for backward.
//
//   router_kit<R> rk(g, T, d, E);           // parameters drawn from g
//   rk.host_params(); rk.device_params(m);  // host views / device views of the same values
//   router_kit<R>::variants();              // e.g. TopK k = 1 and k = 2
//   rk.grad_shapes(); rk.grads(ptrs);       // gradient views over caller storage
#include <algorithm>
#include <array>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include <switchyard/layer/hypermoe_addon.hpp>
#include <switchyard/switchyard.hpp>

#include "cuda/support/device_mirror.cuh"
#include "host/layer/hyper_setup.hpp"
#include "support/random.hpp"

namespace switchyard::test::gpu {

//! {rows, cols} of a gradient array (cols 0: a vector).
using grad_shape = std::array<index_t, 2>;

inline std::size_t grad_elems(const grad_shape& s) {
  return static_cast<std::size_t>(s[0] * std::max<index_t>(1, s[1]));
}

//! A router variant and its name for test messages.
template <class R>
struct variant {
  R value;
  std::string name;
};

template <class R>
struct router_kit;

//! Linear-gate routers (TopK, TopP, AdaptiveGating): w [E, d].
template <class R>
struct linear_kit {
  std::vector<float> w;
  index_t experts, d;
  linear_kit(std::mt19937_64& g, index_t /*tokens*/, index_t d_, index_t e)
      : w(normal(g, static_cast<std::size_t>(e * d_), 1.0f)), experts(e), d(d_) {}
  [[nodiscard]] typename R::params_type host_params() const {
    return {make_view<const float>(w.data(), experts, d)};
  }
  [[nodiscard]] typename R::params_type device_params(device_mirror& m) const {
    return {m(make_view<const float>(w.data(), experts, d))};
  }
  [[nodiscard]] bool masked(index_t) const { return false; }
  [[nodiscard]] std::vector<grad_shape> grad_shapes() const { return {{experts, d}}; }
  [[nodiscard]] typename R::grads_type grads(const std::vector<float*>& p) const {
    return {make_view(p[0], experts, d)};
  }
};

template <>
struct router_kit<routers::TopK> : linear_kit<routers::TopK> {
  using linear_kit::linear_kit;
  static std::vector<variant<routers::TopK>> variants() {
    return {{{.k = 1, .renormalize = false}, "TopK k=1"}, {{.k = 2, .renormalize = true}, "TopK k=2"}};
  }
  static index_t width(const routers::TopK& r, index_t) { return r.k; }
};

template <>
struct router_kit<routers::TopP> : linear_kit<routers::TopP> {
  using linear_kit::linear_kit;
  static std::vector<variant<routers::TopP>> variants() {
    return {{{.p = 0.5f, .max_k = 3}, "TopP p=0.5 max_k=3"}};
  }
  static index_t width(const routers::TopP& r, index_t e) {
    return r.max_k > 0 ? std::min<index_t>(r.max_k, e) : e;
  }
};

template <>
struct router_kit<routers::AdaptiveGating> : linear_kit<routers::AdaptiveGating> {
  using linear_kit::linear_kit;
  static std::vector<variant<routers::AdaptiveGating>> variants() {
    return {{{.threshold = 0.2f}, "AdaptiveGating threshold=0.2"}};
  }
  static index_t width(const routers::AdaptiveGating&, index_t) { return 2; }
};

//! DA-MoE with its default importance (column means of the attention probabilities
//! A [H, T, T], which travel to the device with the gate) and K rule.
template <>
struct router_kit<routers::DAMoE<>> {
  using R = routers::DAMoE<>;
  std::vector<float> w, attention;
  index_t experts, d, tokens, heads = 2;
  router_kit(std::mt19937_64& g, index_t t, index_t d_, index_t e)
      : w(normal(g, static_cast<std::size_t>(e * d_), 1.0f)), experts(e), d(d_), tokens(t) {
    // Rows of positive random scores normalised to sum to 1 (softmax-like attention).
    attention = uniform(g, static_cast<std::size_t>(heads * t * t), 0.05f, 1.0f);
    for (index_t r = 0; r < heads * t; ++r) {
      double s = 0.0;
      for (index_t j = 0; j < t; ++j) s += attention[r * t + j];
      for (index_t j = 0; j < t; ++j) attention[r * t + j] = static_cast<float>(attention[r * t + j] / s);
    }
  }
  static std::vector<variant<R>> variants() {
    return {{R{.k_rule = {.k_min = 1, .k_max = 3}}, "DAMoE k=[1,3]"}};
  }
  static index_t width(const R& r, index_t) { return r.k_rule.max_k(); }
  [[nodiscard]] R::params_type host_params() const {
    R::params_type p;
    p.w = make_view<const float>(w.data(), experts, d);
    p.attention = make_view<const float>(attention.data(), heads, tokens, tokens);
    return p;
  }
  [[nodiscard]] R::params_type device_params(device_mirror& m) const {
    R::params_type p = host_params();
    p.w = m(p.w);
    p.attention = m(p.attention);
    return p;
  }
  [[nodiscard]] bool masked(index_t) const { return false; }
  [[nodiscard]] std::vector<grad_shape> grad_shapes() const { return {{experts, d}}; }
  [[nodiscard]] R::grads_type grads(const std::vector<float*>& p) const {
    return {make_view(p[0], experts, d)};
  }
};

//! DynMoE with E_max slots of which the last is masked (its expert weights are NaN in the
//! tests: a masked slot must never be read).
template <>
struct router_kit<routers::DynMoE> {
  using R = routers::DynMoE;
  std::vector<float> w_gate, thresholds;
  std::vector<std::int32_t> mask;
  index_t experts, d;
  router_kit(std::mt19937_64& g, index_t /*tokens*/, index_t d_, index_t e)
      : w_gate(normal(g, static_cast<std::size_t>(d_ * e), 1.0f)),
        thresholds(normal(g, static_cast<std::size_t>(e), 0.5f)),
        mask(static_cast<std::size_t>(e), 1), experts(e), d(d_) {
    if (e > 1) mask.back() = 0;
  }
  static std::vector<variant<R>> variants() {
    return {{R{.training = true}, "DynMoE training"}, {R{.training = false}, "DynMoE eval"}};
  }
  static index_t width(const R&, index_t e) { return e; }
  [[nodiscard]] R::params_type host_params() const {
    R::params_type p;
    p.w_gate = make_view<const float>(w_gate.data(), d, experts);
    p.thresholds = make_view<const float>(thresholds.data(), experts);
    p.experts_mask = make_view<const std::int32_t>(mask.data(), experts);
    return p;
  }
  [[nodiscard]] R::params_type device_params(device_mirror& m) const {
    R::params_type p = host_params();
    p.w_gate = m(p.w_gate);
    p.thresholds = m(p.thresholds);
    p.experts_mask = m(p.experts_mask);
    return p;
  }
  [[nodiscard]] bool masked(index_t e) const { return mask[static_cast<std::size_t>(e)] == 0; }
  [[nodiscard]] std::vector<grad_shape> grad_shapes() const { return {{d, experts}, {experts, 0}}; }
  [[nodiscard]] R::grads_type grads(const std::vector<float*>& p) const {
    R::grads_type gr;
    gr.w_gate = make_view(p[0], d, experts);
    gr.thresholds = make_view(p[1], experts);
    return gr;
  }
};

// ---- add-ons --------------------------------------------------------------------------------

template <class A>
struct addon_kit;

//! No add-on: empty params and grads.
template <>
struct addon_kit<no_addon> {
  addon_kit(std::mt19937_64&, index_t, index_t) {}
  static no_addon make() { return {}; }
  [[nodiscard]] no_addon::params_type host_params() const { return {}; }
  [[nodiscard]] no_addon::params_type device_params(device_mirror&) const { return {}; }
  [[nodiscard]] std::vector<grad_shape> grad_shapes() const { return {}; }
  [[nodiscard]] no_addon::grads_type grads(const std::vector<float*>&) const { return {}; }
};

//! HyperMoE (layer 1 of 2, adapter width 3) with the hyper_setup.hpp parameter shapes.
template <>
struct addon_kit<layer::hypermoe_addon> {
  static constexpr index_t d_emb = 4, p = 7, h_in = 3, layers = 2, d_le = 2, b = 5, a = 3;
  hyper_parameters P;
  addon_kit(std::mt19937_64& g, index_t experts, index_t d)
      : P(g, experts, d, d_emb, p, h_in, layers, d_le, b, a) {
    for (auto& v : P.val[2]) v = 0.5f + std::abs(v);  // keep the ReLU units alive
    for (auto& v : P.val[7]) v = 0.5f + std::abs(v);
  }
  static layer::hypermoe_addon make() {
    return {.hyper = {.layer_idx = 1, .adapter_dim = static_cast<int>(a)}};
  }
  [[nodiscard]] layer::hypermoe_params host_params() const { return P.params(); }
  [[nodiscard]] layer::hypermoe_params device_params(device_mirror& m) const {
    layer::hypermoe_params hp = P.params();
    auto lin = [&](layer::hyper_linear_params& l) {
      l.w = m(l.w);
      l.b = m(l.b);
    };
    hp.expert_emb = m(hp.expert_emb);
    lin(hp.process1);
    lin(hp.process2);
    hp.generator.layer_embed = m(hp.generator.layer_embed);
    lin(hp.generator.linear1);
    lin(hp.generator.weight_up);
    lin(hp.generator.weight_down);
    lin(hp.generator.bias_up);
    lin(hp.generator.bias_down);
    return hp;
  }
  [[nodiscard]] std::vector<grad_shape> grad_shapes() const { return P.shape; }
  [[nodiscard]] layer::hypermoe_grads grads(const std::vector<float*>& s) const {
    auto m = [&](int i) { return make_view(s[i], P.shape[i][0], P.shape[i][1]); };
    auto v = [&](int i) { return make_view(s[i], P.shape[i][0]); };
    layer::hypermoe_grads hg;
    hg.expert_emb = m(0);
    hg.process1 = {m(1), v(2)};
    hg.process2 = {m(3), v(4)};
    hg.generator.layer_embed = m(5);
    hg.generator.linear1 = {m(6), v(7)};
    hg.generator.weight_up = {m(8), v(9)};
    hg.generator.weight_down = {m(10), v(11)};
    hg.generator.bias_up = {m(12), v(13)};
    hg.generator.bias_down = {m(14), v(15)};
    return hg;
  }
};

// ---- dispatch variants ------------------------------------------------------------------------

template <class D>
std::vector<variant<D>> dispatch_variants();

template <>
inline std::vector<variant<dispatch::sorted_grouped>> dispatch_variants() {
  return {{{}, "sorted_grouped"}};
}
template <>
inline std::vector<variant<dispatch::dense>> dispatch_variants() {
  return {{{}, "dense"}};
}
//! Capacity 1.0 (drops happen) with both dropped-output modes.
template <>
inline std::vector<variant<dispatch::padded_capacity>> dispatch_variants() {
  using dispatch::dropped_output;
  return {{{.capacity_factor = 1.0f, .min_capacity = 0, .capacity_multiple = 2,
            .drop = dropped_output::zero},
           "padded_capacity drop=zero"},
          {{.capacity_factor = 1.0f, .min_capacity = 0, .capacity_multiple = 2,
            .drop = dropped_output::scaled_input},
           "padded_capacity drop=scaled_input"}};
}

}  // namespace switchyard::test::gpu
