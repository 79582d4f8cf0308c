// SPDX-License-Identifier: Apache-2.0
#pragma once
// Comparisons of the GPU layer with the host layer, and the tolerances they use.
//
// Tolerances (|got - want| <= rel·|want| + abs·rms(want), per element; NaN never passes):
// - float storage: rel = abs = 1e-4. Both sides accumulate in float; they differ only in
//   the order of the sums (cuBLAS vs the host GEMMs), which costs ~1e-7·sqrt(d) relative.
// - half / bfloat16 storage, unit roundoff u (2^-11, 2^-8): rel = 2u (one ulp of the rounded
//   output: the two float results may round to neighbouring values) and abs = 6u. The GPU
//   rounds the expert activations to the storage type between the two GEMMs (experts.cuh)
//   while the host keeps them in float: each activation carries a relative error up to u, and
//   their sum through W2 gives an error of about u/sqrt(3)·rms(y) per element (4.5 sigma over
//   10^5 elements stays under 3u·rms).
// - backward (dx, expert and router gradients): the same rel, abs doubled (the recomputed
//   activations and their derivative both carry the rounding).
// - routing arrays (logits, probs, weights): float in both dtypes, rel = 1e-5, abs = 1e-5·rms.
// - losses: rel = 1e-4 (+ a slack of 4/T per token whose selection differs, see below).
//
// Selections may differ on a last-ulp tie (host and device compute the logits with different
// summation orders; a token whose k-th and (k+1)-th probabilities differ by ~1e-7 can flip).
// A case with T >= 256 tokens may have at most T/500 such tokens (each reported); smaller
// cases must match exactly. The y and drop comparison then uses the host layer's
// forward_experts on the DEVICE's plan, so capacity drops downstream of a flip are compared on
// the same selection, and backward always runs the host layer on the device's forward state.
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <cstring>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include <switchyard/switchyard.hpp>

namespace switchyard::test::gpu {

//! An element-wise tolerance: |got - want| <= rel·|want| + abs·rms(want).
struct tolerance {
  double rel;
  double abs;
};

//! y's tolerance for storage type T (file comment).
template <ElementType T>
constexpr tolerance forward_tolerance() {
  if constexpr (std::is_same_v<T, float>) return {1e-4, 1e-4};
  else return {2.0 * unit_roundoff<T>(), 6.0 * unit_roundoff<T>()};
}
//! Gradients' tolerance for storage type T (file comment).
template <ElementType T>
constexpr tolerance backward_tolerance() {
  if constexpr (std::is_same_v<T, float>) return {1e-4, 2e-4};
  else return {2.0 * unit_roundoff<T>(), 12.0 * unit_roundoff<T>()};
}
inline constexpr tolerance routing_tolerance{1e-5, 1e-5};
inline constexpr tolerance loss_tolerance{1e-4, 1e-6};

inline double as_double(float v) { return v; }
inline double as_double(double v) { return v; }
template <ElementType T>
  requires(!std::is_same_v<T, float>)
double as_double(T v) {
  return static_cast<double>(to_float(v));
}

//! Compares `got` with `want` element by element (rows of `row_len` elements whose `skip`
//! entry is set are left out); reports the first few differences and returns their count.
template <class G, class W>
int expect_close(const std::string& what, const std::vector<G>& got, const std::vector<W>& want,
                 tolerance tol, const std::vector<char>& skip = {}, std::size_t row_len = 1) {
  BOOST_TEST_REQUIRE(got.size() == want.size(), what << ": sizes differ");
  double ss = 0.0;
  for (const auto& v : want) ss += as_double(v) * as_double(v);
  const double rms = want.empty() ? 0.0 : std::sqrt(ss / static_cast<double>(want.size()));
  int bad = 0;
  double worst = 0.0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (!skip.empty() && skip[i / row_len]) continue;
    const double g = as_double(got[i]), w = as_double(want[i]);
    const double lim = tol.rel * std::abs(w) + tol.abs * rms;
    const double err = std::abs(g - w);
    if (!(err <= lim)) {  // NaN fails
      if (bad < 5) {
        BOOST_ERROR(what << "[" << i << "] = " << g << ", host " << w << ", |diff| " << err
                         << " > " << lim << " (rms " << rms << ")");
      }
      ++bad;
    }
    if (err > worst || std::isnan(err)) worst = err;
  }
  BOOST_TEST_MESSAGE(what << ": max |diff| " << worst << " (rms " << rms << ")");
  BOOST_TEST(bad == 0, what << ": " << bad << " of " << got.size() << " elements out of tolerance");
  return bad;
}

//! Byte-for-byte equality of two arrays (determinism).
template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

//! A losses struct (all float members) as a vector of floats.
template <class Losses>
std::vector<float> loss_values(const Losses& l) {
  static_assert(std::is_trivially_copyable_v<Losses> && sizeof(Losses) % sizeof(float) == 0);
  std::vector<float> v(sizeof(Losses) / sizeof(float));
  std::memcpy(v.data(), &l, sizeof(Losses));
  return v;
}

//! The tokens whose selection (count or ids) differs between two plans: [T] flags.
inline std::vector<char> selection_mismatch(const routing::routing_plan& got,
                                            const routing::routing_plan& want) {
  std::vector<char> differs(static_cast<std::size_t>(want.num_tokens), 0);
  for (index_t t = 0; t < want.num_tokens; ++t) {
    bool same = got.counts[t] == want.counts[t];
    for (index_t j = 0; same && j < want.width; ++j) same = got.id(t, j) == want.id(t, j);
    differs[static_cast<std::size_t>(t)] = same ? 0 : 1;
  }
  return differs;
}

//! Allowed last-ulp selection flips for a case of T tokens (file comment).
inline index_t allowed_flips(index_t tokens) { return tokens >= 256 ? tokens / 500 : 0; }

//! Reports one token's selections on both sides (and its host probabilities).
inline void report_flip(const routing::routing_plan& dev, const routing::routing_plan& host,
                        index_t t) {
  std::ostringstream s;
  s.precision(9);
  s << "token " << t << ": device [";
  for (index_t j = 0; j < dev.counts[t]; ++j) s << (j ? "," : "") << dev.id(t, j);
  s << "] host [";
  for (index_t j = 0; j < host.counts[t]; ++j) s << (j ? "," : "") << host.id(t, j);
  s << "] host probs";
  for (index_t e = 0; e < host.num_experts; ++e)
    s << " " << host.probs[static_cast<std::size_t>(t * host.num_experts + e)];
  BOOST_TEST_MESSAGE("selection differs (a near tie?) " << s.str());
}

}  // namespace switchyard::test::gpu
