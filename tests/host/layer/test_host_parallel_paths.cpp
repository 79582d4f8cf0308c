// SPDX-License-Identifier: Apache-2.0
// The host layer's parallel paths (issue #14, "backward as parallel as forward"): float, half
// and bfloat16 experts (the latter two through per-thread conversion panels), the router's
// logits and gradients through the fixed kernels and BLAS, forward and backward. Every output
// (y, dx, dW1, db1, dW2, db2, the router's dW) is bitwise the same at 1, 2 and 3 OpenMP
// threads, and matches a float64 reference computed here from the layer's own plan, for the
// grouped and the dense dispatch, with an expert of more rows than row_panels::block and with
// fewer experts than threads.
#include <boost/mp11/algorithm.hpp>
#include <boost/mp11/list.hpp>
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include <omp.h>

#include <switchyard/switchyard.hpp>

#include "host/layer/layer_reference.hpp"
#include "support/random.hpp"

using namespace switchyard;

namespace {

//! Restores the OpenMP thread count on scope exit.
struct thread_guard {
  int omp = omp_get_max_threads();
  ~thread_guard() { omp_set_num_threads(omp); }
};

//! One configuration: sizes and whether the layer asks for batch-invariant kernels.
struct shape {
  index_t tokens, d, f, experts, k;
  bool fixed;
};

//! Everything one forward + backward produces (y as float values of T), compared bitwise.
struct outputs {
  std::vector<float> y, dx, dw1, db1, dw2, db2, dwr;
  std::vector<std::int32_t> ids, counts;
  std::vector<float> weights;
  bool operator==(const outputs&) const = default;
};

//! Bits of a float vector (so that the comparison is bitwise, NaN included).
std::vector<std::uint32_t> bits(const std::vector<float>& v) {
  std::vector<std::uint32_t> b(v.size());
  if (!v.empty()) std::memcpy(b.data(), v.data(), v.size() * sizeof(float));
  return b;
}

template <ElementType T, class D>
struct problem {
  shape s;
  test::layer_data<T> L;
  std::vector<float> wr;  // router weight [E, d]
  std::vector<T> dy;
  MoELayer<routers::TopK, activation::swiglu, D> layer;

  problem(std::mt19937_64& g, const shape& s_)
      : s(s_), L(g, s_.tokens, s_.d, s_.f, s_.experts, true, true),
        wr(test::normal(g, static_cast<std::size_t>(s_.experts * s_.d), 0.2f)),
        layer{.router = {.k = static_cast<int>(s_.k), .renormalize = false},
              .batch_invariant = s_.fixed} {
    for (float v : test::normal(g, static_cast<std::size_t>(s_.tokens * s_.d))) dy.push_back(from_float<T>(v));
  }

  outputs run(int threads) const {
    omp_set_num_threads(threads);
    const index_t t = s.tokens, d = s.d, e = s.experts;
    outputs o;
    o.dx.assign(static_cast<std::size_t>(t * d), 0.0f);
    o.dw1.assign(L.w1.size(), 0.0f);
    o.db1.assign(L.b1.size(), 0.0f);
    o.dw2.assign(L.w2.size(), 0.0f);
    o.db2.assign(L.b2.size(), 0.0f);
    o.dwr.assign(wr.size(), 0.0f);
    const routing::linear_router_params rp{make_view<const float>(wr.data(), e, d)};
    const auto w = L.weights();
    // Caller workspaces of the queried sizes (the no-allocation path).
    std::vector<std::byte> fws(layer.template workspace_size<T>(host_context{}, t, rp, w));
    std::vector<std::byte> bws(layer.template backward_workspace_size<T>(host_context{}, t, rp, w));
    std::vector<T> y(static_cast<std::size_t>(t * d), from_float<T>(-7.0f));
    typename decltype(layer)::result_type res;
    layer.template forward<T>(host_context{}, L.xv(), rp, w, make_view(y.data(), t, d), res,
                              {fws.data(), fws.size()});
    layer.template backward<T>(
        host_context{}, L.xv(), rp, w, res, make_view<const T>(dy.data(), t, d), {},
        make_view(o.dx.data(), t, d),
        {make_view(o.dw1.data(), e, L.p, d), make_view(o.db1.data(), e, L.p),
         make_view(o.dw2.data(), e, d, s.f), make_view(o.db2.data(), e, d)},
        {make_view(o.dwr.data(), e, d)}, {bws.data(), bws.size()});
    for (const T& v : y) o.y.push_back(to_float(v));
    const auto plan = std::as_const(res.plan).view();
    for (index_t i = 0; i < t; ++i) {
      o.counts.push_back(plan.counts(i));
      for (index_t j = 0; j < plan.width(); ++j) {
        o.ids.push_back(plan.expert_ids(i, j));
        o.weights.push_back(plan.weights(i, j));
      }
    }
    return o;
  }
};

//! Float64 forward and backward of the layer for the plan `o` came with (TopK without
//! renormalisation, no aux losses): y, dx, the expert gradients and the router's dW.
template <ElementType T, class D>
outputs reference(const problem<T, D>& pb, const outputs& o) {
  const auto& L = pb.L;
  const index_t t_count = pb.s.tokens, d = pb.s.d, f = pb.s.f, p = L.p, e_count = pb.s.experts;
  const index_t width = pb.s.k;
  std::vector<double> y(t_count * d, 0.0), dx(t_count * d, 0.0), dw1(L.w1.size(), 0.0),
      db1(L.b1.size(), 0.0), dw2(L.w2.size(), 0.0), db2(L.b2.size(), 0.0), dwr(pb.wr.size(), 0.0);
  std::vector<double> x(d), dyt(d), h(p), a(f), ye(d), dye(d), dh(p), probs(e_count), dprobs(e_count);
  for (index_t t = 0; t < t_count; ++t) {
    for (index_t i = 0; i < d; ++i) {
      x[i] = test::dbl(L.x[t * d + i]);
      dyt[i] = test::dbl(pb.dy[t * d + i]);
    }
    // Router probabilities in double.
    double mx = -1e300;
    for (index_t e = 0; e < e_count; ++e) {
      double s = 0.0;
      for (index_t i = 0; i < d; ++i) s += x[i] * pb.wr[e * d + i];
      probs[e] = s;
      mx = std::max(mx, s);
    }
    double z = 0.0;
    for (index_t e = 0; e < e_count; ++e) z += (probs[e] = std::exp(probs[e] - mx));
    for (index_t e = 0; e < e_count; ++e) probs[e] /= z;
    std::fill(dprobs.begin(), dprobs.end(), 0.0);
    for (index_t j = 0; j < o.counts[t]; ++j) {
      const index_t e = o.ids[t * width + j];
      const double wt = o.weights[t * width + j];
      for (index_t r = 0; r < p; ++r) {
        double s = test::dbl(L.b1[e * p + r]);
        for (index_t i = 0; i < d; ++i) s += test::dbl(L.w1[(e * p + r) * d + i]) * x[i];
        h[r] = s;
      }
      for (index_t c = 0; c < f; ++c) a[c] = test::ref_silu(h[c]) * h[f + c];
      double dwt = 0.0;
      for (index_t r = 0; r < d; ++r) {
        double s = test::dbl(L.b2[e * d + r]);
        for (index_t c = 0; c < f; ++c) s += test::dbl(L.w2[(e * d + r) * f + c]) * a[c];
        ye[r] = s;
        y[t * d + r] += wt * s;
        dwt += dyt[r] * s;
        dye[r] = wt * dyt[r];
      }
      dprobs[e] += dwt;
      for (index_t r = 0; r < d; ++r) {
        db2[e * d + r] += dye[r];
        for (index_t c = 0; c < f; ++c) dw2[(e * d + r) * f + c] += dye[r] * a[c];
      }
      for (index_t c = 0; c < f; ++c) {
        double da = 0.0;
        for (index_t r = 0; r < d; ++r) da += test::dbl(L.w2[(e * d + r) * f + c]) * dye[r];
        const double g = h[c], sg = 1.0 / (1.0 + std::exp(-g));
        dh[c] = da * h[f + c] * sg * (1.0 + g * (1.0 - sg));
        dh[f + c] = da * g * sg;
      }
      for (index_t r = 0; r < p; ++r) {
        db1[e * p + r] += dh[r];
        for (index_t i = 0; i < d; ++i) {
          dw1[(e * p + r) * d + i] += dh[r] * x[i];
          dx[t * d + i] += dh[r] * test::dbl(L.w1[(e * p + r) * d + i]);
        }
      }
    }
    // Softmax backward, then logits = x · Wrᵀ.
    double dot = 0.0;
    for (index_t e = 0; e < e_count; ++e) dot += probs[e] * dprobs[e];
    for (index_t e = 0; e < e_count; ++e) {
      const double dl = probs[e] * (dprobs[e] - dot);
      for (index_t i = 0; i < d; ++i) {
        dx[t * d + i] += dl * pb.wr[e * d + i];
        dwr[e * d + i] += dl * x[i];
      }
    }
  }
  const auto f32 = [](const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); };
  return {f32(y), f32(dx), f32(dw1), f32(db1), f32(dw2), f32(db2), f32(dwr), o.ids, o.counts, o.weights};
}

//! max |got - ref| <= tol · max |ref| (and the reference is not all zero).
void check_close(const char* name, const std::vector<float>& got, const std::vector<float>& ref,
                 double tol) {
  BOOST_REQUIRE_EQUAL(got.size(), ref.size());
  double scale = 0.0, err = 0.0;
  std::size_t worst = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    scale = std::max(scale, std::abs(static_cast<double>(ref[i])));
    const double e = std::abs(static_cast<double>(got[i]) - ref[i]);
    if (!(e <= err)) {
      err = e;
      worst = i;
    }
  }
  BOOST_TEST(scale > 0.0, name << ": reference is all zero");
  BOOST_TEST(err <= tol * scale, name << ": max error " << err << " at " << worst << " (got "
                                      << got[worst] << ", reference " << ref[worst]
                                      << "), scale " << scale << ", tolerance " << tol);
}

template <class T, class D>
struct combo {
  using type = T;
  using dispatch_type = D;
};

using combos = boost::mp11::mp_product<
    combo, boost::mp11::mp_list<float, switchyard::half, switchyard::bfloat16>,
    boost::mp11::mp_list<dispatch::sorted_grouped, dispatch::dense>>;

//! The shapes: d·d_ff puts the expert GEMMs on the BLAS path of the row-panel rule; E = 2
//! with k = 2 gives each expert all 900 tokens (more than row_panels::block rows, fewer
//! experts than the 3-thread run); E = 5 runs several panel slots at once; the last runs the
//! batch-invariant kernels.
const shape shapes[] = {{900, 64, 48, 2, 2, false}, {300, 64, 48, 5, 2, false}, {200, 40, 24, 3, 2, true}};

}  // namespace

BOOST_AUTO_TEST_CASE_TEMPLATE(parallel_paths_are_thread_invariant_and_exact, C, combos) {
  using T = typename C::type;
  using D = typename C::dispatch_type;
  const thread_guard guard;
  std::mt19937_64 g(test::base_seed() + 1414);
  // Forward outputs are rounded to T; gradients are float sums of T-stored values.
  const double y_tol = std::is_same_v<T, float> ? 1e-4 : (std::is_same_v<T, switchyard::half> ? 2e-3 : 1e-2);
  const double g_tol = 2e-4;
  for (const shape& s : shapes) {
    BOOST_TEST_CONTEXT("T=" << s.tokens << " d=" << s.d << " d_ff=" << s.f << " E=" << s.experts
                            << " k=" << s.k << " batch_invariant=" << s.fixed) {
      const problem<T, D> pb(g, s);
      const outputs one = pb.run(1);
      for (int threads : {2, 3}) {
        const outputs many = pb.run(threads);
        BOOST_TEST_CONTEXT("threads=" << threads) {
          BOOST_TEST(bits(many.y) == bits(one.y));
          BOOST_TEST(bits(many.dx) == bits(one.dx));
          BOOST_TEST(bits(many.dw1) == bits(one.dw1));
          BOOST_TEST(bits(many.db1) == bits(one.db1));
          BOOST_TEST(bits(many.dw2) == bits(one.dw2));
          BOOST_TEST(bits(many.db2) == bits(one.db2));
          BOOST_TEST(bits(many.dwr) == bits(one.dwr));
          BOOST_TEST((many.ids == one.ids && many.counts == one.counts));
        }
      }
      // Some expert really gets more rows than one row panel when E = 2.
      if (s.experts == 2) {
        index_t rows0 = 0;
        for (std::size_t i = 0; i < one.ids.size(); ++i) rows0 += one.ids[i] == 0;
        BOOST_TEST(rows0 > host::row_panels::block);
      }
      const outputs ref = reference(pb, one);
      check_close("y", one.y, ref.y, y_tol);
      check_close("dx", one.dx, ref.dx, g_tol);
      check_close("dW1", one.dw1, ref.dw1, g_tol);
      check_close("db1", one.db1, ref.db1, g_tol);
      check_close("dW2", one.dw2, ref.dw2, g_tol);
      check_close("db2", one.db2, ref.db2, g_tol);
      check_close("router dW", one.dwr, ref.dwr, g_tol);
    }
  }
}

// The router's products alone, outside a layer: logits bitwise those of one token at a time
// (batch invariance of the in-order sums) and equal across thread counts; the dx / dW products
// bitwise across thread counts, for float and bfloat16 tokens, and a strided router weight
// giving the same logits as a contiguous one.
BOOST_AUTO_TEST_CASE(router_products_are_thread_and_batch_invariant) {
  const thread_guard guard;
  std::mt19937_64 g(test::base_seed() + 1415);
  const index_t t = 203, d = 130, e = 12;
  const auto xf = test::normal(g, static_cast<std::size_t>(t * d));
  std::vector<switchyard::bfloat16> xb;
  for (float v : xf) xb.push_back(from_float<switchyard::bfloat16>(v));
  const auto w = test::normal(g, static_cast<std::size_t>(e * d), 0.1f);
  std::vector<float> w_strided(static_cast<std::size_t>(e * d * 2), 99.0f);
  for (index_t r = 0; r < e; ++r)
    for (index_t i = 0; i < d; ++i) w_strided[(r * d + i) * 2] = w[r * d + i];
  const auto dl = test::normal(g, static_cast<std::size_t>(t * e));
  const auto wv = make_view<const float>(w.data(), e, d);
  const auto wsv = make_strided_view<const float, 2>(w_strided.data(), {e, d}, {2 * d, 2});

  auto products = [&](const auto& xv, int threads) {
    omp_set_num_threads(threads);
    std::vector<float> logits(static_cast<std::size_t>(t * e)), dx(static_cast<std::size_t>(t * d), 0.5f),
        gw(static_cast<std::size_t>(e * d), 0.25f);
    detail::linear_logits(xv, wv, logits.data());
    routing::linear_backward(xv, routing::linear_router_params{wv}, dl.data(), make_view(dx.data(), t, d),
                             routing::linear_router_grads{make_view(gw.data(), e, d)});
    return std::vector<std::vector<float>>{logits, dx, gw};
  };
  auto check_type = [&](const auto& xv) {
    const auto one = products(xv, 1);
    for (int threads : {2, 3}) {
      const auto many = products(xv, threads);
      for (std::size_t i = 0; i < one.size(); ++i) BOOST_TEST(bits(many[i]) == bits(one[i]));
    }
    // Batch invariance of the logits: each token alone gives the same bits; so does the
    // strided weight.
    std::vector<float> alone(static_cast<std::size_t>(e)), strided(static_cast<std::size_t>(t * e));
    bool same = true;
    for (index_t r = 0; r < t; r += 17) {
      using E = std::remove_cvref_t<decltype(xv(0, 0))>;
      const auto row = make_strided_view<const E, 2>(&xv(r, 0), {1, d}, {xv.stride(0), xv.stride(1)});
      detail::linear_logits(row, wv, alone.data());
      same = same && std::memcmp(alone.data(), one[0].data() + r * e, sizeof(float) * e) == 0;
    }
    BOOST_TEST(same);
    detail::linear_logits(xv, wsv, strided.data());
    BOOST_TEST(bits(strided) == bits(one[0]));
    // Against double.
    std::vector<float> ref(static_cast<std::size_t>(t * e));
    for (index_t r = 0; r < t; ++r)
      for (index_t c = 0; c < e; ++c) {
        double s = 0.0;
        for (index_t i = 0; i < d; ++i) s += static_cast<double>(to_float(xv(r, i))) * w[c * d + i];
        ref[r * e + c] = static_cast<float>(s);
      }
    check_close("logits", one[0], ref, 1e-5);
  };
  check_type(make_view<const float>(xf.data(), t, d));
  check_type(make_view<const switchyard::bfloat16>(xb.data(), t, d));
}
