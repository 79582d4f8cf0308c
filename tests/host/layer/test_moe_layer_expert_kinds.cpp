// SPDX-License-Identifier: Apache-2.0
// Non-FFN expert kinds on the host layer (issue #13): identity experts (x_t), zero experts (0)
// and constant experts (MoE++: α1·x_t + α2·v_c, [α1, α2] = softmax(gate_c · x_t)), mixed in one
// plan with FFN experts (and a shared expert), tokens routed only to non-FFN experts included:
// forward against a float64 reference written here (float, half, bfloat16), backward against
// float64 central finite differences of that reference (dx, every FFN weight, the constant
// experts' v and gate, the plan's d_weights through backward_experts), the dense,
// sorted_grouped and padded_capacity dispatches; thread-count invariance; the rows the routed
// expert phase computes (host::expert_rows_probe: no GEMM row for a non-FFN slot); the FLOP
// accounting (ffn_pairs, MoELayer::compute); the routed entry points; the argument checks.
#include <boost/mp11/list.hpp>
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <set>
#include <string>
#include <type_traits>
#include <vector>

#include <omp.h>

#include <switchyard/switchyard.hpp>

#include "support/random.hpp"

using namespace switchyard;

namespace {

struct config {
  index_t tokens = 13, d = 8, d_ff = 6, experts = 4;  // E FFN experts
  index_t identity = 1, zero = 2, constant = 2;       // Z, N, C
  index_t shared = 0, d_ff_s = 5;                     // one ungated shared expert when 1
  index_t width = 4;                                  // plan slots
  [[nodiscard]] index_t all() const { return experts + identity + zero + constant; }
};

double silu(double h) { return h / (1.0 + std::exp(-h)); }

//! Every input and parameter in float64 (the values the library sees after rounding to T).
struct values {
  std::vector<double> x, w1, b1, w2, b2, sw1, sw2, v, cg, pw;
  std::vector<std::int32_t> ids, counts;
  std::vector<std::pair<std::string, std::vector<double>*>> arrays() {
    return {{"x", &x},     {"w1", &w1},   {"b1", &b1}, {"w2", &w2},          {"b2", &b2},
            {"sw1", &sw1}, {"sw2", &sw2}, {"v", &v},   {"constant.gate", &cg}, {"plan.weights", &pw}};
  }
};

//! swiglu FFN of expert e (w1 [n, 2f, d], optional b1, w2 [n, d, f], optional b2) into out.
void ffn(index_t d, index_t f, const std::vector<double>& w1, const std::vector<double>& b1,
         const std::vector<double>& w2, const std::vector<double>& b2, index_t e, const double* x,
         double* out) {
  std::vector<double> a(static_cast<std::size_t>(f));
  auto proj = [&](index_t row) {
    double s = b1.empty() ? 0.0 : b1[e * 2 * f + row];
    for (index_t i = 0; i < d; ++i) s += w1[(e * 2 * f + row) * d + i] * x[i];
    return s;
  };
  for (index_t k = 0; k < f; ++k) a[k] = silu(proj(k)) * proj(f + k);
  for (index_t o = 0; o < d; ++o) {
    double s = b2.empty() ? 0.0 : b2[e * d + o];
    for (index_t k = 0; k < f; ++k) s += w2[(e * d + o) * f + k] * a[k];
    out[o] = s;
  }
}

//! y [T, d] in float64; `keep` (empty: all) marks the FFN pairs a capacity keeps.
std::vector<double> reference(const config& c, const values& v, const std::vector<char>& keep = {}) {
  const index_t d = c.d, e0 = c.experts, z0 = e0 + c.identity, c0 = z0 + c.zero;
  std::vector<double> y(static_cast<std::size_t>(c.tokens * d), 0.0), out(d);
  for (index_t t = 0; t < c.tokens; ++t) {
    const double* xt = &v.x[t * d];
    double* yt = &y[t * d];
    if (c.shared > 0) {
      ffn(d, c.d_ff_s, v.sw1, {}, v.sw2, {}, 0, xt, out.data());
      for (index_t i = 0; i < d; ++i) yt[i] += out[i];
    }
    for (index_t j = 0; j < v.counts[t]; ++j) {
      const index_t id = v.ids[t * c.width + j];
      const double w = v.pw[t * c.width + j];
      if (id < e0) {
        if (!keep.empty() && !keep[t * c.width + j]) continue;
        ffn(d, c.d_ff, v.w1, v.b1, v.w2, v.b2, id, xt, out.data());
        for (index_t i = 0; i < d; ++i) yt[i] += w * out[i];
      } else if (id < z0) {
        for (index_t i = 0; i < d; ++i) yt[i] += w * xt[i];
      } else if (id >= c0) {
        const index_t k = id - c0;
        double z[2] = {0.0, 0.0};
        for (int r = 0; r < 2; ++r)
          for (index_t i = 0; i < d; ++i) z[r] += v.cg[(k * 2 + r) * d + i] * xt[i];
        const double m = std::max(z[0], z[1]);
        const double a1 = std::exp(z[0] - m), a2 = std::exp(z[1] - m);
        for (index_t i = 0; i < d; ++i)
          yt[i] += w * (a1 * xt[i] + a2 * v.v[k * d + i]) / (a1 + a2);
      }  // zero experts: nothing
    }
  }
  return y;
}

double loss(const config& c, const values& v, const std::vector<double>& dy,
            const std::vector<char>& keep) {
  const auto y = reference(c, v, keep);
  double s = 0.0;
  for (std::size_t i = 0; i < y.size(); ++i) s += y[i] * dy[i];
  return s;
}

template <ElementType T>
struct problem {
  config c;
  std::vector<T> x, w1, b1, w2, b2, sw1, sw2, v, cg, dy;
  std::vector<std::int32_t> ids, counts;
  std::vector<float> pw, router_w;

  problem(const config& cfg, std::uint64_t seed) : c(cfg) {
    std::mt19937_64 g(seed);
    auto fill = [&](std::vector<T>& a, index_t n, float s) {
      for (float f : test::normal(g, static_cast<std::size_t>(n), s)) a.push_back(from_float<T>(f));
    };
    const index_t e = c.experts, d = c.d;
    fill(x, c.tokens * d, 1.0f);
    fill(w1, e * 2 * c.d_ff * d, 1.0f / std::sqrt(float(d)));
    fill(b1, e * 2 * c.d_ff, 0.2f);
    fill(w2, e * d * c.d_ff, 1.0f / std::sqrt(float(c.d_ff)));
    fill(b2, e * d, 0.2f);
    if (c.shared > 0) {
      fill(sw1, 2 * c.d_ff_s * d, 1.0f / std::sqrt(float(d)));
      fill(sw2, d * c.d_ff_s, 1.0f / std::sqrt(float(c.d_ff_s)));
    }
    fill(v, c.constant * d, 1.0f);
    fill(cg, c.constant * 2 * d, 0.5f);
    fill(dy, c.tokens * d, 1.0f);
    router_w = test::normal(g, static_cast<std::size_t>(c.all() * d));
    // Plan: token 0 no slot, token 1 only non-FFN experts (every kind), token 2 only zero
    // experts, the rest random distinct experts of all kinds; weights in [0.2, 1).
    ids.assign(static_cast<std::size_t>(c.tokens * c.width), -1);
    pw.assign(ids.size(), 0.0f);
    counts.assign(static_cast<std::size_t>(c.tokens), 0);
    std::uniform_real_distribution<float> wd(0.2f, 1.0f);
    for (index_t t = 1; t < c.tokens; ++t) {
      std::vector<std::int32_t> pool;
      const index_t lo = t == 1 ? e : t == 2 ? e + c.identity : 0;
      const index_t hi = t == 2 ? e + c.identity + c.zero : c.all();
      for (index_t k = lo; k < hi; ++k) pool.push_back(static_cast<std::int32_t>(k));
      if (pool.empty()) continue;
      std::shuffle(pool.begin(), pool.end(), g);
      const index_t cnt = t == 1 ? std::min<index_t>(c.width, static_cast<index_t>(pool.size()))
                                 : std::min<index_t>(1 + static_cast<index_t>(g() % c.width),
                                                     static_cast<index_t>(pool.size()));
      counts[t] = static_cast<std::int32_t>(cnt);
      for (index_t j = 0; j < cnt; ++j) {
        ids[t * c.width + j] = pool[j];
        pw[t * c.width + j] = wd(g);
      }
    }
  }

  expert_weights<T> weights() const {
    const index_t e = c.experts, d = c.d;
    expert_weights<T> w{make_view<const T>(w1.data(), e, 2 * c.d_ff, d),
                        make_view<const T>(b1.data(), e, 2 * c.d_ff),
                        make_view<const T>(w2.data(), e, d, c.d_ff),
                        make_view<const T>(b2.data(), e, d), {}};
    if (c.shared > 0) {
      w.shared.w1 = make_view<const T>(sw1.data(), 1, 2 * c.d_ff_s, d);
      w.shared.w2 = make_view<const T>(sw2.data(), 1, d, c.d_ff_s);
    }
    if (c.constant > 0) {
      w.constant.v = make_view<const T>(v.data(), c.constant, d);
      w.constant.gate = make_view<const T>(cg.data(), c.constant, 2, d);
    }
    return w;
  }
  matrix_view<const T> xv() const { return make_view<const T>(x.data(), c.tokens, c.d); }
  matrix_view<const T> dyv() const { return make_view<const T>(dy.data(), c.tokens, c.d); }
  routing::plan_view<const std::int32_t, const float> plan() const {
    return {make_view<const std::int32_t>(ids.data(), c.tokens, c.width),
            make_view<const float>(pw.data(), c.tokens, c.width),
            make_view<const std::int32_t>(counts.data(), c.tokens), c.all()};
  }
  values as_values() const {
    auto conv = [](const std::vector<T>& a) {
      std::vector<double> r;
      for (const T& e : a) r.push_back(static_cast<double>(to_float(e)));
      return r;
    };
    values r{conv(x), conv(w1), conv(b1), conv(w2), conv(b2), conv(sw1), conv(sw2),
             conv(v), conv(cg), {},       ids,      counts};
    for (float f : pw) r.pw.push_back(f);
    return r;
  }
  std::vector<double> dy_values() const {
    std::vector<double> r;
    for (const T& e : dy) r.push_back(static_cast<double>(to_float(e)));
    return r;
  }
  [[nodiscard]] index_t ffn_pair_count() const {
    index_t n = 0;
    for (index_t t = 0; t < c.tokens; ++t)
      for (index_t j = 0; j < counts[t]; ++j) n += ids[t * c.width + j] < c.experts;
    return n;
  }
};

//! Gradient storage (float, +=) and its expert_grads view.
struct grads_storage {
  std::vector<float> dx, w1, b1, w2, b2, sw1, sw2, v, cg, d_weights;
  template <ElementType T>
  explicit grads_storage(const problem<T>& pr)
      : dx(pr.x.size(), 0.25f), w1(pr.w1.size(), 0.0f), b1(pr.b1.size(), 0.0f),
        w2(pr.w2.size(), 0.0f), b2(pr.b2.size(), 0.0f), sw1(pr.sw1.size(), 0.0f),
        sw2(pr.sw2.size(), 0.0f), v(pr.v.size(), 0.5f), cg(pr.cg.size(), -0.5f),
        d_weights(pr.pw.size(), -9.0f) {}
  template <ElementType T>
  expert_grads view(const problem<T>& pr) {
    const config& c = pr.c;
    const index_t e = c.experts, d = c.d;
    expert_grads g{make_view(w1.data(), e, 2 * c.d_ff, d), make_view(b1.data(), e, 2 * c.d_ff),
                   make_view(w2.data(), e, d, c.d_ff), make_view(b2.data(), e, d), {}};
    if (c.shared > 0) {
      g.shared.w1 = make_view(sw1.data(), 1, 2 * c.d_ff_s, d);
      g.shared.w2 = make_view(sw2.data(), 1, d, c.d_ff_s);
    }
    if (c.constant > 0) {
      g.constant.v = make_view(v.data(), c.constant, d);
      g.constant.gate = make_view(cg.data(), c.constant, 2, d);
    }
    return g;
  }
  //! In the order of values::arrays(); the initial offsets removed by `unbias`.
  std::vector<std::vector<float>*> arrays() {
    return {&dx, &w1, &b1, &w2, &b2, &sw1, &sw2, &v, &cg, &d_weights};
  }
  void unbias() {
    for (float& e : dx) e -= 0.25f;
    for (float& e : v) e -= 0.5f;
    for (float& e : cg) e += 0.5f;
  }
  bool operator==(const grads_storage&) const = default;
};

template <class D>
D make_dispatch(bool drops) {
  if constexpr (std::is_same_v<D, dispatch::padded_capacity>) {
    if (drops) return {.capacity_factor = 0.5f, .min_capacity = 1, .capacity_multiple = 1};
    return {.capacity_factor = 100.0f};
  } else {
    return D{};
  }
}

template <class D>
MoELayer<routers::TopK, activation::swiglu, D> make_layer(const config& c, bool drops,
                                                          bool fixed = false) {
  return {.dispatch = make_dispatch<D>(drops), .batch_invariant = fixed,
          .identity_experts = c.identity, .zero_experts = c.zero, .constant_experts = c.constant};
}

//! forward_experts + backward_experts with workspaces of the queried sizes.
template <class Layer, ElementType T>
void run_plan(const Layer& layer, const problem<T>& pr, std::vector<T>& y,
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

//! The FFN pairs a padded_capacity keeps: capacity over the FFN pairs alone, token order.
template <ElementType T>
std::vector<char> capacity_keep(const problem<T>& pr, const dispatch::padded_capacity& dp) {
  const config& c = pr.c;
  const index_t cap = dp.capacity(c.tokens, pr.ffn_pair_count(), c.experts);
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

std::vector<config> configs() {
  std::vector<config> v;
  config c;
  v.push_back(c);  // identity 1, zero 2, constant 2
  c.identity = 0;
  c.constant = 0;
  c.zero = 3;
  v.push_back(c);  // zero experts only
  c.zero = 0;
  c.constant = 3;
  v.push_back(c);  // constant experts only
  c = config{};
  c.shared = 1;
  c.identity = 2;
  v.push_back(c);  // every kind beside a shared expert
  return v;
}

std::string describe(const config& c) {
  return "Z = " + std::to_string(c.identity) + ", N = " + std::to_string(c.zero) +
         ", C = " + std::to_string(c.constant) + ", S = " + std::to_string(c.shared);
}

template <class D, ElementType T>
void check_forward(std::uint64_t seed, bool drops) {
  for (const config& c : configs()) {
    BOOST_TEST_CONTEXT(describe(c) << (drops ? ", capacity drops" : "")) {
      const problem<T> pr(c, seed);
      const auto layer = make_layer<D>(c, drops);
      std::vector<T> y;
      std::vector<index_t> dropped;
      grads_storage gs(pr);
      run_plan(layer, pr, y, dropped, gs);
      std::vector<char> keep;
      if constexpr (std::is_same_v<D, dispatch::padded_capacity>) keep = capacity_keep(pr, layer.dispatch);
      const auto ref = reference(c, pr.as_values(), keep);
      double scale = 0.0, err = 0.0;
      for (std::size_t i = 0; i < ref.size(); ++i) {
        scale = std::max(scale, std::abs(ref[i]));
        err = std::max(err, std::abs(static_cast<double>(to_float(y[i])) - ref[i]));
      }
      BOOST_TEST(err <= forward_tolerance<T>() * scale, "max |Δy| = " << err << ", scale " << scale);
      index_t total = 0, expected = 0;
      for (index_t e : dropped) total += e;
      if (!keep.empty())
        for (std::size_t i = 0; i < keep.size(); ++i)
          expected += pr.ids[i] >= 0 && pr.ids[i] < c.experts && !keep[i];
      BOOST_TEST(total == expected);
      if (drops) BOOST_TEST(expected > 0);
      if (c.shared == 0) {  // token 0 (no slot) and token 2 (zero experts only): y = 0 exactly
        for (index_t i = 0; i < c.d; ++i) {
          BOOST_TEST(to_float(y[i]) == 0.0f);
          BOOST_TEST(to_float(y[2 * c.d + i]) == 0.0f);
        }
      }
    }
  }
}

template <class D>
void check_backward(std::uint64_t seed, bool drops) {
  for (const config& c : configs()) {
    BOOST_TEST_CONTEXT(describe(c) << (drops ? ", capacity drops" : "")) {
      const problem<float> pr(c, seed);
      const auto layer = make_layer<D>(c, drops);
      std::vector<float> y;
      std::vector<index_t> dropped;
      grads_storage gs(pr);
      run_plan(layer, pr, y, dropped, gs);
      gs.unbias();
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
          const bool dropped_pair = named[a].first == "plan.weights" && !keep.empty() &&
                                    pr.ids[i] >= 0 && pr.ids[i] < c.experts && !keep[i];
          const double keep_v = arr[i], eps = 1e-5;
          arr[i] = keep_v + eps;
          const double lp = loss(c, v, dy, keep);
          arr[i] = keep_v - eps;
          const double lm = loss(c, v, dy, keep);
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
      // A zero slot's d_weights is exactly 0.
      const index_t z0 = c.experts + c.identity;
      for (std::size_t i = 0; i < pr.ids.size(); ++i)
        if (pr.ids[i] >= z0 && pr.ids[i] < z0 + c.zero) BOOST_TEST(gs.d_weights[i] == 0.0f);
    }
  }
}

using dispatches =
    boost::mp11::mp_list<dispatch::sorted_grouped, dispatch::dense, dispatch::padded_capacity>;

}  // namespace

BOOST_AUTO_TEST_CASE_TEMPLATE(forward_matches_the_float64_reference, D, dispatches) {
  const std::uint64_t seed = test::base_seed() + 13101;
  check_forward<D, float>(seed, false);
  check_forward<D, switchyard::half>(seed + 1, false);
  check_forward<D, switchyard::bfloat16>(seed + 2, false);
  if constexpr (std::is_same_v<D, dispatch::padded_capacity>) {
    check_forward<D, float>(seed + 3, true);  // capacity over the FFN pairs only
  }
}

BOOST_AUTO_TEST_CASE_TEMPLATE(backward_matches_finite_differences, D, dispatches) {
  const std::uint64_t seed = test::base_seed() + 13201;
  check_backward<D>(seed, false);
  if constexpr (std::is_same_v<D, dispatch::padded_capacity>) check_backward<D>(seed + 1, true);
}

namespace {

struct threads_scope {
  int saved = omp_get_max_threads();
  explicit threads_scope(int n) { omp_set_num_threads(n); }
  ~threads_scope() { omp_set_num_threads(saved); }
};

template <class D, ElementType T>
std::pair<std::vector<std::uint16_t>, grads_storage> plan_bits(const problem<T>& pr, bool fixed) {
  const auto layer = make_layer<D>(pr.c, true, fixed);
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
  c.experts = 6;
  c.identity = 2;
  c.zero = 2;
  c.constant = 3;
  c.shared = 1;
  c.d_ff_s = 24;
  const problem<T> pr(c, seed);
  for (bool fixed : {false, true}) {
    BOOST_TEST_CONTEXT("batch_invariant = " << fixed) {
      const auto one = [&] {
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
  check_threads<D, float>(test::base_seed() + 13301);
  check_threads<D, switchyard::bfloat16>(test::base_seed() + 13302);
}

// The routed phase never sees a non-FFN slot: the probe records, for forward and backward, a
// plan of exactly the FFN pairs with ids < E and an expert count of E, and the GEMM rows it
// computes equal those of the same plan with every non-FFN slot deleted (sorted_grouped and
// padded_capacity: one row per FFN pair; dense: T per FFN expert used).
BOOST_AUTO_TEST_CASE_TEMPLATE(no_gemm_row_is_spent_on_a_non_ffn_slot, D, dispatches) {
  config c;
  c.tokens = 29;
  c.width = 5;
  const problem<float> pr(c, test::base_seed() + 13401);
  index_t non_ffn = 0;
  for (std::size_t i = 0; i < pr.ids.size(); ++i) non_ffn += pr.ids[i] >= c.experts;
  BOOST_TEST_REQUIRE(non_ffn > 10);
  const index_t ffn = pr.ffn_pair_count();
  std::set<std::int32_t> used;
  for (std::size_t i = 0; i < pr.ids.size(); ++i)
    if (pr.ids[i] >= 0 && pr.ids[i] < c.experts) used.insert(pr.ids[i]);
  const index_t expected_rows =
      std::is_same_v<D, dispatch::dense> ? c.tokens * static_cast<index_t>(used.size()) : ffn;

  const auto layer = make_layer<D>(c, false);
  std::vector<float> y;
  std::vector<index_t> dropped;
  grads_storage gs(pr);
  host::expert_rows_stats kinds_stats;
  {
    host::expert_rows_probe probe;
    run_plan(layer, pr, y, dropped, gs);
    kinds_stats = probe.stats;
  }
  BOOST_TEST(kinds_stats.phases == 2);  // forward and backward
  BOOST_TEST(kinds_stats.experts == c.experts);
  BOOST_TEST(kinds_stats.max_id < c.experts);
  BOOST_TEST(kinds_stats.pairs == 2 * ffn);
  BOOST_TEST(kinds_stats.rows == 2 * expected_rows);

  // The same plan with its non-FFN slots deleted, on a layer without kinds: the same rows.
  problem<float> ffn_only = pr;
  ffn_only.c.identity = ffn_only.c.zero = ffn_only.c.constant = 0;
  for (index_t t = 0; t < c.tokens; ++t) {
    index_t n = 0;
    for (index_t j = 0; j < pr.counts[t]; ++j) {
      const std::int32_t id = pr.ids[t * c.width + j];
      if (id >= c.experts) continue;
      ffn_only.ids[t * c.width + n] = id;
      ffn_only.pw[t * c.width + n++] = pr.pw[t * c.width + j];
    }
    for (index_t j = n; j < c.width; ++j) ffn_only.ids[t * c.width + j] = -1;
    ffn_only.counts[t] = static_cast<std::int32_t>(n);
  }
  const auto plain = make_layer<D>(ffn_only.c, false);
  grads_storage gs2(ffn_only);
  host::expert_rows_probe probe;
  run_plan(plain, ffn_only, y, dropped, gs2);
  BOOST_TEST(probe.stats.rows == kinds_stats.rows);
  BOOST_TEST(probe.stats.pairs == kinds_stats.pairs);
  // No probe installed: nothing recorded anywhere else.
  BOOST_TEST(host::expert_rows_probe::current() == &probe);
}

// FLOP accounting counts FFN slots only.
BOOST_AUTO_TEST_CASE(flop_accounting_counts_ffn_slots_only) {
  config c;
  c.tokens = 21;
  const problem<float> pr(c, test::base_seed() + 13501);
  const auto layer = make_layer<dispatch::sorted_grouped>(c, false);
  const auto w = pr.weights();
  index_t used = 0;
  for (index_t t = 0; t < c.tokens; ++t) used += pr.counts[t];
  const index_t ffn = pr.ffn_pair_count();
  BOOST_TEST_REQUIRE(ffn < used);
  BOOST_TEST(ffn_pairs(pr.plan(), c.experts) == ffn);
  BOOST_TEST(used_pairs(pr.plan()) == used);
  const expert_compute r = layer.compute(w, pr.plan());
  BOOST_TEST(r.ffn_pairs == ffn);
  BOOST_TEST(r.non_ffn_pairs == used - ffn);
  BOOST_TEST(r.ffn_flops ==
             2.0 * static_cast<double>(ffn) * static_cast<double>(2 * c.d_ff + c.d_ff) * c.d);
  // The same accounting as the router side's routing::plan_compute over the same plan.
  std::vector<std::int32_t> ids = pr.ids, counts = pr.counts;
  std::vector<float> pw = pr.pw;
  routing::plan_ref ref{c.tokens, c.width, c.all(), {ids.data(), ids.size()},
                        {pw.data(), pw.size()}, {counts.data(), counts.size()}, {}, {}};
  const routing::plan_compute_report pc = routing::plan_compute(ref, c.experts);
  BOOST_TEST(pc.ffn_assignments == ffn);
  BOOST_TEST(pc.expert_flops(routing::ffn_flops_per_slot(c.d, c.d_ff, true)) == r.ffn_flops);
  const ops::expert_ranges k = layer.expert_kinds(w);
  BOOST_TEST(k.total() == c.all());
  BOOST_TEST(layer.routed_experts(w) == c.all());
  BOOST_TEST((k.kind(c.experts - 1) == ops::expert_kind::ffn));
  BOOST_TEST((k.kind(c.experts) == ops::expert_kind::identity));
  BOOST_TEST((k.kind(c.experts + c.identity) == ops::expert_kind::zero));
  BOOST_TEST((k.kind(c.all() - 1) == ops::expert_kind::constant));
}

// The routed entry points (a TopK router over E + Z + N + C experts) agree with the plan ones
// over the router's plan: y and every expert gradient bitwise; state.dropped has an entry per
// routed expert, the non-FFN ones 0.
BOOST_AUTO_TEST_CASE(routed_entry_points_match_the_plan_entry_points) {
  config c;
  c.tokens = 37;
  c.shared = 1;
  const problem<float> pr(c, test::base_seed() + 13601);
  const index_t all = c.all();
  auto layer = make_layer<dispatch::sorted_grouped>(c, false);
  layer.router.k = 3;
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
  index_t non_ffn = 0;
  for (index_t t = 0; t < c.tokens; ++t)
    for (index_t j = 0; j < res.plan.counts[t]; ++j) non_ffn += res.plan.id(t, j) >= c.experts;
  BOOST_TEST(non_ffn > 0);
  grads_storage routed(pr);
  std::vector<float> drw(pr.router_w.size(), 0.0f);
  layer.backward(host, pr.xv(), rp, w, res, pr.dyv(), routers::TopK::losses_type{},
                 make_view(routed.dx.data(), c.tokens, c.d), routed.view(pr),
                 {make_view(drw.data(), all, c.d)}, bws);
  problem<float> fixed = pr;
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
  BOOST_TEST((routed.v == planned.v));
  BOOST_TEST((routed.cg == planned.cg));
  BOOST_TEST((routed.sw1 == planned.sw1));
  const auto ref = reference(fixed.c, fixed.as_values());
  double err = 0.0, scale = 0.0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    err = std::max(err, std::abs(y[i] - ref[i]));
    scale = std::max(scale, std::abs(ref[i]));
  }
  BOOST_TEST(err <= 2e-6 * scale);
}

// Bad arguments name themselves.
BOOST_AUTO_TEST_CASE(bad_expert_kind_arguments_are_refused) {
  config c;
  problem<float> pr(c, test::base_seed() + 13701);
  std::vector<float> y;
  std::vector<index_t> dropped;
  auto expect = [&](const auto& layer, const problem<float>& p, const std::string& what) {
    grads_storage gs(p);
    try {
      run_plan(layer, p, y, dropped, gs);
      BOOST_ERROR("accepted: " << what);
    } catch (const std::exception& e) {
      BOOST_TEST(std::string(e.what()).find(what) != std::string::npos, e.what());
    }
  };
  {
    auto layer = make_layer<dispatch::sorted_grouped>(c, false);
    layer.zero_experts = -1;
    expect(layer, pr, "zero_experts must be >= 0, got -1");
  }
  {
    auto layer = make_layer<dispatch::sorted_grouped>(c, false);
    layer.router_weight_on_input = true;
    expect(layer, pr, "router_weight_on_input is not supported");
  }
  {
    problem<float> bad = pr;
    bad.c.constant = 1;  // weights.constant [1, d], the layer says C = 2
    bad.v.resize(static_cast<std::size_t>(c.d));
    bad.cg.resize(static_cast<std::size_t>(2 * c.d));
    const auto layer = make_layer<dispatch::sorted_grouped>(c, false);
    expect(layer, bad, "weights.constant.v");
  }
  {
    config none = c;
    none.constant = 0;
    problem<float> p2(none, test::base_seed() + 13702);
    const auto layer = make_layer<dispatch::sorted_grouped>(none, false);
    problem<float> with = p2;
    with.c.constant = 2;  // passes weights.constant and grads.constant to a layer with C = 0
    with.v = pr.v;
    with.cg = pr.cg;
    with.c.zero = none.zero + 2;  // keeps the plan's expert count: ids stay valid
    auto l2 = layer;
    l2.zero_experts = none.zero + 2;
    expect(l2, with, "weights.constant: given, but MoELayer::constant_experts is 0");
  }
}
