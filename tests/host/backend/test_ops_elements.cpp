// The GPU layouts of the per-row and long-sum functors, run on the host in index order against
// the functors they replace on the device, bit for bit: the per-element forms of
// ops::grouped_dy_rows_as, ops::first_non_finite and ops::load_rows; the pipelined router
// sums (backend/cuda/ordered_rows.hpp) against ops::router_logits / ops::linear_dw_elements;
// and the staged reductions' pieces (chunked as the block kernels of
// backend/cuda/route_reductions.cuh run them) against ops::expert_column_sums /
// ops::mean_of_rows.
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <type_traits>
#include <vector>

#include <switchyard/backend/cuda/ordered_rows.hpp>
#include <switchyard/backend/cuda/status.hpp>
#include <switchyard/core/element_type.hpp>
#include <switchyard/core/view.hpp>
#include <switchyard/ops/combine.hpp>
#include <switchyard/ops/expert_rows.hpp>
#include <switchyard/ops/finite.hpp>
#include <switchyard/ops/gather.hpp>
#include <switchyard/ops/route_losses.hpp>
#include <switchyard/ops/route_rows.hpp>

#include "support/random.hpp"

namespace sy = switchyard;
using sy::index_t;

namespace {

template <class F>
void run(index_t n, const F& f) {
  for (index_t i = 0; i < n; ++i) f(i);
}

template <class T>
std::vector<T> as(const std::vector<float>& v) {
  std::vector<T> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = sy::from_float<T>(v[i]);
  return out;
}

template <class T>
std::uint64_t bits(T v) {
  if constexpr (std::is_same_v<T, float>) {
    return sy::detail::float_bits(v);
  } else if constexpr (std::is_same_v<T, double>) {
    std::uint64_t b = 0;
    std::memcpy(&b, &v, sizeof b);
    return b;
  } else {
    return v.bits;
  }
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (bits(a[i]) != bits(b[i])) return false;
  return true;
}

// Rounded to T and back: the values a T-typed x holds, as floats (the float64 reference's input).
template <class T>
double value(const T& v) {
  return static_cast<double>(sy::to_float(v));
}

}  // namespace

BOOST_AUTO_TEST_CASE(staged_reductions_are_the_functors_bitwise) {
  std::mt19937_64 rng(sy::test::base_seed() + 105);
  // T = 2500: three chunks of the staged kernels (1024, 1024, 452).
  const index_t tokens = 2500, experts = 7, width = 3, chunk = sy::cuda::staged_chunk;
  std::vector<std::int32_t> ids(tokens * width), counts(tokens);
  std::uniform_int_distribution<int> id(-1, experts - 1), cnt(-1, width + 1);
  for (auto& v : ids) v = id(rng);
  for (auto& v : counts) v = cnt(rng);
  auto probs = sy::test::uniform(rng, tokens * experts, 0.0f, 1.0f);
  for (index_t i = 0; i < tokens * experts; i += 97)
    probs[static_cast<std::size_t>(i)] *= 1e7f;  // order matters
  for (const auto slots : {sy::ops::counted_slots::top1, sy::ops::counted_slots::every_used,
                           sy::ops::counted_slots::singles}) {
    for (const bool with_pbar : {true, false}) {
      std::vector<double> f_ref(experts, -1.0), p_ref(experts, -1.0), f(experts, -2.0),
          p(experts, -1.0);
      run(experts, sy::ops::expert_column_sums{ids.data(), counts.data(), probs.data(), tokens,
                                               experts, width, slots, f_ref.data(),
                                               with_pbar ? p_ref.data() : nullptr});
      const sy::cuda::staged_column_sums s{{ids.data(), counts.data(), probs.data(), tokens,
                                            experts, width, slots, f.data(),
                                            with_pbar ? p.data() : nullptr}};
      // The kernel's work: per chunk, every thread stages and counts (in any order: here
      // backwards), then one thread adds the staged terms in order.
      std::vector<float> staged(static_cast<std::size_t>(chunk));
      for (index_t e = 0; e < experts; ++e) {
        index_t count = 0;
        double pe = 0.0;
        for (index_t t0 = 0; t0 < tokens; t0 += chunk) {
          const index_t m = std::min(chunk, tokens - t0);
          for (index_t k = m - 1; k >= 0; --k) {
            count += s.count(e, t0 + k);
            staged[static_cast<std::size_t>(k)] = s.prob(e, t0 + k);
          }
          pe = sy::cuda::staged_column_sums::add(pe, staged.data(), m);
        }
        f[static_cast<std::size_t>(e)] = static_cast<double>(count);
        if (with_pbar) p[static_cast<std::size_t>(e)] = pe;
      }
      BOOST_TEST(same_bits(f, f_ref));
      BOOST_TEST(same_bits(p, p_ref));
    }
  }
  // mean_of_rows, and T = 0.
  const auto rv = sy::test::normal(rng, tokens, 1e3f);
  std::vector<double> rows(rv.begin(), rv.end());
  for (std::size_t i = 0; i < rows.size(); i += 31) rows[i] *= 1e12;
  for (const index_t n : {tokens, index_t{0}, index_t{1}, chunk}) {
    float want = -1.0f, got = -2.0f;
    sy::ops::mean_of_rows{rows.data(), n, &want}(0);
    const sy::cuda::staged_mean s{{rows.data(), n, &got}};
    double sum = 0.0;
    for (index_t t0 = 0; t0 < n; t0 += chunk)
      sum = sy::cuda::staged_mean::add(sum, rows.data() + t0, std::min(chunk, n - t0));
    got = s.finish(sum);
    BOOST_TEST(sy::detail::float_bits(got) == sy::detail::float_bits(want));
  }
}
