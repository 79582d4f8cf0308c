// SPDX-License-Identifier: Apache-2.0
// The NaN policies (docs/errors.md): a non-finite x throws non_finite_error naming the
// element and writes nothing; a non-finite expert weight propagates to the outputs of the
// tokens routed to that expert only; a non-finite dy_t propagates to dx_t and to the
// gradients of what token t reaches, every other token's dx row is bitwise unchanged.
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <limits>
#include <set>
#include <vector>

#include "host/hardening/hardening_setup.hpp"

namespace sy = switchyard;
using sy::index_t;
using sy::make_view;

namespace {

using Layer = sy::MoELayer<sy::routers::TopK, sy::activation::swiglu>;
const sy::routing::softmax_router_losses coeffs{0.01f, 0.01f, 0.001f};
constexpr float qnan = std::numeric_limits<float>::quiet_NaN();

bool row_finite(const std::vector<float>& v, index_t row, index_t width) {
  for (index_t i = 0; i < width; ++i)
    if (!std::isfinite(v[row * width + i])) return false;
  return true;
}

bool rows_same_bits(const std::vector<float>& a, const std::vector<float>& b, index_t row,
                    index_t width) {
  return std::memcmp(a.data() + row * width, b.data() + row * width, width * sizeof(float)) == 0;
}

}  // namespace

BOOST_AUTO_TEST_CASE(nan_in_x_throws_and_writes_nothing) {
  for (const float bad : {qnan, std::numeric_limits<float>::infinity()}) {
    sy::test::small_layer s(31);
    Layer layer{.router = s.rs.router};
    s.L.x[5 * s.d + 3] = bad;
    std::vector<float> y(static_cast<std::size_t>(s.tokens * s.d));
    sy::test::fill_poison(y);
    const std::vector<float> y_before = y;
    Layer::result_type res;
    try {
      layer.forward<float>(sy::host_context{}, s.L.xv(), s.rs.params(s.d), s.L.weights(),
                           make_view(y.data(), s.tokens, s.d), res);
      BOOST_ERROR("no exception for a non-finite x");
    } catch (const sy::non_finite_error& e) {
      BOOST_TEST(e.argument() == "x");
      BOOST_TEST(std::string(e.what()).find("x[5, 3]") != std::string::npos, e.what());
    }
    BOOST_TEST(sy::test::same_bits(y, y_before));
  }
}

BOOST_AUTO_TEST_CASE(nan_in_expert_weight_propagates_to_its_tokens_only) {
  sy::test::small_layer s(32, 40, 16, 8, 4, 1);  // k = 1: each token reaches one expert
  Layer layer{.router = s.rs.router};
  const sy::host_context ctx;
  std::vector<float> y_clean(static_cast<std::size_t>(s.tokens * s.d)), y(y_clean.size());
  Layer::result_type res;
  layer.forward<float>(ctx, s.L.xv(), s.rs.params(s.d), s.L.weights(),
                       make_view(y_clean.data(), s.tokens, s.d), res);
  const index_t e = res.plan.id(0, 0);
  s.L.w2[static_cast<std::size_t>(e * s.d * s.f + 2)] = qnan;  // w2[e, 0, 2]
  layer.forward<float>(ctx, s.L.xv(), s.rs.params(s.d), s.L.weights(),
                       make_view(y.data(), s.tokens, s.d), res);
  index_t reached = 0;
  for (index_t t = 0; t < s.tokens; ++t) {
    if (res.plan.id(t, 0) == e) {
      ++reached;
      BOOST_TEST(std::isnan(y[t * s.d]));  // output row 0 of expert e
    } else {
      BOOST_TEST(rows_same_bits(y, y_clean, t, s.d));
    }
  }
  BOOST_TEST(reached >= 1);
  BOOST_TEST(reached < s.tokens);
}

BOOST_AUTO_TEST_CASE(nan_in_dy_propagates_to_its_token_only) {
  for (const bool batch_invariant : {false, true}) {
    sy::test::small_layer s(33, 40, 16, 8, 6, 2);
    Layer layer{.router = s.rs.router, .batch_invariant = batch_invariant};
    const sy::host_context ctx;
    std::vector<float> y(static_cast<std::size_t>(s.tokens * s.d));
    Layer::result_type res;
    layer.forward<float>(ctx, s.L.xv(), s.rs.params(s.d), s.L.weights(),
                         make_view(y.data(), s.tokens, s.d), res);
    layer.backward<float>(ctx, s.L.xv(), s.rs.params(s.d), s.L.weights(), res, s.dyv(), coeffs,
                          s.dxv(), s.grads(), s.rgrads());
    const std::vector<float> dx_clean = s.dx;
    const index_t bad = 7;
    s.reset_grads();
    s.dy[static_cast<std::size_t>(bad * s.d + 1)] = qnan;
    layer.backward<float>(ctx, s.L.xv(), s.rs.params(s.d), s.L.weights(), res, s.dyv(), coeffs,
                          s.dxv(), s.grads(), s.rgrads());  // no throw: NaN in dy propagates
    BOOST_TEST(!row_finite(s.dx, bad, s.d));
    for (index_t t = 0; t < s.tokens; ++t)
      if (t != bad) BOOST_TEST(rows_same_bits(s.dx, dx_clean, t, s.d), "dx row " << t);
    // Expert gradients: non-finite for the experts token `bad` reaches, finite elsewhere.
    std::set<index_t> reached;
    for (index_t j = 0; j < res.plan.counts[static_cast<std::size_t>(bad)]; ++j) reached.insert(res.plan.id(bad, j));
    for (index_t e = 0; e < s.experts; ++e) {
      bool finite = true;
      const std::size_t n = static_cast<std::size_t>(s.d * s.f);
      for (std::size_t i = 0; i < n; ++i) finite = finite && std::isfinite(s.gw2[e * n + i]);
      BOOST_TEST(finite == (reached.count(e) == 0), "expert " << e);
    }
  }
}
