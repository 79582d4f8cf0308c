// SPDX-License-Identifier: Apache-2.0
#pragma once
// Float64 reference of the MoE layer, written plainly (loops over tokens, slots and
// features), independent of the library's dispatch/backend code; plus per-router set-ups
// used by the layer tests.
#include <cmath>
#include <cstdint>
#include <random>
#include <type_traits>
#include <vector>

#include <switchyard/switchyard.hpp>

#include "support/random.hpp"

namespace switchyard::test {

// ---- activations in double -------------------------------------------------------------
inline double ref_silu(double h) { return h / (1.0 + std::exp(-h)); }
inline double ref_gelu(double h) { return 0.5 * h * (1.0 + std::erf(h / std::sqrt(2.0))); }
inline double ref_gelu_tanh(double h) {
  const double u = std::sqrt(2.0 / M_PI) * (h + 0.044715 * h * h * h);
  return 0.5 * h * (1.0 + std::tanh(u));
}

//! act(h) (plain) or act(gate)·up (gated) in double, by activation type.
template <class A>
double ref_activation(double h, double up = 0.0) {
  if constexpr (std::is_same_v<A, activation::relu>) return h > 0 ? h : 0.0;
  else if constexpr (std::is_same_v<A, activation::gelu>) return ref_gelu(h);
  else if constexpr (std::is_same_v<A, activation::gelu_tanh>) return ref_gelu_tanh(h);
  else if constexpr (std::is_same_v<A, activation::silu>) return ref_silu(h);
  else if constexpr (std::is_same_v<A, activation::swiglu>) return ref_silu(h) * up;
  else if constexpr (std::is_same_v<A, activation::geglu>) return ref_gelu(h) * up;
  else static_assert(sizeof(A) == 0, "no reference for this activation");
}

//! Storage of everything a layer test needs, in T, with float64 copies of the rounded values.
template <ElementType T>
struct layer_data {
  index_t tokens, d, d_ff, p, experts;
  bool bias;
  std::vector<T> x, w1, b1, w2, b2;

  layer_data(std::mt19937_64& g, index_t t, index_t d_, index_t f, index_t e, bool gated,
             bool with_bias)
      : tokens(t), d(d_), d_ff(f), p(gated ? 2 * f : f), experts(e), bias(with_bias) {
    auto fill = [&](std::vector<T>& v, std::size_t n, float s) {
      const auto r = normal(g, n, s);
      v.resize(n);
      for (std::size_t i = 0; i < n; ++i) v[i] = from_float<T>(r[i]);
    };
    fill(x, static_cast<std::size_t>(t * d), 1.0f);
    fill(w1, static_cast<std::size_t>(e * p * d), 1.0f / std::sqrt(static_cast<float>(d)));
    fill(w2, static_cast<std::size_t>(e * d * f), 1.0f / std::sqrt(static_cast<float>(f)));
    if (bias) {
      fill(b1, static_cast<std::size_t>(e * p), 0.1f);
      fill(b2, static_cast<std::size_t>(e * d), 0.1f);
    }
  }

  expert_weights<T> weights() const {
    expert_weights<T> w{make_view<const T>(w1.data(), experts, p, d), {},
                        make_view<const T>(w2.data(), experts, d, d_ff), {}};
    if (bias) {
      w.b1 = make_view<const T>(b1.data(), experts, p);
      w.b2 = make_view<const T>(b2.data(), experts, d);
    }
    return w;
  }
  matrix_view<const T> xv() const { return make_view<const T>(x.data(), tokens, d); }
  //! The weight views passed through `to_context` (a context fixture's).
  template <class Map>
  expert_weights<T> weights(const Map& to_context) const {
    expert_weights<T> w = weights();
    w.w1 = to_context(w.w1);
    w.w2 = to_context(w.w2);
    if (bias) {
      w.b1 = to_context(w.b1);
      w.b2 = to_context(w.b2);
    }
    return w;
  }
};

inline double dbl(float v) { return v; }
template <ElementType T>
double dbl(T v) {
  return static_cast<double>(to_float(v));
}

//! FFN_e(x_t) in double: out [d]; `absout` (optional) the same with absolute values (the
//! scale a float computation's rounding error is proportional to).
template <class A, ElementType T>
void ref_expert(const layer_data<T>& L, index_t e, const double* x, double* out,
                double* absout = nullptr) {
  const bool gated = activation_traits<A>::is_gated;
  std::vector<double> a(L.d_ff), aa(L.d_ff);
  for (index_t c = 0; c < L.d_ff; ++c) {
    auto proj = [&](index_t row, double& ab) {
      double s = L.bias ? dbl(L.b1[e * L.p + row]) : 0.0;
      ab = std::abs(s);
      for (index_t i = 0; i < L.d; ++i) {
        const double w = dbl(L.w1[(e * L.p + row) * L.d + i]);
        s += w * x[i];
        ab += std::abs(w * x[i]);
      }
      return s;
    };
    double ab_g, ab_u = 0.0;
    const double hg = proj(c, ab_g);
    if (gated) {
      const double hu = proj(L.d_ff + c, ab_u);
      a[c] = ref_activation<A>(hg, hu);
      aa[c] = (std::abs(hg) + ab_g) * (std::abs(hu) + ab_u) + 1.0;
    } else {
      a[c] = ref_activation<A>(hg);
      aa[c] = std::abs(hg) + ab_g + 1.0;
    }
  }
  for (index_t o = 0; o < L.d; ++o) {
    double s = L.bias ? dbl(L.b2[e * L.d + o]) : 0.0, ab = std::abs(s);
    for (index_t c = 0; c < L.d_ff; ++c) {
      const double w = dbl(L.w2[(e * L.d + o) * L.d_ff + c]);
      s += w * a[c];
      ab += std::abs(w) * aa[c];
    }
    out[o] = s;
    if (absout) absout[o] = ab;
  }
}

//! Which pairs a capacity-C dispatch keeps (token order, then slot order): kept[t·w + j].
inline std::vector<char> ref_capacity_keep(const routing::routing_plan& plan, index_t cap) {
  std::vector<char> keep(static_cast<std::size_t>(plan.num_tokens * plan.width), 0);
  std::vector<index_t> fill(static_cast<std::size_t>(plan.num_experts), 0);
  for (index_t t = 0; t < plan.num_tokens; ++t)
    for (index_t j = 0; j < plan.counts[t]; ++j) {
      const auto e = plan.id(t, j);
      if (fill[e] < cap) {
        ++fill[e];
        keep[t * plan.width + j] = 1;
      }
    }
  return keep;
}

//! y [T, d] in double for a given plan; `keep` (empty = all kept) marks pairs that reach their
//! expert; a dropped pair contributes w·x_t when `pass_through`, else nothing.
template <class A, ElementType T>
std::vector<double> ref_layer(const layer_data<T>& L, const routing::routing_plan& plan,
                              const std::vector<char>& keep, bool pass_through,
                              std::vector<double>* scale = nullptr) {
  std::vector<double> y(static_cast<std::size_t>(L.tokens * L.d), 0.0), xt(L.d), out(L.d),
      ab(L.d);
  if (scale) scale->assign(y.size(), 0.0);
  for (index_t t = 0; t < L.tokens; ++t) {
    for (index_t i = 0; i < L.d; ++i) xt[i] = dbl(L.x[t * L.d + i]);
    for (index_t j = 0; j < plan.counts[t]; ++j) {
      const double w = plan.weight(t, j);
      if (!keep.empty() && !keep[t * plan.width + j]) {
        if (pass_through)
          for (index_t i = 0; i < L.d; ++i) y[t * L.d + i] += w * xt[i];
        continue;
      }
      ref_expert<A>(L, plan.id(t, j), xt.data(), out.data(), ab.data());
      for (index_t i = 0; i < L.d; ++i) {
        y[t * L.d + i] += w * out[i];
        if (scale) (*scale)[t * L.d + i] += std::abs(w) * ab[i];
      }
    }
  }
  return y;
}

// ---- router set-ups: parameters for each router the typed tests use ---------------------

//! Linear-gate routers (TopK, TopP, AdaptiveGating): w [E, d].
template <class R>
struct router_setup {
  R router;
  std::vector<float> w;
  index_t experts;
  router_setup(std::mt19937_64& g, R r, index_t tokens, index_t d, index_t e)
      : router(r), w(normal(g, static_cast<std::size_t>(e * d), 1.0f)), experts(e) {
    (void)tokens;
    (void)d;
  }
  typename R::params_type params(index_t d) const {
    return {make_view<const float>(w.data(), experts, d)};
  }
  //! The parameter views passed through `to_context` (a context fixture's).
  template <class Map>
  typename R::params_type params(index_t d, const Map& to_context) const {
    return {to_context(make_view<const float>(w.data(), experts, d))};
  }
  //! Experts no plan can route to (none for these routers).
  bool masked(index_t) const { return false; }
};

//! DA-MoE with caller-supplied importance: I [T] uniform in [0, 1).
template <class I, class K>
struct router_setup<routers::DAMoE<I, K>> {
  using R = routers::DAMoE<I, K>;
  R router;
  std::vector<float> w, importance;
  index_t experts, tokens;
  router_setup(std::mt19937_64& g, R r, index_t t, index_t d, index_t e)
      : router(r),
        w(normal(g, static_cast<std::size_t>(e * d), 1.0f)),
        importance(uniform(g, static_cast<std::size_t>(t), 0.0f, 1.0f)),
        experts(e),
        tokens(t) {}
  typename R::params_type params(index_t d) const {
    typename R::params_type p;
    p.w = make_view<const float>(w.data(), experts, d);
    p.importance = make_view<const float>(importance.data(), tokens);
    return p;
  }
  template <class Map>
  typename R::params_type params(index_t d, const Map& to_context) const {
    typename R::params_type p = params(d);
    p.w = to_context(p.w);
    p.importance = to_context(p.importance);
    return p;
  }
  bool masked(index_t) const { return false; }
};

//! DynMoE with E_max slots of which the last one is masked (never routed to).
template <>
struct router_setup<routers::DynMoE> {
  using R = routers::DynMoE;
  R router;
  std::vector<float> w_gate, thresholds;
  std::vector<std::int32_t> mask;
  index_t experts;
  router_setup(std::mt19937_64& g, R r, index_t /*t*/, index_t d, index_t e)
      : router(r),
        w_gate(normal(g, static_cast<std::size_t>(d * e), 1.0f)),
        thresholds(normal(g, static_cast<std::size_t>(e), 0.5f)),
        mask(static_cast<std::size_t>(e), 1),
        experts(e) {
    if (e > 1) mask.back() = 0;
  }
  typename R::params_type params(index_t d) const {
    typename R::params_type p;
    p.w_gate = make_view<const float>(w_gate.data(), d, experts);
    p.thresholds = make_view<const float>(thresholds.data(), experts);
    p.experts_mask = make_view<const std::int32_t>(mask.data(), experts);
    return p;
  }
  template <class Map>
  typename R::params_type params(index_t d, const Map& to_context) const {
    typename R::params_type p = params(d);
    p.w_gate = to_context(p.w_gate);
    p.thresholds = to_context(p.thresholds);
    p.experts_mask = to_context(p.experts_mask);
    return p;
  }
  bool masked(index_t e) const { return mask[e] == 0; }
};

}  // namespace switchyard::test
