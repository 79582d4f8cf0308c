// SPDX-License-Identifier: Apache-2.0
// MoELayer: determinism across runs and OpenMP thread counts, edge shapes, a token routed to
// no expert, bad input (every error names the argument and the expectation), workspace
// (size query, caller memory, no allocation), 64-bit index arithmetic, strided views, the
// add-on hook.
#include <boost/test/unit_test.hpp>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <tuple>
#include <vector>

#include <omp.h>

#include <switchyard/layer/hypermoe_addon.hpp>
#include <switchyard/switchyard.hpp>

#include "host/layer/layer_reference.hpp"
#include "support/random.hpp"

// Counts heap allocations (operator new) so a test can prove forward allocates nothing.
// (GCC flags the malloc/free pair once new/delete are inlined; the pair is correct.)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
namespace {
std::atomic<long> g_allocations{0};
}
void* operator new(std::size_t n) {
  ++g_allocations;
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }

namespace sy = switchyard;
using namespace switchyard;

namespace {

template <class E, class F>
void expect_error(F&& f, const std::string& argument, const std::string& fragment) {
  try {
    f();
    BOOST_ERROR("no exception; expected one naming " << argument);
  } catch (const E& e) {
    BOOST_TEST(e.argument() == argument);
    BOOST_TEST(std::string(e.what()).find(fragment) != std::string::npos,
               "message '" << e.what() << "' lacks '" << fragment << "'");
  }
}

// Runs a top-k layer on fresh inputs and compares y with the float64 reference.
template <class A, class D, class T = float>
void run_against_reference(index_t tokens, index_t d, index_t f, index_t experts, int k) {
  std::mt19937_64 g(test::base_seed() + 31 + tokens * 7 + experts);
  test::layer_data<T> L(g, tokens, d, f, experts, activation_traits<A>::is_gated, true);
  test::router_setup<routers::TopK> rs(g, {.k = k}, tokens, d, experts);
  MoELayer<routers::TopK, A, D> layer{.router = rs.router};
  std::vector<T> y(static_cast<std::size_t>(tokens * d));
  typename decltype(layer)::result_type res;
  layer.template forward<T>(switchyard::host_context{}, L.xv(), rs.params(d), L.weights(), make_view(y.data(), tokens, d), res);
  BOOST_TEST(res.plan.num_tokens == tokens);
  std::vector<double> scale;
  const auto ref = test::ref_layer<A>(L, res.plan, {}, false, &scale);
  for (index_t i = 0; i < tokens * d; ++i)
    BOOST_TEST(std::abs(test::dbl(y[i]) - ref[i]) <=
               2.0 * unit_roundoff<T>() * std::abs(ref[i]) + 2e-6 * (scale[i] + 1.0));
  if (tokens == 0) {
    BOOST_TEST(res.losses.lb_switch == 0.0f);
    BOOST_TEST(res.losses.z == 0.0f);
    // backward on an empty batch is valid too
    std::vector<float> gw1(L.w1.size());
    layer.template backward<T>(switchyard::host_context{}, L.xv(), rs.params(d), L.weights(), res, L.xv(), {},
                               make_view<float>(nullptr, 0, d),
                               {make_view(gw1.data(), experts, L.p, d), {}, {}, {}}, {});
    for (float v : gw1) BOOST_TEST(v == 0.0f);
  }
}

using dispatches = std::tuple<dispatch::sorted_grouped, dispatch::padded_capacity, dispatch::dense>;

}  // namespace

BOOST_AUTO_TEST_CASE_TEMPLATE(edge_shapes, D, dispatches) {
  run_against_reference<activation::swiglu, D>(0, 8, 4, 4, 2);   // T = 0
  run_against_reference<activation::gelu, D>(1, 8, 4, 4, 2);     // T = 1
  run_against_reference<activation::relu, D>(5, 8, 4, 1, 1);     // E = 1
  run_against_reference<activation::silu, D>(6, 7, 5, 3, 3);     // k = E
  run_against_reference<activation::geglu, D, sy::half>(9, 13, 3, 4, 2);  // odd d, half
}

// Bitwise equal across two runs and across OpenMP thread counts (1 vs 2), forward and
// backward, for every dispatch. Sizes pass the OpenMP thresholds so loops really split.
BOOST_AUTO_TEST_CASE_TEMPLATE(bitwise_deterministic_across_runs_and_threads, D, dispatches) {
  std::mt19937_64 g(test::base_seed() + 41);
  constexpr index_t tokens = 600, d = 64, f = 40, experts = 8;
  test::layer_data<float> L(g, tokens, d, f, experts, true, true);
  test::router_setup<routers::TopK> rs(g, {.k = 2}, tokens, d, experts);
  const auto dy = test::normal(g, tokens * d);
  MoELayer<routers::TopK, activation::swiglu, D> layer{.router = rs.router};
  struct outputs {
    std::vector<float> y, dx, dw1, db1, dw2, db2, dwr;
    bool operator==(const outputs&) const = default;
  };
  auto run = [&](int threads) {
    omp_set_num_threads(threads);
    outputs o{std::vector<float>(tokens * d), std::vector<float>(tokens * d),
              std::vector<float>(L.w1.size()), std::vector<float>(L.b1.size()),
              std::vector<float>(L.w2.size()), std::vector<float>(L.b2.size()),
              std::vector<float>(rs.w.size())};
    typename decltype(layer)::result_type res;
    layer.template forward<float>(switchyard::host_context{}, L.xv(), rs.params(d), L.weights(), make_view(o.y.data(), tokens, d), res);
    layer.template backward<float>(switchyard::host_context{}, L.xv(), rs.params(d), L.weights(), res, make_view<const float>(dy.data(), tokens, d),
        {0.01f, 0.01f, 0.001f}, make_view(o.dx.data(), tokens, d),
        {make_view(o.dw1.data(), experts, L.p, d), make_view(o.db1.data(), experts, L.p),
         make_view(o.dw2.data(), experts, d, f), make_view(o.db2.data(), experts, d)},
        {make_view(o.dwr.data(), experts, d)});
    return o;
  };
  const int saved = omp_get_max_threads();
  const outputs a = run(1), b = run(1), c = run(2);
  omp_set_num_threads(saved);
  BOOST_TEST((a == b), "two runs with 1 thread differ");
  BOOST_TEST((a == c), "1 thread and 2 threads differ");
  BOOST_TEST(std::any_of(a.dw1.begin(), a.dw1.end(), [](float v) { return v != 0.0f; }));
}

// A plan made by hand (as DynMoE's training mode makes one): token 1 uses no expert.
BOOST_AUTO_TEST_CASE(token_routed_to_no_expert) {
  std::mt19937_64 g(test::base_seed() + 51);
  constexpr index_t tokens = 3, d = 6, f = 4, experts = 3;
  test::layer_data<float> L(g, tokens, d, f, experts, false, true);
  routing::routing_plan plan;
  plan.resize(tokens, 2, experts);
  plan.expert_ids = {2, 0, -1, -1, 1, -1};
  plan.weights = {0.7f, 0.3f, 0.0f, 0.0f, 1.0f, 0.0f};
  plan.counts = {2, 0, 1};
  MoELayer<routers::TopK, activation::gelu, dispatch::sorted_grouped> layer{};
  std::vector<float> y(tokens * d, 123.0f);
  std::vector<index_t> dropped(experts);
  layer.forward_experts<float>(switchyard::host_context{}, L.xv(), std::as_const(plan).view(), L.weights(),
                               make_view(y.data(), tokens, d), {dropped.data(), dropped.size()});
  const auto ref = test::ref_layer<activation::gelu>(L, plan, {}, false);
  for (index_t i = 0; i < d; ++i) BOOST_TEST(y[1 * d + i] == 0.0f);  // no expert: y_t = 0
  for (index_t i = 0; i < tokens * d; ++i) BOOST_TEST(std::abs(y[i] - ref[i]) <= 1e-5);

  std::vector<float> dy(tokens * d, 1.0f), dx(tokens * d, 0.0f), dw(tokens * 2, -1.0f);
  layer.backward_experts<float>(switchyard::host_context{}, L.xv(), std::as_const(plan).view(), L.weights(),
                                make_view<const float>(dy.data(), tokens, d),
                                make_view(dx.data(), tokens, d), {}, {dw.data(), dw.size()});
  for (index_t i = 0; i < d; ++i) BOOST_TEST(dx[1 * d + i] == 0.0f);
  BOOST_TEST(dw[2] == 0.0f);  // unused slots get no weight cotangent
  BOOST_TEST(dw[3] == 0.0f);
  BOOST_TEST(dw[0] != 0.0f);
}

BOOST_AUTO_TEST_CASE(bad_input_names_argument_and_expectation) {
  std::mt19937_64 g(test::base_seed() + 61);
  constexpr index_t tokens = 4, d = 6, f = 3, experts = 4;
  test::layer_data<float> L(g, tokens, d, f, experts, true, false);
  test::router_setup<routers::TopK> rs(g, {.k = 2}, tokens, d, experts);
  std::vector<float> y(tokens * d), wrong(tokens * (d + 1));
  MoELayer<routers::TopK, activation::swiglu> layer{.router = rs.router};
  decltype(layer)::result_type res;
  const auto yv = make_view(y.data(), tokens, d);

  // x's width differs from the weights'.
  expect_error<shape_error>([&] {
    layer.forward<float>(switchyard::host_context{}, make_view<const float>(wrong.data(), tokens, d + 1), rs.params(d),
                         L.weights(), yv, res);
  }, "weights.w2", "[E, d, d_ff] with d = x.extent(1)");
  // Gated activation but W1 is [E, d_ff, d].
  {
    auto w = L.weights();
    w.w1 = make_view<const float>(L.w1.data(), experts, f, d);
    expect_error<shape_error>([&] { layer.forward<float>(switchyard::host_context{}, L.xv(), rs.params(d), w, yv, res); },
                              "weights.w1", "2·d_ff");
  }
  // Router has 3 experts, the weights 4.
  expect_error<shape_error>([&] {
    layer.forward<float>(switchyard::host_context{}, L.xv(), {make_view<const float>(rs.w.data(), 3, d)}, L.weights(), yv, res);
  }, "weights.w1", "router's expert count E = 3");
  // y of the wrong shape.
  expect_error<shape_error>([&] {
    layer.forward<float>(switchyard::host_context{}, L.xv(), rs.params(d), L.weights(), make_view(y.data(), tokens - 1, d), res);
  }, "y", "[T, d] like x");
  // k > E.
  {
    MoELayer<routers::TopK, activation::swiglu> big{.router = {.k = 5}};
    expect_error<range_error>([&] { big.forward<float>(switchyard::host_context{}, L.xv(), rs.params(d), L.weights(), yv, res); },
                              "k", "[1, E]");
  }
  // capacity factor <= 0 (and NaN).
  for (float cf : {0.0f, -1.0f, NAN}) {
    MoELayer<routers::TopK, activation::swiglu, dispatch::padded_capacity> cap{
        .router = rs.router, .dispatch = {.capacity_factor = cf}};
    expect_error<range_error>([&] { cap.forward<float>(switchyard::host_context{}, L.xv(), rs.params(d), L.weights(), yv, res); },
                              "capacity_factor", "> 0");
  }
  // NaN / Inf in x: non_finite_error naming the element.
  for (float bad : {NAN, INFINITY, -INFINITY}) {
    auto x = L.x;
    x[2 * d + 3] = bad;
    expect_error<non_finite_error>([&] {
      layer.forward<float>(switchyard::host_context{}, make_view<const float>(x.data(), tokens, d), rs.params(d), L.weights(), yv, res);
    }, "x", "x[2, 3]");
  }
  // A plan for other shapes.
  {
    routing::routing_plan plan;
    plan.resize(tokens + 1, 2, experts);
    std::vector<index_t> dropped(experts);
    expect_error<shape_error>([&] {
      layer.forward_experts<float>(switchyard::host_context{}, L.xv(), std::as_const(plan).view(), L.weights(), yv,
                                   {dropped.data(), dropped.size()});
    }, "plan.expert_ids", "expected shape [4, *]");
    plan.resize(tokens, 2, experts + 1);
    expect_error<shape_error>([&] {
      layer.forward_experts<float>(switchyard::host_context{}, L.xv(), std::as_const(plan).view(), L.weights(), yv,
                                   {dropped.data(), dropped.size()});
    }, "plan", "num_experts must match weights (E = 4)");
    plan.resize(tokens, 2, experts);
    plan.counts[0] = 1;
    plan.expert_ids[0] = 7;
    expect_error<range_error>([&] {
      layer.forward_experts<float>(switchyard::host_context{}, L.xv(), std::as_const(plan).view(), L.weights(), yv,
                                   {dropped.data(), dropped.size()});
    }, "plan.expert_ids", "in [0, 4)");
  }
  // Gradient views of the wrong shape.
  {
    layer.forward<float>(switchyard::host_context{}, L.xv(), rs.params(d), L.weights(), yv, res);
    std::vector<float> gw2(experts * d * f);
    expect_error<shape_error>([&] {
      layer.backward<float>(switchyard::host_context{}, L.xv(), rs.params(d), L.weights(), res, L.xv(), {}, {},
                            {{}, {}, make_view(gw2.data(), experts, f, d), {}}, {});
    }, "grads.w2", "same as weights.w2");
  }
  // A workspace smaller than the query.
  {
    std::vector<std::byte> ws(layer.workspace_size<float>(switchyard::host_context{}, tokens, rs.params(d), L.weights()) / 2);
    expect_error<shape_error>([&] {
      layer.forward<float>(switchyard::host_context{}, L.xv(), rs.params(d), L.weights(), yv, res, {ws.data(), ws.size()});
    }, "workspace", "see workspace_size");
  }
}

BOOST_AUTO_TEST_CASE(caller_workspace_gives_same_result_without_allocating) {
  std::mt19937_64 g(test::base_seed() + 71);
  constexpr index_t tokens = 50, d = 16, f = 8, experts = 6;
  test::layer_data<sy::bfloat16> L(g, tokens, d, f, experts, true, true);
  test::router_setup<routers::TopK> rs(g, {.k = 2}, tokens, d, experts);
  MoELayer<routers::TopK, activation::swiglu, dispatch::padded_capacity> layer{
      .router = rs.router, .dispatch = {.capacity_factor = 1.0f}};
  std::vector<sy::bfloat16> y1(tokens * d), y2(tokens * d);
  decltype(layer)::result_type r1, r2;
  layer.forward<sy::bfloat16>(switchyard::host_context{}, L.xv(), rs.params(d), L.weights(), make_view(y1.data(), tokens, d), r1);

  const std::size_t bytes = layer.workspace_size<sy::bfloat16>(switchyard::host_context{}, tokens, rs.params(d), L.weights());
  std::vector<std::byte> ws(bytes + 1);
  const ::cuda::std::span<std::byte> span(ws.data() + 1, bytes);  // deliberately unaligned
  layer.forward<sy::bfloat16>(switchyard::host_context{}, L.xv(), rs.params(d), L.weights(), make_view(y2.data(), tokens, d), r2, span);
  BOOST_TEST(std::memcmp(y1.data(), y2.data(), y1.size() * sizeof(sy::bfloat16)) == 0);
  BOOST_TEST(r1.dropped == r2.dropped);

  // No allocation with a workspace, for every router and dispatch: test_no_allocation.cpp.
  // Without a workspace the layer allocates its own (so a counter would see allocations).
  const long before_owned = g_allocations.load();
  layer.forward<sy::bfloat16>(switchyard::host_context{}, L.xv(), rs.params(d), L.weights(), make_view(y2.data(), tokens, d), r2);
  BOOST_TEST(g_allocations.load() - before_owned > 0);
  BOOST_TEST(std::memcmp(y1.data(), y2.data(), y1.size() * sizeof(sy::bfloat16)) == 0);
}

// 64-bit offsets: the index helpers and the views' mappings past 2^31 and 2^32, on a large
// logical shape over a small buffer (only the index arithmetic runs, no element is read).
BOOST_AUTO_TEST_CASE(index_arithmetic_is_64_bit) {
  __extension__ typedef __int128 i128;
  const index_t e = 63, r = 65535, c = 65535, s0 = index_t{1} << 32, s1 = 65536, s2 = 1;
  const index_t off = sy::detail::offset3(e, r, c, s0, s1, s2);
  BOOST_TEST((static_cast<i128>(off) == static_cast<i128>(e) * s0 + static_cast<i128>(r) * s1 + c));
  BOOST_TEST(off > (index_t{1} << 32));
  BOOST_TEST((sy::detail::row_offset(index_t{1} << 30, 4096) ==
             static_cast<index_t>(static_cast<i128>(1) << 42)));
  const index_t p = dispatch::pair_index(index_t{3} << 30, 7, 8);
  BOOST_TEST((static_cast<i128>(p) == (static_cast<i128>(3) << 33) + 7));

  float small[4] = {};
  // W1 of 64 experts × 2·16384 × 16384 (2^35 elements) viewed over 4 floats.
  const auto big = make_strided_view<const float, 3>(
      small, {64, 32768, 16384}, {index_t{32768} * 16384, 16384, 1});
  BOOST_TEST(big.mapping()(63, 32767, 16383) ==
             sy::detail::offset3(63, 32767, 16383, big.stride(0), big.stride(1), big.stride(2)));
  BOOST_TEST((static_cast<i128>(big.mapping()(63, 32767, 16383)) ==
             static_cast<i128>(64) * 32768 * 16384 - 1));

  // Capacity for 2^33 assignments over 64 experts (T = 2^31 tokens, k = 4).
  const dispatch::padded_capacity pc{.capacity_factor = 1.0f, .min_capacity = 0, .capacity_multiple = 1};
  const index_t cap = pc.capacity(index_t{1} << 31, index_t{1} << 33, 64);
  BOOST_TEST(cap == (index_t{1} << 33) / 64);
  BOOST_TEST((pc.max_rows(index_t{1} << 31, 4, 64) == static_cast<index_t>(static_cast<i128>(64) * cap)));
}

// Strided (non-contiguous) x, y and weights, including a transposed-storage W2 that needs
// a float panel, give the same y as contiguous copies.
BOOST_AUTO_TEST_CASE(strided_views) {
  std::mt19937_64 g(test::base_seed() + 81);
  constexpr index_t tokens = 21, d = 10, f = 6, experts = 4;
  test::layer_data<float> L(g, tokens, d, f, experts, false, false);
  test::router_setup<routers::TopK> rs(g, {.k = 2}, tokens, d, experts);
  MoELayer<routers::TopK, activation::silu> layer{.router = rs.router};
  std::vector<float> y(tokens * d);
  decltype(layer)::result_type res;
  layer.forward<float>(switchyard::host_context{}, L.xv(), rs.params(d), L.weights(), make_view(y.data(), tokens, d), res);

  const index_t ldx = d + 3;
  std::vector<float> xs(tokens * ldx, NAN), w1s(experts * f * (d + 2), NAN), w2t(experts * f * d),
      ys(tokens * ldx * 2, -7.0f);
  for (index_t t = 0; t < tokens; ++t)
    for (index_t i = 0; i < d; ++i) xs[t * ldx + i] = L.x[t * d + i];
  for (index_t e = 0; e < experts; ++e)
    for (index_t r = 0; r < f; ++r)
      for (index_t i = 0; i < d; ++i) w1s[(e * f + r) * (d + 2) + i] = L.w1[(e * f + r) * d + i];
  for (index_t e = 0; e < experts; ++e)  // W2 stored as [E, d_ff, d] and viewed transposed
    for (index_t o = 0; o < d; ++o)
      for (index_t c = 0; c < f; ++c) w2t[(e * f + c) * d + o] = L.w2[(e * d + o) * f + c];
  const expert_weights<float> w{
      make_strided_view<const float, 3>(w1s.data(), {experts, f, d}, {f * (d + 2), d + 2, 1}), {},
      make_strided_view<const float, 3>(w2t.data(), {experts, d, f}, {f * d, 1, d}), {}};
  const auto xv = make_strided_view<const float, 2>(xs.data(), {tokens, d}, {ldx, 1});
  const auto yv = make_strided_view<float, 2>(ys.data(), {tokens, d}, {2 * ldx, 2});
  layer.forward<float>(switchyard::host_context{}, xv, rs.params(d), w, yv, res);
  for (index_t t = 0; t < tokens; ++t)
    for (index_t i = 0; i < d; ++i) BOOST_TEST(std::abs(yv(t, i) - y[t * d + i]) <= 1e-5f);
  BOOST_TEST(ys[1] == -7.0f);  // the gaps of the strided y are untouched
}

namespace {
// A test add-on: adds s · x to y (and s · dy to dx).
struct scaled_skip {
  using policy_kind = addon_tag;
  struct params_type {
    float s = 0.0f;
  };
  struct grads_type {};
  template <ElementType T, class Id, class W>
  void forward(const matrix_view<const T>& x, const routing::plan_view<Id, W>&,
               const params_type& p, const matrix_view<float>& out, workspace_arena&) const {
    for (index_t t = 0; t < x.extent(0); ++t)
      for (index_t i = 0; i < x.extent(1); ++i) out(t, i) = p.s * to_float(x(t, i));
  }
  template <ElementType T, class Id, class W>
  void backward(const matrix_view<const T>&, const routing::plan_view<Id, W>&,
                const params_type& p, const matrix_view<const float>& dy,
                const matrix_view<float>& dx, const grads_type&, float*, workspace_arena&) const {
    for (index_t t = 0; t < dy.extent(0); ++t)
      for (index_t i = 0; i < dy.extent(1); ++i) dx(t, i) += p.s * dy(t, i);
  }
};
static_assert(AddOnModule<scaled_skip>);
static_assert(AddOnModule<layer::hypermoe_addon>);
}  // namespace

BOOST_AUTO_TEST_CASE(addon_hook_adds_its_term_and_gradient) {
  std::mt19937_64 g(test::base_seed() + 91);
  constexpr index_t tokens = 12, d = 8, f = 4, experts = 4;
  test::layer_data<float> L(g, tokens, d, f, experts, false, true);
  test::router_setup<routers::TopK> rs(g, {.k = 2}, tokens, d, experts);
  MoELayer<routers::TopK, activation::relu> plain{.router = rs.router};
  MoELayer<routers::TopK, activation::relu, dispatch::sorted_grouped, scaled_skip> with{.router = rs.router};
  std::vector<float> y0(tokens * d), y1(tokens * d), dy(tokens * d, 1.0f), dx0(tokens * d),
      dx1(tokens * d);
  decltype(plain)::result_type r0;
  decltype(with)::result_type r1;
  plain.forward<float>(switchyard::host_context{}, L.xv(), rs.params(d), L.weights(), make_view(y0.data(), tokens, d), r0);
  with.forward<float>(switchyard::host_context{}, L.xv(), rs.params(d), L.weights(), make_view(y1.data(), tokens, d), r1, {}, {.s = 0.5f});
  for (index_t i = 0; i < tokens * d; ++i) BOOST_TEST(std::abs(y1[i] - (y0[i] + 0.5f * L.x[i])) <= 1e-5f);
  plain.backward<float>(switchyard::host_context{}, L.xv(), rs.params(d), L.weights(), r0, make_view<const float>(dy.data(), tokens, d),
                        {}, make_view(dx0.data(), tokens, d), {}, {});
  with.backward<float>(switchyard::host_context{}, L.xv(), rs.params(d), L.weights(), r1, make_view<const float>(dy.data(), tokens, d),
                       {}, make_view(dx1.data(), tokens, d), {}, {}, {}, {.s = 0.5f});
  for (index_t i = 0; i < tokens * d; ++i) BOOST_TEST(std::abs(dx1[i] - (dx0[i] + 0.5f)) <= 1e-5f);
}

// Backward with half / bfloat16 storage equals the float backward on the same (rounded)
// values: conversions are exact and all math is float, so only GEMM ordering may differ.
using low_precision = std::tuple<sy::half, sy::bfloat16>;
BOOST_AUTO_TEST_CASE_TEMPLATE(low_precision_backward_matches_float, T, low_precision) {
  std::mt19937_64 g(test::base_seed() + 95);
  constexpr index_t tokens = 33, d = 12, f = 6, experts = 5;
  test::layer_data<T> L(g, tokens, d, f, experts, true, true);
  test::layer_data<float> Lf = [&] {
    std::mt19937_64 g2(1);
    test::layer_data<float> c(g2, tokens, d, f, experts, true, true);
    auto cp = [](const std::vector<T>& s, std::vector<float>& t) {
      for (std::size_t i = 0; i < s.size(); ++i) t[i] = to_float(s[i]);
    };
    cp(L.x, c.x), cp(L.w1, c.w1), cp(L.b1, c.b1), cp(L.w2, c.w2), cp(L.b2, c.b2);
    return c;
  }();
  test::router_setup<routers::TopK> rs(g, {.k = 2}, tokens, d, experts);
  const auto dyf = test::normal(g, tokens * d);
  std::vector<T> dy(tokens * d);
  std::vector<float> dy_rounded(tokens * d);
  for (index_t i = 0; i < tokens * d; ++i) {
    dy[i] = from_float<T>(dyf[i]);
    dy_rounded[i] = to_float(dy[i]);
  }
  MoELayer<routers::TopK, activation::geglu, dispatch::padded_capacity> layer{
      .router = rs.router, .dispatch = {.capacity_factor = 1.0f, .min_capacity = 0, .capacity_multiple = 1}};
  auto run = [&](const auto& data, const auto& dyv) {
    using E = std::remove_cvref_t<decltype(data.x[0])>;
    std::vector<E> y(tokens * d);
    std::vector<float> dx(tokens * d), dw1(data.w1.size()), db2(data.b2.size()), dwr(rs.w.size());
    typename decltype(layer)::result_type res;
    layer.template forward<E>(switchyard::host_context{}, data.xv(), rs.params(d), data.weights(), make_view(y.data(), tokens, d), res);
    layer.template backward<E>(switchyard::host_context{}, data.xv(), rs.params(d), data.weights(), res,
                               make_view<const E>(dyv.data(), tokens, d), {0.1f, 0.1f, 0.01f},
                               make_view(dx.data(), tokens, d),
                               {make_view(dw1.data(), experts, data.p, d), {}, {}, make_view(db2.data(), experts, d)},
                               {make_view(dwr.data(), experts, d)});
    dx.insert(dx.end(), dw1.begin(), dw1.end());
    dx.insert(dx.end(), db2.begin(), db2.end());
    dx.insert(dx.end(), dwr.begin(), dwr.end());
    return std::make_pair(dx, res.total_dropped());
  };
  const auto [low, dropped_low] = run(L, dy);
  const auto [ref, dropped_ref] = run(Lf, dy_rounded);
  BOOST_TEST(dropped_low == dropped_ref);
  float scale = 0;
  for (float v : ref) scale = std::max(scale, std::abs(v));
  for (std::size_t i = 0; i < ref.size(); ++i) BOOST_TEST(std::abs(low[i] - ref[i]) <= 1e-5f * (scale + 1.0f));
}
