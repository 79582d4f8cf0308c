// SPDX-License-Identifier: Apache-2.0
// MoELayer forward against the float64 reference layer (layer_reference.hpp), over a typed
// list of router × activation × dispatch × dtype, on fresh seeded inputs; and the three
// dispatches agree when nothing is dropped.
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <cstdio>
#include <tuple>

#include <switchyard/switchyard.hpp>

#include "host/layer/layer_reference.hpp"
#include "support/contexts.hpp"
#include "support/random.hpp"

namespace sy = switchyard;
using namespace switchyard;

namespace {

template <class R, class A, class D, class T>
struct cfg {
  using router = R;
  using activation = A;
  using dispatch = D;
  using element = T;
};

template <class R>
R make_router() {
  if constexpr (std::is_same_v<R, routers::TopK>) return R{.k = 2, .renormalize = true};
  else if constexpr (std::is_same_v<R, routers::TopP>) return R{.p = 0.5f, .max_k = 3};
  else if constexpr (std::is_same_v<R, routers::AdaptiveGating>) return R{.threshold = 0.2f};
  else if constexpr (std::is_same_v<R, routers::DynMoE>) return R{.training = true};
  else return R{.k_rule = {.k_min = 1, .k_max = 3}};
}

template <class D>
D make_dispatch() {
  if constexpr (std::is_same_v<D, dispatch::padded_capacity>)
    return D{.capacity_factor = 1.0f, .min_capacity = 0, .capacity_multiple = 2,
             .drop = dispatch::dropped_output::scaled_input};
  else return D{};
}

using damoe = routers::DAMoE<routing::importance::precomputed>;

// Twelve instantiations: every router, activation, dispatch and dtype appears at least twice.
using configs = std::tuple<
    cfg<routers::TopK, activation::relu, dispatch::sorted_grouped, float>,
    cfg<routers::TopK, activation::swiglu, dispatch::sorted_grouped, sy::half>,
    cfg<routers::TopK, activation::gelu_tanh, dispatch::padded_capacity, sy::bfloat16>,
    cfg<routers::TopK, activation::geglu, dispatch::dense, float>,
    cfg<routers::TopP, activation::silu, dispatch::sorted_grouped, sy::bfloat16>,
    cfg<routers::TopP, activation::swiglu, dispatch::padded_capacity, float>,
    cfg<routers::AdaptiveGating, activation::gelu, dispatch::dense, sy::half>,
    cfg<routers::AdaptiveGating, activation::relu, dispatch::padded_capacity, sy::half>,
    cfg<damoe, activation::geglu, dispatch::sorted_grouped, float>,
    cfg<damoe, activation::silu, dispatch::dense, sy::bfloat16>,
    cfg<routers::DynMoE, activation::swiglu, dispatch::sorted_grouped, float>,
    cfg<routers::DynMoE, activation::gelu, dispatch::padded_capacity, sy::half>>;

}  // namespace

BOOST_AUTO_TEST_CASE_TEMPLATE(forward_matches_float64_reference, C, configs) {
  using R = typename C::router;
  using A = typename C::activation;
  using D = typename C::dispatch;
  using T = typename C::element;
  const std::uint64_t seed = test::base_seed() + 11;
  std::mt19937_64 g(seed);
  constexpr index_t tokens = 37, d = 19, d_ff = 13, experts = 6;  // d, d_ff: no vector width
  BOOST_TEST_MESSAGE("seed " << seed << " dtype " << element_type_name<T>());

  test::layer_data<T> L(g, tokens, d, d_ff, experts, activation_traits<A>::is_gated, true);
  test::router_setup<R> rs(g, make_router<R>(), tokens, d, experts);
  // A masked DynMoE slot holds NaN weights: the plan never routes there, so they are never read.
  for (index_t e = 0; e < experts; ++e) {
    if (!rs.masked(e)) continue;
    for (index_t i = 0; i < L.p * d; ++i) L.w1[e * L.p * d + i] = from_float<T>(NAN);
  }
  MoELayer<R, A, D> layer{.router = rs.router, .dispatch = make_dispatch<D>()};
  // One body for every execution context (tests/support/contexts.hpp).
  test::for_each_context([&](auto& f) {
    const auto to_context = [&](const auto& v) { return f.to_context(v); };
    std::vector<T> y(static_cast<std::size_t>(tokens * d), from_float<T>(-7.0f));  // poisoned
    const auto y_ctx = f.to_context(make_view(y.data(), tokens, d));
    const auto rp = rs.params(d, to_context);
    auto state = f.template make_state<typename R::losses_type>(tokens, layer.router.width(rp), experts);
    layer.forward(f.context(), f.to_context(L.xv()), rp, L.weights(to_context), y_ctx, state.view());
    f.to_host(y_ctx, y.data());
    const auto& res = state.download();

    BOOST_TEST_REQUIRE(res.plan.num_tokens == tokens);
    for (index_t t = 0; t < tokens; ++t)
      for (index_t j = 0; j < res.plan.counts[t]; ++j) BOOST_TEST_REQUIRE(!rs.masked(res.plan.id(t, j)));

    std::vector<char> keep;
    bool pass_through = false;
    index_t expected_dropped = 0;
    if constexpr (std::is_same_v<D, dispatch::padded_capacity>) {
      const auto disp = make_dispatch<D>();
      // C by the documented formula, written out here from the spec.
      const double raw = std::ceil(static_cast<double>(disp.capacity_factor) *
                                   res.plan.total_assignments() / experts);
      index_t cap = std::max<index_t>(static_cast<index_t>(raw), disp.min_capacity);
      cap = (cap + disp.capacity_multiple - 1) / disp.capacity_multiple * disp.capacity_multiple;
      keep = test::ref_capacity_keep(res.plan, cap);
      pass_through = true;
      BOOST_TEST_MESSAGE("capacity " << cap);
      for (index_t p = 0; p < tokens * res.plan.width; ++p)
        if (p % res.plan.width < res.plan.counts[p / res.plan.width] && !keep[p]) ++expected_dropped;
    }
    BOOST_TEST(res.total_dropped() == expected_dropped);
    if constexpr (std::is_same_v<D, dispatch::padded_capacity>) BOOST_TEST(expected_dropped > 0);  // the case exercises drops
    for (index_t e = 0; e < experts && std::is_same_v<D, dispatch::padded_capacity>; ++e) {
      index_t n = 0;  // per-expert drops: routed pairs beyond the kept ones
      for (index_t p = 0; p < tokens * res.plan.width; ++p)
        if (p % res.plan.width < res.plan.counts[p / res.plan.width] && res.plan.id(p / res.plan.width, p % res.plan.width) == e && !keep[p]) ++n;
      BOOST_TEST(res.dropped[e] == n);
    }

    std::vector<double> scale;
    const auto ref = test::ref_layer<A>(L, res.plan, keep, pass_through, &scale);
    const double u = unit_roundoff<T>();
    int bad = 0;
    for (index_t i = 0; i < tokens * d; ++i) {
      const double got = test::dbl(y[i]);
      const double tol = 2.0 * u * std::abs(ref[i]) + 2e-6 * (scale[i] + 1.0);
      if (!(std::abs(got - ref[i]) <= tol) && bad++ < 5)
        BOOST_ERROR("y[" << i / d << ", " << i % d << "] = " << got << ", reference " << ref[i]
                         << ", tolerance " << tol);
    }
    BOOST_TEST(bad == 0);
  });
}

// With a capacity that drops nothing, all three dispatches give the same y (to float
// rounding: the GEMMs run over different row counts).
using dispatch_dtypes = std::tuple<float, sy::half, sy::bfloat16>;
BOOST_AUTO_TEST_CASE_TEMPLATE(three_dispatches_agree_without_drops, T, dispatch_dtypes) {
  std::mt19937_64 g(test::base_seed() + 12);
  constexpr index_t tokens = 29, d = 11, d_ff = 7, experts = 5;
  test::layer_data<T> L(g, tokens, d, d_ff, experts, true, true);
  test::router_setup<routers::TopK> rs(g, {.k = 2}, tokens, d, experts);
  const auto params = rs.params(d);
  std::vector<T> y_sorted(tokens * d), y_padded(tokens * d), y_dense(tokens * d);
  MoELayer<routers::TopK, activation::swiglu, dispatch::sorted_grouped> a{.router = rs.router};
  MoELayer<routers::TopK, activation::swiglu, dispatch::padded_capacity> b{
      .router = rs.router, .dispatch = {.capacity_factor = 100.0f}};
  MoELayer<routers::TopK, activation::swiglu, dispatch::dense> c{.router = rs.router};
  decltype(a)::result_type ra, rb, rc;
  a.forward<T>(switchyard::host_context{}, L.xv(), params, L.weights(), make_view(y_sorted.data(), tokens, d), ra);
  b.forward<T>(switchyard::host_context{}, L.xv(), params, L.weights(), make_view(y_padded.data(), tokens, d), rb);
  c.forward<T>(switchyard::host_context{}, L.xv(), params, L.weights(), make_view(y_dense.data(), tokens, d), rc);
  BOOST_TEST(rb.total_dropped() == 0);
  const double u = unit_roundoff<T>();
  for (index_t i = 0; i < tokens * d; ++i) {
    const double s = test::dbl(y_sorted[i]);
    const double tol = 2.0 * u * std::abs(s) + 1e-5;
    BOOST_TEST(std::abs(test::dbl(y_padded[i]) - s) <= tol);
    BOOST_TEST(std::abs(test::dbl(y_dense[i]) - s) <= tol);
  }
}
