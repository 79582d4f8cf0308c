// SPDX-License-Identifier: Apache-2.0
// Element types: conversions round to nearest even, bit-exactly, against a float64 reference
// of the rounding rule; special values survive. Exhaustive over all 2^16 patterns of half and
// bfloat16: exact decoding, bit-exact round trips, and every adjacent pair's midpoint (ties to
// even) and its float neighbours, incl. subnormals, underflow to zero and overflow to Inf.
// NaN: only "stays NaN, quiet" is checked (the header promises no NaN sign or payload).
#include <boost/test/unit_test.hpp>

#include <switchyard/core/element_type.hpp>

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

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

// ---------------------------------------------------------------------------------------------
// Exhaustive checks over all 2^16 patterns of each format, against a reference written here
// from the IEEE definitions (ldexp decoding, rounding in double arithmetic), never from the
// header's conversions.
namespace {

struct Format {
  const char* name;
  int mant_bits;             // stored fraction bits
  int exp_bits;              // exponent field bits
  int bias;                  // exponent bias
  std::uint16_t inf_bits;    // +Inf
  std::uint16_t max_finite;  // largest finite positive pattern
  std::uint16_t quiet_bit;   // the quiet-NaN bit (top fraction bit)
};
constexpr Format kHalf{"half", 10, 5, 15, 0x7c00, 0x7bff, 0x0200};
constexpr Format kBf16{"bfloat16", 7, 8, 127, 0x7f80, 0x7f7f, 0x0040};

template <class T>
constexpr const Format& format_of() {
  if constexpr (std::is_same_v<T, sy::half>) return kHalf;
  else return kBf16;
}

float float_of_bits(std::uint32_t u) { return std::bit_cast<float>(u); }
std::uint32_t bits_of_float(float f) { return std::bit_cast<std::uint32_t>(f); }

std::string hex(std::uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%x", v);
  return buf;
}

// Value of a bit pattern by the IEEE formula: (-1)^s * 2^(e-bias) * 1.m, or
// (-1)^s * 2^(1-bias) * 0.m for e == 0; all-ones exponent is Inf (m == 0) or NaN.
double ref_decode(const Format& f, std::uint16_t b) {
  const bool neg = (b & 0x8000u) != 0;
  const int e = (b >> f.mant_bits) & ((1 << f.exp_bits) - 1);
  const int m = b & ((1 << f.mant_bits) - 1);
  double v;
  if (e == (1 << f.exp_bits) - 1) {
    v = m ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  } else if (e == 0) {
    v = std::ldexp(static_cast<double>(m), 1 - f.bias - f.mant_bits);
  } else {
    v = std::ldexp(static_cast<double>((1 << f.mant_bits) + m), e - f.bias - f.mant_bits);
  }
  return neg ? -v : v;
}

bool is_nan_pattern(const Format& f, std::uint16_t b) {
  return (b & 0x7fffu) > f.inf_bits;
}

// Decoded positive finite values, indexed by bit pattern 0 .. max_finite (increasing).
std::vector<double> positive_table(const Format& f) {
  std::vector<double> t(f.max_finite + 1u);
  for (std::uint32_t b = 0; b <= f.max_finite; ++b) t[b] = ref_decode(f, static_cast<std::uint16_t>(b));
  return t;
}

// Expected pattern for a non-NaN float, by double arithmetic: scale |x| by the format's
// spacing at x's binade (clamped to the subnormal spacing), round half to even by hand, and
// overflow to Inf when the result (unbounded exponent) exceeds the largest finite value. The
// pattern is then looked up in the decoded table, so no bit tricks are shared with the header.
std::uint16_t ref_round(const Format& f, const std::vector<double>& pos, float x) {
  const std::uint16_t sign = std::signbit(x) ? 0x8000u : 0u;
  const double a = std::fabs(static_cast<double>(x));
  if (std::isinf(a)) return sign | f.inf_bits;
  if (a == 0.0) return sign;
  const int e = std::max(std::ilogb(a), 1 - f.bias);
  const double q = std::ldexp(1.0, e - f.mant_bits);  // spacing of the format around a
  const double n = a / q;                             // exact (power-of-two scaling)
  double r = std::floor(n);
  const double frac = n - r;
  if (frac > 0.5 || (frac == 0.5 && std::fmod(r, 2.0) != 0.0)) r += 1.0;
  const double v = r * q;
  if (v > pos.back()) return sign | f.inf_bits;
  const auto it = std::lower_bound(pos.begin(), pos.end(), v);
  if (it == pos.end() || *it != v) throw std::logic_error("ref_round: value not representable");
  return static_cast<std::uint16_t>(sign | static_cast<std::uint16_t>(it - pos.begin()));
}

// Counts mismatches, reporting the first few (keeps 10^6 checks fast and the log short).
class Mismatches {
 public:
  explicit Mismatches(std::string what) : what_(std::move(what)) {}
  template <class Msg>
  void check(bool ok, Msg&& msg) {
    ++checks_;
    if (ok) return;
    if (failures_++ < 8) BOOST_ERROR(what_ << ": " << msg());
  }
  ~Mismatches() {
    BOOST_TEST(failures_ == 0, what_ << ": " << failures_ << " of " << checks_ << " checks failed");
    BOOST_TEST(checks_ > 0, what_ << ": nothing checked");
  }

 private:
  std::string what_;
  long failures_ = 0;
  long checks_ = 0;
};

template <class T>
std::uint16_t convert(float x) {
  return sy::from_float<T>(x).bits;
}

// (a) every pattern decodes to exactly the IEEE value (sign of zero and Inf included).
template <class T>
void check_decode_all() {
  const Format& f = format_of<T>();
  Mismatches m(std::string(f.name) + " decode");
  for (std::uint32_t u = 0; u < 65536; ++u) {
    const auto b = static_cast<std::uint16_t>(u);
    const float got = sy::to_float(T::from_bits(b));
    const double want = ref_decode(f, b);
    if (std::isnan(want)) {
      m.check(std::isnan(got), [&] { return "pattern " + hex(b) + " should decode to NaN"; });
      continue;
    }
    m.check(static_cast<double>(got) == want && std::signbit(got) == std::signbit(want), [&] {
      return "pattern " + hex(b) + " decodes to float " + hex(bits_of_float(got));
    });
  }
}

// (b) from_float(to_float(v)) gives v back for every non-NaN; NaN stays a quiet NaN.
template <class T>
void check_round_trip_all() {
  const Format& f = format_of<T>();
  Mismatches m(std::string(f.name) + " round trip");
  for (std::uint32_t u = 0; u < 65536; ++u) {
    const auto b = static_cast<std::uint16_t>(u);
    const std::uint16_t back = convert<T>(sy::to_float(T::from_bits(b)));
    if (is_nan_pattern(f, b)) {
      m.check(is_nan_pattern(f, back) && (back & f.quiet_bit), [&] {
        return "NaN pattern " + hex(b) + " came back as " + hex(back) + " (not a quiet NaN)";
      });
    } else {
      m.check(back == b, [&] { return "pattern " + hex(b) + " came back as " + hex(back); });
    }
  }
}

// (c) for every adjacent pair (lo, hi) of same-sign finite values (the largest finite with
// Inf = 2^(emax+1) as its upper neighbour), the midpoint ties to the even pattern and the
// floats one float-ulp below/above it round to lo/hi. Covers zero -> smallest subnormal
// (underflow), the whole subnormal range, subnormal -> normal, every binade boundary and
// max finite -> Inf (overflow), for both signs.
template <class T>
void check_adjacent_midpoints() {
  const Format& f = format_of<T>();
  const auto pos = positive_table(f);
  const double inf_as_value = std::ldexp(1.0, (1 << (f.exp_bits - 1)));  // 2^(emax+1)
  Mismatches m(std::string(f.name) + " midpoints");
  for (const std::uint16_t sign : {std::uint16_t{0}, std::uint16_t{0x8000}}) {
    for (std::uint32_t u = 0; u <= f.max_finite; ++u) {
      const auto lo = static_cast<std::uint16_t>(u);
      const auto hi = static_cast<std::uint16_t>(u + 1);  // == inf_bits after max_finite
      const double vlo = pos[lo];
      const double vhi = hi == f.inf_bits ? inf_as_value : pos[hi];
      const double mid = (vlo + vhi) / 2;  // exact in double
      const float mid_f = static_cast<float>(mid);
      m.check(static_cast<double>(mid_f) == mid,
              [&] { return "midpoint above " + hex(lo) + " is not a float"; });
      const float inf = std::numeric_limits<float>::infinity();
      const float below = std::nextafter(mid_f, 0.0f);
      const float above = std::nextafter(mid_f, inf);
      m.check(static_cast<double>(below) > vlo && static_cast<double>(above) < vhi,
              [&] { return "neighbours of the midpoint above " + hex(lo) + " leave the interval"; });
      const std::uint16_t even = (lo & 1u) == 0 ? lo : hi;
      const float s = sign ? -1.0f : 1.0f;
      const struct {
        float x;
        std::uint16_t want;
        const char* what;
      } cases[] = {{s * mid_f, static_cast<std::uint16_t>(sign | even), "midpoint"},
                   {s * below, static_cast<std::uint16_t>(sign | lo), "just below midpoint"},
                   {s * above, static_cast<std::uint16_t>(sign | hi), "just above midpoint"}};
      for (const auto& c : cases) {
        const std::uint16_t got = convert<T>(c.x);
        m.check(got == c.want, [&] {
          return std::string(c.what) + " of " + hex(sign | lo) + "," + hex(sign | hi) +
                 ": float " + hex(bits_of_float(c.x)) + " -> " + hex(got) + ", want " +
                 hex(c.want);
        });
        // The reference agrees with the pair analysis (validates the reference itself).
        m.check(ref_round(f, pos, c.x) == c.want, [&] {
          return std::string("reference disagrees at float ") + hex(bits_of_float(c.x));
        });
      }
    }
  }
}

// Every float whose low 16 bits are one of the rounding-critical patterns (exact, ties and
// their neighbours for both formats' rounding positions) or random, for all 2^16 high halves
// (every sign, exponent and the top of the mantissa): matches the double reference; float
// NaNs of every payload become quiet NaNs.
template <class T>
void check_against_reference_sweep() {
  const Format& f = format_of<T>();
  const auto pos = positive_table(f);
  constexpr std::array<std::uint32_t, 18> lows = {
      0x0000, 0x0001, 0x0fff, 0x1000, 0x1001, 0x1fff, 0x2000, 0x2001, 0x3000,
      0x5000, 0x7fff, 0x8000, 0x8001, 0x9000, 0xc000, 0xe000, 0xf000, 0xffff};
  std::mt19937 g(static_cast<std::uint32_t>(sy::test::base_seed()));
  Mismatches m(std::string(f.name) + " sweep");
  for (std::uint32_t hi = 0; hi < 65536; ++hi) {
    const auto one = [&](std::uint32_t low) {
      const float x = float_of_bits((hi << 16) | low);
      const std::uint16_t got = convert<T>(x);
      if (std::isnan(x)) {
        m.check(is_nan_pattern(f, got) && (got & f.quiet_bit), [&] {
          return "float NaN " + hex(bits_of_float(x)) + " -> " + hex(got) + " (not a quiet NaN)";
        });
        return;
      }
      const std::uint16_t want = ref_round(f, pos, x);
      m.check(got == want, [&] {
        return "float " + hex(bits_of_float(x)) + " -> " + hex(got) + ", want " + hex(want);
      });
    };
    for (const std::uint32_t low : lows) one(low);
    one(g() & 0xffffu);
  }
}

struct Case {
  float x;
  std::uint16_t want;
};

// Named cases (each also with its negative): checks the header and the reference both.
template <class T>
void check_cases(std::initializer_list<Case> cases) {
  const Format& f = format_of<T>();
  const auto pos = positive_table(f);
  for (const Case& c : cases) {
    for (const float s : {1.0f, -1.0f}) {
      const float x = s * c.x;
      const auto want = static_cast<std::uint16_t>(c.want | (s < 0 ? 0x8000u : 0u));
      BOOST_TEST(convert<T>(x) == want, f.name << "(" << hex(bits_of_float(x)) << ") = "
                                               << hex(convert<T>(x)) << ", want " << hex(want));
      BOOST_TEST(ref_round(f, pos, x) == want, "reference for " << hex(bits_of_float(x)));
    }
  }
}

}  // namespace

BOOST_AUTO_TEST_CASE(every_pattern_decodes_to_its_ieee_value) {
  check_decode_all<sy::half>();
  check_decode_all<sy::bfloat16>();
  // bfloat16 is the top half of a float: an independent bit-shift decoder agrees.
  Mismatches m("bfloat16 decode vs shift");
  for (std::uint32_t u = 0; u < 65536; ++u) {
    const float got = sy::to_float(sy::bfloat16::from_bits(static_cast<std::uint16_t>(u)));
    m.check(bits_of_float(got) == u << 16, [&] { return "pattern " + hex(u); });
  }
}

BOOST_AUTO_TEST_CASE(every_pattern_round_trips_bit_exactly) {
  check_round_trip_all<sy::half>();
  check_round_trip_all<sy::bfloat16>();
}

BOOST_AUTO_TEST_CASE(every_adjacent_midpoint_ties_to_even) {
  check_adjacent_midpoints<sy::half>();
  check_adjacent_midpoints<sy::bfloat16>();
}

BOOST_AUTO_TEST_CASE(rounding_matches_reference_over_critical_bit_patterns) {
  check_against_reference_sweep<sy::half>();
  check_against_reference_sweep<sy::bfloat16>();
}

BOOST_AUTO_TEST_CASE(half_boundaries) {
  const float flt_max = std::numeric_limits<float>::max();
  const float flt_true_min = std::numeric_limits<float>::denorm_min();
  const float inf = std::numeric_limits<float>::infinity();
  check_cases<sy::half>({
      // Largest finite -> Inf: 65504 is max, 65520 the midpoint to 2^16 (ties away from the
      // odd 0x7bff, i.e. to Inf).
      {65504.0f, 0x7bff},
      {std::nextafter(65520.0f, 0.0f), 0x7bff},
      {65520.0f, 0x7c00},
      {std::nextafter(65520.0f, inf), 0x7c00},
      {65536.0f, 0x7c00},
      // Beyond half's range (fine in bfloat16): Inf.
      {1e10f, 0x7c00},
      {3e38f, 0x7c00},
      {flt_max, 0x7c00},
      {inf, 0x7c00},
      // Underflow: half the smallest subnormal ties to even (0), just above -> 2^-24.
      {0x1p-24f, 0x0001},
      {0x1p-25f, 0x0000},
      {std::nextafter(0x1p-25f, 1.0f), 0x0001},
      {std::nextafter(0x1p-25f, 0.0f), 0x0000},
      {0x1p-26f, 0x0000},
      {0x1p-126f, 0x0000},
      {flt_true_min, 0x0000},
      {0.0f, 0x0000},
      // Subnormal ties.
      {3 * 0x1p-25f, 0x0002},
      {5 * 0x1p-25f, 0x0002},
      {7 * 0x1p-25f, 0x0004},
      // Subnormal / normal boundary: 1023 * 2^-24 is the largest subnormal, 2^-14 the
      // smallest normal; the midpoint ties to the even 0x0400.
      {1023 * 0x1p-24f, 0x03ff},
      {std::nextafter(2047 * 0x1p-25f, 0.0f), 0x03ff},
      {2047 * 0x1p-25f, 0x0400},
      {0x1p-14f, 0x0400},
      {2045 * 0x1p-25f, 0x03fe},
      // Normal ties.
      {1.0f + 0x1p-11f, 0x3c00},
      {1.0f + 3 * 0x1p-11f, 0x3c02},
      {2049.0f, 0x6800},
      {2051.0f, 0x6802},
  });
}

BOOST_AUTO_TEST_CASE(bfloat16_boundaries) {
  const float flt_max = std::numeric_limits<float>::max();
  const float inf = std::numeric_limits<float>::infinity();
  check_cases<sy::bfloat16>({
      // Beyond half's range: 1e10f = 0x501502f9 rounds down, 3e38f = 0x7f61b1e6 up.
      {1e10f, 0x5015},
      {3e38f, 0x7f62},
      {65520.0f, 0x4780},
      // Largest finite (0x7f7f = 0x1.fep127) -> Inf: the midpoint 0x7f7f8000 ties to Inf.
      {float_of_bits(0x7f7f0000), 0x7f7f},
      {float_of_bits(0x7f7f7fff), 0x7f7f},
      {float_of_bits(0x7f7f8000), 0x7f80},
      {float_of_bits(0x7f7f8001), 0x7f80},
      {flt_max, 0x7f80},
      {inf, 0x7f80},
      // Normal ties: 1 + 2^-8 -> 1 (0x3f80, even); 1 + 3 * 2^-8, between 0x3f81 and 0x3f82,
      // -> 0x3f82 (even); one float ulp off a tie rounds to the nearer neighbour.
      {1.0f + 0x1p-8f, 0x3f80},
      {1.0f + 3 * 0x1p-8f, 0x3f82},
      {float_of_bits(0x3f808001), 0x3f81},
      {float_of_bits(0x3f817fff), 0x3f81},
      // Float subnormals (bfloat16 has the same exponent range): ties and underflow.
      {float_of_bits(0x00008000), 0x0000},
      {float_of_bits(0x00008001), 0x0001},
      {float_of_bits(0x00018000), 0x0002},
      {float_of_bits(0x00000001), 0x0000},
      // Subnormal / normal boundary: 0x007f8000 ties to the even 0x0080 (FLT_MIN).
      {float_of_bits(0x007f7fff), 0x007f},
      {float_of_bits(0x007f8000), 0x0080},
      {std::numeric_limits<float>::min(), 0x0080},
  });
}

BOOST_AUTO_TEST_CASE(float_nans_with_payloads_become_quiet_nans) {
  const std::uint32_t nans[] = {
      // quiet
      0x7fc00000, 0x7fc00001, 0x7fd55555, 0x7fffffff, 0xffc00000, 0xffffffff,
      // signalling: payload only in bits the narrow formats drop, or only in kept bits
      0x7f800001, 0x7f800100, 0x7f801fff, 0x7f802000, 0x7f80ffff, 0x7f810000, 0x7fa00000,
      0x7fbfffff, 0xff800001, 0xffa00000};
  for (const std::uint32_t n : nans) {
    const float x = float_of_bits(n);
    BOOST_TEST_REQUIRE(std::isnan(x));
    const std::uint16_t h = convert<sy::half>(x);
    const std::uint16_t b = convert<sy::bfloat16>(x);
    BOOST_TEST((is_nan_pattern(kHalf, h) && (h & kHalf.quiet_bit)), "half(" << hex(n) << ") = " << hex(h));
    BOOST_TEST((is_nan_pattern(kBf16, b) && (b & kBf16.quiet_bit)), "bfloat16(" << hex(n) << ") = " << hex(b));
    BOOST_TEST(std::isnan(sy::to_float(sy::half::from_bits(h))));
    BOOST_TEST(std::isnan(sy::to_float(sy::bfloat16::from_bits(b))));
  }
}
