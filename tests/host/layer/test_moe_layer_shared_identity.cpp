// SPDX-License-Identifier: Apache-2.0
// Shared experts (y_t += g_t · Σ_s FFN_s(x_t), g_t = σ(x_t · gateᵀ) or 1) and identity
// (zero-computation) experts (plan ids in [E, E + Z) contribute w_tj · x_t) on the host layer:
// forward against a float64 reference written here (float, half, bfloat16), backward against
// float64 central finite differences of that reference (dx, every routed and shared weight
// gradient, the gate, the plan's d_weights), with the dense, sorted_grouped and
// padded_capacity dispatches; the routed entry points (forward / backward) against the plan
// ones; workspaces of the queried sizes; the bits do not depend on the thread count.
#include <boost/mp11/list.hpp>
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include <omp.h>

#include <switchyard/switchyard.hpp>

#include "support/random.hpp"

using namespace switchyard;

namespace {

// ---- configuration ----------------------------------------------------------------------

struct config {
  index_t tokens = 11, d = 8, d_ff = 6, experts = 4;  // E FFN experts
  index_t identity = 0;                               // Z identity experts
  index_t shared = 0;                                 // S shared experts (0: none)
  index_t d_ff_s = 5;                                 // shared experts' hidden width
  bool gate = false;                                  // sigmoid gate on the shared term
  bool bias = true;                                   // biases on routed and shared experts
  index_t width = 3;                                  // plan slots
  bool weight_on_input = false;                       // Llama-4: FFN(w·x) for FFN slots
};

double silu(double h) { return h / (1.0 + std::exp(-h)); }
double gelu(double h) { return 0.5 * h * (1.0 + std::erf(h / std::sqrt(2.0))); }
double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }

template <class A>
double act(double g, double u) {
  if constexpr (std::is_same_v<A, activation::swiglu>) return silu(g) * u;
  else return gelu(g);  // activation::gelu (plain: u unused)
}

//! Every input and parameter in float64 (the values the library sees after rounding to T).
struct values {
  std::vector<double> x, w1, b1, w2, b2, sw1, sb1, sw2, sb2, gate, pw;
  std::vector<std::int32_t> ids, counts;
  //! The arrays finite differences perturb, with their names.
  std::vector<std::pair<std::string, std::vector<double>*>> arrays() {
    return {{"x", &x},     {"w1", &w1},   {"b1", &b1},   {"w2", &w2},     {"b2", &b2},
            {"sw1", &sw1}, {"sb1", &sb1}, {"sw2", &sw2}, {"sb2", &sb2}, {"gate", &gate},
            {"plan.weights", &pw}};
  }
};

//! FFN(v) in double for expert e of (w1 [n, P, d], b1, w2 [n, d, f], b2) into out [d].
template <class A>
void ffn(const config& c, index_t f, const std::vector<double>& w1, const std::vector<double>& b1,
         const std::vector<double>& w2, const std::vector<double>& b2, index_t e, const double* v,
         double* out) {
  constexpr bool gated = activation_traits<A>::is_gated;
  const index_t p = gated ? 2 * f : f, d = c.d;
  std::vector<double> a(static_cast<std::size_t>(f));
  auto proj = [&](index_t row) {
    double s = b1.empty() ? 0.0 : b1[e * p + row];
    for (index_t i = 0; i < d; ++i) s += w1[(e * p + row) * d + i] * v[i];
    return s;
  };
  for (index_t k = 0; k < f; ++k) a[k] = gated ? act<A>(proj(k), proj(f + k)) : act<A>(proj(k), 0);
  for (index_t o = 0; o < d; ++o) {
    double s = b2.empty() ? 0.0 : b2[e * d + o];
    for (index_t k = 0; k < f; ++k) s += w2[(e * d + o) * f + k] * a[k];
    out[o] = s;
  }
}

//! y [T, d] of the layer in double; `keep[t·width + j]` (empty: all) marks the FFN pairs that
//! reach their expert (a dropped pair contributes nothing).
template <class A>
std::vector<double> reference(const config& c, const values& v, const std::vector<char>& keep = {}) {
  const index_t d = c.d;
  std::vector<double> y(static_cast<std::size_t>(c.tokens * d), 0.0), out(d), sum(d);
  for (index_t t = 0; t < c.tokens; ++t) {
    const double* xt = &v.x[t * d];
    for (index_t j = 0; j < v.counts[t]; ++j) {
      const index_t e = v.ids[t * c.width + j];
      const double w = v.pw[t * c.width + j];
      if (e >= c.experts) {
        for (index_t i = 0; i < d; ++i) y[t * d + i] += w * xt[i];
        continue;
      }
      if (!keep.empty() && !keep[t * c.width + j]) continue;
      if (c.weight_on_input) {
        std::vector<double> wx(xt, xt + d);
        for (double& e_ : wx) e_ *= w;
        ffn<A>(c, c.d_ff, v.w1, v.b1, v.w2, v.b2, e, wx.data(), out.data());
        for (index_t i = 0; i < d; ++i) y[t * d + i] += out[i];
        continue;
      }
      ffn<A>(c, c.d_ff, v.w1, v.b1, v.w2, v.b2, e, xt, out.data());
      for (index_t i = 0; i < d; ++i) y[t * d + i] += w * out[i];
    }
    if (c.shared == 0) continue;
    std::fill(sum.begin(), sum.end(), 0.0);
    for (index_t s = 0; s < c.shared; ++s) {
      ffn<A>(c, c.d_ff_s, v.sw1, v.sb1, v.sw2, v.sb2, s, xt, out.data());
      for (index_t i = 0; i < d; ++i) sum[i] += out[i];
    }
    double g = 1.0;
    if (c.gate) {
      double z = 0.0;
      for (index_t i = 0; i < d; ++i) z += xt[i] * v.gate[i];
      g = sigmoid(z);
    }
    for (index_t i = 0; i < d; ++i) y[t * d + i] += g * sum[i];
  }
  return y;
}

//! Σ y · dy of the reference.
template <class A>
double loss(const config& c, const values& v, const std::vector<double>& dy,
            const std::vector<char>& keep) {
  const auto y = reference<A>(c, v, keep);
  double s = 0.0;
  for (std::size_t i = 0; i < y.size(); ++i) s += y[i] * dy[i];
  return s;
}

// ---- the problem in storage type T ------------------------------------------------------

template <ElementType T, class A>
struct problem {
  config c;
  index_t p, ps;
  std::vector<T> x, w1, b1, w2, b2, sw1, sb1, sw2, sb2, gate, dy;
  std::vector<std::int32_t> ids, counts;
  std::vector<float> pw;
  std::vector<float> router_w;  // [E + Z, d] for the routed entry points

  problem(const config& cfg, std::uint64_t seed) : c(cfg) {
    constexpr bool gated = activation_traits<A>::is_gated;
    p = gated ? 2 * c.d_ff : c.d_ff;
    ps = gated ? 2 * c.d_ff_s : c.d_ff_s;
    std::mt19937_64 g(seed);
    auto fill = [&](std::vector<T>& v, index_t n, float s) {
      for (float f : test::normal(g, static_cast<std::size_t>(n), s)) v.push_back(from_float<T>(f));
    };
    const index_t e = c.experts, d = c.d, n = c.shared;
    fill(x, c.tokens * d, 1.0f);
    fill(w1, e * p * d, 1.0f / std::sqrt(float(d)));
    fill(w2, e * d * c.d_ff, 1.0f / std::sqrt(float(c.d_ff)));
    if (c.bias) {
      fill(b1, e * p, 0.2f);
      fill(b2, e * d, 0.2f);
    }
    if (n > 0) {
      fill(sw1, n * ps * d, 1.0f / std::sqrt(float(d)));
      fill(sw2, n * d * c.d_ff_s, 1.0f / std::sqrt(float(c.d_ff_s)));
      if (c.bias) {
        fill(sb1, n * ps, 0.2f);
        fill(sb2, n * d, 0.2f);
      }
      if (c.gate) fill(gate, d, 0.5f);
    }
    fill(dy, c.tokens * d, 1.0f);
    router_w = test::normal(g, static_cast<std::size_t>((e + c.identity) * d));
    // Plan: token t uses 1..width distinct experts of E + Z (token 0 none; token 1 only
    // identity experts when there are any; the rest random), weights in [0.2, 1).
    const index_t all = e + c.identity;
    ids.assign(static_cast<std::size_t>(c.tokens * c.width), -1);
    pw.assign(ids.size(), 0.0f);
    counts.assign(static_cast<std::size_t>(c.tokens), 0);
    std::uniform_real_distribution<float> wd(0.2f, 1.0f);
    for (index_t t = 1; t < c.tokens; ++t) {
      std::vector<std::int32_t> pool;
      if (t == 1 && c.identity > 0) {
        for (index_t k = e; k < all; ++k) pool.push_back(static_cast<std::int32_t>(k));
      } else {
        for (index_t k = 0; k < all; ++k) pool.push_back(static_cast<std::int32_t>(k));
      }
      std::shuffle(pool.begin(), pool.end(), g);
      const index_t cnt = std::min<index_t>(1 + static_cast<index_t>(g() % c.width),
                                            static_cast<index_t>(pool.size()));
      counts[t] = static_cast<std::int32_t>(cnt);
      for (index_t j = 0; j < cnt; ++j) {
        ids[t * c.width + j] = pool[j];
        pw[t * c.width + j] = wd(g);
      }
    }
  }

  expert_weights<T> weights() const {
    const index_t e = c.experts, d = c.d, n = c.shared;
    expert_weights<T> w{make_view<const T>(w1.data(), e, p, d), {},
                        make_view<const T>(w2.data(), e, d, c.d_ff), {}, {}};
    if (c.bias) {
      w.b1 = make_view<const T>(b1.data(), e, p);
      w.b2 = make_view<const T>(b2.data(), e, d);
    }
    if (n > 0) {
      w.shared.w1 = make_view<const T>(sw1.data(), n, ps, d);
      w.shared.w2 = make_view<const T>(sw2.data(), n, d, c.d_ff_s);
      if (c.bias) {
        w.shared.b1 = make_view<const T>(sb1.data(), n, ps);
        w.shared.b2 = make_view<const T>(sb2.data(), n, d);
      }
      if (c.gate) w.shared.gate = make_view<const T>(gate.data(), 1, d);
    }
    return w;
  }
  matrix_view<const T> xv() const { return make_view<const T>(x.data(), c.tokens, c.d); }
  matrix_view<const T> dyv() const { return make_view<const T>(dy.data(), c.tokens, c.d); }
  routing::plan_view<const std::int32_t, const float> plan() const {
    return {make_view<const std::int32_t>(ids.data(), c.tokens, c.width),
            make_view<const float>(pw.data(), c.tokens, c.width),
            make_view<const std::int32_t>(counts.data(), c.tokens), c.experts + c.identity};
  }

  values as_values() const {
    auto conv = [](const std::vector<T>& v) {
      std::vector<double> r;
      for (const T& e : v) r.push_back(static_cast<double>(to_float(e)));
      return r;
    };
    values v{conv(x),   conv(w1),  conv(b1), conv(w2), conv(b2), conv(sw1), conv(sb1),
             conv(sw2), conv(sb2), conv(gate), {}, ids, counts};
    for (float f : pw) v.pw.push_back(f);
    return v;
  }
  std::vector<double> dy_values() const {
    std::vector<double> r;
    for (const T& e : dy) r.push_back(static_cast<double>(to_float(e)));
    return r;
  }
};

//! Gradient storage (float, +=) with the expert_grads view over it.
struct grads_storage {
  std::vector<float> dx, w1, b1, w2, b2, sw1, sb1, sw2, sb2, gate, d_weights;
  template <ElementType T, class A>
  explicit grads_storage(const problem<T, A>& pr)
      : dx(pr.x.size(), 0.25f), w1(pr.w1.size(), 0.0f), b1(pr.b1.size(), 0.0f),
        w2(pr.w2.size(), 0.0f), b2(pr.b2.size(), 0.0f), sw1(pr.sw1.size(), 0.0f),
        sb1(pr.sb1.size(), 0.0f), sw2(pr.sw2.size(), 0.0f), sb2(pr.sb2.size(), 0.0f),
        gate(pr.gate.size(), 0.0f), d_weights(pr.pw.size(), -9.0f) {}
  template <ElementType T, class A>
  expert_grads view(const problem<T, A>& pr) {
    const config& c = pr.c;
    const index_t e = c.experts, d = c.d, n = c.shared;
    expert_grads g{make_view(w1.data(), e, pr.p, d), {}, make_view(w2.data(), e, d, c.d_ff), {}, {}};
    if (c.bias) {
      g.b1 = make_view(b1.data(), e, pr.p);
      g.b2 = make_view(b2.data(), e, d);
    }
    if (n > 0) {
      g.shared.w1 = make_view(sw1.data(), n, pr.ps, d);
      g.shared.w2 = make_view(sw2.data(), n, d, c.d_ff_s);
      if (c.bias) {
        g.shared.b1 = make_view(sb1.data(), n, pr.ps);
        g.shared.b2 = make_view(sb2.data(), n, d);
      }
      if (c.gate) g.shared.gate = make_view(gate.data(), 1, d);
    }
    return g;
  }
  //! The arrays in the order of values::arrays() ("x" is dx minus its initial 0.25).
  std::vector<std::vector<float>*> arrays() {
    return {&dx, &w1, &b1, &w2, &b2, &sw1, &sb1, &sw2, &sb2, &gate, &d_weights};
  }
  bool operator==(const grads_storage&) const = default;
};

//! forward_experts + backward_experts with workspaces of the queried sizes.
template <class Layer, ElementType T, class A>
void run_plan(const Layer& layer, const problem<T, A>& pr, std::vector<T>& y,
              std::vector<index_t>& dropped, grads_storage& gs) {
  const host_context host{};
  const auto w = pr.weights();
  const config& c = pr.c;
  y.assign(pr.x.size(), from_float<T>(-7.0f));
  dropped.assign(static_cast<std::size_t>(c.experts), -1);
  std::vector<std::byte> fws(layer.experts_workspace_size(host, c.tokens, c.width, w)),
      bws(layer.experts_backward_workspace_size(host, c.tokens, c.width, w));
  layer.forward_experts(host, pr.xv(), pr.plan(), w, make_view(y.data(), c.tokens, c.d),
                        span<index_t>{dropped.data(), dropped.size()}, fws);
  layer.backward_experts(host, pr.xv(), pr.plan(), w, pr.dyv(),
                         make_view(gs.dx.data(), c.tokens, c.d), gs.view(pr),
                         span<float>{gs.d_weights.data(), gs.d_weights.size()}, bws);
}

template <class D>
D make_dispatch(bool drops) {
  if constexpr (std::is_same_v<D, dispatch::padded_capacity>) {
    if (drops) return {.capacity_factor = 0.5f, .min_capacity = 1, .capacity_multiple = 1};
    return {.capacity_factor = 100.0f};
  } else {
    return D{};
  }
}

//! The FFN pairs a padded_capacity dispatch keeps: its capacity over the FFN pairs alone (the
//! identity slots are not dispatched), token order then slot order.
template <ElementType T, class A>
std::vector<char> capacity_keep(const problem<T, A>& pr, const dispatch::padded_capacity& dp) {
  const config& c = pr.c;
  index_t ffn_pairs = 0;
  for (index_t t = 0; t < c.tokens; ++t)
    for (index_t j = 0; j < pr.counts[t]; ++j) ffn_pairs += pr.ids[t * c.width + j] < c.experts;
  const index_t cap = dp.capacity(c.tokens, ffn_pairs, c.experts);
  std::vector<char> keep(pr.ids.size(), 0);
  std::vector<index_t> fill(static_cast<std::size_t>(c.experts), 0);
  for (index_t t = 0; t < c.tokens; ++t)
    for (index_t j = 0; j < pr.counts[t]; ++j) {
      const index_t e = pr.ids[t * c.width + j];
      if (e < c.experts && fill[e] < cap) {
        ++fill[e];
        keep[t * c.width + j] = 1;
      }
    }
  return keep;
}

template <ElementType T>
double forward_tolerance() {
  if constexpr (std::is_same_v<T, float>) return 2e-6;
  else if constexpr (std::is_same_v<T, switchyard::half>) return 2e-3;
  else return 1.6e-2;
}

//! The configurations every test walks: shared with/without gate, S = 1 and 2, identity
//! experts with and without shared ones.
std::vector<config> configs() {
  std::vector<config> v;
  config c;
  c.shared = 1;
  v.push_back(c);  // one shared expert, no gate
  c.shared = 2;
  c.gate = true;
  v.push_back(c);  // two, gated
  c = config{};
  c.identity = 2;
  v.push_back(c);  // identity experts only
  c.shared = 2;
  c.gate = true;
  c.bias = false;
  v.push_back(c);  // both, gated, no biases
  c.bias = true;
  c.shared = 1;
  c.gate = false;
  c.identity = 3;
  v.push_back(c);  // both, ungated
  c.weight_on_input = true;
  c.gate = true;
  v.push_back(c);  // both, with the router weight on the input (an identity slot: w·x)
  return v;
}

std::string describe(const config& c) {
  return "S = " + std::to_string(c.shared) + (c.gate ? " gated" : "") +
         ", Z = " + std::to_string(c.identity) + (c.bias ? ", biases" : "") +
         (c.weight_on_input ? ", weight on input" : "");
}

template <class D, class A, ElementType T>
void check_forward(std::uint64_t seed, bool drops) {
  for (const config& c : configs()) {
    BOOST_TEST_CONTEXT(describe(c) << (drops ? ", capacity drops" : "")) {
      const problem<T, A> pr(c, seed);
      const MoELayer<routers::TopK, A, D> layer{.dispatch = make_dispatch<D>(drops),
                                                .router_weight_on_input = c.weight_on_input,
                                                .identity_experts = c.identity};
      std::vector<T> y;
      std::vector<index_t> dropped;
      grads_storage gs(pr);
      run_plan(layer, pr, y, dropped, gs);
      std::vector<char> keep;
      if constexpr (std::is_same_v<D, dispatch::padded_capacity>) keep = capacity_keep(pr, layer.dispatch);
      const auto ref = reference<A>(c, pr.as_values(), keep);
      double scale = 0.0, err = 0.0;
      for (std::size_t i = 0; i < ref.size(); ++i) {
        scale = std::max(scale, std::abs(ref[i]));
        err = std::max(err, std::abs(static_cast<double>(to_float(y[i])) - ref[i]));
      }
      BOOST_TEST(err <= forward_tolerance<T>() * scale, "max |Δy| = " << err << ", scale " << scale);
      index_t total_dropped = 0;
      for (index_t v : dropped) total_dropped += v;
      index_t expected = 0;
      if (!keep.empty())
        for (index_t t = 0; t < c.tokens; ++t)
          for (index_t j = 0; j < pr.counts[t]; ++j)
            expected += pr.ids[t * c.width + j] < c.experts && !keep[t * c.width + j];
      BOOST_TEST(total_dropped == expected);
      if (drops) BOOST_TEST(expected > 0);
    }
  }
}

//! Backward (float): every gradient against float64 central differences of the reference.
template <class D, class A>
void check_backward(std::uint64_t seed, bool drops) {
  for (const config& c : configs()) {
    BOOST_TEST_CONTEXT(describe(c) << (drops ? ", capacity drops" : "")) {
      const problem<float, A> pr(c, seed);
      const MoELayer<routers::TopK, A, D> layer{.dispatch = make_dispatch<D>(drops),
                                                .router_weight_on_input = c.weight_on_input,
                                                .identity_experts = c.identity};
      std::vector<float> y;
      std::vector<index_t> dropped;
      grads_storage gs(pr);
      run_plan(layer, pr, y, dropped, gs);
      for (float& v : gs.dx) v -= 0.25f;  // dx was accumulated onto 0.25
      std::vector<char> keep;
      if constexpr (std::is_same_v<D, dispatch::padded_capacity>) keep = capacity_keep(pr, layer.dispatch);
      values v = pr.as_values();
      const auto dy = pr.dy_values();
      auto named = v.arrays();
      auto got = gs.arrays();
      for (std::size_t a = 0; a < named.size(); ++a) {
        std::vector<double>& arr = *named[a].second;
        const std::vector<float>& lib = *got[a];
        BOOST_TEST_REQUIRE(arr.size() == lib.size(), named[a].first);
        double scale = 0.0, err = 0.0;
        index_t worst = -1;
        for (std::size_t i = 0; i < arr.size(); ++i) {
          const bool dropped_pair =
              named[a].first == "plan.weights" && !keep.empty() && pr.ids[i] >= 0 &&
              pr.ids[i] < c.experts && !keep[i];
          const double keep_v = arr[i], eps = 1e-5;
          arr[i] = keep_v + eps;
          const double lp = loss<A>(c, v, dy, keep);
          arr[i] = keep_v - eps;
          const double lm = loss<A>(c, v, dy, keep);
          arr[i] = keep_v;
          const double fd = dropped_pair ? 0.0 : (lp - lm) / (2 * eps);
          scale = std::max(scale, std::abs(fd));
          if (std::abs(lib[i] - fd) > err) {
            err = std::abs(lib[i] - fd);
            worst = static_cast<index_t>(i);
          }
        }
        BOOST_TEST(err <= 2e-5 * std::max(scale, 1.0),
                   named[a].first << ": max |Δ| = " << err << " at " << worst << ", scale " << scale);
      }
    }
  }
}

using dispatches = boost::mp11::mp_list<dispatch::sorted_grouped, dispatch::dense, dispatch::padded_capacity>;

}  // namespace

BOOST_AUTO_TEST_CASE_TEMPLATE(forward_matches_the_float64_reference, D, dispatches) {
  const std::uint64_t seed = test::base_seed() + 12201;
  check_forward<D, activation::swiglu, float>(seed, false);
  check_forward<D, activation::swiglu, switchyard::half>(seed + 1, false);
  check_forward<D, activation::swiglu, switchyard::bfloat16>(seed + 2, false);
  check_forward<D, activation::gelu, float>(seed + 3, false);
  if constexpr (std::is_same_v<D, dispatch::padded_capacity>) {
    check_forward<D, activation::swiglu, float>(seed + 4, true);  // capacity over FFN pairs
  }
}

BOOST_AUTO_TEST_CASE_TEMPLATE(backward_matches_finite_differences, D, dispatches) {
  const std::uint64_t seed = test::base_seed() + 12301;
  check_backward<D, activation::swiglu>(seed, false);
  check_backward<D, activation::gelu>(seed + 1, false);
  if constexpr (std::is_same_v<D, dispatch::padded_capacity>) {
    check_backward<D, activation::swiglu>(seed + 2, true);
  }
}

namespace {

//! Sets the OpenMP thread count for a scope and restores it after.
struct threads_scope {
  int saved = omp_get_max_threads();
  explicit threads_scope(int n) { omp_set_num_threads(n); }
  ~threads_scope() { omp_set_num_threads(saved); }
};

//! y (as bits), dropped and every gradient of forward_experts + backward_experts.
template <class D, ElementType T>
std::pair<std::vector<std::uint16_t>, grads_storage> plan_bits(const problem<T, activation::swiglu>& pr,
                                                               bool fixed) {
  const MoELayer<routers::TopK, activation::swiglu, D> layer{
      .dispatch = make_dispatch<D>(true), .batch_invariant = fixed,
      .identity_experts = pr.c.identity};
  std::vector<T> y;
  std::vector<index_t> dropped;
  grads_storage gs(pr);
  run_plan(layer, pr, y, dropped, gs);
  std::vector<std::uint16_t> bits(y.size() * sizeof(T) / 2);
  std::memcpy(bits.data(), y.data(), y.size() * sizeof(T));
  for (index_t v : dropped) bits.push_back(static_cast<std::uint16_t>(v));
  return {bits, gs};
}

template <class D, ElementType T>
void check_threads(std::uint64_t seed) {
  config c;
  c.tokens = 300;  // large enough for the OpenMP regions to split
  c.d = 128;
  c.d_ff = 40;
  c.d_ff_s = 24;
  c.experts = 6;
  c.identity = 2;
  c.shared = 2;
  c.gate = true;
  const problem<T, activation::swiglu> pr(c, seed);
  for (bool fixed : {false, true}) {
    BOOST_TEST_CONTEXT("batch_invariant = " << fixed) {
      std::pair<std::vector<std::uint16_t>, grads_storage> one = [&] {
        threads_scope s(1);
        return plan_bits<D>(pr, fixed);
      }();
      for (int n : {2, 3, 8}) {
        threads_scope s(n);
        const auto many = plan_bits<D>(pr, fixed);
        BOOST_TEST((many.first == one.first), "y or dropped differ with " << n << " threads");
        BOOST_TEST((many.second == one.second), "gradients differ with " << n << " threads");
      }
    }
  }
}

}  // namespace

BOOST_AUTO_TEST_CASE_TEMPLATE(bits_do_not_depend_on_the_thread_count, D, dispatches) {
  check_threads<D, float>(test::base_seed() + 12501);
  check_threads<D, switchyard::bfloat16>(test::base_seed() + 12502);
}

// The routed entry points (router + experts) agree with the plan ones over the router's plan:
// y bitwise, the expert and shared gradients bitwise; state.dropped has E + Z entries, the
// identity ones 0.
BOOST_AUTO_TEST_CASE(routed_entry_points_match_the_plan_entry_points) {
  config c;
  c.tokens = 37;
  c.identity = 3;
  c.shared = 2;
  c.gate = true;
  const problem<float, activation::swiglu> pr(c, test::base_seed() + 12601);
  const index_t all = c.experts + c.identity;
  const MoELayer<routers::TopK, activation::swiglu> layer{.router = {.k = 3},
                                                          .identity_experts = c.identity};
  const host_context host{};
  const routers::TopK::params_type rp{make_view<const float>(pr.router_w.data(), all, c.d)};
  const auto w = pr.weights();
  std::vector<float> y(pr.x.size());
  typename decltype(layer)::result_type res;
  std::vector<std::byte> fws(layer.workspace_size(host, c.tokens, rp, w)),
      bws(layer.backward_workspace_size(host, c.tokens, rp, w));
  layer.forward(host, pr.xv(), rp, w, make_view(y.data(), c.tokens, c.d), res, fws);
  BOOST_TEST(res.dropped.size() == static_cast<std::size_t>(all));
  for (index_t e = c.experts; e < all; ++e) BOOST_TEST(res.dropped[e] == 0);
  index_t identity_slots = 0;
  for (index_t t = 0; t < c.tokens; ++t)
    for (index_t j = 0; j < res.plan.counts[t]; ++j) identity_slots += res.plan.id(t, j) >= c.experts;
  BOOST_TEST(identity_slots > 0);
  grads_storage routed(pr);
  std::vector<float> drw(pr.router_w.size(), 0.0f);
  layer.backward(host, pr.xv(), rp, w, res, pr.dyv(), routers::TopK::losses_type{},
                 make_view(routed.dx.data(), c.tokens, c.d), routed.view(pr),
                 {make_view(drw.data(), all, c.d)}, bws);

  // The same through the plan entry points over the router's plan.
  problem<float, activation::swiglu> fixed = pr;
  fixed.ids = res.plan.expert_ids;
  fixed.pw = res.plan.weights;
  fixed.counts = res.plan.counts;
  fixed.c.width = res.plan.width;
  std::vector<float> y2;
  std::vector<index_t> dropped;
  grads_storage planned(fixed);
  run_plan(layer, fixed, y2, dropped, planned);
  BOOST_TEST((y == y2));
  BOOST_TEST((routed.w1 == planned.w1));
  BOOST_TEST((routed.w2 == planned.w2));
  BOOST_TEST((routed.b1 == planned.b1));
  BOOST_TEST((routed.sw1 == planned.sw1));
  BOOST_TEST((routed.sw2 == planned.sw2));
  BOOST_TEST((routed.sb2 == planned.sb2));
  BOOST_TEST((routed.gate == planned.gate));
  // And y against the float64 reference over that plan.
  const auto ref = reference<activation::swiglu>(fixed.c, fixed.as_values());
  double err = 0.0, scale = 0.0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    err = std::max(err, std::abs(y[i] - ref[i]));
    scale = std::max(scale, std::abs(ref[i]));
  }
  BOOST_TEST(err <= 2e-6 * scale);
}

// Plan ids are checked against E + Z: an identity id is accepted, E + Z is not (range_error
// naming plan.expert_ids); without identity experts an id E is refused as before.
BOOST_AUTO_TEST_CASE(plan_ids_are_checked_against_e_plus_z) {
  config c;
  c.identity = 2;
  problem<float, activation::swiglu> pr(c, test::base_seed() + 12701);
  pr.counts[0] = 1;
  pr.ids[0] = static_cast<std::int32_t>(c.experts + c.identity - 1);  // the last identity expert
  pr.pw[0] = 0.5f;
  const MoELayer<routers::TopK, activation::swiglu> layer{.identity_experts = c.identity};
  std::vector<float> y;
  std::vector<index_t> dropped;
  grads_storage gs(pr);
  BOOST_CHECK_NO_THROW(run_plan(layer, pr, y, dropped, gs));
  for (index_t i = 0; i < c.d; ++i) BOOST_TEST(y[i] == 0.5f * pr.x[i]);  // w · x_0 exactly
  pr.ids[0] = static_cast<std::int32_t>(c.experts + c.identity);
  auto plan = pr.plan();
  plan.num_experts = c.experts + c.identity;
  std::vector<index_t> d4(static_cast<std::size_t>(c.experts));
  y.assign(pr.x.size(), 0.0f);
  try {
    layer.forward_experts(host_context{}, pr.xv(), plan, pr.weights(),
                          make_view(y.data(), c.tokens, c.d), span<index_t>{d4.data(), d4.size()});
    BOOST_FAIL("an id of E + Z was accepted");
  } catch (const range_error& e) {
    BOOST_TEST(std::string(e.what()).find("plan.expert_ids[0, 0] must be in [0, 6)") != std::string::npos,
               e.what());
  }
}
