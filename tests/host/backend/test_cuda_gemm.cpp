// SPDX-License-Identifier: Apache-2.0
// The CUDA expert phase's GEMM descriptions (backend/cuda/gemm.hpp), checked without a GPU:
// every row-major intent mapped by to_column_major and run by a naive column-major GEMM with
// cuBLAS's semantics must equal a naive row-major reference — generic descriptions with
// transposes, leading dimensions past the extents and batch strides, then each of the six
// GEMMs the forward and backward make, strided-batched (padded_capacity, dense) and grouped
// (sorted_grouped: per-group sizes from the row counts, operands from group_operand) over
// strided weight tensors. Also the grouped call's host arrays and the argument checks.
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include <switchyard/backend/cuda/gemm.hpp>
#include <switchyard/core/error.hpp>

#include "support/random.hpp"

namespace sy = switchyard;
using sy::index_t;
using sy::cuda::blas_gemm;
using sy::cuda::gemm_desc;
using sy::cuda::gemm_op;

namespace {

//! cuBLAS's semantics, column-major, one problem: C = alpha·op(A)·op(B) + beta·C.
void column_major_gemm(const blas_gemm& b, const float* a, const float* bm, float* c) {
  for (int i = 0; i < b.m; ++i) {
    for (int j = 0; j < b.n; ++j) {
      double s = 0.0;
      for (int l = 0; l < b.k; ++l) {
        const float av = b.trans_a == gemm_op::none ? a[i + static_cast<index_t>(l) * b.lda]
                                                    : a[l + static_cast<index_t>(i) * b.lda];
        const float bv = b.trans_b == gemm_op::none ? bm[l + static_cast<index_t>(j) * b.ldb]
                                                    : bm[j + static_cast<index_t>(l) * b.ldb];
        s += static_cast<double>(av) * bv;
      }
      float& out = c[i + static_cast<index_t>(j) * b.ldc];
      out = static_cast<float>(b.alpha * s + b.beta * static_cast<double>(out));
    }
  }
}

//! The mapped call over `batch` problems, operands swapped as the backend swaps them.
void run_mapped(const gemm_desc& g, index_t batch, const float* a, const float* b, float* c) {
  const blas_gemm m = sy::cuda::to_column_major(g, "test");
  const auto ops = sy::cuda::column_major_operands(a, b);
  for (index_t q = 0; q < batch; ++q)
    column_major_gemm(m, ops.a + q * m.stride_a, ops.b + q * m.stride_b, c + q * m.stride_c);
}

//! The intent itself, row-major, over `batch` problems.
void run_row_major(const gemm_desc& g, index_t batch, const float* a, const float* b, float* c) {
  for (index_t q = 0; q < batch; ++q) {
    const float* aq = a + q * g.stride_a;
    const float* bq = b + q * g.stride_b;
    float* cq = c + q * g.stride_c;
    for (index_t i = 0; i < g.m; ++i) {
      for (index_t j = 0; j < g.n; ++j) {
        double s = 0.0;
        for (index_t l = 0; l < g.k; ++l) {
          const float av = g.op_a == gemm_op::none ? aq[i * g.lda + l] : aq[l * g.lda + i];
          const float bv = g.op_b == gemm_op::none ? bq[l * g.ldb + j] : bq[j * g.ldb + l];
          s += static_cast<double>(av) * bv;
        }
        float& out = cq[i * g.ldc + j];
        out = static_cast<float>(g.alpha * s + g.beta * static_cast<double>(out));
      }
    }
  }
}

void expect_close(const std::vector<float>& got, const std::vector<float>& want,
                  const std::string& what) {
  BOOST_TEST_REQUIRE(got.size() == want.size());
  for (std::size_t i = 0; i < got.size(); ++i) {
    const float tol = 1e-5f * (1.0f + std::fabs(want[i]));
    if (!(std::fabs(got[i] - want[i]) <= tol)) {
      BOOST_ERROR(what << ": element " << i << " got " << got[i] << ", want " << want[i]);
      return;
    }
  }
}

index_t pick(std::mt19937_64& rng, index_t lo, index_t hi) {
  return std::uniform_int_distribution<index_t>(lo, hi)(rng);
}

}  // namespace

BOOST_AUTO_TEST_CASE(random_descriptions_map_to_the_same_product) {
  std::mt19937_64 rng(sy::test::base_seed());
  for (int trial = 0; trial < 200; ++trial) {
    gemm_desc g;
    g.op_a = pick(rng, 0, 1) ? gemm_op::transpose : gemm_op::none;
    g.op_b = pick(rng, 0, 1) ? gemm_op::transpose : gemm_op::none;
    g.m = pick(rng, 1, 7), g.n = pick(rng, 1, 7), g.k = pick(rng, 1, 7);
    g.lda = g.a_cols() + pick(rng, 0, 3);
    g.ldb = g.b_cols() + pick(rng, 0, 3);
    g.ldc = g.n + pick(rng, 0, 3);
    const index_t batch = pick(rng, 1, 3);
    const index_t size_a = g.a_rows() * g.lda, size_b = g.b_rows() * g.ldb, size_c = g.m * g.ldc;
    g.stride_a = pick(rng, 0, 1) ? size_a + pick(rng, 0, 5) : 0;  // 0: shared operand
    g.stride_b = size_b + pick(rng, 0, 5);
    g.stride_c = size_c + pick(rng, 0, 5);
    g.alpha = sy::test::uniform(rng, 1, 0.5f, 2.0f)[0];
    g.beta = pick(rng, 0, 1) ? 1.0f : 0.0f;
    const auto a =
        sy::test::normal(rng, static_cast<std::size_t>(g.stride_a * (batch - 1) + size_a));
    const auto b =
        sy::test::normal(rng, static_cast<std::size_t>(g.stride_b * (batch - 1) + size_b));
    const auto c0 =
        sy::test::normal(rng, static_cast<std::size_t>(g.stride_c * (batch - 1) + size_c));
    std::vector<float> got = c0, want = c0;
    run_mapped(g, batch, a.data(), b.data(), got.data());
    run_row_major(g, batch, a.data(), b.data(), want.data());
    expect_close(got, want, "trial " + std::to_string(trial));
  }
}

BOOST_AUTO_TEST_CASE(mapping_swaps_operands_and_transposes) {
  gemm_desc g;
  g.op_a = gemm_op::none, g.op_b = gemm_op::transpose;
  g.m = 5, g.n = 3, g.k = 4, g.lda = 6, g.ldb = 9, g.ldc = 7;
  g.stride_a = 11, g.stride_b = 22, g.stride_c = 33, g.beta = 1.0f;
  const blas_gemm b = sy::cuda::to_column_major(g, "test");
  BOOST_TEST((b.trans_a == gemm_op::transpose));
  BOOST_TEST((b.trans_b == gemm_op::none));
  BOOST_TEST(b.m == 3);
  BOOST_TEST(b.n == 5);
  BOOST_TEST(b.k == 4);
  BOOST_TEST(b.lda == 9);
  BOOST_TEST(b.ldb == 6);
  BOOST_TEST(b.ldc == 7);
  BOOST_TEST(b.stride_a == 22);
  BOOST_TEST(b.stride_b == 11);
  BOOST_TEST(b.stride_c == 33);
  BOOST_TEST(b.beta == 1.0f);
  const auto ops = sy::cuda::column_major_operands(1, 2);
  BOOST_TEST(ops.a == 2);
  BOOST_TEST(ops.b == 1);
}

BOOST_AUTO_TEST_CASE(bad_leading_dimensions_and_wide_dimensions_are_rejected) {
  gemm_desc g;
  g.op_a = gemm_op::transpose, g.op_b = gemm_op::none;
  g.m = 5, g.n = 3, g.k = 4, g.lda = 4, g.ldb = 3, g.ldc = 3;  // op(A) = Aᵀ: A is [K, M], lda >= M
  BOOST_CHECK_THROW(sy::cuda::to_column_major(g, "test"), sy::shape_error);
  g.lda = 5;
  BOOST_CHECK_NO_THROW(sy::cuda::to_column_major(g, "test"));
  g.ldc = 2;
  BOOST_CHECK_THROW(sy::cuda::to_column_major(g, "test"), sy::shape_error);
  g.ldc = 3;
  g.k = index_t{1} << 31;
  g.ldb = 3;
  BOOST_CHECK_THROW(sy::cuda::to_column_major(g, "test"), sy::range_error);
}

namespace {

//! One expert phase's buffers on the host, float, with strided weights and gradients.
struct phase {
  index_t E, d, f, p, block, x_block, rows;
  index_t ld_w1, s_w1, ld_w2, s_w2, ld_g1, s_g1, ld_g2, s_g2;
  std::vector<float> w1, w2, gw1, gw2, xs, h, a, y, dy, da, dh, dx;

  phase(std::mt19937_64& rng, index_t experts, bool gated, index_t blk, bool dense)
      : E(experts),
        d(pick(rng, 2, 6)),
        f(pick(rng, 2, 5)),
        p(gated ? 2 * f : f),
        block(blk),
        x_block(dense ? 0 : blk),
        rows(experts * blk) {
    ld_w1 = d + pick(rng, 0, 3), s_w1 = p * ld_w1 + pick(rng, 0, 4);
    ld_w2 = f + pick(rng, 0, 3), s_w2 = d * ld_w2 + pick(rng, 0, 4);
    ld_g1 = d + pick(rng, 0, 3), s_g1 = p * ld_g1 + pick(rng, 0, 4);
    ld_g2 = f + pick(rng, 0, 3), s_g2 = d * ld_g2 + pick(rng, 0, 4);
    auto n = [](index_t v) { return static_cast<std::size_t>(v); };
    w1 = sy::test::normal(rng, n(E * s_w1));
    w2 = sy::test::normal(rng, n(E * s_w2));
    gw1 = sy::test::normal(rng, n(E * s_g1));
    gw2 = sy::test::normal(rng, n(E * s_g2));
    xs = sy::test::normal(rng, n((dense ? blk : rows) * d));
    h = sy::test::normal(rng, n(rows * p));
    a = sy::test::normal(rng, n(rows * f));
    y = sy::test::normal(rng, n(rows * d));
    dy = sy::test::normal(rng, n(rows * d));
    da = sy::test::normal(rng, n(rows * f));
    dh = sy::test::normal(rng, n(rows * p));
    dx = sy::test::normal(rng, n(rows * d));
  }

  [[nodiscard]] sy::cuda::expert_gemm_layout layout() const {
    sy::cuda::expert_gemm_layout l;
    l.d = d, l.d_ff = f, l.p = p;
    l.ld_w1 = ld_w1, l.stride_w1 = s_w1, l.ld_w2 = ld_w2, l.stride_w2 = s_w2;
    l.ld_gw1 = ld_g1, l.stride_gw1 = s_g1, l.ld_gw2 = ld_g2, l.stride_gw2 = s_g2;
    return l;
  }
  [[nodiscard]] float W1(index_t e, index_t r, index_t c) const {
    return w1[e * s_w1 + r * ld_w1 + c];
  }
  [[nodiscard]] float W2(index_t e, index_t r, index_t c) const {
    return w2[e * s_w2 + r * ld_w2 + c];
  }
  //! Row r of expert e's block in Xs.
  [[nodiscard]] float X(index_t e, index_t r, index_t c) const {
    return xs[(e * x_block + r) * d + c];
  }
};

//! Row-major meaning of each expert GEMM, over expert e's `n` rows starting at row `r0` of the
//! row buffers (and `x0` of Xs); writes the expected outputs into the given copies.
struct semantics {
  const phase& ph;
  index_t e, n, r0, x0;

  void up(std::vector<float>& h) const {
    for (index_t r = 0; r < n; ++r)
      for (index_t c = 0; c < ph.p; ++c) {
        double s = 0;
        for (index_t i = 0; i < ph.d; ++i) s += double(ph.xs[(x0 + r) * ph.d + i]) * ph.W1(e, c, i);
        h[(r0 + r) * ph.p + c] = float(s);
      }
  }
  void down(std::vector<float>& y) const {
    for (index_t r = 0; r < n; ++r)
      for (index_t c = 0; c < ph.d; ++c) {
        double s = 0;
        for (index_t i = 0; i < ph.f; ++i) s += double(ph.a[(r0 + r) * ph.f + i]) * ph.W2(e, c, i);
        y[(r0 + r) * ph.d + c] = float(s);
      }
  }
  void d_act(std::vector<float>& da) const {
    for (index_t r = 0; r < n; ++r)
      for (index_t c = 0; c < ph.f; ++c) {
        double s = 0;
        for (index_t i = 0; i < ph.d; ++i) s += double(ph.dy[(r0 + r) * ph.d + i]) * ph.W2(e, i, c);
        da[(r0 + r) * ph.f + c] = float(s);
      }
  }
  void grad_w2(std::vector<float>& g) const {
    for (index_t i = 0; i < ph.d; ++i)
      for (index_t c = 0; c < ph.f; ++c) {
        double s = 0;
        for (index_t r = 0; r < n; ++r)
          s += double(ph.dy[(r0 + r) * ph.d + i]) * ph.a[(r0 + r) * ph.f + c];
        float& out = g[e * ph.s_g2 + i * ph.ld_g2 + c];
        out = float(double(out) + s);
      }
  }
  void grad_w1(std::vector<float>& g) const {
    for (index_t i = 0; i < ph.p; ++i)
      for (index_t c = 0; c < ph.d; ++c) {
        double s = 0;
        for (index_t r = 0; r < n; ++r)
          s += double(ph.dh[(r0 + r) * ph.p + i]) * ph.xs[(x0 + r) * ph.d + c];
        float& out = g[e * ph.s_g1 + i * ph.ld_g1 + c];
        out = float(double(out) + s);
      }
  }
  void d_x(std::vector<float>& dx) const {
    for (index_t r = 0; r < n; ++r)
      for (index_t c = 0; c < ph.d; ++c) {
        double s = 0;
        for (index_t i = 0; i < ph.p; ++i) s += double(ph.dh[(r0 + r) * ph.p + i]) * ph.W1(e, i, c);
        dx[(r0 + r) * ph.d + c] = float(s);
      }
  }
};

namespace eg = sy::cuda::expert_gemm;

//! Runs each of the six descriptions strided-batched over E experts and compares with the
//! semantics.
void check_strided(std::mt19937_64& rng, bool gated, bool dense) {
  const index_t E = pick(rng, 1, 4), blk = pick(rng, 1, 5);
  phase ph(rng, E, gated, blk, dense);
  const auto l = ph.layout();
  const sy::cuda::expert_gemm_rows r{blk, blk, dense ? 0 : blk};
  const std::string tag = std::string(gated ? "gated" : "plain") + (dense ? " dense" : " padded");

  auto both = [&](auto&& describe, const std::vector<float>& a, const std::vector<float>& b,
                  std::vector<float> c, auto&& expect, const char* what) {
    std::vector<float> want = c;
    run_mapped(describe(l, r), E, a.data(), b.data(), c.data());
    for (index_t e = 0; e < E; ++e) expect(semantics{ph, e, blk, e * blk, e * ph.x_block}, want);
    expect_close(c, want, tag + " " + what);
  };
  both([](const auto& l_, const auto& r_) { return eg::up(l_, r_); }, ph.xs, ph.w1, ph.h,
       [](const semantics& s, auto& w) { s.up(w); }, "up");
  both([](const auto& l_, const auto& r_) { return eg::down(l_, r_); }, ph.a, ph.w2, ph.y,
       [](const semantics& s, auto& w) { s.down(w); }, "down");
  both([](const auto& l_, const auto& r_) { return eg::d_act(l_, r_); }, ph.dy, ph.w2, ph.da,
       [](const semantics& s, auto& w) { s.d_act(w); }, "d_act");
  both([](const auto& l_, const auto& r_) { return eg::grad_w2(l_, r_, true); }, ph.dy, ph.a,
       ph.gw2, [](const semantics& s, auto& w) { s.grad_w2(w); }, "grad_w2");
  both([](const auto& l_, const auto& r_) { return eg::grad_w1(l_, r_, true); }, ph.dh, ph.xs,
       ph.gw1, [](const semantics& s, auto& w) { s.grad_w1(w); }, "grad_w1");
  both([](const auto& l_, const auto& r_) { return eg::d_x(l_, r_); }, ph.dh, ph.w1, ph.dx,
       [](const semantics& s, auto& w) { s.d_x(w); }, "d_x");
}

}  // namespace

BOOST_AUTO_TEST_CASE(expert_gemms_strided_batched_padded_and_dense) {
  std::mt19937_64 rng(sy::test::base_seed() + 1);
  for (int trial = 0; trial < 20; ++trial) {
    for (bool gated : {false, true}) {
      check_strided(rng, gated, false);
      check_strided(rng, gated, true);
    }
  }
}

BOOST_AUTO_TEST_CASE(overwriting_gradient_gemms_for_dense_scratch) {
  // beta = 0: the dense backward writes every expert's gradient into scratch.
  std::mt19937_64 rng(sy::test::base_seed() + 2);
  phase ph(rng, 3, true, 4, true);
  const auto l = ph.layout();
  const sy::cuda::expert_gemm_rows r{4, 4, 0};
  std::vector<float> got = ph.gw1, want = ph.gw1;
  run_mapped(eg::grad_w1(l, r, false), 3, ph.dh.data(), ph.xs.data(), got.data());
  for (index_t e = 0; e < 3; ++e)
    for (index_t i = 0; i < ph.p; ++i)
      for (index_t c = 0; c < ph.d; ++c) want[e * ph.s_g1 + i * ph.ld_g1 + c] = 0.0f;
  for (index_t e = 0; e < 3; ++e) semantics{ph, e, 4, e * 4, 0}.grad_w1(want);
  expect_close(got, want, "grad_w1 beta 0");
}

namespace {

enum class fake_op { n = 7, t = 9 };

//! The grouped path on the host: groups from row counts, each group's arguments from the
//! grouped call's arrays, operands from group_operand over the device-style row layout.
void check_grouped(std::mt19937_64& rng, bool gated) {
  const index_t E = pick(rng, 1, 6);
  std::vector<index_t> counts(static_cast<std::size_t>(E)), begin(static_cast<std::size_t>(E));
  index_t rows = 0;
  for (index_t e = 0; e < E; ++e) {
    counts[e] = pick(rng, 0, 1) ? pick(rng, 1, 5) : 0;  // some experts empty
    begin[e] = rows;
    rows += counts[e];
  }
  // A phase with one block of all rows (the grouped layout has no blocks).
  phase ph(rng, E, gated, 0, false);
  ph.rows = rows;
  auto n = [](index_t v) { return static_cast<std::size_t>(v); };
  ph.xs = sy::test::normal(rng, n(rows * ph.d) + 1);
  ph.h = sy::test::normal(rng, n(rows * ph.p) + 1);
  ph.a = sy::test::normal(rng, n(rows * ph.f) + 1);
  ph.y = sy::test::normal(rng, n(rows * ph.d) + 1);
  ph.dy = sy::test::normal(rng, n(rows * ph.d) + 1);
  ph.da = sy::test::normal(rng, n(rows * ph.f) + 1);
  ph.dh = sy::test::normal(rng, n(rows * ph.p) + 1);
  ph.dx = sy::test::normal(rng, n(rows * ph.d) + 1);
  const auto l = ph.layout();

  sy::workspace_arena measure;
  sy::cuda::group_args<fake_op> sizing(measure, E, fake_op::n, fake_op::t);
  std::vector<std::byte> host(measure.required());
  sy::workspace_arena hws({host.data(), host.size()});
  sy::cuda::group_args<fake_op> args(hws, E, fake_op::n, fake_op::t);
  args.reset(counts.data(), E);

  auto row_op = [](const std::vector<float>& v, index_t ld) {
    return sy::cuda::group_operand{reinterpret_cast<const std::byte*>(v.data()),
                                   ld * index_t(sizeof(float)), true};
  };
  auto expert_op = [](const std::vector<float>& v, index_t stride) {
    return sy::cuda::group_operand{reinterpret_cast<const std::byte*>(v.data()),
                                   stride * index_t(sizeof(float)), false};
  };
  const std::string tag = gated ? "grouped gated" : "grouped plain";

  // Runs GEMM `describe` over the groups as the device would, then the semantics.
  auto both = [&](auto&& describe, sy::cuda::group_operand oa, sy::cuda::group_operand ob,
                  std::vector<float> c, bool c_by_row, index_t c_ld_or_stride, auto&& expect,
                  const char* what) {
    std::vector<float> want = c;
    const auto call = sy::cuda::make_grouped_call(
        args,
        [&](index_t rows_g) {
          return describe(l, sy::cuda::expert_gemm_rows{rows_g, 0, 0});
        },
        what);
    BOOST_TEST_REQUIRE(call.groups == args.groups());
    const sy::cuda::group_operand oc{reinterpret_cast<const std::byte*>(c.data()),
                                     c_ld_or_stride * index_t(sizeof(float)), c_by_row};
    index_t group = 0;
    for (index_t e = 0; e < E; ++e) {
      if (counts[e] == 0) continue;
      blas_gemm b;
      b.trans_a = call.trans_a[group] == fake_op::n ? gemm_op::none : gemm_op::transpose;
      b.trans_b = call.trans_b[group] == fake_op::n ? gemm_op::none : gemm_op::transpose;
      b.m = call.m[group], b.n = call.n[group], b.k = call.k[group];
      b.lda = call.lda[group], b.ldb = call.ldb[group], b.ldc = call.ldc[group];
      b.alpha = call.alpha[group], b.beta = call.beta[group];
      BOOST_TEST(call.group_size[group] == 1);
      const auto* pa = reinterpret_cast<const float*>(oa.at(e, begin.data()));
      const auto* pb = reinterpret_cast<const float*>(ob.at(e, begin.data()));
      auto* pc = const_cast<float*>(reinterpret_cast<const float*>(oc.at(e, begin.data())));
      const auto ops = sy::cuda::column_major_operands(pa, pb);
      column_major_gemm(b, ops.a, ops.b, pc);
      expect(semantics{ph, e, counts[e], begin[e], begin[e]}, want);
      ++group;
    }
    expect_close(c, want, tag + " " + what);
  };
  both([](const auto& l_, const auto& r_) { return eg::up(l_, r_); }, row_op(ph.xs, ph.d),
       expert_op(ph.w1, ph.s_w1), ph.h, true, ph.p, [](const semantics& s, auto& w) { s.up(w); },
       "up");
  both([](const auto& l_, const auto& r_) { return eg::down(l_, r_); }, row_op(ph.a, ph.f),
       expert_op(ph.w2, ph.s_w2), ph.y, true, ph.d, [](const semantics& s, auto& w) { s.down(w); },
       "down");
  both([](const auto& l_, const auto& r_) { return eg::d_act(l_, r_); }, row_op(ph.dy, ph.d),
       expert_op(ph.w2, ph.s_w2), ph.da, true, ph.f,
       [](const semantics& s, auto& w) { s.d_act(w); }, "d_act");
  both([](const auto& l_, const auto& r_) { return eg::grad_w2(l_, r_, true); },
       row_op(ph.dy, ph.d), row_op(ph.a, ph.f), ph.gw2, false, ph.s_g2,
       [](const semantics& s, auto& w) { s.grad_w2(w); }, "grad_w2");
  both([](const auto& l_, const auto& r_) { return eg::grad_w1(l_, r_, true); },
       row_op(ph.dh, ph.p), row_op(ph.xs, ph.d), ph.gw1, false, ph.s_g1,
       [](const semantics& s, auto& w) { s.grad_w1(w); }, "grad_w1");
  both([](const auto& l_, const auto& r_) { return eg::d_x(l_, r_); }, row_op(ph.dh, ph.p),
       expert_op(ph.w1, ph.s_w1), ph.dx, true, ph.d, [](const semantics& s, auto& w) { s.d_x(w); },
       "d_x");
}

}  // namespace

BOOST_AUTO_TEST_CASE(expert_gemms_grouped_over_the_row_counts) {
  std::mt19937_64 rng(sy::test::base_seed() + 3);
  for (int trial = 0; trial < 30; ++trial) {
    check_grouped(rng, false);
    check_grouped(rng, true);
  }
}

BOOST_AUTO_TEST_CASE(grouped_arguments_are_shared_by_content) {
  const index_t E = 5;
  std::vector<index_t> counts = {3, 0, 3, 2, 0};
  sy::workspace_arena measure;
  sy::cuda::group_args<fake_op> sizing(measure, E, fake_op::n, fake_op::t);
  std::vector<std::byte> host(measure.required());
  sy::workspace_arena hws({host.data(), host.size()});
  BOOST_TEST(hws.used() == 0u);
  sy::cuda::group_args<fake_op> args(hws, E, fake_op::n, fake_op::t);
  BOOST_TEST(hws.used() <= measure.used() + sy::workspace_arena::alignment);
  args.reset(counts.data(), E);
  BOOST_TEST(args.groups() == 3);
  BOOST_TEST(args.rows()[0] == 3);
  BOOST_TEST(args.rows()[1] == 3);
  BOOST_TEST(args.rows()[2] == 2);

  sy::cuda::expert_gemm_layout l;
  l.d = 8, l.d_ff = 6, l.p = 12, l.ld_w1 = 8, l.stride_w1 = 96, l.ld_w2 = 6, l.stride_w2 = 48;
  l.ld_gw1 = 8, l.stride_gw1 = 96, l.ld_gw2 = 6, l.stride_gw2 = 48;
  auto rows = [](index_t n) { return sy::cuda::expert_gemm_rows{n, 0, 0}; };
  // The backward's six GEMMs fit the slots; equal arrays are one array.
  const auto up = sy::cuda::make_grouped_call(
      args, [&](index_t n) { return eg::up(l, rows(n)); }, "up");
  const auto down = sy::cuda::make_grouped_call(
      args, [&](index_t n) { return eg::down(l, rows(n)); }, "down");
  const auto da = sy::cuda::make_grouped_call(
      args, [&](index_t n) { return eg::d_act(l, rows(n)); }, "d_act");
  const auto g2 = sy::cuda::make_grouped_call(
      args, [&](index_t n) { return eg::grad_w2(l, rows(n), true); }, "g2");
  const auto g1 = sy::cuda::make_grouped_call(
      args, [&](index_t n) { return eg::grad_w1(l, rows(n), true); }, "g1");
  const auto dx = sy::cuda::make_grouped_call(
      args, [&](index_t n) { return eg::d_x(l, rows(n)); }, "d_x");
  BOOST_TEST(up.n == down.n);  // both: the rows of each group (cuBLAS n = M)
  BOOST_TEST(up.n[0] == 3);
  BOOST_TEST(up.n[2] == 2);
  BOOST_TEST(g2.k == up.n);  // the gradient GEMMs sum over the rows
  BOOST_TEST(up.group_size == g1.group_size);
  BOOST_TEST(up.beta != g1.beta);  // 0 and 1
  BOOST_TEST(up.beta == dx.beta);
  BOOST_TEST(g1.beta[1] == 1.0f);
  BOOST_TEST(up.m[1] == 12);                  // cuBLAS m = N = P
  BOOST_TEST((up.trans_a[0] == fake_op::t));  // W1ᵀ
  BOOST_TEST((up.trans_b[0] == fake_op::n));
  BOOST_TEST((da.trans_a[2] == fake_op::n));
  BOOST_TEST((g2.trans_b[0] == fake_op::t));  // dYᵀ
  // No experts with rows: no groups, nothing to call.
  std::vector<index_t> none(5, 0);
  args.reset(none.data(), E);
  const auto empty = sy::cuda::make_grouped_call(
      args, [&](index_t n) { return eg::up(l, rows(n)); }, "up");
  BOOST_TEST(empty.groups == 0);
}

BOOST_AUTO_TEST_CASE(group_operand_offsets_are_64_bit) {
  const std::vector<index_t> begin = {0, index_t{3} << 30};
  const sy::cuda::group_operand rows{nullptr, 4096, true},
      experts{nullptr, index_t{1} << 33, false};
  BOOST_TEST(rows.offset(1, begin.data()) == (index_t{3} << 30) * 4096);
  BOOST_TEST(experts.offset(1, begin.data()) == index_t{1} << 33);
  BOOST_TEST(rows.offset(0, begin.data()) == 0);
}
