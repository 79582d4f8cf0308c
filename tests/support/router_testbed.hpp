// SPDX-License-Identifier: Apache-2.0
#pragma once
// Router testbed: what the router tests share instead of copying it. A random problem
// (x [T, d], gate w [E, d], optional attention [H, T, T]), shapes as data, routing through the
// host backend's conveniences, float64 references (logits, logsumexp, softmax), a float64
// central-difference gradient check, and `expect_error<E>(fn, "argument", "fragment")`.
#include <boost/test/unit_test.hpp>

#include <switchyard/backend/host/route.hpp>
#include <switchyard/core/error.hpp>
#include <switchyard/core/view.hpp>
#include <switchyard/routing/plan.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "support/random.hpp"

namespace switchyard::test {

//! A problem's sizes, as data: tests loop over lists of them.
struct router_shape {
  int tokens, d, experts, heads = 0;  //!< heads > 0: also random attention probabilities
};

//! A random router problem: x ~ N(0, 1) [T, d], w ~ N(0, wscale) [E, d] and, with heads > 0,
//! attention rows = softmax(N(0, 1.5)) [H, T, T] (causal: keys j <= i only).
struct router_problem {
  int tokens, d, experts, heads;
  std::vector<float> x, w, attn;

  router_problem(router_shape s, std::uint64_t seed, float wscale = 0.5f, bool causal = false)
      : tokens(s.tokens), d(s.d), experts(s.experts), heads(s.heads) {
    std::mt19937_64 g(seed);
    x = normal(g, static_cast<std::size_t>(tokens) * d);
    w = normal(g, static_cast<std::size_t>(experts) * d, wscale);
    if (heads > 0) {
      const auto sc = normal(g, static_cast<std::size_t>(heads) * tokens * tokens, 1.5f);
      attn.assign(sc.size(), 0.0f);
      for (int h = 0; h < heads; ++h)
        for (int i = 0; i < tokens; ++i) {
          const int n = causal ? i + 1 : tokens;
          const std::size_t r = (static_cast<std::size_t>(h) * tokens + i) * tokens;
          double z = 0;
          for (int j = 0; j < n; ++j) z += std::exp(double(sc[r + j]));
          for (int j = 0; j < n; ++j) attn[r + j] = static_cast<float>(std::exp(double(sc[r + j])) / z);
        }
    }
  }

  [[nodiscard]] matrix_view<const float> xv() const { return make_view(x.data(), tokens, d); }
  [[nodiscard]] matrix_view<const float> wv() const { return make_view(w.data(), experts, d); }
  [[nodiscard]] tensor_view<const float, 3> attention() const {
    return make_view(attn.data(), heads, tokens, tokens);
  }
  //! The same problem restricted to token `t` (attention dropped).
  [[nodiscard]] router_problem token(int t) const {
    router_problem one = *this;
    one.tokens = 1;
    one.heads = 0;
    one.attn.clear();
    one.x.assign(x.begin() + static_cast<std::ptrdiff_t>(t) * d,
                 x.begin() + static_cast<std::ptrdiff_t>(t + 1) * d);
    return one;
  }
};

//! Routes x with `r` through the host backend into a fresh owning plan.
template <class R>
routing::routing_plan route_plan(const R& r, const matrix_view<const float>& x,
                                 const typename R::params_type& p,
                                 typename R::losses_type* losses = nullptr) {
  routing::routing_plan plan;
  typename R::losses_type l{};
  host::route(r, x, p, plan, l);
  if (losses) *losses = l;
  return plan;
}

//! d_logits [T, E] of a composed router's backward (no dx, no grads).
template <class R>
std::vector<float> backward_logits(const R& r, const routing::routing_plan& plan,
                                   const std::vector<float>& d_weights,
                                   const typename R::losses_type& coeff) {
  std::vector<float> d_logits(plan.logits.size());
  host::route_backward_logits(r, plan, d_weights.data(), coeff, d_logits.data());
  return d_logits;
}

// ---- float64 references --------------------------------------------------------------------

//! logits [T, E] = x [T, d] · wᵀ in float64.
inline std::vector<double> logits64(const std::vector<double>& x, const std::vector<double>& w,
                                    int tokens, int d, int e) {
  std::vector<double> lg(static_cast<std::size_t>(tokens) * e, 0.0);
  for (int t = 0; t < tokens; ++t)
    for (int i = 0; i < e; ++i)
      for (int q = 0; q < d; ++q) lg[t * e + i] += x[t * d + q] * w[i * d + q];
  return lg;
}

//! logsumexp of row t of logits [T, E], float64.
inline double lse64(const std::vector<double>& logits, int t, int e) {
  double m = -1e300;
  for (int i = 0; i < e; ++i) m = std::max(m, logits[t * e + i]);
  double s = 0;
  for (int i = 0; i < e; ++i) s += std::exp(logits[t * e + i] - m);
  return m + std::log(s);
}

//! softmax of row t of logits [T, E], float64.
inline std::vector<double> softmax64(const std::vector<double>& logits, int t, int e) {
  const double lse = lse64(logits, t, e);
  std::vector<double> p(e);
  for (int i = 0; i < e; ++i) p[i] = std::exp(logits[t * e + i] - lse);
  return p;
}

//! As a vector<double>.
inline std::vector<double> to64(const std::vector<float>& v) { return {v.begin(), v.end()}; }

//! Checks `got[i]` against the float64 central difference of f at `point` for every i:
//! |got − fd| <= atol + rtol·|fd|.
inline void check_gradient(const std::string& what, const std::vector<float>& got,
                           const std::function<double(const std::vector<double>&)>& f,
                           const std::vector<double>& point, double atol, double rtol,
                           double h = 1e-6) {
  BOOST_TEST_REQUIRE(got.size() == point.size());
  for (std::size_t i = 0; i < point.size(); ++i) {
    auto up = point, dn = point;
    up[i] += h;
    dn[i] -= h;
    const double fd = (f(up) - f(dn)) / (2 * h);
    BOOST_TEST(std::abs(got[i] - fd) <= atol + rtol * std::abs(fd),
               what << " i=" << i << " got=" << got[i] << " fd=" << fd);
  }
}

//! dx and dw of a linear-scoring router against float64 central differences of the objective
//! of the logits `obj` through logits = x · wᵀ.
template <class R>
void check_linear_backward(const R& r, const router_problem& p,
                           const typename R::params_type& params,
                           const routing::routing_plan& plan, const std::vector<float>& cot,
                           const typename R::losses_type& coeff,
                           const std::function<double(const std::vector<double>&)>& obj) {
  std::vector<float> dx(p.x.size(), 0.0f), dw(p.w.size(), 0.0f);
  host::route_backward(r, p.xv(), params, plan, cot.data(), coeff,
                       make_view(dx.data(), p.tokens, p.d), {make_view(dw.data(), p.experts, p.d)});
  const auto x64 = to64(p.x), w64 = to64(p.w);
  check_gradient("dx", dx,
                 [&](const std::vector<double>& xx) {
                   return obj(logits64(xx, w64, p.tokens, p.d, p.experts));
                 },
                 x64, 5e-5, 2e-4);
  check_gradient("dw", dw,
                 [&](const std::vector<double>& ww) {
                   return obj(logits64(x64, ww, p.tokens, p.d, p.experts));
                 },
                 w64, 5e-5, 2e-4);
}

// ---- errors --------------------------------------------------------------------------------

//! Expects `fn` to throw E whose argument() is `argument` and whose message contains
//! `fragment` (and the argument's name).
template <class E>
void expect_error(const std::function<void()>& fn, const std::string& argument,
                  const std::string& fragment = "") {
  try {
    fn();
    BOOST_ERROR("no exception; expected one naming " << argument << " with '" << fragment << "'");
  } catch (const E& e) {
    BOOST_TEST(e.argument() == argument, "argument '" << e.argument() << "', want " << argument);
    BOOST_TEST(std::string(e.what()).find(argument) != std::string::npos, e.what());
    BOOST_TEST(std::string(e.what()).find(fragment) != std::string::npos,
               "message '" << e.what() << "' lacks '" << fragment << "'");
  } catch (const std::exception& e) {
    BOOST_ERROR("wrong exception type for " << argument << ": " << e.what());
  }
}

}  // namespace switchyard::test
