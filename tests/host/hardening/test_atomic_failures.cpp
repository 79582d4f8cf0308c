// SPDX-License-Identifier: Apache-2.0
// Regression tests of the adversarial probe (issue #17): a failing call writes nothing.
// Backward checks every argument (the router's gradient views, the workspace, BLAS strides)
// before its first += (a retry must not double-count); a forward that threw leaves its
// result marked incomplete and backward refuses it; outputs overlapping inputs are refused.
#include <boost/test/unit_test.hpp>

#include <sys/mman.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "host/hardening/hardening_setup.hpp"

namespace sy = switchyard;
using sy::index_t;
using sy::make_view;

namespace {

using Layer = sy::MoELayer<sy::routers::TopK, sy::activation::swiglu>;
const sy::routing::softmax_router_losses coeffs{0.01f, 0.01f, 0.001f};

//! An add-on that adds nothing, or throws from its forward when told to (after the router
//! has written the plan: the failure a forward can meet half way).
struct failing_addon {
  using policy_kind = sy::addon_tag;
  struct params_type {
    bool fail = false;
  };
  struct grads_type {};
  template <class X, class P>
  void forward(const X&, const P&, const params_type& p, const sy::matrix_view<float>& out,
               sy::workspace_arena&) const {
    if (p.fail) throw std::runtime_error("failing_addon: told to fail");
    for (index_t t = 0; t < out.extent(0); ++t)
      for (index_t i = 0; i < out.extent(1); ++i) out(t, i) = 0.0f;
  }
  template <class X, class P, class DY>
  void backward(const X&, const P&, const params_type&, const DY&, const sy::matrix_view<float>&,
                const grads_type&, float*, sy::workspace_arena&) const {}
};

}  // namespace

// The router's gradient view has the wrong shape: before the fix, dx and the expert
// gradients had been accumulated when the router threw.
BOOST_AUTO_TEST_CASE(backward_checks_router_grads_before_writing) {
  sy::test::small_layer s(1);
  Layer layer{.router = s.rs.router};
  std::vector<float> y(static_cast<std::size_t>(s.tokens * s.d));
  Layer::result_type res;
  layer.forward<float>(sy::host_context{}, s.L.xv(), s.rs.params(s.d), s.L.weights(),
                       make_view(y.data(), s.tokens, s.d), res);
  const std::vector<float> before = s.all_grads();
  const sy::routing::linear_router_grads bad{make_view(s.gwr.data(), s.experts - 1, s.d)};
  sy::test::expect_named<sy::shape_error>(
      [&] {
        layer.backward<float>(sy::host_context{}, s.L.xv(), s.rs.params(s.d), s.L.weights(), res,
                              s.dyv(), coeffs, s.dxv(), s.grads(), bad);
      },
      "grads.w");
  BOOST_TEST(sy::test::same_bits(before, s.all_grads()), "a gradient changed before the throw");
  // The retry with the right view gives what a single clean backward gives.
  layer.backward<float>(sy::host_context{}, s.L.xv(), s.rs.params(s.d), s.L.weights(), res,
                        s.dyv(), coeffs, s.dxv(), s.grads(), s.rgrads());
  const std::vector<float> retried = s.all_grads();
  s.reset_grads();
  layer.backward<float>(sy::host_context{}, s.L.xv(), s.rs.params(s.d), s.L.weights(), res,
                        s.dyv(), coeffs, s.dxv(), s.grads(), s.rgrads());
  BOOST_TEST(sy::test::same_bits(retried, s.all_grads()));
  BOOST_TEST(!sy::test::same_bits(before, retried));
}

// A workspace one byte short: a shape_error naming it, and nothing written (forward: y;
// backward: every gradient).
BOOST_AUTO_TEST_CASE(short_workspace_writes_nothing) {
  sy::test::small_layer s(2, 40, 16, 8, 4, 2);
  Layer layer{.router = s.rs.router};
  const sy::host_context ctx;
  std::vector<float> y(static_cast<std::size_t>(s.tokens * s.d));
  Layer::result_type res;
  layer.forward<float>(ctx, s.L.xv(), s.rs.params(s.d), s.L.weights(),
                       make_view(y.data(), s.tokens, s.d), res);
  const std::size_t fwd = layer.workspace_size<float>(ctx, s.tokens, s.rs.params(s.d), s.L.weights());
  const std::size_t bwd =
      layer.backward_workspace_size<float>(ctx, s.tokens, s.rs.params(s.d), s.L.weights());
  std::vector<std::byte> ws(std::max(fwd, bwd));
  std::vector<float> y2(y.size());
  sy::test::fill_poison(y2);
  const std::vector<float> y2_before = y2;
  sy::test::expect_named<sy::shape_error>(
      [&] {
        layer.forward<float>(ctx, s.L.xv(), s.rs.params(s.d), s.L.weights(),
                             make_view(y2.data(), s.tokens, s.d), res, {ws.data(), fwd - 1});
      },
      "workspace");
  BOOST_TEST(sy::test::same_bits(y2, y2_before), "forward wrote y before the throw");
  // (That forward got past the layer's own checks, so `res` is now marked incomplete.)
  layer.forward<float>(ctx, s.L.xv(), s.rs.params(s.d), s.L.weights(),
                       make_view(y2.data(), s.tokens, s.d), res, {ws.data(), fwd});
  BOOST_TEST(sy::test::same_bits(y2, y));
  const std::vector<float> before = s.all_grads();
  // Half of it (the probe: thrown for the workspace after dx and the expert gradients had
  // been accumulated), and one byte short.
  for (const std::size_t bytes : {bwd / 2, bwd - 1}) {
    sy::test::expect_named<sy::shape_error>(
        [&] {
          layer.backward<float>(ctx, s.L.xv(), s.rs.params(s.d), s.L.weights(), res, s.dyv(),
                                coeffs, s.dxv(), s.grads(), s.rgrads(), {ws.data(), bytes});
        },
        "workspace");
    BOOST_TEST(sy::test::same_bits(before, s.all_grads()),
               "a gradient changed before the throw (" << bytes << " bytes)");
  }
}

// Strided views everywhere (x, dy, dx, weights, gradients with padded rows) with exactly the
// queried workspace: no error, and the same result as contiguous views.
BOOST_AUTO_TEST_CASE(strided_backward_with_queried_workspace) {
  sy::test::small_layer s(3, 33, 16, 8, 4, 2);
  Layer layer{.router = s.rs.router};
  const sy::host_context ctx;
  const index_t pad = 3, ld = s.d + pad;
  auto padded = [&](const std::vector<float>& v, index_t rows, index_t cols) {
    std::vector<float> out(static_cast<std::size_t>(rows * (cols + pad)), sy::test::poison);
    for (index_t r = 0; r < rows; ++r)
      for (index_t c = 0; c < cols; ++c) out[r * (cols + pad) + c] = v[r * cols + c];
    return out;
  };
  auto view2 = [&](auto* p, index_t rows, index_t cols) {
    return sy::make_strided_view<std::remove_reference_t<decltype(*p)>, 2>(p, {rows, cols},
                                                                          {cols + pad, 1});
  };
  const index_t ep = s.experts * s.L.p;  // w1 as [E·P, d] rows
  const index_t ed = s.experts * s.d;    // w2 as [E·d, f] rows
  const std::vector<float> xs = padded(s.L.x, s.tokens, s.d), dys = padded(s.dy, s.tokens, s.d),
                           w1s = padded(s.L.w1, ep, s.d), w2s = padded(s.L.w2, ed, s.f);
  std::vector<float> dxs = padded(s.dx, s.tokens, s.d), gw1s = padded(s.gw1, ep, s.d),
                     gw2s = padded(s.gw2, ed, s.f);
  sy::expert_weights<float> w = s.L.weights();
  w.w1 = sy::make_strided_view<const float, 3>(w1s.data(), {s.experts, s.L.p, s.d},
                                               {s.L.p * (s.d + pad), s.d + pad, 1});
  w.w2 = sy::make_strided_view<const float, 3>(w2s.data(), {s.experts, s.d, s.f},
                                               {s.d * (s.f + pad), s.f + pad, 1});
  sy::expert_grads g = s.grads();
  g.w1 = sy::make_strided_view<float, 3>(gw1s.data(), {s.experts, s.L.p, s.d},
                                         {s.L.p * (s.d + pad), s.d + pad, 1});
  g.w2 = sy::make_strided_view<float, 3>(gw2s.data(), {s.experts, s.d, s.f},
                                         {s.d * (s.f + pad), s.f + pad, 1});
  const auto xv = view2(xs.data(), s.tokens, s.d);
  const auto dyv = view2(dys.data(), s.tokens, s.d);
  const auto dxv = view2(dxs.data(), s.tokens, s.d);
  (void)ld;
  std::vector<float> y(static_cast<std::size_t>(s.tokens * s.d));
  Layer::result_type res;
  const std::size_t bwd = layer.backward_workspace_size<float>(ctx, s.tokens, s.rs.params(s.d), w);
  std::vector<std::byte> ws(bwd);
  layer.forward<float>(ctx, xv, s.rs.params(s.d), w, make_view(y.data(), s.tokens, s.d), res);
  layer.backward<float>(ctx, xv, s.rs.params(s.d), w, res, dyv, coeffs, dxv, g, s.rgrads(),
                        {ws.data(), ws.size()});
  // Contiguous run on the same values.
  sy::test::small_layer c(3, 33, 16, 8, 4, 2);
  Layer::result_type res_c;
  std::vector<float> y_c(y.size());
  layer.forward<float>(ctx, c.L.xv(), c.rs.params(c.d), c.L.weights(),
                       make_view(y_c.data(), c.tokens, c.d), res_c);
  layer.backward<float>(ctx, c.L.xv(), c.rs.params(c.d), c.L.weights(), res_c, c.dyv(), coeffs,
                        c.dxv(), c.grads(), c.rgrads());
  auto close = [](float a, float b) { return std::abs(a - b) <= 1e-5f * (1.0f + std::abs(b)); };
  for (std::size_t i = 0; i < y.size(); ++i) BOOST_TEST(close(y[i], y_c[i]));
  for (index_t t = 0; t < s.tokens; ++t)
    for (index_t i = 0; i < s.d; ++i) {
      BOOST_TEST(close(dxs[t * ld + i], c.dx[t * s.d + i]));
      BOOST_TEST(dxs[t * ld + s.d] == sy::test::poison);  // padding untouched
    }
  for (index_t r = 0; r < ep; ++r)
    for (index_t i = 0; i < s.d; ++i) BOOST_TEST(close(gw1s[r * ld + i], c.gw1[r * s.d + i]));
}

// A forward that threw half way (here: an add-on failing after the router wrote the plan)
// leaves its result incomplete: backward refuses it instead of reading half a result.
BOOST_AUTO_TEST_CASE(backward_refuses_result_of_failed_forward) {
  sy::test::small_layer s(4);
  sy::MoELayer<sy::routers::TopK, sy::activation::swiglu, sy::dispatch::sorted_grouped,
               failing_addon>
      layer{.router = s.rs.router};
  using L = decltype(layer);
  const sy::host_context ctx;
  std::vector<float> y(static_cast<std::size_t>(s.tokens * s.d));
  L::result_type res;
  layer.forward<float>(ctx, s.L.xv(), s.rs.params(s.d), s.L.weights(),
                       make_view(y.data(), s.tokens, s.d), res);
  layer.backward<float>(ctx, s.L.xv(), s.rs.params(s.d), s.L.weights(), res, s.dyv(), coeffs,
                        s.dxv(), s.grads(), s.rgrads());  // a completed forward: accepted
  BOOST_CHECK_THROW(layer.forward<float>(ctx, s.L.xv(), s.rs.params(s.d), s.L.weights(),
                                         make_view(y.data(), s.tokens, s.d), res, {}, {true}),
                    std::runtime_error);
  const std::vector<float> before = s.all_grads();
  sy::test::expect_named<sy::invalid_argument>(
      [&] {
        layer.backward<float>(ctx, s.L.xv(), s.rs.params(s.d), s.L.weights(), res, s.dyv(),
                              coeffs, s.dxv(), s.grads(), s.rgrads());
      },
      "state");
  BOOST_TEST(sy::test::same_bits(before, s.all_grads()));
  // A forward that completes makes it valid again.
  layer.forward<float>(ctx, s.L.xv(), s.rs.params(s.d), s.L.weights(),
                       make_view(y.data(), s.tokens, s.d), res);
  layer.backward<float>(ctx, s.L.xv(), s.rs.params(s.d), s.L.weights(), res, s.dyv(), coeffs,
                        s.dxv(), s.grads(), s.rgrads());
}

#if __has_include(<switchyard/core/checked.hpp>)
// The same through state views: the flag is the caller's bool (host memory).
BOOST_AUTO_TEST_CASE(state_view_complete_flag) {
  sy::test::small_layer s(5);
  sy::MoELayer<sy::routers::TopK, sy::activation::swiglu, sy::dispatch::sorted_grouped,
               failing_addon>
      layer{.router = s.rs.router};
  using L = decltype(layer);
  const sy::host_context ctx;
  std::vector<float> y(static_cast<std::size_t>(s.tokens * s.d));
  L::result_type owner;
  owner.resize(s.tokens, 2, s.experts);
  bool complete = true;
  L::state_type st = owner.state();
  st.complete = &complete;
  BOOST_CHECK_THROW(layer.forward<float>(ctx, s.L.xv(), s.rs.params(s.d), s.L.weights(),
                                         make_view(y.data(), s.tokens, s.d), st, {}, {true}),
                    std::runtime_error);
  BOOST_TEST(!complete);
  sy::test::expect_named<sy::invalid_argument>(
      [&] {
        layer.backward<float>(ctx, s.L.xv(), s.rs.params(s.d), s.L.weights(), st, s.dyv(),
                              coeffs, s.dxv(), s.grads(), s.rgrads());
      },
      "state");
  layer.forward<float>(ctx, s.L.xv(), s.rs.params(s.d), s.L.weights(),
                       make_view(y.data(), s.tokens, s.d), st);
  BOOST_TEST(complete);
  // A failed argument check writes nothing, the flag included.
  BOOST_CHECK_THROW(layer.forward<float>(ctx, s.L.xv(), s.rs.params(s.d), s.L.weights(),
                                         make_view(y.data(), s.tokens - 1, s.d), st),
                    sy::shape_error);
  BOOST_TEST(complete);
}
#endif

// Expert weight and gradient views whose row stride (the BLAS leading dimension) exceeds
// INT_MAX, at shapes where the expert GEMMs run on the BLAS: the probe saw a range_error
// thrown inside the parallel expert region. Such slices now go through float panels: the
// result equals the contiguous run's.
BOOST_AUTO_TEST_CASE(blas_leading_dimension_over_int_max) {
  const index_t tokens = 16, d = 512, f = 8, experts = 2;  // d·d_ff large enough for BLAS
  std::mt19937_64 g(sy::test::base_seed() + 6);
  sy::test::layer_data<float> L(g, tokens, d, f, experts, false, true);
  sy::test::router_setup<sy::routers::TopK> rs(g, {.k = 1}, tokens, d, experts);
  const std::vector<float> dy = sy::test::normal(g, static_cast<std::size_t>(tokens * d));
  sy::MoELayer<sy::routers::TopK, sy::activation::relu> layer{.router = rs.router};
  const sy::host_context ctx;
  // w1 [E, P, d] and grads.w1 with rows 2^31 + 64 elements apart: address space only.
  const index_t big = (index_t{1} << 31) + 64, rows = experts * L.p;
  const std::size_t bytes = static_cast<std::size_t>((rows - 1) * big + d) * sizeof(float);
  auto reserve = [&] {
    return mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  };
  void* wmem = reserve();
  void* gmem = reserve();
  if (wmem == MAP_FAILED || gmem == MAP_FAILED) {
    BOOST_TEST_MESSAGE("mmap of 2 x " << bytes << " bytes failed: case skipped");
    if (wmem != MAP_FAILED) munmap(wmem, bytes);
    return;
  }
  float* wp = static_cast<float*>(wmem);
  float* gp = static_cast<float*>(gmem);
  for (index_t r = 0; r < rows; ++r)
    for (index_t i = 0; i < d; ++i) {
      wp[r * big + i] = L.w1[static_cast<std::size_t>(r * d + i)];
      gp[r * big + i] = 0.5f;
    }
  sy::expert_weights<float> w = L.weights();
  w.w1 = sy::make_strided_view<const float, 3>(wp, {experts, L.p, d}, {L.p * big, big, 1});
  std::vector<float> gw1(static_cast<std::size_t>(rows * d), 0.5f), dx(L.x.size(), 0.25f),
      dx_ref(dx);
  sy::expert_grads grads{sy::make_strided_view<float, 3>(gp, {experts, L.p, d}, {L.p * big, big, 1}),
                         {}, {}, {}};
  const sy::expert_grads grads_ref{make_view(gw1.data(), experts, L.p, d), {}, {}, {}};
  std::vector<float> y(static_cast<std::size_t>(tokens * d)), y_ref(y.size());
  decltype(layer)::result_type res, res_ref;
  layer.forward<float>(ctx, L.xv(), rs.params(d), w, make_view(y.data(), tokens, d), res);
  layer.forward<float>(ctx, L.xv(), rs.params(d), L.weights(), make_view(y_ref.data(), tokens, d),
                       res_ref);
  auto close = [](float a, float b) { return std::abs(a - b) <= 1e-5f * (1.0f + std::abs(b)); };
  for (std::size_t i = 0; i < y.size(); ++i) BOOST_TEST(close(y[i], y_ref[i]));
  const auto dyv = make_view<const float>(dy.data(), tokens, d);
  layer.backward<float>(ctx, L.xv(), rs.params(d), w, res, dyv, {}, make_view(dx.data(), tokens, d),
                        grads, {});
  layer.backward<float>(ctx, L.xv(), rs.params(d), L.weights(), res_ref, dyv, {},
                        make_view(dx_ref.data(), tokens, d), grads_ref, {});
  for (std::size_t i = 0; i < dx.size(); ++i) BOOST_TEST(close(dx[i], dx_ref[i]));
  bool grads_close = true;
  for (index_t r = 0; r < rows; ++r)
    for (index_t i = 0; i < d; ++i)
      grads_close = grads_close && close(gp[r * big + i], gw1[static_cast<std::size_t>(r * d + i)]);
  BOOST_TEST(grads_close);
  BOOST_TEST(!sy::test::same_bits(gw1, std::vector<float>(gw1.size(), 0.5f)));
  munmap(wmem, bytes);
  munmap(gmem, bytes);
}

// Outputs overlapping inputs are refused, naming both (y over x; dx over dy; a gradient over
// its weight; the state over x), and nothing is written.
BOOST_AUTO_TEST_CASE(outputs_overlapping_inputs_are_refused) {
  sy::test::small_layer s(7);
  Layer layer{.router = s.rs.router};
  const sy::host_context ctx;
  // x and y in one buffer, y starting half way into x.
  std::vector<float> buf(static_cast<std::size_t>(s.tokens * s.d * 2));
  std::copy(s.L.x.begin(), s.L.x.end(), buf.begin());
  const index_t shift = s.tokens * s.d / 2;
  const auto x = make_view<const float>(buf.data(), s.tokens, s.d);
  const auto y = make_view(buf.data() + shift, s.tokens, s.d);
  const std::vector<float> buf_before = buf;
  Layer::result_type res;
  auto check_message = [](const sy::invalid_argument& e, const char* other) {
    BOOST_TEST(std::string(e.what()).find(std::string("overlaps ") + other) != std::string::npos,
               e.what());
  };
  try {
    layer.forward<float>(ctx, x, s.rs.params(s.d), s.L.weights(), y, res);
    BOOST_ERROR("y overlapping x: no exception");
  } catch (const sy::invalid_argument& e) {
    BOOST_TEST(e.argument() == "y");
    check_message(e, "x");
  }
  BOOST_TEST(sy::test::same_bits(buf, buf_before));
  // A clean forward, then dx over dy.
  std::vector<float> y_ok(static_cast<std::size_t>(s.tokens * s.d));
  layer.forward<float>(ctx, s.L.xv(), s.rs.params(s.d), s.L.weights(),
                       make_view(y_ok.data(), s.tokens, s.d), res);
  std::vector<float> dd = s.dy;
  dd.resize(dd.size() + 4, 1.0f);
  const std::vector<float> dd_before = dd;
  const std::vector<float> before = s.all_grads();
  try {
    layer.backward<float>(ctx, s.L.xv(), s.rs.params(s.d), s.L.weights(), res,
                          make_view<const float>(dd.data(), s.tokens, s.d), coeffs,
                          make_view(dd.data() + 4, s.tokens, s.d), s.grads(), s.rgrads());
    BOOST_ERROR("dx overlapping dy: no exception");
  } catch (const sy::invalid_argument& e) {
    BOOST_TEST(e.argument() == "dx");
    check_message(e, "dy");
  }
  BOOST_TEST(sy::test::same_bits(dd, dd_before));
  BOOST_TEST(sy::test::same_bits(before, s.all_grads()));
  // grads.w1 over weights.w1 (a float layer training in place).
  std::vector<float> w1 = s.L.w1;
  sy::expert_weights<float> w = s.L.weights();
  w.w1 = make_view<const float>(w1.data(), s.experts, s.L.p, s.d);
  sy::expert_grads g = s.grads();
  g.w1 = make_view(w1.data(), s.experts, s.L.p, s.d);
  try {
    layer.backward<float>(ctx, s.L.xv(), s.rs.params(s.d), w, res, s.dyv(), coeffs, s.dxv(), g,
                          s.rgrads());
    BOOST_ERROR("grads.w1 overlapping weights.w1: no exception");
  } catch (const sy::invalid_argument& e) {
    BOOST_TEST(e.argument() == "grads.w1");
    check_message(e, "weights.w1");
  }
  BOOST_TEST(sy::test::same_bits(w1, s.L.w1));
  BOOST_TEST(sy::test::same_bits(before, s.all_grads()));
  // The router's gradient over its own weight (params.w).
  std::vector<float> wr = s.rs.w;
  const sy::routing::linear_router_params rp_inplace{make_view<const float>(wr.data(), s.experts, s.d)};
  try {
    layer.backward<float>(ctx, s.L.xv(), rp_inplace, s.L.weights(), res, s.dyv(), coeffs, s.dxv(),
                          s.grads(), {make_view(wr.data(), s.experts, s.d)});
    BOOST_ERROR("grads.w overlapping params.w: no exception");
  } catch (const sy::invalid_argument& e) {
    BOOST_TEST(e.argument() == "grads.w");
    check_message(e, "params.w");
  }
  BOOST_TEST(sy::test::same_bits(wr, s.rs.w));
  BOOST_TEST(sy::test::same_bits(before, s.all_grads()));
  // Disjoint buffers (the ordinary case) still run.
  layer.backward<float>(ctx, s.L.xv(), s.rs.params(s.d), s.L.weights(), res, s.dyv(), coeffs,
                        s.dxv(), s.grads(), s.rgrads());
  BOOST_TEST(!sy::test::same_bits(before, s.all_grads()));
}
