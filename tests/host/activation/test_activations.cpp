// Activation functors: values against float64 formulas, derivatives against central
// differences of those formulas, the gated trait, and the concept checks.
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <tuple>

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
