// SPDX-License-Identifier: Apache-2.0
// The host backend's batch-invariant GEMMs (backend/host/fixed_gemm.hpp) and the row-panel
// rule (backend/host/row_panels.hpp):
// 1. gemm_nt_fixed / gemm_nn_fixed against a float64 reference over many shapes (every code
//    path: full 2×4 / 4×8 blocks, remainder columns, remainder rows), strided operands, with
//    and without `accumulate` (C poisoned with NaN before a non-accumulating call; C's padding
//    and every untouched element must keep their bits);
// 2. bitwise invariance: a fixed row of A gives the same output row at every position of calls
//    with m = 1..40, and a fixed column of the output (row of B for nt, column of B for nn)
//    the same bits at every position of calls with n = 1..40;
// 3. the documented per-element operation sequence, recomputed here in float, bit for bit.
//
// Compile-time note: this file is compiled with the project's flags (-O2, no -march), so on
// x86-64 the compiler has no FMA instruction and cannot contract a·b + c in the reference
// below; the reference additionally rounds every product through a volatile float, so it
// stays unfused even under -march=native / -ffp-contract=fast.
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <switchyard/backend/host/fixed_gemm.hpp>
#include <switchyard/backend/host/row_panels.hpp>

#include "support/random.hpp"

namespace sy = switchyard;
using sy::index_t;
using sy::host::row_panels;

namespace {

enum class form { nt, nn };

const char* name(form f) { return f == form::nt ? "gemm_nt_fixed" : "gemm_nn_fixed"; }

// Operands of one call: A [m, k] (lda), B [n, k] for nt / [k, n] for nn (ldb), C [m, n] (ldc).
// Padding columns of A and B hold NaN: a kernel that read past the widths would show it.
struct problem {
  form f;
  index_t m, n, k, lda, ldb, ldc;
  std::vector<float> a, b, c;

  problem(form f_, index_t m_, index_t n_, index_t k_, index_t pad_a, index_t pad_b,
          index_t pad_c, std::mt19937_64& g)
      : f(f_), m(m_), n(n_), k(k_), lda(k_ + pad_a), ldb((f_ == form::nt ? k_ : n_) + pad_b),
        ldc(n_ + pad_c) {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    a.assign(static_cast<std::size_t>(m * lda), nan);
    b.assign(static_cast<std::size_t>(b_rows() * ldb), nan);
    const auto av = sy::test::normal(g, static_cast<std::size_t>(m * k));
    for (index_t i = 0; i < m; ++i)
      for (index_t p = 0; p < k; ++p) a[i * lda + p] = av[i * k + p];
    const auto bv = sy::test::normal(g, static_cast<std::size_t>(b_rows() * b_cols()));
    for (index_t r = 0; r < b_rows(); ++r)
      for (index_t q = 0; q < b_cols(); ++q) b[r * ldb + q] = bv[r * b_cols() + q];
    c = sy::test::normal(g, static_cast<std::size_t>(m * ldc));
  }
  index_t b_rows() const { return f == form::nt ? n : k; }
  index_t b_cols() const { return f == form::nt ? k : n; }
  float a_at(index_t i, index_t p) const { return a[i * lda + p]; }
  // B as the product reads it: element (p, j) of op(B) = B[j, p] (nt) or B[p, j] (nn).
  float b_at(index_t p, index_t j) const { return f == form::nt ? b[j * ldb + p] : b[p * ldb + j]; }

  void run(bool accumulate) {
    if (f == form::nt)
      sy::host::gemm_nt_fixed(m, n, k, a.data(), lda, b.data(), ldb, c.data(), ldc, accumulate);
    else
      sy::host::gemm_nn_fixed(m, n, k, a.data(), lda, b.data(), ldb, c.data(), ldc, accumulate);
  }
};

// The documented per-element sequence, in float, every product rounded on its own.
float product(float x, float y) {
  volatile float r = x * y;  // rounded to float before any add (no fusing in the test)
  return r;
}

// gemm_nn_fixed: s = 0; s = s + a_p·b_p for p = 0..k-1.
float nn_sequence(const problem& P, index_t i, index_t j) {
  float s = 0.0f;
  for (index_t p = 0; p < P.k; ++p) s = s + product(P.a_at(i, p), P.b_at(p, j));
  return s;
}

// gemm_nt_fixed: lane l sums p ≡ l (mod 4) for p < k4 in increasing p, r = (l0 + l2) +
// (l1 + l3), then r = r + a_p·b_p for p = k4..k-1.
float nt_sequence(const problem& P, index_t i, index_t j) {
  const index_t k4 = P.k / 4 * 4;
  float lane[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (index_t p = 0; p < k4; ++p) lane[p % 4] = lane[p % 4] + product(P.a_at(i, p), P.b_at(p, j));
  volatile float left = lane[0] + lane[2], right = lane[1] + lane[3];
  float r = left + right;
  for (index_t p = k4; p < P.k; ++p) r = r + product(P.a_at(i, p), P.b_at(p, j));
  return r;
}

std::uint32_t bits(float x) {
  std::uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u;
}

std::string shape(const problem& P, bool acc) {
  return std::string(name(P.f)) + " m=" + std::to_string(P.m) + " n=" + std::to_string(P.n) +
         " k=" + std::to_string(P.k) + " lda=" + std::to_string(P.lda) +
         " ldb=" + std::to_string(P.ldb) + " ldc=" + std::to_string(P.ldc) +
         (acc ? " accumulate" : "");
}

// Runs one call and checks every element of C: within the float64 bound (and, with
// `exact`, bitwise equal to the documented sequence); C's padding columns keep their bits.
// Returns the number of failing elements (reported once per call).
int check_call(problem& P, bool accumulate, bool exact) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  if (!accumulate)
    for (index_t i = 0; i < P.m; ++i)
      for (index_t j = 0; j < P.n; ++j) P.c[i * P.ldc + j] = nan;  // must be overwritten, not read
  const std::vector<float> before = P.c;
  P.run(accumulate);
  int bad = 0;
  std::string first;
  constexpr double u = 1.0 / 16777216.0;  // 2^-24, float's unit roundoff
  for (index_t i = 0; i < P.m; ++i) {
    for (index_t j = 0; j < P.ldc; ++j) {
      const float got = P.c[i * P.ldc + j];
      const float old = before[i * P.ldc + j];
      if (j >= P.n) {  // padding: untouched
        if (bits(got) != bits(old)) {
          if (bad++ == 0) first = "padding C[" + std::to_string(i) + ", " + std::to_string(j) + "] changed";
        }
        continue;
      }
      double ref = accumulate ? static_cast<double>(old) : 0.0, mass = accumulate ? std::abs(ref) : 0.0;
      for (index_t p = 0; p < P.k; ++p) {
        const double t = static_cast<double>(P.a_at(i, p)) * static_cast<double>(P.b_at(p, j));
        ref += t;
        mass += std::abs(t);
      }
      const double tol = static_cast<double>(P.k + 1) * u * mass + 1e-37;
      bool ok = std::isfinite(got) && std::abs(static_cast<double>(got) - ref) <= tol;
      if (ok && exact) {
        float want = P.f == form::nt ? nt_sequence(P, i, j) : nn_sequence(P, i, j);
        if (accumulate) want = old + want;
        ok = bits(got) == bits(want);
        if (!ok && bad == 0)
          first = "C[" + std::to_string(i) + ", " + std::to_string(j) + "] = " +
                  std::to_string(got) + " differs in bits from the documented sequence's " +
                  std::to_string(want);
      } else if (!ok && bad == 0) {
        first = "C[" + std::to_string(i) + ", " + std::to_string(j) + "] = " +
                std::to_string(got) + ", float64 reference " + std::to_string(ref) + " ± " +
                std::to_string(tol);
      }
      bad += !ok;
    }
  }
  if (bad)
    BOOST_ERROR(shape(P, accumulate) << ": " << bad << " bad elements, first: " << first);
  return bad;
}

// Sizes that reach every block/remainder combination of both kernels (m mod 2 and 4, n mod
// 4 and 8, k mod 4), up to 70.
const std::vector<index_t> sizes_m = {1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 13, 17, 33, 70};
const std::vector<index_t> sizes_n = {1, 2, 3, 4, 5, 7, 8, 9, 12, 15, 16, 17, 31, 33, 70};
const std::vector<index_t> sizes_k = {1, 2, 3, 4, 5, 7, 8, 9, 13, 31, 64, 67, 70};

void sweep(form f, bool exact, std::uint64_t seed) {
  std::mt19937_64 g(seed);
  int failures = 0;
  for (index_t m : sizes_m)
    for (index_t n : sizes_n)
      for (index_t k : sizes_k) {
        // Half the calls with leading dimensions wider than the rows (1..5 extra elements).
        const bool strided = (g() & 1u) != 0;
        const auto pad = [&] { return strided ? static_cast<index_t>(1 + g() % 5) : index_t{0}; };
        const index_t pa = pad(), pb = pad(), pc = pad();
        problem P(f, m, n, k, pa, pb, pc, g);
        for (bool acc : {false, true}) {
          failures += check_call(P, acc, exact) != 0;
          if (failures > 20) {  // enough to diagnose
            BOOST_TEST(failures == 0, name(f) << ": stopped after " << failures << " bad calls");
            return;
          }
        }
      }
  BOOST_TEST(failures == 0, name(f) << ": " << failures << " bad calls");
}

}  // namespace

BOOST_AUTO_TEST_SUITE(fixed_gemm)

BOOST_AUTO_TEST_CASE(nt_matches_float64_reference_over_shapes_strides_and_accumulate) {
  sweep(form::nt, /*exact=*/false, sy::test::base_seed() + 3101);
}

BOOST_AUTO_TEST_CASE(nn_matches_float64_reference_over_shapes_strides_and_accumulate) {
  sweep(form::nn, /*exact=*/false, sy::test::base_seed() + 3102);
}

// The documented sequences, bit for bit, on every element of every shape above.
BOOST_AUTO_TEST_CASE(nt_computes_the_documented_four_lane_sequence_bitwise) {
  sweep(form::nt, /*exact=*/true, sy::test::base_seed() + 3103);
}

BOOST_AUTO_TEST_CASE(nn_computes_the_documented_increasing_k_sequence_bitwise) {
  sweep(form::nn, /*exact=*/true, sy::test::base_seed() + 3104);
}

// One fixed row of A (and fixed B): placed at every row position of calls with m = 1..40
// (other rows random), its output row has the same bits as when it is alone (m = 1); with
// accumulate, the same initial C row too. n covers full column blocks and remainder columns.
BOOST_AUTO_TEST_CASE(a_row_gets_the_same_bits_at_every_position_for_every_m) {
  std::mt19937_64 g(sy::test::base_seed() + 3105);
  for (form f : {form::nt, form::nn}) {
    for (index_t k : {13, 36}) {
      const index_t n = 21, pad_a = 3, pad_c = 2;
      problem base(f, 1, n, k, pad_a, 1, pad_c, g);
      const std::vector<float> row(base.a.begin(), base.a.begin() + k);
      const std::vector<float> c0(base.c.begin(), base.c.begin() + n);
      for (bool acc : {false, true}) {
        problem solo = base;
        solo.run(acc);
        const std::vector<float> want(solo.c.begin(), solo.c.begin() + n);
        int bad = 0;
        for (index_t m = 1; m <= 40; ++m) {
          for (index_t pos = 0; pos < m; ++pos) {
            problem P(f, m, n, k, pad_a, 1, pad_c, g);
            P.b = base.b;
            P.ldb = base.ldb;
            std::memcpy(P.a.data() + pos * P.lda, row.data(), sizeof(float) * k);
            std::memcpy(P.c.data() + pos * P.ldc, c0.data(), sizeof(float) * n);
            P.run(acc);
            if (std::memcmp(P.c.data() + pos * P.ldc, want.data(), sizeof(float) * n) != 0 &&
                bad++ < 5)
              BOOST_ERROR(name(f) << " k=" << k << (acc ? " accumulate" : "") << ": row at "
                                  << pos << " of m=" << m << " differs from m=1");
          }
        }
        BOOST_TEST(bad == 0, name(f) << " k=" << k << ": " << bad << " differing placements");
      }
    }
  }
}

// One fixed output column (row j of B for nt, column j of B for nn) with fixed A: placed at
// every column position of calls with n = 1..40 (other columns random), its output column has
// the same bits as when n = 1. m covers full row blocks and remainder rows.
BOOST_AUTO_TEST_CASE(an_output_column_gets_the_same_bits_at_every_position_for_every_n) {
  std::mt19937_64 g(sy::test::base_seed() + 3106);
  for (form f : {form::nt, form::nn}) {
    for (index_t k : {13, 36}) {
      const index_t m = 7;
      problem base(f, m, 1, k, 2, 0, 0, g);
      std::vector<float> col(static_cast<std::size_t>(k)), c0(static_cast<std::size_t>(m));
      for (index_t p = 0; p < k; ++p) col[p] = base.b_at(p, 0);
      for (index_t i = 0; i < m; ++i) c0[i] = base.c[i * base.ldc];
      for (bool acc : {false, true}) {
        problem solo = base;
        solo.run(acc);
        std::vector<float> want(static_cast<std::size_t>(m));
        for (index_t i = 0; i < m; ++i) want[i] = solo.c[i * solo.ldc];
        int bad = 0;
        for (index_t n = 1; n <= 40; ++n) {
          for (index_t pos = 0; pos < n; ++pos) {
            problem P(f, m, n, k, 2, 1, 3, g);
            P.a = base.a;
            P.lda = base.lda;
            for (index_t p = 0; p < k; ++p) {
              if (f == form::nt) P.b[pos * P.ldb + p] = col[p];
              else P.b[p * P.ldb + pos] = col[p];
            }
            for (index_t i = 0; i < m; ++i) P.c[i * P.ldc + pos] = c0[i];
            P.run(acc);
            std::vector<float> got(static_cast<std::size_t>(m));
            for (index_t i = 0; i < m; ++i) got[i] = P.c[i * P.ldc + pos];
            if (std::memcmp(got.data(), want.data(), sizeof(float) * m) != 0 && bad++ < 5)
              BOOST_ERROR(name(f) << " k=" << k << (acc ? " accumulate" : "") << ": column at "
                                  << pos << " of n=" << n << " differs from n=1");
          }
        }
        BOOST_TEST(bad == 0, name(f) << " k=" << k << ": " << bad << " differing placements");
      }
    }
  }
}

// k = 0: C = 0 (or unchanged with accumulate); m = 0 or n = 0: nothing written.
BOOST_AUTO_TEST_CASE(empty_reductions_and_empty_outputs) {
  std::mt19937_64 g(sy::test::base_seed() + 3107);
  for (form f : {form::nt, form::nn}) {
    problem P(f, 5, 9, 0, 0, 0, 1, g);
    const auto c0 = P.c;
    P.run(true);
    BOOST_TEST(std::memcmp(P.c.data(), c0.data(), sizeof(float) * c0.size()) == 0, name(f));
    P.run(false);
    for (index_t i = 0; i < 5; ++i)
      for (index_t j = 0; j < 10; ++j)
        BOOST_TEST(bits(P.c[i * P.ldc + j]) == (j < 9 ? bits(0.0f) : bits(c0[i * P.ldc + j])),
                   name(f) << " k=0 C[" << i << ", " << j << "]");
    const std::vector<float> guard = sy::test::normal(g, 8);
    std::vector<float> c = guard;
    if (f == form::nt) {
      sy::host::gemm_nt_fixed(0, 4, 3, P.a.data(), 3, P.b.data(), 3, c.data(), 4, false);
      sy::host::gemm_nt_fixed(2, 0, 3, P.a.data(), 3, P.b.data(), 3, c.data(), 4, false);
    } else {
      sy::host::gemm_nn_fixed(0, 4, 3, P.a.data(), 3, P.b.data(), 4, c.data(), 4, false);
      sy::host::gemm_nn_fixed(2, 0, 3, P.a.data(), 3, P.b.data(), 4, c.data(), 4, false);
    }
    BOOST_TEST(std::memcmp(c.data(), guard.data(), sizeof(float) * c.size()) == 0, name(f));
  }
}

BOOST_AUTO_TEST_SUITE_END()

// ---------------------------------------------------------------------------------------
BOOST_AUTO_TEST_SUITE(row_panels_rule)

static_assert(row_panels::block % row_panels::granule == 0);

// for_shape: min_rows is a multiple of granule in [granule, block]; with a BLAS it is the
// fewest such rows whose calls stay above the small-kernel bound; toy shapes, whose full
// block would not, use the backend's own GEMM.
BOOST_AUTO_TEST_CASE(for_shape_keeps_calls_above_the_small_kernel_bound) {
  std::mt19937_64 g(sy::test::base_seed() + 3201);
  std::vector<std::pair<index_t, index_t>> shapes = {
      {16, 16}, {1, 1}, {64, 256}, {50, 50}, {51, 51}, {100, 100}, {128, 512},
      {512, 2048}, {1024, 4096}, {4096, 14336}, {7, 3}, {1000, 1000}, {1, 1000000}};
  for (int r = 0; r < 200; ++r)
    shapes.emplace_back(static_cast<index_t>(1 + g() % 3000), static_cast<index_t>(1 + g() % 3000));
  // Every d·d_ff around the switch from the own GEMM to the BLAS (a full block just clearing
  // the bound: 10^6 / 384 ≈ 2604) and around each min_rows step below it.
  for (index_t d_ff = 1; d_ff <= 6000; ++d_ff) shapes.emplace_back(1, d_ff);
  for (const auto& [d, d_ff] : shapes) {
    const auto rp = row_panels::for_shape(d, d_ff);
    const double nk = static_cast<double>(d) * static_cast<double>(d_ff);
    const std::string what = "d=" + std::to_string(d) + " d_ff=" + std::to_string(d_ff);
    BOOST_TEST(rp.min_rows % row_panels::granule == 0, what << " min_rows " << rp.min_rows);
    BOOST_TEST(rp.min_rows >= row_panels::granule, what);
    BOOST_TEST(rp.min_rows <= row_panels::block, what);
    BOOST_TEST(!rp.fixed, what);
    // A full block is the largest call: the BLAS is used exactly when it clears the bound.
    BOOST_TEST(rp.use_blas == (row_panels::block * nk > row_panels::small_kernel_bound),
               what << " use_blas " << rp.use_blas);
    if (rp.use_blas) {
      BOOST_TEST(rp.min_rows * nk > row_panels::small_kernel_bound, what << " min_rows " << rp.min_rows);
      if (rp.min_rows > row_panels::granule)  // the fewest such rows
        BOOST_TEST((rp.min_rows - row_panels::granule) * nk <= row_panels::small_kernel_bound,
                   what << " min_rows " << rp.min_rows << " is not the smallest");
    }
  }
  BOOST_TEST(!row_panels::for_shape(16, 16).use_blas);
  BOOST_TEST(row_panels::for_shape(1024, 4096).use_blas);
  BOOST_TEST(row_panels::for_shape(1024, 4096).min_rows == row_panels::granule);
}

// padded(n): 0 for no rows; otherwise full blocks kept as they are, then the tail rounded
// up to a multiple of granule and to at least min_rows (so >= n, >= min_rows, a multiple of
// granule, and less than n + max(granule, min_rows)).
BOOST_AUTO_TEST_CASE(padded_keeps_full_blocks_and_rounds_the_tail) {
  std::vector<row_panels> rules = {row_panels{}};
  for (const auto& [d, d_ff] : std::vector<std::pair<index_t, index_t>>{
           {16, 16}, {64, 256}, {100, 100}, {50, 60}, {1024, 4096}, {40, 200}})
    rules.push_back(row_panels::for_shape(d, d_ff));
  for (const auto& rp : rules) {
    const std::string what = "min_rows=" + std::to_string(rp.min_rows);
    BOOST_TEST(rp.padded(0) == 0, what);
    BOOST_TEST(rp.padded(-3) == 0, what);
    const index_t lift = std::max(row_panels::granule, rp.min_rows);
    for (index_t n = 1; n <= 3 * row_panels::block + 50; ++n) {
      const index_t p = rp.padded(n);
      const index_t full = n / row_panels::block * row_panels::block, tail = n - full;
      const index_t tail_want =
          tail == 0 ? 0
                    : std::max((tail + row_panels::granule - 1) / row_panels::granule *
                                   row_panels::granule,
                               rp.min_rows);
      if (p != full + tail_want || p < n || p % row_panels::granule != 0 || p < rp.min_rows ||
          p >= n + lift) {
        BOOST_ERROR(what << ": padded(" << n << ") = " << p << ", want " << full + tail_want);
        break;
      }
    }
    for (index_t b = 1; b <= 4; ++b) BOOST_TEST(rp.padded(b * row_panels::block) == b * row_panels::block);
  }
}

// bound(rows, groups) >= Σ_e padded(n_e) for any split of at most `rows` rows over `groups`
// experts: random splits, and the worst case (one row per expert).
BOOST_AUTO_TEST_CASE(bound_covers_every_split_of_rows_over_experts) {
  std::mt19937_64 g(sy::test::base_seed() + 3203);
  for (const auto& rp : {row_panels{}, row_panels::for_shape(16, 16), row_panels::for_shape(64, 256),
                         row_panels::for_shape(100, 100), row_panels::for_shape(1024, 4096)}) {
    for (int trial = 0; trial < 2000; ++trial) {
      const index_t groups = static_cast<index_t>(1 + g() % 64);
      const index_t rows = static_cast<index_t>(g() % 3000);
      // Σ n_e = used <= rows, cut at random points (some experts empty).
      const index_t used = trial % 3 == 0 ? rows : static_cast<index_t>(g() % (rows + 1));
      std::vector<index_t> cuts = {0, used};
      for (index_t e = 1; e < groups; ++e) cuts.push_back(used == 0 ? 0 : static_cast<index_t>(g() % (used + 1)));
      std::sort(cuts.begin(), cuts.end());
      index_t total = 0;
      for (std::size_t e = 0; e + 1 < cuts.size(); ++e) total += rp.padded(cuts[e + 1] - cuts[e]);
      if (total > rp.bound(rows, groups)) {
        BOOST_ERROR("min_rows=" << rp.min_rows << ": rows=" << rows << " groups=" << groups
                                << " split needs " << total << " > bound " << rp.bound(rows, groups));
        break;
      }
    }
    for (index_t rows = 0; rows <= 200; ++rows) {
      for (index_t groups : {index_t{1}, index_t{3}, rows, rows + 5}) {
        if (groups <= 0) continue;
        const index_t ones = std::min(rows, groups);  // `ones` experts with one row each...
        const index_t rest = rows - ones;              // ...and the rest on the first
        const index_t total = ones == 0 ? 0 : rp.padded(1 + rest) + (ones - 1) * rp.padded(1);
        BOOST_TEST(total <= rp.bound(rows, groups),
                   "min_rows=" << rp.min_rows << " rows=" << rows << " groups=" << groups);
      }
    }
  }
}

// The batch-invariant rule pads nothing: padded(n) == n and the bound is the row count.
BOOST_AUTO_TEST_CASE(batch_invariant_rule_pads_nothing) {
  const auto rp = row_panels::batch_invariant();
  BOOST_TEST(rp.fixed);
  for (index_t n = 0; n <= 2 * row_panels::block + 30; ++n) BOOST_TEST_REQUIRE(rp.padded(n) == n);
  for (index_t rows : {0, 1, 17, 1000})
    for (index_t groups : {1, 8, 64}) BOOST_TEST(rp.bound(rows, groups) == rows);
}

BOOST_AUTO_TEST_SUITE_END()
