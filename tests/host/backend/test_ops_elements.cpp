// SPDX-License-Identifier: Apache-2.0
// The GPU layouts of the per-row and long-sum functors, run on the host in index order against
// the functors they replace on the device, bit for bit: the per-element forms of
// ops::grouped_dy_rows_as, ops::first_non_finite and ops::load_rows; the pipelined router
// sums (backend/cuda/ordered_rows.hpp) against ops::router_logits / ops::linear_dw_elements;
// and the staged reductions' pieces (chunked as the block kernels of
// backend/cuda/route_reductions.cuh run them) against ops::expert_column_sums /
// ops::mean_of_rows; the dense layout's per-element dY and slot copies against
// ops::dense_dy_rows_as / ops::keep_dense_slots_all; the staged token counts against the
// one-thread count_tokens / load_balance_finish / two_expert_share_finish; DynMoE's staged
// usage and threshold gradient against ops::dynmoe_usage_column / ops::dynmoe_threshold_grad.
#include <boost/test/unit_test.hpp>

#include <algorithm>
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

BOOST_AUTO_TEST_CASE(grouped_dy_elements_and_weights_are_grouped_dy_rows_as_bitwise) {
  std::mt19937_64 rng(sy::test::base_seed() + 101);
  using T = sy::bfloat16;
  // d = 37: not a multiple of the pipelined dot's 16 terms (the tail loop runs).
  const index_t tokens = 5, width = 2, d = 37, rows = 9;
  const auto wts = sy::test::uniform(rng, tokens * width, 0.1f, 1.0f);
  const auto weights = sy::make_view<const float>(wts.data(), tokens, width);
  const auto dyv = as<T>(sy::test::normal(rng, tokens * d));
  const auto dy = sy::make_view<const T>(dyv.data(), tokens, d);
  const std::vector<index_t> row_pair = {1, 2, 5, -1, 0, 4, 9, -1, 7};
  const auto ys = sy::test::normal(rng, rows * d);
  for (const bool on_input : {false, true}) {
    std::vector<float> dys(rows * d, -3.0f), dys_ref(rows * d, -4.0f);
    std::vector<float> dw(tokens * width, -1.0f), dw_ref(tokens * width, -1.0f);
    std::vector<T> dys_t(rows * d), dys_t_ref(rows * d);
    run(rows, sy::ops::grouped_dy_rows_as<T, const float>{
                  {weights, row_pair.data(), width, d, dy, ys.data(), dys_ref.data(), dw_ref.data(),
                   on_input},
                  dys_t_ref.data()});
    const sy::ops::grouped_dy_rows<T, const float> f{
        weights, row_pair.data(), width, d, dy, ys.data(), dys.data(), dw.data(), on_input};
    run(rows * d, sy::ops::grouped_dy_elements<T, const float>{f, dys_t.data()});
    run(rows, sy::ops::grouped_dy_weights<T, const float>{f});
    BOOST_TEST(same_bits(dys, dys_ref));
    BOOST_TEST(same_bits(dys_t, dys_t_ref));
    BOOST_TEST(same_bits(dw, dw_ref));
  }
  // The pipelined dot against a float64 reference (sanity) and dot_row (bitwise), d = 1..40.
  for (index_t n = 1; n <= 40; ++n) {
    const float got = sy::ops::dot_row_pipelined(dy, 1, ys.data() + 3 * d, n);
    BOOST_TEST(sy::detail::float_bits(got) ==
               sy::detail::float_bits(sy::ops::dot_row(dy, 1, ys.data() + 3 * d, n)));
    double ref = 0.0;
    for (index_t i = 0; i < n; ++i)
      ref += value(dy(1, i)) * ys[static_cast<std::size_t>(3 * d + i)];
    BOOST_TEST(std::abs(got - ref) <= 1e-4 * (1.0 + std::abs(ref)));
  }
}

BOOST_AUTO_TEST_CASE(dense_dy_and_slot_elements_are_the_dense_row_forms_bitwise) {
  std::mt19937_64 rng(sy::test::base_seed() + 106);
  using T = sy::bfloat16;
  using Id = const std::int32_t;
  // The dense layout: expert e's rows [e·T, e·T + T). d = 37 (the pipelined dot's tail runs);
  // token 3 names expert 1 twice (both slots get the dot, its dY adds both weights), token 4
  // uses no slot, token 5 one of two.
  const index_t tokens = 7, width = 2, experts = 3, d = 37, rows = experts * tokens;
  const std::vector<std::int32_t> idv = {0, 2, 1, 2, 2, 1, 1, 1, 0, 0, 2, 1, 1, 2};
  const std::vector<std::int32_t> cv = {2, 2, 1, 2, 0, 1, 2};
  const auto ids = sy::make_view<Id>(idv.data(), tokens, width);
  const auto counts = sy::make_view<Id>(cv.data(), tokens);
  const auto wts = sy::test::uniform(rng, tokens * width, 0.1f, 1.0f);
  const auto weights = sy::make_view<const float>(wts.data(), tokens, width);
  const auto dyv = as<T>(sy::test::normal(rng, tokens * d));
  const auto dy = sy::make_view<const T>(dyv.data(), tokens, d);
  const auto ys = sy::test::normal(rng, rows * d);
  for (const bool on_input : {false, true}) {
    std::vector<float> dys(rows * d, -3.0f), dys_ref(rows * d, -4.0f);
    std::vector<float> dw(tokens * width, -1.0f), dw_ref(tokens * width, -1.0f);
    std::vector<T> dys_t(rows * d), dys_t_ref(rows * d);
    run(rows, sy::ops::dense_dy_rows_as<T, Id, const float>{
                  {ids, weights, counts, 0, tokens, width, d, dy, ys.data(), dys_ref.data(),
                   dw_ref.data(), on_input},
                  dys_t_ref.data()});
    const sy::ops::dense_dy_rows<T, Id, const float> f{
        ids, weights, counts, 0, tokens, width, d, dy, ys.data(), dys.data(), dw.data(), on_input};
    run(rows * d, sy::ops::dense_dy_elements<T, Id, const float>{f, dys_t.data()});
    run(rows, sy::ops::dense_dy_weights<T, Id, const float>{f});
    BOOST_TEST(same_bits(dys, dys_ref));
    BOOST_TEST(same_bits(dys_t, dys_t_ref));
    BOOST_TEST(same_bits(dw, dw_ref));
    // Token 3's dY row of expert 1 against float64: (w_30 + w_31) · dy_3 (1 · dy_3 on input).
    const double w = on_input ? 1.0 : static_cast<double>(wts[6]) + wts[7];
    for (index_t c = 0; c < d; ++c)
      BOOST_TEST(std::abs(dys[static_cast<std::size_t>((tokens + 3) * d + c)] -
                          w * value(dy(3, c))) <= 1e-6 * (1.0 + std::abs(w * value(dy(3, c)))));
  }
  // keep_dense_slots_all: pair rows of every used slot (the others keep their sentinel).
  std::vector<float> pair(tokens * width * d, -5.0f), pair_ref(tokens * width * d, -5.0f);
  run(rows, sy::ops::keep_dense_slots_all<Id>{
                {ids, counts, 0, width, d, ys.data(), pair_ref.data()}, tokens});
  run(rows * d, sy::ops::keep_dense_slot_elements<Id>{
                    {ids, counts, 0, width, d, ys.data(), pair.data()}, tokens});
  BOOST_TEST(same_bits(pair, pair_ref));
  // Token 1's slot 1 names expert 2: its pair row is expert 2's row 1.
  BOOST_TEST(pair[static_cast<std::size_t>(3 * d + 5)] ==
             ys[static_cast<std::size_t>((2 * tokens + 1) * d + 5)]);
}

BOOST_AUTO_TEST_CASE(non_finite_elements_record_the_row_scans_first_element) {
  std::mt19937_64 rng(sy::test::base_seed() + 102);
  using T = sy::half;
  const index_t tokens = 6, d = 11;
  const float nan = std::numeric_limits<float>::quiet_NaN(),
              inf = std::numeric_limits<float>::infinity();
  const auto run_case = [&](const std::vector<std::pair<index_t, float>>& bad) {
    auto xf = sy::test::normal(rng, tokens * d);
    for (const auto& [i, v] : bad) xf[static_cast<std::size_t>(i)] = v;
    const auto xv = as<T>(xf);
    const auto x = sy::make_view<const T>(xv.data(), tokens, d);
    sy::cuda::device_status rows{}, elems{};
    rows.reset(d, 1, 1, tokens, true);
    elems.reset(d, 1, 1, tokens, true);
    const sy::ops::first_non_finite<T> scan{x};
    for (index_t t = 0; t < tokens; ++t) {  // record_non_finite_rows' body (backend/cuda/layer.cuh)
      const index_t i = scan(t);
      if (i >= 0) rows.record(sy::cuda::status_kind::non_finite_x, t * d + i);
    }
    const sy::ops::non_finite_element<T> test{x};
    for (index_t i = tokens * d - 1; i >= 0; --i)  // any order: the smallest index wins
      if (test(i)) elems.record(sy::cuda::status_kind::non_finite_x, i);
    const int k = static_cast<int>(sy::cuda::status_kind::non_finite_x);
    BOOST_TEST(rows.first[k] == elems.first[k]);
    return elems.first[k];
  };
  BOOST_TEST(run_case({{4 * d + 7, nan}, {5 * d + 1, inf}, {4 * d + 9, -inf}}) == 4u * d + 7u);
  BOOST_TEST(run_case({{2 * d + 10, inf}, {3 * d, nan}}) == 2u * d + 10u);
  BOOST_TEST(run_case({}) == std::numeric_limits<unsigned long long>::max());
}

BOOST_AUTO_TEST_CASE(load_row_elements_are_load_rows) {
  std::mt19937_64 rng(sy::test::base_seed() + 103);
  using T = sy::bfloat16;
  const index_t tokens = 4, padded = 6, d = 9;
  const auto xv = as<T>(sy::test::normal(rng, tokens * d));
  const auto x = sy::make_view<const T>(xv.data(), tokens, d);
  std::vector<float> got(padded * d, -1.0f), want(padded * d, -2.0f);
  run(padded, sy::ops::load_rows<T>{x, tokens, d, want.data()});
  run(padded * d, sy::ops::load_row_elements<T>{{x, tokens, d, got.data()}});
  BOOST_TEST(same_bits(got, want));
}

BOOST_AUTO_TEST_CASE(rows_as_float_copies_a_token_range_exactly) {
  // The router's float GEMM operand on the GPU: token rows [t0, t0 + n) of a strided x, each
  // element the exact float of the stored value, row-major [n, d].
  std::mt19937_64 rng(sy::test::base_seed() + 103);
  const auto check = [&](auto tag, index_t tokens, index_t d, index_t x_stride, index_t t0) {
    using T = decltype(tag);
    const auto xv = as<T>(sy::test::normal(rng, tokens * d * x_stride));
    const auto x =
        sy::make_strided_view<const T, 2>(xv.data(), {tokens, d}, {d * x_stride, x_stride});
    const index_t n = tokens - t0;
    std::vector<float> got(static_cast<std::size_t>(n * d), std::numeric_limits<float>::quiet_NaN());
    run(n * d, sy::ops::rows_as_float<T>{x, t0, got.data()});
    for (index_t r = 0; r < n; ++r)
      for (index_t c = 0; c < d; ++c)
        BOOST_TEST(got[static_cast<std::size_t>(r * d + c)] == value(x(t0 + r, c)));
  };
  check(sy::bfloat16{}, 7, 13, 1, 0);
  check(sy::half{}, 9, 5, 3, 4);
  check(float{}, 5, 6, 2, 2);
}

BOOST_AUTO_TEST_CASE(pipelined_router_sums_are_the_plain_functors_bitwise) {
  std::mt19937_64 rng(sy::test::base_seed() + 104);
  const auto check = [&](auto tag, index_t tokens, index_t d, index_t experts, index_t x_stride) {
    using T = decltype(tag);
    // x strided along a row (x_stride > 1), as the element path allows.
    const auto xv = as<T>(sy::test::normal(rng, tokens * d * x_stride));
    const auto x =
        sy::make_strided_view<const T, 2>(xv.data(), {tokens, d}, {d * x_stride, x_stride});
    const auto wv = sy::test::normal(rng, experts * d, 0.1f);
    const auto w = sy::make_view<const float>(wv.data(), experts, d);
    std::vector<float> logits(tokens * experts, -1.0f), logits_ref(tokens * experts, -2.0f);
    run(tokens * experts, sy::ops::router_logits<T>{x, w, logits_ref.data()});
    run(tokens * experts, sy::cuda::router_logits_pipelined<T>{{x, w, logits.data()}});
    BOOST_TEST(same_bits(logits, logits_ref));
    double ref = 0.0;  // element (tokens-1, experts-1) against float64
    for (index_t k = 0; k < d; ++k)
      ref += value(x(tokens - 1, k)) * wv[static_cast<std::size_t>((experts - 1) * d + k)];
    BOOST_TEST(std::abs(logits.back() - ref) <= 1e-4 * (1.0 + std::abs(ref)));

    const auto dl = sy::test::normal(rng, tokens * experts);
    const auto g0 = sy::test::normal(rng, experts * d);  // accumulated into (+=)
    std::vector<float> gw = g0, gw_ref = g0;
    run(experts * d, sy::ops::linear_dw_elements<T>{
                         dl.data(), x, sy::make_view<float>(gw_ref.data(), experts, d)});
    run(experts * d, sy::cuda::linear_dw_pipelined<T>{
                         {dl.data(), x, sy::make_view<float>(gw.data(), experts, d)}});
    BOOST_TEST(same_bits(gw, gw_ref));
    double gref = g0[0];
    for (index_t t = 0; t < tokens; ++t)
      gref += static_cast<double>(dl[static_cast<std::size_t>(t * experts)]) * value(x(t, 0));
    BOOST_TEST(std::abs(gw[0] - gref) <= 1e-4 * (1.0 + std::abs(gref)));
  };
  // Lengths below, at and past the 16 pipelined terms, with tails.
  check(sy::bfloat16{}, 37, 67, 5, 1);
  check(sy::half{}, 8, 8, 3, 2);
  check(float{}, 3, 5, 4, 1);
  check(sy::bfloat16{}, 64, 16, 8, 3);
}

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

namespace {

// The token-count functors as they were before their pieces (the references).
void old_count_tokens(const std::int32_t* counts, index_t tokens, std::int32_t count,
                      index_t* out) {
  index_t n = 0;
  for (index_t t = 0; t < tokens; ++t) n += counts[t] == count ? 1 : 0;
  *out = n;
}
float old_load_balance_finish(const double* f, const double* pbar, const std::int32_t* counts,
                              index_t tokens, index_t experts, bool singles) {
  index_t f_count = tokens;
  if (singles) {
    f_count = 0;
    for (index_t t = 0; t < tokens; ++t) f_count += counts[t] == 1 ? 1 : 0;
  }
  return f_count == 0 ? 0.0f : sy::routing::load_balance_value(f, pbar, experts, f_count, tokens);
}
float old_two_expert_share(const std::int32_t* counts, index_t tokens) {
  index_t top2 = 0;
  for (index_t t = 0; t < tokens; ++t) top2 += counts[t] == 2 ? 1 : 0;
  return tokens == 0 ? 0.0f : static_cast<float>(static_cast<double>(top2) / tokens);
}

// kernels::staged_token_count's work: `threads` threads count strided shares (here added in
// reverse thread order), then one finish with the total.
template <class F>
void staged_count(const F& f, index_t threads) {
  index_t total = 0;
  if (f.counts_tokens()) {
    for (index_t th = threads - 1; th >= 0; --th) {
      index_t mine = 0;
      for (index_t t = th; t < f.tokens; t += threads) mine += f.count_of(t);
      total += mine;
    }
  }
  f.finish(total);
}

}  // namespace

BOOST_AUTO_TEST_CASE(staged_token_counts_are_the_one_thread_counts_bitwise) {
  std::mt19937_64 rng(sy::test::base_seed() + 107);
  const index_t tokens = 2500, experts = 7;
  std::vector<std::int32_t> counts(tokens);
  std::uniform_int_distribution<int> cnt(-1, 4);
  for (auto& v : counts) v = cnt(rng);
  const auto fv = sy::test::uniform(rng, experts, 0.0f, 300.0f);
  const auto pv = sy::test::uniform(rng, experts, 0.0f, 400.0f);
  const std::vector<double> f(fv.begin(), fv.end()), pbar(pv.begin(), pv.end());
  for (const index_t n : {tokens, index_t{0}, index_t{1}, index_t{255}, index_t{257}}) {
    for (const index_t threads : {index_t{1}, index_t{256}}) {
      for (const std::int32_t c : {1, 2, 3}) {
        index_t want = -1, got = -2;
        old_count_tokens(counts.data(), n, c, &want);
        staged_count(sy::ops::count_tokens{counts.data(), n, c, &got}, threads);
        BOOST_TEST(got == want);
      }
      for (const bool singles : {false, true}) {
        float got = -2.0f;
        const float want =
            old_load_balance_finish(f.data(), pbar.data(), counts.data(), n, experts, singles);
        staged_count(sy::ops::load_balance_finish{f.data(), pbar.data(), counts.data(), n, experts,
                                                  singles, &got},
                     threads);
        BOOST_TEST(sy::detail::float_bits(got) == sy::detail::float_bits(want));
        // The one-item functor itself (its pieces in one loop).
        float one = -3.0f;
        sy::ops::load_balance_finish{f.data(), pbar.data(), counts.data(), n,
                                     experts,  singles,     &one}(0);
        BOOST_TEST(sy::detail::float_bits(one) == sy::detail::float_bits(want));
      }
      float got = -2.0f;
      staged_count(sy::ops::two_expert_share_finish{counts.data(), n, &got}, threads);
      BOOST_TEST(sy::detail::float_bits(got) ==
                 sy::detail::float_bits(old_two_expert_share(counts.data(), n)));
    }
  }
  // A float64 sanity check of the share: the tokens using two experts, counted directly.
  double two = 0.0;
  for (const auto v : counts) two += v == 2 ? 1.0 : 0.0;
  float share = -1.0f;
  sy::ops::two_expert_share_finish{counts.data(), tokens, &share}(0);
  BOOST_TEST(std::abs(share - two / tokens) <= 1e-7);
  BOOST_TEST(two > 0.0);
}

BOOST_AUTO_TEST_CASE(staged_dynmoe_reductions_are_the_functors_bitwise) {
  std::mt19937_64 rng(sy::test::base_seed() + 108);
  // T = 2500: three chunks (1024, 1024, 452); ids may repeat within a token (1/k added once
  // per hit), k = 0 tokens are not routed.
  const index_t tokens = 2500, e_max = 6, chunk = sy::cuda::staged_chunk, threads = 256;
  std::vector<std::int32_t> ids(tokens * e_max), counts(tokens);
  std::uniform_int_distribution<int> id(0, e_max - 1), cnt(0, static_cast<int>(e_max));
  for (auto& v : ids) v = id(rng);
  for (auto& v : counts) v = cnt(rng);
  for (const bool share : {false, true}) {
    for (const bool with_me : {true, false}) {
      std::vector<double> me_ref(e_max, -1.0), ce_ref(e_max, -1.0), me(e_max, -1.0),
          ce(e_max, -1.0);
      std::vector<index_t> cnt_ref(2, -1), cnt_got(2, -1);
      run(e_max, sy::ops::dynmoe_usage_column{tokens, e_max, ids.data(), counts.data(),
                                              with_me ? me_ref.data() : nullptr, ce_ref.data(),
                                              cnt_ref.data(), cnt_ref.data() + 1, share});
      const sy::cuda::staged_usage_column s{{tokens, e_max, ids.data(), counts.data(),
                                             with_me ? me.data() : nullptr, ce.data(),
                                             cnt_got.data(), cnt_got.data() + 1, share}};
      // The kernel's work per expert: every thread stages and counts its strided share (here
      // the threads in reverse order), then one thread adds the staged chunk in token order.
      std::vector<std::int32_t> hits(static_cast<std::size_t>(chunk)),
          slots(static_cast<std::size_t>(chunk));
      for (index_t e = e_max - 1; e >= 0; --e) {
        index_t h = 0, r = 0, n = 0;
        double m = 0.0;
        for (index_t t0 = 0; t0 < tokens; t0 += chunk) {
          const index_t c = std::min(chunk, tokens - t0);
          for (index_t th = threads - 1; th >= 0; --th) {
            for (index_t k = th; k < c; k += threads) {
              slots[static_cast<std::size_t>(k)] = s.slots(t0 + k);
              hits[static_cast<std::size_t>(k)] = s.hits(e, t0 + k);
              h += hits[static_cast<std::size_t>(k)];
              r += slots[static_cast<std::size_t>(k)] != 0 ? 1 : 0;
              n += slots[static_cast<std::size_t>(k)];
            }
          }
          m = sy::cuda::staged_usage_column::add(m, hits.data(), slots.data(), c);
        }
        s.finish(e, m, h, r, n);
      }
      BOOST_TEST(same_bits(me, me_ref));
      BOOST_TEST(same_bits(ce, ce_ref));
      BOOST_TEST(cnt_got == cnt_ref);
    }
  }
  // A float64 sanity check of one expert's usage: m = Σ over hits of 1/k.
  {
    std::vector<double> me(e_max), ce(e_max);
    std::vector<index_t> c2(2);
    run(e_max, sy::ops::dynmoe_usage_column{tokens, e_max, ids.data(), counts.data(), me.data(),
                                            ce.data(), c2.data(), c2.data() + 1, false});
    double ref = 0.0, hits2 = 0.0;
    for (index_t t = 0; t < tokens; ++t)
      for (index_t j = 0; j < counts[static_cast<std::size_t>(t)]; ++j)
        if (ids[static_cast<std::size_t>(t * e_max + j)] == 2) {
          ref += 1.0 / counts[static_cast<std::size_t>(t)];
          hits2 += 1.0;
        }
    BOOST_TEST(std::abs(me[2] - ref) <= 1e-9 * ref);
    BOOST_TEST(ce[2] == hits2);
    BOOST_TEST(hits2 > 0.0);
  }
  // dynmoe_threshold_grad: grads.thresholds(e) += (−Σ_t g[t, e]) · θ(1 − θ) · s.
  const auto gv = sy::test::normal(rng, tokens * e_max, 1.0f);
  std::vector<double> g(gv.begin(), gv.end());
  for (std::size_t i = 0; i < g.size(); i += 53) g[i] *= 1e9;  // order matters
  const auto theta = sy::test::uniform(rng, e_max, 0.05f, 0.95f);
  const auto grad0 = sy::test::normal(rng, e_max, 1.0f);
  std::vector<float> grad_ref(grad0), grad(grad0);
  const float scale = 1.7f;
  run(e_max, sy::ops::dynmoe_threshold_grad{tokens, e_max, g.data(), theta.data(), scale,
                                            sy::make_view<float>(grad_ref.data(), e_max)});
  const sy::cuda::staged_threshold_grad s{
      {tokens, e_max, g.data(), theta.data(), scale, sy::make_view<float>(grad.data(), e_max)}};
  std::vector<double> staged(static_cast<std::size_t>(chunk));
  for (index_t e = 0; e < e_max; ++e) {
    double dtheta = 0.0;
    for (index_t t0 = 0; t0 < tokens; t0 += chunk) {
      const index_t c = std::min(chunk, tokens - t0);
      for (index_t k = c - 1; k >= 0; --k) staged[static_cast<std::size_t>(k)] = s.term(e, t0 + k);
      dtheta = sy::cuda::staged_threshold_grad::sub(dtheta, staged.data(), c);
    }
    s.finish(e, dtheta);
  }
  BOOST_TEST(same_bits(grad, grad_ref));
  BOOST_TEST(!same_bits(grad, grad0));
}
