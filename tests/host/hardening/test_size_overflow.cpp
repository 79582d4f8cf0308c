// SPDX-License-Identifier: Apache-2.0
// Regression tests of the adversarial probe (issue #17): size arithmetic on user input.
// padded_capacity's capacity saturates at T (a huge capacity_factor, min_capacity or
// expert_capacity drops nothing) and rejects a capacity_multiple above its bound; products of
// sizes (workspace queries with a huge T, a view's element count, E past the 32-bit ids) throw
// range_error instead of wrapping or hanging.
#include <boost/test/unit_test.hpp>

#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "host/hardening/hardening_setup.hpp"

namespace sy = switchyard;
using sy::index_t;
using sy::make_view;

namespace {

constexpr index_t int64_max = std::numeric_limits<index_t>::max();

//! Runs a TopK(k = 2) layer under `dispatch` and under sorted_grouped (which drops nothing);
//! returns (y, y of sorted_grouped, pairs dropped).
std::tuple<std::vector<float>, std::vector<float>, index_t> run_capacity(
    const sy::dispatch::padded_capacity& dispatch, std::uint64_t salt) {
  sy::test::small_layer s(salt, 64, 16, 8, 8, 2);
  const sy::host_context ctx;
  sy::MoELayer<sy::routers::TopK, sy::activation::swiglu, sy::dispatch::padded_capacity> layer{
      .router = s.rs.router, .dispatch = dispatch};
  sy::MoELayer<sy::routers::TopK, sy::activation::swiglu> reference{.router = s.rs.router};
  std::vector<float> y(static_cast<std::size_t>(s.tokens * s.d)), y_ref(y.size());
  sy::test::fill_poison(y);
  decltype(layer)::result_type res;
  decltype(reference)::result_type res_ref;
  layer.forward<float>(ctx, s.L.xv(), s.rs.params(s.d), s.L.weights(),
                       make_view(y.data(), s.tokens, s.d), res);
  reference.forward<float>(ctx, s.L.xv(), s.rs.params(s.d), s.L.weights(),
                           make_view(y_ref.data(), s.tokens, s.d), res_ref);
  return {y, y_ref, res.total_dropped()};
}

void expect_nothing_dropped(const sy::dispatch::padded_capacity& dispatch, std::uint64_t salt) {
  const auto [y, y_ref, dropped] = run_capacity(dispatch, salt);
  BOOST_TEST(dropped == 0);
  for (std::size_t i = 0; i < y.size(); ++i)
    BOOST_TEST(std::abs(y[i] - y_ref[i]) <= 1e-5f * (1.0f + std::abs(y_ref[i])));
}

}  // namespace

// capacity_factor = 1e30 is valid (finite, > 0) and means "never full": it dropped about
// half the pairs (1e30 converted to an integer).
BOOST_AUTO_TEST_CASE(huge_capacity_factor_drops_nothing) {
  expect_nothing_dropped({.capacity_factor = 1e30f}, 11);
  expect_nothing_dropped({.capacity_factor = std::numeric_limits<float>::max()}, 12);
}

// min_capacity = INT64_MAX dropped every pair (its rounding up wrapped negative).
BOOST_AUTO_TEST_CASE(huge_min_capacity_drops_nothing) {
  expect_nothing_dropped({.min_capacity = int64_max}, 13);
  expect_nothing_dropped({.min_capacity = int64_max - 5, .capacity_multiple = 3}, 14);
}

// An absolute expert_capacity of INT64_MAX (E · C buffer rows overflowed).
BOOST_AUTO_TEST_CASE(huge_expert_capacity_drops_nothing) {
  expect_nothing_dropped({.expert_capacity = int64_max}, 15);
}

// capacity_multiple = 2^62 aborted or hung: rejected, naming the field and its bound.
BOOST_AUTO_TEST_CASE(huge_capacity_multiple_is_rejected) {
  sy::test::expect_named<sy::range_error>(
      [] { (void)run_capacity({.capacity_multiple = index_t{1} << 62}, 16); }, "capacity_multiple");
  sy::test::expect_named<sy::range_error>(
      [] { (void)run_capacity({.capacity_multiple = (index_t{1} << 16) + 1}, 17); },
      "capacity_multiple");
  const auto [y, y_ref, dropped] = run_capacity({.capacity_multiple = index_t{1} << 16}, 18);
  BOOST_TEST(dropped == 0);
}

// The capacity formula itself, at its edges: saturation at T rounded up, E = 0 (was a
// division by zero), T = 0.
BOOST_AUTO_TEST_CASE(capacity_formula_edges) {
  const sy::dispatch::padded_capacity big_cf{.capacity_factor = 1e30f};
  BOOST_TEST(big_cf.capacity(100, 200, 8) == 104);  // T = 100 rounded up to 8
  const sy::dispatch::padded_capacity big_min{.min_capacity = int64_max, .capacity_multiple = 1};
  BOOST_TEST(big_min.capacity(100, 200, 8) == 100);
  const sy::dispatch::padded_capacity absolute{.expert_capacity = int64_max};
  BOOST_TEST(absolute.capacity(100, 200, 8) == 104);  // T rounded up to 8
  BOOST_TEST(absolute.max_rows(100, 2, 8) == 8 * 104);
  const sy::dispatch::padded_capacity plain{};
  BOOST_TEST(plain.capacity(100, 200, 0) == 0);  // no experts
  BOOST_TEST(plain.capacity(0, 0, 8) == 0);
  BOOST_TEST(plain.capacity(100, 200, 8) == 32);  // ceil(1.25 · 25) = 32: unchanged
  BOOST_TEST(big_cf.max_rows(int64_max / 4, 2, 1) >= int64_max / 4);  // no wrap
}

// workspace_size with a huge T wrapped and returned a few hundred bytes.
BOOST_AUTO_TEST_CASE(workspace_size_with_huge_tokens) {
  sy::test::small_layer s(21);
  const sy::host_context ctx;
  sy::MoELayer<sy::routers::TopK, sy::activation::swiglu> layer{.router = s.rs.router};
  for (const index_t tokens : {index_t{1} << 62, int64_max / 2 + 1, int64_max}) {
    sy::test::expect_named<sy::range_error>(
        [&] { (void)layer.workspace_size<float>(ctx, tokens, s.rs.params(s.d), s.L.weights()); },
        "tokens");
    sy::test::expect_named<sy::range_error>(
        [&] {
          (void)layer.backward_workspace_size<float>(ctx, tokens, s.rs.params(s.d), s.L.weights());
        },
        "tokens");
    sy::test::expect_named<sy::range_error>(
        [&] { (void)layer.experts_workspace_size<float>(ctx, tokens, 2, s.L.weights()); },
        "tokens");
  }
  sy::test::expect_named<sy::range_error>(
      [&] { (void)layer.workspace_size<float>(ctx, -1, s.rs.params(s.d), s.L.weights()); },
      "tokens");
  // An ordinary T still answers, and more than T · d floats.
  const std::size_t n = layer.workspace_size<float>(ctx, 4096, s.rs.params(s.d), s.L.weights());
  BOOST_TEST(n > static_cast<std::size_t>(4096 * s.d) * sizeof(float));
}

// A view whose extents multiply past int64 (element_count overflowed) is a range_error
// naming the argument, raised by the layer's checks.
BOOST_AUTO_TEST_CASE(view_element_count_overflow) {
  sy::test::small_layer s(22);
  const sy::host_context ctx;
  sy::MoELayer<sy::routers::TopK, sy::activation::swiglu> layer{.router = s.rs.router};
  // x with T = 2^62 rows of d = 16 (a lie about the memory, caught before any read).
  const index_t tokens = index_t{1} << 62;
  const auto x = sy::make_strided_view<const float, 2>(s.L.x.data(), {tokens, s.d}, {0, 1});
  std::vector<float> y(16);
  const auto yv = sy::make_strided_view<float, 2>(y.data(), {tokens, s.d}, {0, 1});
  decltype(layer)::result_type res;
  sy::test::expect_named<sy::range_error>(
      [&] { layer.forward<float>(ctx, x, s.rs.params(s.d), s.L.weights(), yv, res); }, "x");
#if __has_include(<switchyard/core/checked.hpp>)
  BOOST_CHECK_THROW((void)sy::element_count(x), sy::range_error);
  BOOST_TEST(sy::detail::checked_mul("n", 3, 5) == 15);
  BOOST_CHECK_THROW((void)sy::detail::checked_mul("n", index_t{1} << 32, index_t{1} << 31),
                    sy::range_error);
  BOOST_CHECK_THROW((void)sy::detail::checked_add("n", int64_max, 1), sy::range_error);
  BOOST_CHECK_THROW((void)sy::detail::checked_mul("n", -1, 2), sy::range_error);
  sy::workspace_arena ws;
  BOOST_CHECK_THROW((void)ws.take<float>(int64_max / 2), sy::range_error);
  BOOST_CHECK_THROW((void)ws.take<float>(-1), sy::range_error);
#endif
}

// E = 2^31 + 1 routed experts (1 FFN expert + 2^31 identity experts; the router's weight is a
// stride-0 view) hung: the ids are 32-bit, so it is a range_error naming E.
BOOST_AUTO_TEST_CASE(experts_past_int32_ids) {
  sy::test::small_layer s(23, 4, 8, 4, 1, 1);
  const sy::host_context ctx;
  const index_t experts = (index_t{1} << 31) + 1;
  sy::MoELayer<sy::routers::TopK, sy::activation::swiglu> layer{
      .router = s.rs.router, .identity_experts = experts - 1};
  const sy::routing::linear_router_params rp{
      sy::make_strided_view<const float, 2>(s.rs.w.data(), {experts, s.d}, {0, 1})};
  std::vector<float> y(static_cast<std::size_t>(s.tokens * s.d));
  decltype(layer)::result_type res;
  sy::test::expect_named<sy::range_error>(
      [&] {
        layer.forward<float>(ctx, s.L.xv(), rp, s.L.weights(), make_view(y.data(), s.tokens, s.d),
                             res);
      },
      "E");
}
