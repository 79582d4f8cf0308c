// Element types: conversions round to nearest even, bit-exactly, against a float64 reference
// of the rounding rule; special values survive.
#include <boost/test/unit_test.hpp>

#include <switchyard/core/element_type.hpp>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>

#include "support/random.hpp"

namespace sy = switchyard;

namespace {

// Reference: the representable value nearest to f (ties to even mantissa) among all 65536
// bit patterns, found by exhaustive decoding (independent of the library's bit tricks).
template <class T>
std::uint16_t nearest_bits(float f, const std::vector<double>& decoded, double inf_value) {
  const double v = f;
  std::uint16_t best = 0;
  double best_err = std::numeric_limits<double>::infinity();
  for (std::uint32_t b = 0; b < 65536; ++b) {
    const double d = decoded[b];
    if (std::isnan(d)) continue;
    // IEEE: Inf stands for 2^(emax+1) when rounding (so overflow rounds to Inf).
    const double as_value = std::isinf(d) ? std::copysign(inf_value, d) : d;
    const double err = std::abs(as_value - v);
    const bool tie = err == best_err;
    const bool better_tie = tie && ((std::signbit(d) == std::signbit(v) && d == 0.0) ||
                                    ((b & 1u) == 0 && (best & 1u) == 1 && d != 0.0));
    if (err < best_err || better_tie) {
      best = static_cast<std::uint16_t>(b);
      best_err = err;
    }
  }
  return best;
}

template <class T>
std::vector<double> decode_all() {
  std::vector<double> out(65536);
  for (std::uint32_t b = 0; b < 65536; ++b)
    out[b] = static_cast<float>(T::from_bits(static_cast<std::uint16_t>(b)));
  return out;
}

}  // namespace

BOOST_AUTO_TEST_CASE(half_decodes_known_values) {
  BOOST_TEST(static_cast<float>(sy::half::from_bits(0x3c00)) == 1.0f);
  BOOST_TEST(static_cast<float>(sy::half::from_bits(0xc000)) == -2.0f);
  BOOST_TEST(static_cast<float>(sy::half::from_bits(0x7bff)) == 65504.0f);
  BOOST_TEST(static_cast<float>(sy::half::from_bits(0x0001)) == std::ldexp(1.0f, -24));
  BOOST_TEST(std::isinf(static_cast<float>(sy::half::from_bits(0x7c00))));
  BOOST_TEST(std::isnan(static_cast<float>(sy::half::from_bits(0x7e00))));
  BOOST_TEST(static_cast<float>(sy::bfloat16::from_bits(0x3f80)) == 1.0f);
}

BOOST_AUTO_TEST_CASE(half_roundtrip_is_exact_for_every_pattern) {
  for (std::uint32_t b = 0; b < 65536; ++b) {
    const auto h = sy::half::from_bits(static_cast<std::uint16_t>(b));
    const float f = static_cast<float>(h);
    if (std::isnan(f)) {
      BOOST_TEST(std::isnan(static_cast<float>(sy::half(f))));
      continue;
    }
    BOOST_TEST_REQUIRE(sy::half(f).bits == h.bits, "pattern " << b);
    const auto bf = sy::bfloat16::from_bits(static_cast<std::uint16_t>(b));
    if (!std::isnan(static_cast<float>(bf))) {
      BOOST_TEST_REQUIRE(sy::bfloat16(static_cast<float>(bf)).bits == bf.bits, "pattern " << b);
    }
  }
}

BOOST_AUTO_TEST_CASE(conversion_rounds_to_nearest_even) {
  std::mt19937_64 g(sy::test::base_seed());
  const auto half_table = decode_all<sy::half>();
  const auto bf_table = decode_all<sy::bfloat16>();
  // Random magnitudes across the half range (incl. subnormals), and exact midpoints.
  std::uniform_real_distribution<float> expo(-26.0f, 16.5f);
  std::uniform_int_distribution<int> sign(0, 1);
  for (int i = 0; i < 300; ++i) {
    const float f = (sign(g) ? -1.0f : 1.0f) * std::exp2(expo(g));
    BOOST_TEST(sy::half(f).bits == nearest_bits<sy::half>(f, half_table, 65536.0), "f=" << f);
    BOOST_TEST(sy::bfloat16(f).bits == nearest_bits<sy::bfloat16>(f, bf_table, 0x1p128), "f=" << f);
  }
  // Midpoint between 1 and the next half (1 + 2^-10): ties to even -> 1.0.
  BOOST_TEST(sy::half(1.0f + std::ldexp(1.0f, -11)).bits == 0x3c00);
  BOOST_TEST(sy::half(1.0f + 3 * std::ldexp(1.0f, -11)).bits == 0x3c02);
  BOOST_TEST(sy::half(70000.0f).bits == 0x7c00);  // overflow -> +Inf
}
