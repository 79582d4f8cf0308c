// SPDX-License-Identifier: Apache-2.0
// MoELayer backward against central finite differences of a float64 reference layer (top-k
// routing, softmax, load-balance and z losses, expert FFNs, capacity drops written out
// plainly here), for every parameter kind: x, router w, W1, b1, W2, b2, with caller-chosen
// aux-loss coefficients.
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include <switchyard/switchyard.hpp>

#include "host/layer/layer_reference.hpp"
#include "support/random.hpp"

namespace sy = switchyard;
using namespace switchyard;

namespace {

struct dims {
  index_t t, d, f, p, e, k;
};

//! All parameters of the layer in double (the values the float layer sees, exactly).
struct params {
  std::vector<double> x, wr, w1, b1, w2, b2;
};

//! Loss = Σ G ⊙ y + c_s · lb_switch + c_k · lb_topk + c_z · z, all in double.
template <class A>
double ref_loss(const dims& m, const params& q, const std::vector<double>& G, double c_s,
                double c_k, double c_z, bool capacity, index_t cap, bool pass_through) {
  const bool gated = activation_traits<A>::is_gated;
  std::vector<double> probs(m.t * m.e), lse(m.t);
  std::vector<index_t> ids(m.t * m.k);
  std::vector<double> wts(m.t * m.k);
  for (index_t t = 0; t < m.t; ++t) {
    std::vector<double> lg(m.e);
    double mx = -1e300;
    for (index_t e = 0; e < m.e; ++e) {
      double s = 0;
      for (index_t i = 0; i < m.d; ++i) s += q.x[t * m.d + i] * q.wr[e * m.d + i];
      lg[e] = s;
      mx = std::max(mx, s);
    }
    double z = 0;
    for (index_t e = 0; e < m.e; ++e) z += std::exp(lg[e] - mx);
    lse[t] = mx + std::log(z);
    for (index_t e = 0; e < m.e; ++e) probs[t * m.e + e] = std::exp(lg[e] - lse[t]);
    std::vector<index_t> order(m.e);
    for (index_t e = 0; e < m.e; ++e) order[e] = e;
    std::stable_sort(order.begin(), order.end(),
                     [&](index_t a, index_t b) { return probs[t * m.e + a] > probs[t * m.e + b]; });
    double s = 0;
    for (index_t j = 0; j < m.k; ++j) s += probs[t * m.e + order[j]];
    for (index_t j = 0; j < m.k; ++j) {
      ids[t * m.k + j] = order[j];
      wts[t * m.k + j] = probs[t * m.e + order[j]] / s;
    }
  }
  // Aux losses.
  std::vector<double> f1(m.e, 0), fk(m.e, 0), pbar(m.e, 0);
  double zl = 0;
  for (index_t t = 0; t < m.t; ++t) {
    f1[ids[t * m.k]] += 1.0 / m.t;
    for (index_t j = 0; j < m.k; ++j) fk[ids[t * m.k + j]] += 1.0 / m.t;
    for (index_t e = 0; e < m.e; ++e) pbar[e] += probs[t * m.e + e] / m.t;
    zl += lse[t] * lse[t] / m.t;
  }
  double lbs = 0, lbk = 0;
  for (index_t e = 0; e < m.e; ++e) {
    lbs += m.e * f1[e] * pbar[e];
    lbk += m.e * fk[e] * pbar[e];
  }
  // Experts and combine.
  std::vector<index_t> fill(m.e, 0);
  double loss = c_s * lbs + c_k * lbk + c_z * zl;
  std::vector<double> h(m.p), a(m.f);
  for (index_t t = 0; t < m.t; ++t) {
    const double* xt = &q.x[t * m.d];
    for (index_t j = 0; j < m.k; ++j) {
      const index_t e = ids[t * m.k + j];
      const double w = wts[t * m.k + j];
      if (capacity && fill[e]++ >= cap) {
        if (pass_through)
          for (index_t i = 0; i < m.d; ++i) loss += G[t * m.d + i] * w * xt[i];
        continue;
      }
      for (index_t r = 0; r < m.p; ++r) {
        double s = q.b1[e * m.p + r];
        for (index_t i = 0; i < m.d; ++i) s += q.w1[(e * m.p + r) * m.d + i] * xt[i];
        h[r] = s;
      }
      for (index_t c = 0; c < m.f; ++c)
        a[c] = gated ? test::ref_activation<A>(h[c], h[m.f + c]) : test::ref_activation<A>(h[c]);
      for (index_t o = 0; o < m.d; ++o) {
        double s = q.b2[e * m.d + o];
        for (index_t c = 0; c < m.f; ++c) s += q.w2[(e * m.d + o) * m.f + c] * a[c];
        loss += G[t * m.d + o] * w * s;
      }
    }
  }
  return loss;
}

template <class A, class D>
struct case_ {
  using activation = A;
  using dispatch = D;
};

using cases = std::tuple<case_<activation::relu, dispatch::sorted_grouped>,
                         case_<activation::gelu, dispatch::dense>,
                         case_<activation::gelu_tanh, dispatch::sorted_grouped>,
                         case_<activation::silu, dispatch::padded_capacity>,
                         case_<activation::swiglu, dispatch::padded_capacity>,
                         case_<activation::geglu, dispatch::dense>>;

std::vector<float> as_float(const std::vector<double>& v) { return {v.begin(), v.end()}; }

}  // namespace

BOOST_AUTO_TEST_CASE_TEMPLATE(backward_matches_central_differences, C, cases) {
  using A = typename C::activation;
  using D = typename C::dispatch;
  constexpr bool capacity = std::is_same_v<D, dispatch::padded_capacity>;
  // silu: Switch's pass-through for dropped pairs; swiglu: dropped pairs give zero.
  constexpr bool pass_through = std::is_same_v<A, activation::silu>;
  const bool gated = activation_traits<A>::is_gated;
  const dims m{9, 5, 4, gated ? 8 : 4, 4, 2};
  std::mt19937_64 g(test::base_seed() + 21);
  auto gen = [&](index_t n, float s) {
    const auto v = test::normal(g, static_cast<std::size_t>(n), s);
    return std::vector<double>(v.begin(), v.end());  // exact float values
  };
  params q{gen(m.t * m.d, 1.0f),         gen(m.e * m.d, 1.0f),   gen(m.e * m.p * m.d, 0.5f),
           gen(m.e * m.p, 0.2f),         gen(m.e * m.d * m.f, 0.5f), gen(m.e * m.d, 0.2f)};
  const auto G = gen(m.t * m.d, 1.0f);
  const float c_s = 0.3f, c_k = 0.2f, c_z = 0.05f;

  D disp{};
  if constexpr (capacity) {
    disp.capacity_factor = 0.75f;
    disp.min_capacity = 0;
    disp.capacity_multiple = 1;
    disp.drop = pass_through ? dispatch::dropped_output::scaled_input : dispatch::dropped_output::zero;
  }
  // C = ceil(cf · T · k / E) (min_capacity 0, multiple 1), from the documented formula.
  const index_t cap = capacity ? static_cast<index_t>(std::ceil(0.75 * m.t * m.k / m.e)) : 0;
  MoELayer<routers::TopK, A, D> layer{.router = {.k = static_cast<int>(m.k), .renormalize = true},
                                      .dispatch = disp};

  // Library forward + backward in float.
  auto xf = as_float(q.x), wrf = as_float(q.wr), w1f = as_float(q.w1), b1f = as_float(q.b1),
       w2f = as_float(q.w2), b2f = as_float(q.b2), Gf = as_float(G);
  const expert_weights<float> w{make_view<const float>(w1f.data(), m.e, m.p, m.d),
                                make_view<const float>(b1f.data(), m.e, m.p),
                                make_view<const float>(w2f.data(), m.e, m.d, m.f),
                                make_view<const float>(b2f.data(), m.e, m.d)};
  const routing::linear_router_params rp{make_view<const float>(wrf.data(), m.e, m.d)};
  std::vector<float> y(m.t * m.d);
  typename decltype(layer)::result_type res;
  const matrix_view<const float> xv = make_view<const float>(xf.data(), m.t, m.d);
  layer.template forward<float>(switchyard::host_context{}, xv, rp, w, make_view(y.data(), m.t, m.d), res);
  if constexpr (capacity) BOOST_TEST(res.total_dropped() > 0);  // the case exercises drops

  std::vector<float> dx(q.x.size()), dwr(q.wr.size()), dw1(q.w1.size()), db1(q.b1.size()),
      dw2(q.w2.size()), db2(q.b2.size());
  const expert_grads eg{make_view(dw1.data(), m.e, m.p, m.d), make_view(db1.data(), m.e, m.p),
                        make_view(dw2.data(), m.e, m.d, m.f), make_view(db2.data(), m.e, m.d)};
  layer.template backward<float>(switchyard::host_context{}, xv, rp, w, res, make_view<const float>(Gf.data(), m.t, m.d),
                                 {c_s, c_k, c_z}, make_view(dx.data(), m.t, m.d), eg,
                                 {make_view(dwr.data(), m.e, m.d)});

  // The reference forward reproduces the library's y (same routing, same drops).
  {
    double s = 0;
    for (index_t i = 0; i < m.t * m.d; ++i) s += G[i] * y[i];
    const double ref = ref_loss<A>(m, q, G, 0, 0, 0, capacity, cap, pass_through);
    BOOST_TEST(std::abs(s - ref) <= 1e-4 * (1.0 + std::abs(ref)));
  }

  auto check = [&](const char* name, std::vector<double>& param, const std::vector<float>& got) {
    const double h = 1e-6;
    double max_fd = 0;
    std::vector<double> fd(param.size());
    for (std::size_t i = 0; i < param.size(); ++i) {
      const double keep = param[i];
      param[i] = keep + h;
      const double lp = ref_loss<A>(m, q, G, c_s, c_k, c_z, capacity, cap, pass_through);
      param[i] = keep - h;
      const double lm = ref_loss<A>(m, q, G, c_s, c_k, c_z, capacity, cap, pass_through);
      param[i] = keep;
      fd[i] = (lp - lm) / (2 * h);
      max_fd = std::max(max_fd, std::abs(fd[i]));
    }
    BOOST_TEST(max_fd > 0.0, name << ": the gradient is not identically zero");
    int bad = 0;
    for (std::size_t i = 0; i < param.size(); ++i) {
      const double tol = 1e-4 * std::max(1.0, max_fd) + 1e-3 * std::abs(fd[i]);
      if (!(std::abs(got[i] - fd[i]) <= tol) && bad++ < 4)
        BOOST_ERROR(name << "[" << i << "]: backward " << got[i] << ", central difference "
                         << fd[i]);
    }
    BOOST_TEST(bad == 0, name);
  };
  check("dx", q.x, dx);
  check("router w", q.wr, dwr);
  check("W1", q.w1, dw1);
  check("b1", q.b1, db1);
  check("W2", q.w2, dw2);
  check("b2", q.b2, db2);
}
