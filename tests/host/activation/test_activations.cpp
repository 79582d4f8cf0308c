// SPDX-License-Identifier: Apache-2.0
// Activation functors: values against float64 formulas, derivatives against central
// differences of those formulas, the gated trait, and the concept checks. The clamped gated
// ones (DeepSeek-V4, gpt-oss) also at points on both sides of their limits, where the clamps
// must pass no gradient (PyTorch's clamp: gradient where lo <= v <= hi, inclusive).
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <tuple>
#include <utility>
#include <vector>

#include <switchyard/activation/concepts.hpp>
#include <switchyard/activation/functors.hpp>

#include "support/random.hpp"

namespace act = switchyard::activation;
using switchyard::activation_traits;

namespace {

double silu(double h) { return h / (1.0 + std::exp(-h)); }
double gelu(double h) { return 0.5 * h * (1.0 + std::erf(h / std::sqrt(2.0))); }
double gelu_tanh(double h) {
  return 0.5 * h * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (h + 0.044715 * h * h * h)));
}
double relu(double h) { return h > 0 ? h : 0.0; }

template <class F>
double reference(double h) {
  if constexpr (std::is_same_v<F, act::relu>) return relu(h);
  else if constexpr (std::is_same_v<F, act::gelu>) return gelu(h);
  else if constexpr (std::is_same_v<F, act::gelu_tanh>) return gelu_tanh(h);
  else return silu(h);
}
template <class F>
double gated_reference(double g, double u) {
  if constexpr (std::is_same_v<F, act::swiglu>) return silu(g) * u;
  else return gelu(g) * u;
}

using plain = std::tuple<act::relu, act::gelu, act::gelu_tanh, act::silu>;
using gated = std::tuple<act::swiglu, act::geglu>;

}  // namespace

BOOST_AUTO_TEST_CASE_TEMPLATE(plain_value_and_derivative, F, plain) {
  static_assert(!activation_traits<F>::is_gated);
  static_assert(switchyard::Activation<F>);
  std::mt19937_64 g(switchyard::test::base_seed() + 1);
  const auto hs = switchyard::test::uniform(g, 400, -8.0f, 8.0f);
  const F f{};
  for (float h : hs) {
    const double ref = reference<F>(h);
    BOOST_TEST(std::abs(f(h) - ref) <= 4e-7 * (1.0 + std::abs(ref)), "h = " << h);
    if (std::is_same_v<F, act::relu> && std::abs(h) < 1e-3f) continue;  // kink
    const double eps = 1e-6;
    const double fd = (reference<F>(h + eps) - reference<F>(h - eps)) / (2 * eps);
    BOOST_TEST(std::abs(f.derivative(h) - fd) <= 1e-5 * (1.0 + std::abs(fd)), "h = " << h);
  }
}

BOOST_AUTO_TEST_CASE_TEMPLATE(gated_value_and_partials, F, gated) {
  static_assert(activation_traits<F>::is_gated);
  static_assert(switchyard::Activation<F>);
  std::mt19937_64 g(switchyard::test::base_seed() + 2);
  const auto gs = switchyard::test::uniform(g, 300, -6.0f, 6.0f);
  const auto us = switchyard::test::uniform(g, 300, -3.0f, 3.0f);
  const F f{};
  for (std::size_t i = 0; i < gs.size(); ++i) {
    const double gv = gs[i], uv = us[i], ref = gated_reference<F>(gv, uv);
    BOOST_TEST(std::abs(f(gs[i], us[i]) - ref) <= 1e-6 * (1.0 + std::abs(ref)));
    float dg = 0, du = 0;
    const float dout = 0.7f;
    f.backward(gs[i], us[i], dout, dg, du);
    const double eps = 1e-6;
    const double fdg = dout * (gated_reference<F>(gv + eps, uv) - gated_reference<F>(gv - eps, uv)) / (2 * eps);
    const double fdu = dout * (gated_reference<F>(gv, uv + eps) - gated_reference<F>(gv, uv - eps)) / (2 * eps);
    BOOST_TEST(std::abs(dg - fdg) <= 1e-5 * (1.0 + std::abs(fdg)));
    BOOST_TEST(std::abs(du - fdu) <= 1e-5 * (1.0 + std::abs(fdu)));
  }
}

namespace {

// float64 references of the clamped activations (limit, alpha as the functors' members).
double clip_above(double v, double hi) { return v > hi ? hi : v; }
double clip(double v, double lo, double hi) { return v > hi ? hi : (v < lo ? lo : v); }
double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }
double clamped_swiglu_ref(double g, double u, double limit) {
  return silu(clip_above(g, limit)) * clip(u, -limit, limit);
}
double gpt_oss_ref(double g, double u, double limit, double alpha) {
  const double gc = clip_above(g, limit), uc = clip(u, -limit, limit);
  return (uc + 1.0) * gc * sigmoid(alpha * gc);
}
// Analytic float64 partials with PyTorch's clamp rule (no gradient where a clamp clips).
void clamped_swiglu_partials(double g, double u, double limit, double& dg, double& du) {
  const double gc = clip_above(g, limit), uc = clip(u, -limit, limit), s = sigmoid(gc);
  dg = g <= limit ? uc * s * (1.0 + gc * (1.0 - s)) : 0.0;
  du = (u >= -limit && u <= limit) ? silu(gc) : 0.0;
}
void gpt_oss_partials(double g, double u, double limit, double alpha, double& dg, double& du) {
  const double gc = clip_above(g, limit), uc = clip(u, -limit, limit), s = sigmoid(alpha * gc);
  dg = g <= limit ? (uc + 1.0) * s * (1.0 + alpha * gc * (1.0 - s)) : 0.0;
  du = (u >= -limit && u <= limit) ? gc * s : 0.0;
}

//! Gate and up values: random ones spanning both sides of ±limit, and points just inside and
//! just outside each bound (the clamps' kinks themselves are checked separately).
std::vector<std::pair<float, float>> clamp_points(std::uint64_t seed, float limit) {
  std::mt19937_64 g(seed);
  const auto gs = switchyard::test::uniform(g, 300, -2.0f * limit, 2.0f * limit);
  const auto us = switchyard::test::uniform(g, 300, -2.0f * limit, 2.0f * limit);
  std::vector<std::pair<float, float>> v;
  for (std::size_t i = 0; i < gs.size(); ++i) v.emplace_back(gs[i], us[i]);
  for (float off : {-0.25f, -0.01f, 0.01f, 0.25f}) {
    v.emplace_back(limit + off, 0.5f);         // gate around +limit
    v.emplace_back(-1.3f, limit + off);        // up around +limit
    v.emplace_back(0.8f, -limit + off);        // up around -limit
    v.emplace_back(limit + off, -limit - off);  // both
  }
  return v;
}

//! Checks value and partials of a clamped activation against float64 (analytic and central
//! differences away from the kinks), with `ref(g, u)` and `partials(g, u, dg, du)`.
template <class F, class Ref, class Partials>
void check_clamped(const F& f, float limit, std::uint64_t seed, Ref ref, Partials partials) {
  for (auto [gv, uv] : clamp_points(seed, limit)) {
    const double r = ref(gv, uv);
    BOOST_TEST(std::abs(f(gv, uv) - r) <= 1e-6 * (1.0 + std::abs(r)), "g = " << gv << ", u = " << uv);
    const float dout = -0.6f;
    float dg = 0, du = 0;
    f.backward(gv, uv, dout, dg, du);
    double adg = 0, adu = 0;
    partials(gv, uv, adg, adu);
    adg *= dout;
    adu *= dout;
    BOOST_TEST(std::abs(dg - adg) <= 1e-5 * (1.0 + std::abs(adg)), "g = " << gv << ", u = " << uv);
    BOOST_TEST(std::abs(du - adu) <= 1e-5 * (1.0 + std::abs(adu)), "g = " << gv << ", u = " << uv);
    const double eps = 1e-6;
    if (std::abs(gv - limit) > 1e-3) {
      const double fdg = dout * (ref(gv + eps, uv) - ref(gv - eps, uv)) / (2 * eps);
      BOOST_TEST(std::abs(dg - fdg) <= 1e-5 * (1.0 + std::abs(fdg)), "g = " << gv << ", u = " << uv);
    }
    if (std::abs(std::abs(uv) - limit) > 1e-3) {
      const double fdu = dout * (ref(gv, uv + eps) - ref(gv, uv - eps)) / (2 * eps);
      BOOST_TEST(std::abs(du - fdu) <= 1e-5 * (1.0 + std::abs(fdu)), "g = " << gv << ", u = " << uv);
    }
  }
}

}  // namespace

BOOST_AUTO_TEST_CASE(clamped_swiglu_value_and_partials) {
  static_assert(activation_traits<act::clamped_swiglu>::is_gated);
  static_assert(switchyard::Activation<act::clamped_swiglu>);
  for (float limit : {7.0f, 2.5f}) {
    const act::clamped_swiglu f{.limit = limit};
    check_clamped(f, limit, switchyard::test::base_seed() + 3,
                  [&](double g, double u) { return clamped_swiglu_ref(g, u, limit); },
                  [&](double g, double u, double& dg, double& du) {
                    clamped_swiglu_partials(g, u, limit, dg, du);
                  });
  }
  // Default limit 7 (DeepSeek-V4's swiglu_limit); far outside the limits nothing flows back.
  const act::clamped_swiglu f{};
  BOOST_TEST(f.limit == 7.0f);
  float dg = 1, du = 1;
  f.backward(9.0f, 8.0f, 1.0f, dg, du);
  BOOST_TEST(dg == 0.0f);
  BOOST_TEST(du == 0.0f);
  BOOST_TEST(f(9.0f, 8.0f) == static_cast<float>(silu(7.0) * 7.0), boost::test_tools::tolerance(1e-6f));
}

BOOST_AUTO_TEST_CASE(gpt_oss_swiglu_value_and_partials) {
  static_assert(activation_traits<act::gpt_oss_swiglu>::is_gated);
  static_assert(switchyard::Activation<act::gpt_oss_swiglu>);
  for (auto [limit, alpha] : {std::pair{7.0f, 1.702f}, std::pair{3.0f, 0.9f}}) {
    const act::gpt_oss_swiglu f{.limit = limit, .alpha = alpha};
    check_clamped(f, limit, switchyard::test::base_seed() + 4,
                  [&](double g, double u) { return gpt_oss_ref(g, u, limit, alpha); },
                  [&](double g, double u, double& dg, double& du) {
                    gpt_oss_partials(g, u, limit, alpha, dg, du);
                  });
  }
  const act::gpt_oss_swiglu f{};
  BOOST_TEST(f.limit == 7.0f);
  BOOST_TEST(f.alpha == 1.702f);
}

BOOST_AUTO_TEST_CASE(clamps_at_the_limit_pass_the_gradient) {
  // PyTorch's clamp passes the gradient where the value equals a bound.
  const float limit = 7.0f;
  const act::clamped_swiglu c{};
  const act::gpt_oss_swiglu o{};
  for (const float u : {limit, -limit}) {
    float dg = 0, du = 0;
    c.backward(limit, u, 1.0f, dg, du);
    double adg = 0, adu = 0;
    clamped_swiglu_partials(limit, u, limit, adg, adu);
    BOOST_TEST(dg != 0.0f);
    BOOST_TEST(du != 0.0f);
    BOOST_TEST(std::abs(dg - adg) <= 1e-5 * (1.0 + std::abs(adg)));
    BOOST_TEST(std::abs(du - adu) <= 1e-5 * (1.0 + std::abs(adu)));
    o.backward(limit, u, 1.0f, dg, du);
    gpt_oss_partials(limit, u, limit, 1.702, adg, adu);
    BOOST_TEST(std::abs(dg - adg) <= 1e-5 * (1.0 + std::abs(adg)));
    BOOST_TEST(std::abs(du - adu) <= 1e-5 * (1.0 + std::abs(adu)));
  }
  // NaN propagates through the clamps (as torch.clamp).
  BOOST_TEST(std::isnan(c(std::nanf(""), 1.0f)));
  BOOST_TEST(std::isnan(o(1.0f, std::nanf(""))));
}

namespace {
struct user_gated {  // a user-defined gated activation declares it by a member
  using policy_kind = switchyard::activation_tag;
  static constexpr bool is_gated = true;
  float operator()(float g, float u) const { return g * u; }
  void backward(float g, float u, float d, float& dg, float& du) const {
    dg = d * u;
    du = d * g;
  }
};
struct not_an_activation {  // no policy_kind: cannot satisfy the concept by accident
  float operator()(float h) const { return h; }
  float derivative(float) const { return 1.0f; }
};
}  // namespace

BOOST_AUTO_TEST_CASE(traits_and_concept) {
  static_assert(activation_traits<user_gated>::is_gated);
  static_assert(switchyard::Activation<user_gated>);
  static_assert(switchyard::check_activation<user_gated>());
  static_assert(!switchyard::Activation<not_an_activation>);
  static_assert(!activation_traits<act::relu>::is_gated);
  BOOST_TEST(true);
}
