// SPDX-License-Identifier: Apache-2.0
// MoELayer::router_weight_on_input (Llama-4: y_t = Σ_j FFN_{e_tj}(w_tj · x_t), no weight on
// the output) through the plan entry points forward_experts / backward_experts, against a
// float64 reference written here: forward in float, half and bfloat16; backward (dx, W1, b1,
// W2, b2 and the plan-weight cotangent d_weights) against float64 central differences, with
// sorted_grouped, padded_capacity (zero and scaled_input drops, token_major and slot_major
// order, an absolute expert_capacity) and dense; the bits do not depend on the thread count,
// and with batch_invariant a token's y and dx do not depend on its batch.
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <omp.h>

#include <switchyard/switchyard.hpp>

#include "host/layer/layer_reference.hpp"
#include "support/random.hpp"

using namespace switchyard;

namespace {

// ---- the problem: a plan and the expert weights, in double (the exact values the library sees)

struct problem {
  index_t t, d, f, p, e, width;
  std::vector<double> x, w1, b1, w2, b2, wts;  // wts [T·width]: the plan's weights
  std::vector<std::int32_t> ids, counts;
};

//! A random problem whose values are exactly representable in T (x and the expert weights
//! rounded to T; plan weights are float). Token t uses counts in [1, width] distinct experts,
//! except token 1, which uses none.
template <ElementType T>
problem make_problem(std::mt19937_64& g, index_t t, index_t d, index_t f, index_t e,
                     index_t width, bool gated) {
  problem q{t, d, f, gated ? 2 * f : f, e, width, {}, {}, {}, {}, {}, {}, {}, {}};
  auto gen = [&](index_t n, float s) {
    const auto v = test::normal(g, static_cast<std::size_t>(n), s);
    std::vector<double> out(v.size());
    for (std::size_t i = 0; i < v.size(); ++i) out[i] = to_float(from_float<T>(v[i]));
    return out;
  };
  q.x = gen(t * d, 1.0f);
  q.w1 = gen(e * q.p * d, 0.5f);
  q.b1 = gen(e * q.p, 0.2f);
  q.w2 = gen(e * d * f, 0.5f);
  q.b2 = gen(e * d, 0.2f);
  q.ids.assign(static_cast<std::size_t>(t * width), -1);
  q.wts.assign(static_cast<std::size_t>(t * width), 0.0);
  q.counts.assign(static_cast<std::size_t>(t), 0);
  std::vector<std::int32_t> all(static_cast<std::size_t>(e));
  for (index_t i = 0; i < e; ++i) all[i] = static_cast<std::int32_t>(i);
  const auto w = test::uniform(g, static_cast<std::size_t>(t * width), 0.1f, 1.5f);
  for (index_t i = 0; i < t; ++i) {
    std::shuffle(all.begin(), all.end(), g);
    const index_t c = i == 1 ? 0 : (i % 5 == 3 ? 1 : width);
    q.counts[i] = static_cast<std::int32_t>(c);
    for (index_t j = 0; j < c; ++j) {
      q.ids[i * width + j] = all[j];
      q.wts[i * width + j] = w[i * width + j];
    }
  }
  return q;
}

//! The rule of ../shared/hf-cases/README.md "Capacity", literally: pairs considered in
//! token-major or slot-major order; a pair is kept if the count of pairs considered so far for
//! its expert (itself included) is ≤ C. keep[t·width + j]; all kept when C < 0.
std::vector<char> ref_keep(const problem& q, index_t cap, bool slot_major) {
  std::vector<char> keep(q.ids.size(), 0);
  std::vector<std::pair<index_t, index_t>> order;
  if (slot_major) {
    for (index_t j = 0; j < q.width; ++j)
      for (index_t t = 0; t < q.t; ++t) order.emplace_back(t, j);
  } else {
    for (index_t t = 0; t < q.t; ++t)
      for (index_t j = 0; j < q.width; ++j) order.emplace_back(t, j);
  }
  std::vector<index_t> considered(static_cast<std::size_t>(q.e), 0);
  for (auto [t, j] : order) {
    if (j >= q.counts[t]) continue;
    const auto e = q.ids[t * q.width + j];
    keep[t * q.width + j] = cap < 0 || ++considered[e] <= cap;
  }
  return keep;
}

//! y [T, d] in double: Σ_j FFN_{e_tj}(w_tj · x_t) over kept pairs, + w_tj · x_t for a dropped
//! pair when `pass_through`.
template <class A>
std::vector<double> ref_forward(const problem& q, const std::vector<char>& keep,
                                bool pass_through) {
  const bool gated = activation_traits<A>::is_gated;
  std::vector<double> y(static_cast<std::size_t>(q.t * q.d), 0.0), u(q.d), h(q.p), a(q.f);
  for (index_t t = 0; t < q.t; ++t) {
    for (index_t j = 0; j < q.counts[t]; ++j) {
      const index_t e = q.ids[t * q.width + j];
      const double w = q.wts[t * q.width + j];
      if (!keep[t * q.width + j]) {
        if (pass_through)
          for (index_t i = 0; i < q.d; ++i) y[t * q.d + i] += w * q.x[t * q.d + i];
        continue;
      }
      for (index_t i = 0; i < q.d; ++i) u[i] = w * q.x[t * q.d + i];
      for (index_t r = 0; r < q.p; ++r) {
        double s = q.b1[e * q.p + r];
        for (index_t i = 0; i < q.d; ++i) s += q.w1[(e * q.p + r) * q.d + i] * u[i];
        h[r] = s;
      }
      for (index_t c = 0; c < q.f; ++c)
        a[c] = gated ? test::ref_activation<A>(h[c], h[q.f + c]) : test::ref_activation<A>(h[c]);
      for (index_t o = 0; o < q.d; ++o) {
        double s = q.b2[e * q.d + o];
        for (index_t c = 0; c < q.f; ++c) s += q.w2[(e * q.d + o) * q.f + c] * a[c];
        y[t * q.d + o] += s;
      }
    }
  }
  return y;
}

// ---- the library side ------------------------------------------------------------------

template <ElementType T>
std::vector<T> as_t(const std::vector<double>& v) {
  std::vector<T> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = from_float<T>(static_cast<float>(v[i]));
  return out;
}

//! Everything one library run needs and produces, in T (gradients float).
template <ElementType T>
struct layer_run {
  const problem& q;
  std::vector<T> x, w1, b1, w2, b2, dy;
  routing::routing_plan plan;
  std::vector<T> y;
  std::vector<index_t> dropped;
  std::vector<float> dx, dw1, db1, dw2, db2, dwts;

  layer_run(const problem& q_, const std::vector<double>& g)
      : q(q_), x(as_t<T>(q.x)), w1(as_t<T>(q.w1)), b1(as_t<T>(q.b1)), w2(as_t<T>(q.w2)),
        b2(as_t<T>(q.b2)), dy(as_t<T>(g)) {
    plan.resize(q.t, q.width, q.e);
    for (std::size_t i = 0; i < q.ids.size(); ++i) {
      plan.expert_ids[i] = q.ids[i];
      plan.weights[i] = static_cast<float>(q.wts[i]);
    }
    for (index_t t = 0; t < q.t; ++t) plan.counts[t] = q.counts[t];
  }

  expert_weights<T> weights() const {
    return {make_view<const T>(w1.data(), q.e, q.p, q.d), make_view<const T>(b1.data(), q.e, q.p),
            make_view<const T>(w2.data(), q.e, q.d, q.f), make_view<const T>(b2.data(), q.e, q.d)};
  }

  template <class Layer>
  void forward(const Layer& layer) {
    y.assign(x.size(), from_float<T>(0.0f));
    dropped.assign(static_cast<std::size_t>(q.e), -1);
    layer.template forward_experts<T>(host_context{}, make_view<const T>(x.data(), q.t, q.d),
                                      std::as_const(plan).view(), weights(),
                                      make_view(y.data(), q.t, q.d), dropped);
  }

  template <class Layer>
  void backward(const Layer& layer) {
    dx.assign(x.size(), 0.0f);
    dw1.assign(w1.size(), 0.0f);
    db1.assign(b1.size(), 0.0f);
    dw2.assign(w2.size(), 0.0f);
    db2.assign(b2.size(), 0.0f);
    dwts.assign(plan.weights.size(), -7.0f);
    const expert_grads eg{make_view(dw1.data(), q.e, q.p, q.d), make_view(db1.data(), q.e, q.p),
                          make_view(dw2.data(), q.e, q.d, q.f), make_view(db2.data(), q.e, q.d)};
    layer.template backward_experts<T>(host_context{}, make_view<const T>(x.data(), q.t, q.d),
                                       std::as_const(plan).view(), weights(),
                                       make_view<const T>(dy.data(), q.t, q.d),
                                       make_view(dx.data(), q.t, q.d), eg,
                                       span<float>(dwts.data(), dwts.size()));
  }
};

// ---- the dispatch configurations under test -------------------------------------------

struct grouped_case {
  using dispatch_type = dispatch::sorted_grouped;
  static dispatch_type make() { return {}; }
  static constexpr index_t cap = -1;
  static constexpr bool slot_major = false, pass_through = false;
};
struct capacity_zero_case {  // token-major, dropped pairs give nothing, C from the factor
  using dispatch_type = dispatch::padded_capacity;
  static dispatch_type make() {
    return {.capacity_factor = 0.5f, .min_capacity = 0, .capacity_multiple = 1};
  }
  static constexpr index_t cap = -2;  // from the factor: ceil(0.5 · Σ counts / E)
  static constexpr bool slot_major = false, pass_through = false;
};
struct capacity_pass_case {  // slot-major, dropped pairs give w · x_t, absolute C
  using dispatch_type = dispatch::padded_capacity;
  static dispatch_type make() {
    return {.drop = dispatch::dropped_output::scaled_input,
            .priority = dispatch::capacity_priority::slot_major,
            .expert_capacity = 3};
  }
  static constexpr index_t cap = 3;
  static constexpr bool slot_major = true, pass_through = true;
};
struct dense_case {
  using dispatch_type = dispatch::dense;
  static dispatch_type make() { return {}; }
  static constexpr index_t cap = -1;
  static constexpr bool slot_major = false, pass_through = false;
};

template <class C>
index_t capacity_of(const problem& q) {
  if (C::cap != -2) return C::cap;
  index_t assignments = 0;
  for (auto c : q.counts) assignments += c;
  return static_cast<index_t>(std::ceil(0.5 * static_cast<double>(assignments) / q.e));
}

template <class A, class C>
auto make_layer(bool batch_invariant = false) {
  return MoELayer<routers::TopK, A, typename C::dispatch_type>{
      .router = {.k = 2},
      .dispatch = C::make(),
      .batch_invariant = batch_invariant,
      .router_weight_on_input = true};
}

template <class A, class C>
struct case_ {
  using activation = A;
  using config = C;
};

using cases = std::tuple<case_<activation::swiglu, grouped_case>,
                         case_<activation::gelu, grouped_case>,
                         case_<activation::swiglu, capacity_zero_case>,
                         case_<activation::silu, capacity_pass_case>,
                         case_<activation::swiglu, capacity_pass_case>,
                         case_<activation::swiglu, dense_case>,
                         case_<activation::relu, dense_case>>;

double max_abs(const std::vector<double>& v) {
  double m = 0.0;
  for (double a : v) m = std::max(m, std::abs(a));
  return m;
}

template <ElementType T>
double tolerance() {
  if constexpr (std::is_same_v<T, float>) return 1e-5;
  else if constexpr (std::is_same_v<T, switchyard::half>) return 2e-3;
  else return 1.6e-2;  // bfloat16: 8 significant bits
}

//! Forward in T against the float64 reference: max|Δ| ≤ tol(T) · max|y_ref|; drop counts exact.
template <class A, class C, ElementType T>
void check_forward(std::uint64_t seed) {
  std::mt19937_64 g(seed);
  const bool gated = activation_traits<A>::is_gated;
  const problem q = make_problem<T>(g, 17, 12, 6, 5, 2, gated);
  const auto keep = ref_keep(q, capacity_of<C>(q), C::slot_major);
  const auto ref = ref_forward<A>(q, keep, C::pass_through);
  layer_run<T> r(q, std::vector<double>(q.x.size(), 1.0));
  r.forward(make_layer<A, C>());
  const double tol = tolerance<T>() * max_abs(ref);
  int bad = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    const double got = to_float(r.y[i]);
    if (!(std::abs(got - ref[i]) <= tol) && bad++ < 4)
      BOOST_ERROR("y[" << i << "] = " << got << ", reference " << ref[i] << " (tolerance " << tol
                       << ")");
  }
  BOOST_TEST(bad == 0);
  // Drop counts per expert from the reference's keep set.
  std::vector<index_t> dropped(static_cast<std::size_t>(q.e), 0);
  for (index_t t = 0; t < q.t; ++t)
    for (index_t j = 0; j < q.counts[t]; ++j)
      if (!keep[t * q.width + j]) ++dropped[q.ids[t * q.width + j]];
  BOOST_TEST(r.dropped == dropped, boost::test_tools::per_element());
  if constexpr (C::cap != -1) {
    BOOST_TEST(std::count(keep.begin(), keep.end(), 0) > 0);  // the case drops pairs
  }
}

}  // namespace

BOOST_AUTO_TEST_CASE_TEMPLATE(forward_matches_float64_reference, K, cases) {
  using A = typename K::activation;
  using C = typename K::config;
  check_forward<A, C, float>(test::base_seed() + 1201);
  check_forward<A, C, switchyard::half>(test::base_seed() + 1202);
  check_forward<A, C, switchyard::bfloat16>(test::base_seed() + 1203);
}

// The weight sits on the input, not the output: with ReLU and no biases FFN is positively
// homogeneous (FFN(w·x) = w·FFN(x), w > 0), so both placements give the same y up to float
// rounding; with swiglu (silu is not homogeneous) they differ by far more than rounding.
template <class A>
double placement_difference(std::uint64_t seed) {
  std::mt19937_64 g(seed);
  problem q = make_problem<float>(g, 9, 8, 4, 4, 2, activation_traits<A>::is_gated);
  std::fill(q.b1.begin(), q.b1.end(), 0.0);
  std::fill(q.b2.begin(), q.b2.end(), 0.0);
  const std::vector<double> ones(q.x.size(), 1.0);
  layer_run<float> on(q, ones), off(q, ones);
  auto layer = make_layer<A, grouped_case>();
  on.forward(layer);
  layer.router_weight_on_input = false;
  off.forward(layer);
  double diff = 0.0, scale = 0.0;
  for (std::size_t i = 0; i < on.y.size(); ++i) {
    diff = std::max(diff, static_cast<double>(std::abs(on.y[i] - off.y[i])));
    scale = std::max(scale, static_cast<double>(std::abs(off.y[i])));
  }
  BOOST_TEST(scale > 0.0);
  return diff / scale;
}

BOOST_AUTO_TEST_CASE(weight_on_input_is_not_weight_on_output) {
  BOOST_TEST(placement_difference<activation::relu>(test::base_seed() + 1210) <= 1e-5);
  BOOST_TEST(placement_difference<activation::swiglu>(test::base_seed() + 1211) >= 1e-2);
}

BOOST_AUTO_TEST_CASE_TEMPLATE(backward_matches_central_differences, K, cases) {
  using A = typename K::activation;
  using C = typename K::config;
  std::mt19937_64 g(test::base_seed() + 1220);
  const bool gated = activation_traits<A>::is_gated;
  problem q = make_problem<float>(g, 11, 5, 4, 4, 2, gated);
  const auto gv = test::normal(g, static_cast<std::size_t>(q.t * q.d));
  const std::vector<double> G(gv.begin(), gv.end());
  const auto keep = ref_keep(q, capacity_of<C>(q), C::slot_major);
  if constexpr (C::cap != -1) BOOST_TEST(std::count(keep.begin(), keep.end(), 0) > 0);

  layer_run<float> r(q, G);
  const auto layer = make_layer<A, C>();
  r.forward(layer);
  r.backward(layer);

  auto loss = [&] {
    const auto y = ref_forward<A>(q, keep, C::pass_through);
    double s = 0.0;
    for (std::size_t i = 0; i < y.size(); ++i) s += G[i] * y[i];
    return s;
  };
  auto check = [&](const char* name, std::vector<double>& param, const std::vector<float>& got) {
    BOOST_TEST_REQUIRE(param.size() == got.size());
    const double h = 1e-6;
    double max_fd = 0.0;
    std::vector<double> fd(param.size());
    for (std::size_t i = 0; i < param.size(); ++i) {
      const double keep_value = param[i];
      param[i] = keep_value + h;
      const double lp = loss();
      param[i] = keep_value - h;
      const double lm = loss();
      param[i] = keep_value;
      fd[i] = (lp - lm) / (2 * h);
      max_fd = std::max(max_fd, std::abs(fd[i]));
    }
    BOOST_TEST(max_fd > 0.0, name << ": the gradient is not identically zero");
    int bad = 0;
    for (std::size_t i = 0; i < param.size(); ++i) {
      const double tol = 2e-5 * std::max(1.0, max_fd) + 1e-4 * std::abs(fd[i]);
      if (!(std::abs(got[i] - fd[i]) <= tol) && bad++ < 4)
        BOOST_ERROR(name << "[" << i << "]: backward " << got[i] << ", central difference "
                         << fd[i]);
    }
    BOOST_TEST(bad == 0, name);
  };
  check("dx", q.x, r.dx);
  check("W1", q.w1, r.dw1);
  check("b1", q.b1, r.db1);
  check("W2", q.w2, r.dw2);
  check("b2", q.b2, r.db2);
  check("d_weights", q.wts, r.dwts);
}

namespace {

//! Sets the OpenMP and (where the BLAS offers it) the BLAS thread count; restores on exit.
struct thread_guard {
  int omp = omp_get_max_threads();
  int blas = host::blas_threads();
  static void set(int n) {
    omp_set_num_threads(n);
    host::set_blas_threads(n);
  }
  ~thread_guard() {
    omp_set_num_threads(omp);
    host::set_blas_threads(blas);
  }
};

template <ElementType T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() &&
         std::equal(a.begin(), a.end(), b.begin(), [](const T& u, const T& v) {
           return std::memcmp(&u, &v, sizeof(T)) == 0;
         });
}

template <class A, class C, ElementType T>
void check_threads(std::uint64_t seed) {
  std::mt19937_64 g(seed);
  // Large enough that every OpenMP region of the phase runs in parallel (T·width·d > 2^15).
  const problem q = make_problem<T>(g, 300, 64, 24, 8, 2, activation_traits<A>::is_gated);
  const auto gv = test::normal(g, static_cast<std::size_t>(q.t * q.d));
  const std::vector<double> G(gv.begin(), gv.end());
  const thread_guard guard;
  const auto layer = make_layer<A, C>();
  thread_guard::set(1);
  layer_run<T> ref(q, G);
  ref.forward(layer);
  ref.backward(layer);
  for (int threads : {2, 3, 4}) {
    thread_guard::set(threads);
    layer_run<T> r(q, G);
    r.forward(layer);
    r.backward(layer);
    BOOST_TEST(same_bits(r.y, ref.y), "y differs with " << threads << " threads");
    BOOST_TEST(r.dropped == ref.dropped);
    BOOST_TEST(same_bits(r.dx, ref.dx), "dx differs with " << threads << " threads");
    BOOST_TEST((same_bits(r.dw1, ref.dw1) && same_bits(r.db1, ref.db1) &&
                same_bits(r.dw2, ref.dw2) && same_bits(r.db2, ref.db2)),
               "expert gradients differ with " << threads << " threads");
    BOOST_TEST(same_bits(r.dwts, ref.dwts), "d_weights differ with " << threads << " threads");
  }
}

}  // namespace

BOOST_AUTO_TEST_CASE(bits_do_not_depend_on_the_thread_count) {
  const auto seed = test::base_seed() + 1230;
  check_threads<activation::swiglu, grouped_case, float>(seed);
  check_threads<activation::swiglu, grouped_case, switchyard::bfloat16>(seed + 1);
  check_threads<activation::gelu, capacity_pass_case, float>(seed + 2);
  check_threads<activation::swiglu, capacity_zero_case, switchyard::half>(seed + 3);
  check_threads<activation::swiglu, dense_case, float>(seed + 4);
}

// batch_invariant: a token's y and dx (and its d_weights) are the same bits alone as in its
// batch (sorted_grouped and dense: no capacity, so nothing couples tokens).
template <class C>
void check_batch_invariance(std::uint64_t seed) {
  std::mt19937_64 g(seed);
  const problem q = make_problem<float>(g, 40, 32, 16, 6, 2, true);
  const auto gv = test::normal(g, static_cast<std::size_t>(q.t * q.d));
  const std::vector<double> G(gv.begin(), gv.end());
  const auto layer = make_layer<activation::swiglu, C>(true);
  layer_run<float> all(q, G);
  all.forward(layer);
  all.backward(layer);
  for (index_t t : {index_t{0}, index_t{7}, q.t - 1}) {
    problem one = q;
    one.t = 1;
    auto slice = [&](const auto& v, index_t per) {
      using V = std::decay_t<decltype(v)>;
      return V(v.begin() + t * per, v.begin() + (t + 1) * per);
    };
    one.x = slice(q.x, q.d);
    one.ids = slice(q.ids, q.width);
    one.wts = slice(q.wts, q.width);
    one.counts = slice(q.counts, 1);
    layer_run<float> r(one, slice(G, q.d));
    r.forward(layer);
    r.backward(layer);
    BOOST_TEST(same_bits(r.y, slice(all.y, q.d)), "y of token " << t);
    BOOST_TEST(same_bits(r.dx, slice(all.dx, q.d)), "dx of token " << t);
    BOOST_TEST(same_bits(r.dwts, slice(all.dwts, q.width)), "d_weights of token " << t);
  }
}

BOOST_AUTO_TEST_CASE(batch_invariant_token_bits) {
  check_batch_invariance<grouped_case>(test::base_seed() + 1240);
  check_batch_invariance<dense_case>(test::base_seed() + 1241);
}
