// SPDX-License-Identifier: Apache-2.0
// The CUDA expert phase without a GPU: the per-row functors of ops/expert_rows.hpp against the
// host backend's functors (bitwise), and the whole device pipeline of
// backend/cuda/expert_phase.hpp — the same workspace carving, row layout, GEMM descriptions
// and launch sequence the GPU runs — executed by a naive host executor and compared with
// host::experts_forward / experts_backward for the three dispatch policies, three
// activations and float/half/bfloat16, with strided weights, optional biases and gradients.
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <typeinfo>
#include <vector>

#include <switchyard/activation/functors.hpp>
#include <switchyard/backend/cuda/expert_phase.hpp>
#include <switchyard/backend/host/expert_backward.hpp>
#include <switchyard/backend/host/expert_forward.hpp>
#include <switchyard/dispatch/dense.hpp>
#include <switchyard/dispatch/padded_capacity.hpp>
#include <switchyard/dispatch/sorted_grouped.hpp>
#include <switchyard/ops/expert_rows.hpp>

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
std::uint32_t bits(T v) {
  if constexpr (std::is_same_v<T, float>)
    return sy::detail::float_bits(v);
  else
    return v.bits;
}

template <class T>
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (bits(a[i]) != bits(b[i])) return false;
  return true;
}

}  // namespace

// ---- functors -------------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(grouped_row_expert_finds_each_rows_expert_and_padding) {
  // Sorted layout with empty experts (0, 2 and 5 empty), then a padded layout of C = 4.
  const std::vector<index_t> count = {0, 3, 0, 2, 1, 0}, begin = {0, 0, 3, 3, 5, 6};
  const sy::ops::grouped_row_expert sorted{begin.data(), count.data(), 6};
  const std::vector<index_t> want = {1, 1, 1, 3, 3, 4};
  for (index_t r = 0; r < 6; ++r) BOOST_TEST(sorted(r) == want[r]);
  BOOST_TEST(sorted(6) == -1);  // past the real rows
  const std::vector<index_t> pcount = {2, 0, 4}, pbegin = {0, 4, 8};
  const sy::ops::grouped_row_expert padded{pbegin.data(), pcount.data(), 3};
  const std::vector<index_t> pwant = {0, 0, -1, -1, -1, -1, -1, -1, 2, 2, 2, 2};
  for (index_t r = 0; r < 12; ++r) BOOST_TEST(padded(r) == pwant[r]);
  BOOST_TEST(sy::ops::dense_row_expert{5}(14) == 2);
}

namespace {

template <class T, class Act>
void check_bias_activate(std::mt19937_64& rng, bool with_bias) {
  constexpr bool gated = sy::activation_traits<Act>::is_gated;
  const index_t E = 3, f = 5, p = gated ? 2 * f : f, rows = 7, bias_stride = 2;
  const std::vector<index_t> count = {3, 0, 2}, begin = {0, 4, 4};  // rows 3 and 6 padding
  const sy::ops::grouped_row_expert rx{begin.data(), count.data(), E};
  const auto h0 = sy::test::normal(rng, static_cast<std::size_t>(rows * p));
  const auto b1 = as<T>(sy::test::normal(rng, static_cast<std::size_t>(E * p * bias_stride)));
  const sy::matrix_view<const T> bias =
      with_bias
          ? sy::make_strided_view<const T, 2>(b1.data(), {E, p}, {p * bias_stride, bias_stride})
          : sy::matrix_view<const T>{};
  std::vector<float> h = h0;
  std::vector<T> a(static_cast<std::size_t>(rows * f), sy::from_float<T>(7.0f));
  run(rows * f, sy::ops::bias_activate<T, Act, sy::ops::grouped_row_expert>{
                    Act{}, rx, h.data(), p, bias, a.data(), f, f, true});
  // The host: add_bias_rows then activate_rows in float, then rounded.
  std::vector<float> hh = h0, ha(static_cast<std::size_t>(rows * f));
  std::vector<T> want(static_cast<std::size_t>(rows * f), sy::from_float<T>(0.0f));
  for (index_t r = 0; r < rows; ++r) {
    const index_t e = rx(r);
    if (e < 0) continue;
    if (with_bias) sy::ops::add_bias_rows<T>{&bias(e, 0), bias.stride(1), hh.data(), p, p}(r);
    sy::ops::activate_rows<Act>{Act{}, hh.data(), p, ha.data(), f, f}(r);
    for (index_t c = 0; c < f; ++c) want[r * f + c] = sy::from_float<T>(ha[r * f + c]);
  }
  BOOST_TEST(same_bits(a, want));
  BOOST_TEST(same_bits(h, hh));  // the biased H written back (padding rows untouched)
}

}  // namespace

BOOST_AUTO_TEST_CASE(bias_activation_is_the_hosts_arithmetic_rounded) {
  std::mt19937_64 rng(sy::test::base_seed() + 10);
  for (bool b : {false, true}) {
    check_bias_activate<float, sy::activation::swiglu>(rng, b);
    check_bias_activate<sy::half, sy::activation::swiglu>(rng, b);
    check_bias_activate<sy::bfloat16, sy::activation::gelu>(rng, b);
    check_bias_activate<float, sy::activation::relu>(rng, b);
    check_bias_activate<sy::half, sy::activation::gelu>(rng, b);
  }
}

BOOST_AUTO_TEST_CASE(gather_load_bias_and_rounding_rows) {
  std::mt19937_64 rng(sy::test::base_seed() + 11);
  using T = sy::half;
  const index_t tokens = 3, d = 4, width = 2;
  const auto xv = as<T>(sy::test::normal(rng, 3 * 6));  // row stride 6
  const auto x = sy::make_strided_view<const T, 2>(xv.data(), {tokens, d}, {6, 1});
  const std::vector<index_t> row_pair = {5, -1, 0, 3};  // tokens 2, pad, 0, 1
  std::vector<T> rows(4 * d);
  run(4 * d, sy::ops::gather_as<T>{x, row_pair.data(), width, d, rows.data()});
  std::vector<float> ref(4 * d);
  run(4, sy::ops::gather_rows<T>{x, row_pair.data(), width, d, ref.data()});
  BOOST_TEST(same_bits(rows, as<T>(ref)));
  std::vector<T> loaded(tokens * d);
  run(tokens * d, sy::ops::load_as<T>{x, d, loaded.data()});
  for (index_t t = 0; t < tokens; ++t)
    for (index_t i = 0; i < d; ++i) BOOST_TEST(loaded[t * d + i].bits == x(t, i).bits);

  // Expert bias add per row's expert (dense rows of T = 3 per expert).
  const auto b2 = as<T>(sy::test::normal(rng, 2 * d));
  const auto bias = sy::make_view<const T>(b2.data(), 2, d);
  auto m = sy::test::normal(rng, 6 * d);
  auto want = m;
  run(6 * d, sy::ops::add_expert_bias<T, sy::ops::dense_row_expert>{{3}, bias, m.data(), d, d});
  for (index_t r = 0; r < 6; ++r)
    sy::ops::add_bias_rows<T>{&bias(r / 3, 0), 1, want.data(), d, d}(r);
  BOOST_TEST(m == want, boost::test_tools::per_element());

  std::vector<T> rounded(6 * 2);
  run(6, sy::ops::round_rows<T>{m.data(), d, rounded.data(), 2, 2});
  for (index_t r = 0; r < 6; ++r)
    for (index_t c = 0; c < 2; ++c) BOOST_TEST(rounded[r * 2 + c].bits == T(m[r * d + c]).bits);
}

BOOST_AUTO_TEST_CASE(backward_rows_match_the_host_functors) {
  std::mt19937_64 rng(sy::test::base_seed() + 12);
  using T = sy::bfloat16;
  using Act = sy::activation::swiglu;
  const index_t tokens = 3, width = 2, d = 4, f = 3, p = 2 * f, E = 2;
  const std::vector<std::int32_t> ids = {1, 0, 0, -1, 1, 0}, counts = {2, 1, 2};
  const auto wts = sy::test::uniform(rng, 6, 0.1f, 1.0f);
  const sy::routing::plan_view<const std::int32_t, const float> plan{
      sy::make_view<const std::int32_t>(ids.data(), tokens, width),
      sy::make_view<const float>(wts.data(), tokens, width),
      sy::make_view<const std::int32_t>(counts.data(), tokens), E};
  const auto dyv = as<T>(sy::test::normal(rng, tokens * d));
  const auto dy = sy::make_view<const T>(dyv.data(), tokens, d);

  // Grouped dY rows: the host functor's rows and d_weights, plus a T copy.
  const std::vector<index_t> row_pair = {1, 2, 5, -1, 0, 4};
  const auto ys = sy::test::normal(rng, 6 * d);
  std::vector<float> dys(6 * d), dys_ref(6 * d), dw(6, -1.0f), dw_ref(6, -1.0f);
  std::vector<T> dys_t(6 * d);
  run(6, sy::ops::grouped_dy_rows_as<T, const float>{
             {plan.weights, row_pair.data(), width, d, dy, ys.data(), dys.data(), dw.data()},
             dys_t.data()});
  run(6, sy::ops::grouped_dy_rows<T, const float>{plan.weights, row_pair.data(), width, d, dy,
                                                  ys.data(), dys_ref.data(), dw_ref.data()});
  BOOST_TEST(same_bits(dys, dys_ref));
  BOOST_TEST(same_bits(dw, dw_ref));
  BOOST_TEST(same_bits(dys_t, as<T>(dys_ref)));

  // Dense dY rows of every expert at once vs the host's per-expert loop.
  const auto yd = sy::test::normal(rng, E * tokens * d);
  std::vector<float> dd(E * tokens * d), dd_ref(E * tokens * d), dwd(6, 0.0f), dwd_ref(6, 0.0f);
  std::vector<T> dd_t(E * tokens * d);
  run(E * tokens, sy::ops::dense_dy_rows_as<T, const std::int32_t, const float>{
                      {plan.expert_ids, plan.weights, plan.counts, 0, tokens, width, d, dy,
                       yd.data(), dd.data(), dwd.data()},
                      dd_t.data()});
  for (index_t e = 0; e < E; ++e)
    run(tokens, sy::ops::dense_dy_rows<T, const std::int32_t, const float>{
                    plan.expert_ids, plan.weights, plan.counts, e, tokens, width, d, dy,
                    yd.data() + e * tokens * d, dd_ref.data() + e * tokens * d, dwd_ref.data()});
  BOOST_TEST(same_bits(dd, dd_ref));
  BOOST_TEST(same_bits(dwd, dwd_ref));
  BOOST_TEST(same_bits(dd_t, as<T>(dd_ref)));

  // dH through the activation with its T copy; padding rows zero.
  const std::vector<index_t> count = {2, 3}, begin = {0, 4};  // rows 2, 3 padding
  const sy::ops::grouped_row_expert rx{begin.data(), count.data(), E};
  const auto h0 = sy::test::normal(rng, 7 * p);
  const auto da = sy::test::normal(rng, 7 * f);
  auto h = h0, h_ref = h0;
  std::vector<T> dh_t(7 * p);
  run(7 * f, sy::ops::activate_backward_as<T, Act, sy::ops::grouped_row_expert>{
                 Act{}, rx, h.data(), p, da.data(), f, f, dh_t.data()});
  for (index_t r = 0; r < 7; ++r) {
    if (rx(r) < 0) {
      std::fill(h_ref.begin() + r * p, h_ref.begin() + (r + 1) * p, 0.0f);
      continue;
    }
    sy::ops::activate_backward_rows<Act>{Act{}, h_ref.data(), p, da.data(), f, f}(r);
  }
  BOOST_TEST(same_bits(h, h_ref));
  BOOST_TEST(same_bits(dh_t, as<T>(h_ref)));

  // Dense slot rows of every expert at once vs the host's per-expert loop.
  std::vector<float> pairs(tokens * width * d, -3.0f), pairs_ref(tokens * width * d, -3.0f);
  run(E * tokens,
      sy::ops::keep_dense_slots_all<const std::int32_t>{
          {plan.expert_ids, plan.counts, 0, width, d, yd.data(), pairs.data()}, tokens});
  for (index_t e = 0; e < E; ++e)
    run(tokens, sy::ops::keep_dense_slots<const std::int32_t>{plan.expert_ids, plan.counts, e,
                                                              width, d, yd.data() + e * tokens * d,
                                                              pairs_ref.data()});
  BOOST_TEST(same_bits(pairs, pairs_ref));
}

BOOST_AUTO_TEST_CASE(segmented_bias_gradient_and_used_expert_gradients) {
  std::mt19937_64 rng(sy::test::base_seed() + 13);
  const index_t E = 3, cols = 4, rows = 9;
  const std::vector<index_t> count = {2, 0, 4}, begin = {1, 3, 3};
  const auto m = sy::test::normal(rng, rows * cols);
  const auto db0 = sy::test::normal(rng, E * cols * 2);
  auto db = db0, want = db0;
  const auto view = sy::make_strided_view<float, 2>(db.data(), {E, cols}, {cols * 2, 2});
  run(E * cols, sy::ops::bias_grad_segments<sy::ops::grouped_segments>{
                    {begin.data(), count.data()}, m.data(), cols, cols, view});
  for (index_t e = 0; e < E; ++e) {
    if (count[e] == 0) continue;
    run(cols, sy::ops::bias_grad_columns{m.data() + begin[e] * cols, count[e], cols,
                                         want.data() + e * cols * 2, 2});
  }
  BOOST_TEST(same_bits(db, want));

  // Dense: all T rows of each used expert, none of an unused one.
  const index_t tokens = 3;
  auto dbd = db0, wantd = db0;
  const auto viewd = sy::make_strided_view<float, 2>(dbd.data(), {E, cols}, {cols * 2, 2});
  run(E * cols, sy::ops::bias_grad_segments<sy::ops::dense_segments>{
                    {tokens, count.data()}, m.data(), cols, cols, viewd});
  for (index_t e = 0; e < E; ++e) {
    if (count[e] == 0) continue;
    run(cols, sy::ops::bias_grad_columns{m.data() + e * tokens * cols, tokens, cols,
                                         wantd.data() + e * cols * 2, 2});
  }
  BOOST_TEST(same_bits(dbd, wantd));

  const auto part = sy::test::normal(rng, E * 2 * cols);
  auto g = sy::test::normal(rng, E * 2 * (cols + 1));
  auto gwant = g;
  const auto gview =
      sy::make_strided_view<float, 3>(g.data(), {E, 2, cols}, {2 * (cols + 1), cols + 1, 1});
  run(E * 2 * cols, sy::ops::add_used_expert_grads{part.data(), count.data(), gview});
  for (index_t e = 0; e < E; ++e)
    for (index_t r = 0; r < 2; ++r)
      for (index_t c = 0; c < cols; ++c)
        if (count[e] > 0)
          gwant[e * 2 * (cols + 1) + r * (cols + 1) + c] += part[(e * 2 + r) * cols + c];
  BOOST_TEST(same_bits(g, gwant));
}

// ---- the whole pipeline on a naive executor --------------------------------------------------

namespace {

//! The expert phase's executor on the host: functors in a loop, GEMMs naively with cuBLAS's
//! column-major semantics (float accumulation as CUBLAS_COMPUTE_32F), pointer arrays written
//! by the same table code as the device kernel.
struct host_exec {
  enum class op { n, t };
  using blas_op = op;
  static constexpr op op_none = op::n;
  static constexpr op op_transpose = op::t;
  template <sy::ElementType T>
  static constexpr bool grouped_native = std::is_same_v<T, float>;  // as the device executor
  mutable int strided_calls = 0, grouped_calls = 0, pointer_builds = 0, single_calls = 0;

  template <class F>
  void launch(index_t n, const F& f, const char*) const {
    for (index_t i = 0; i < n; ++i) f(i);
  }
  void build_group_pointers(const sy::cuda::gemm_operand_table& table, const index_t* row_begin,
                            const index_t* row_count, index_t experts, void** out) const {
    ++pointer_builds;
    index_t g = 0;
    for (index_t e = 0; e < experts; ++e)
      if (row_count[e] > 0) table.write(out, experts, g++, e, row_begin);
  }
  template <class T>
  static void gemm(const sy::cuda::blas_gemm& b, const T* a, const T* bm, float* c) {
    using sy::cuda::gemm_op;
    for (int i = 0; i < b.m; ++i)
      for (int j = 0; j < b.n; ++j) {
        float s = 0.0f;
        for (int l = 0; l < b.k; ++l) {
          const T av =
              b.trans_a == gemm_op::none ? a[i + index_t(l) * b.lda] : a[l + index_t(i) * b.lda];
          const T bv =
              b.trans_b == gemm_op::none ? bm[l + index_t(j) * b.ldb] : bm[j + index_t(l) * b.ldb];
          s += sy::to_float(av) * sy::to_float(bv);
        }
        float& out = c[i + index_t(j) * b.ldc];
        out = b.alpha * s + b.beta * out;
      }
  }
  template <sy::ElementType T>
  void gemm_strided(const sy::cuda::blas_gemm& b, const void* a, const void* bm, void* c,
                    index_t batch, const char*) const {
    ++strided_calls;
    for (index_t q = 0; q < batch; ++q)
      gemm(b, static_cast<const T*>(a) + q * b.stride_a, static_cast<const T*>(bm) + q * b.stride_b,
           static_cast<float*>(c) + q * b.stride_c);
  }
  template <sy::ElementType T>
  void gemm_single(const sy::cuda::blas_gemm& b, const void* a, const void* bm, void* c,
                   const char*) const {
    ++single_calls;
    gemm(b, static_cast<const T*>(a), static_cast<const T*>(bm), static_cast<float*>(c));
  }
  template <sy::ElementType T>
  void gemm_grouped(const sy::cuda::grouped_call<op>& c, const void* const* a, const void* const* b,
                    void* const* out, const char*) const {
    ++grouped_calls;
    for (int g = 0; g < c.groups; ++g) {
      BOOST_TEST_REQUIRE(c.group_size[g] == 1);
      sy::cuda::blas_gemm m;
      m.trans_a = c.trans_a[g] == op::n ? sy::cuda::gemm_op::none : sy::cuda::gemm_op::transpose;
      m.trans_b = c.trans_b[g] == op::n ? sy::cuda::gemm_op::none : sy::cuda::gemm_op::transpose;
      m.m = c.m[g], m.n = c.n[g], m.k = c.k[g], m.lda = c.lda[g], m.ldb = c.ldb[g],
      m.ldc = c.ldc[g];
      m.alpha = c.alpha[g], m.beta = c.beta[g];
      gemm(m, static_cast<const T*>(a[g]), static_cast<const T*>(b[g]),
           static_cast<float*>(out[g]));
    }
  }
};

//! The device dispatch's groups from the host's (dispatch.cuh's documented differences):
//! sorted_grouped's rows past the real ones hold unused_pair; padded_capacity's blocks start
//! at e·C_max; dense as the host.
struct device_style_groups {
  std::vector<index_t> begin, count, dropped, pair_row, row_pair, host_count;
  sy::cuda::expert_groups_ref ref;

  template <class D>
  device_style_groups(const D& policy, const sy::dispatch::expert_groups& g, index_t tokens,
                      index_t width, index_t E)
      : begin(g.row_begin.begin(), g.row_begin.end()),
        count(g.row_count.begin(), g.row_count.end()),
        dropped(g.dropped.begin(), g.dropped.end()),
        pair_row(g.pair_row.begin(), g.pair_row.end()) {
    if constexpr (std::is_same_v<D, sy::dispatch::sorted_grouped>) {
      row_pair.assign(g.row_pair.begin(), g.row_pair.end());
      for (index_t r = g.num_rows; r < tokens * width; ++r) row_pair[r] = sy::dispatch::unused_pair;
      host_count = count;
      ref.rows = tokens * width;
      ref.host_row_count = host_count.data();
    } else if constexpr (std::is_same_v<D, sy::dispatch::padded_capacity>) {
      const index_t cmax = policy.capacity(tokens, tokens * width, E);
      row_pair.assign(static_cast<std::size_t>(E * cmax), sy::dispatch::unused_pair);
      for (index_t e = 0; e < E; ++e) {
        for (index_t i = 0; i < count[e]; ++i) {
          const index_t p = g.row_pair[g.row_begin[e] + i];
          row_pair[e * cmax + i] = p;
          pair_row[p] = e * cmax + i;
        }
        begin[e] = e * cmax;
      }
      ref.rows = E * cmax;
      ref.capacity = cmax;
    } else {
      row_pair.assign(g.row_pair.begin(), g.row_pair.end());
      ref.rows = tokens;
      ref.capacity = tokens;
    }
    ref.row_begin = begin.data();
    ref.row_count = count.data();
    ref.dropped = dropped.data();
    ref.pair_row = pair_row.data();
    ref.row_pair = row_pair.data();
    ref.drop = g.drop;
  }
};

//! Expert parameters of T with strided storage (row padding, expert padding, bias stride 2).
template <class T>
struct strided_weights {
  std::vector<T> w1, w2, b1, b2;
  sy::expert_weights<T> view;
  strided_weights(std::mt19937_64& rng, index_t E, index_t p, index_t d, index_t f, bool bias) {
    const index_t ld1 = d + 3, s1 = p * ld1 + 5, ld2 = f + 2, s2 = d * ld2 + 1;
    w1 = as<T>(sy::test::normal(rng, E * s1, 1.0f / std::sqrt(float(d))));
    w2 = as<T>(sy::test::normal(rng, E * s2, 1.0f / std::sqrt(float(f))));
    view.w1 = sy::make_strided_view<const T, 3>(w1.data(), {E, p, d}, {s1, ld1, 1});
    view.w2 = sy::make_strided_view<const T, 3>(w2.data(), {E, d, f}, {s2, ld2, 1});
    if (bias) {
      b1 = as<T>(sy::test::normal(rng, E * p * 2, 0.5f));
      b2 = as<T>(sy::test::normal(rng, E * d * 2, 0.5f));
      view.b1 = sy::make_strided_view<const T, 2>(b1.data(), {E, p}, {2 * p, 2});
      view.b2 = sy::make_strided_view<const T, 2>(b2.data(), {E, d}, {2 * d, 2});
    }
  }
};

//! Gradient buffers (random start values: the phase accumulates) with strided storage.
struct strided_grads {
  std::vector<float> w1, w2, b1, b2;
  sy::expert_grads view;
  strided_grads(const std::vector<float>& a1, const std::vector<float>& a2,
                const std::vector<float>& c1, const std::vector<float>& c2, index_t E, index_t p,
                index_t d, index_t f, bool weights, bool biases)
      : w1(a1), w2(a2), b1(c1), b2(c2) {
    if (weights) {
      view.w1 = sy::make_strided_view<float, 3>(w1.data(), {E, p, d}, {p * (d + 1) + 2, d + 1, 1});
      view.w2 = sy::make_strided_view<float, 3>(w2.data(), {E, d, f}, {d * (f + 2), f + 2, 1});
    }
    if (biases) {
      view.b1 = sy::make_strided_view<float, 2>(b1.data(), {E, p}, {p * 3, 3});
      view.b2 = sy::make_strided_view<float, 2>(b2.data(), {E, d}, {d, 1});
    }
  }
};

//! max |a - b| <= tol · (1 + max |b|), naming the first element that is not.
template <class A, class B>
void expect_near(const std::vector<A>& a, const std::vector<B>& b, double tol,
                 const std::string& what) {
  BOOST_TEST_REQUIRE(a.size() == b.size());
  double scale = 0.0;
  for (const auto& v : b) scale = std::max(scale, std::fabs(double(sy::to_float(v))));
  const double bound = tol * (1.0 + scale);
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double x = sy::to_float(a[i]), y = sy::to_float(b[i]);
    if (!(std::fabs(x - y) <= bound)) {
      BOOST_ERROR(what << ": element " << i << " got " << x << ", want " << y << " (bound " << bound
                       << ")");
      return;
    }
  }
}

template <class T>
double tolerance() {
  // float: summation order only; half/bfloat16: A, dY, dH stored in T (several roundings).
  return std::is_same_v<T, float> ? 1e-5 : 8.0 * sy::unit_roundoff<T>();
}

template <class D, class Act, class T>
void compare_pipeline(std::mt19937_64& rng, const D& policy, bool bias, bool grads_present,
                      bool dx_present, bool nan_unused = false) {
  constexpr bool gated = sy::activation_traits<Act>::is_gated;
  const index_t tokens = std::uniform_int_distribution<index_t>(1, 9)(rng);
  const index_t E = std::uniform_int_distribution<index_t>(nan_unused ? 3 : 2, 5)(rng);
  // nan_unused: no pair names expert E-1, whose parameters are NaN (a masked DynMoE slot).
  const index_t routable = nan_unused ? E - 1 : E;
  const index_t width = std::min<index_t>(3, routable), d = 6, f = 5, p = gated ? 2 * f : f;
  const std::string tag = std::string(typeid(D).name()) + " " + typeid(Act).name() + " " +
                          sy::element_type_name<T>() + (bias ? " bias" : "") +
                          (grads_present ? " grads" : "") + (dx_present ? " dx" : "") +
                          (nan_unused ? " nan-unused" : "");
  BOOST_TEST_CONTEXT(tag) {
    // A plan with distinct experts per token, some tokens using fewer slots (or none).
    std::vector<std::int32_t> ids(tokens * width, -1), counts(tokens);
    std::vector<float> wts(tokens * width, 0.0f);
    for (index_t t = 0; t < tokens; ++t) {
      counts[t] = static_cast<std::int32_t>(std::uniform_int_distribution<index_t>(0, width)(rng));
      std::vector<std::int32_t> perm(routable);
      for (index_t e = 0; e < routable; ++e) perm[e] = static_cast<std::int32_t>(e);
      std::shuffle(perm.begin(), perm.end(), rng);
      for (index_t j = 0; j < counts[t]; ++j) {
        ids[t * width + j] = perm[j];
        wts[t * width + j] = sy::test::uniform(rng, 1, 0.1f, 1.0f)[0];
      }
    }
    const sy::routing::plan_view<const std::int32_t, const float> plan{
        sy::make_view<const std::int32_t>(ids.data(), tokens, width),
        sy::make_view<const float>(wts.data(), tokens, width),
        sy::make_view<const std::int32_t>(counts.data(), tokens), E};
    const auto xv = as<T>(sy::test::normal(rng, tokens * d));
    const auto x = sy::make_view<const T>(xv.data(), tokens, d);
    strided_weights<T> w(rng, E, p, d, f, bias);
    if (nan_unused) {
      const T nan = sy::from_float<T>(std::numeric_limits<float>::quiet_NaN());
      for (index_t r = 0; r < p; ++r)
        for (index_t c = 0; c < d; ++c) const_cast<T&>(w.view.w1(E - 1, r, c)) = nan;
      for (index_t r = 0; r < d; ++r)
        for (index_t c = 0; c < f; ++c) const_cast<T&>(w.view.w2(E - 1, r, c)) = nan;
      if (bias) {
        for (index_t c = 0; c < p; ++c) const_cast<T&>(w.view.b1(E - 1, c)) = nan;
        for (index_t c = 0; c < d; ++c) const_cast<T&>(w.view.b2(E - 1, c)) = nan;
      }
    }
    const sy::cuda::expert_dims dm{tokens, width, E, d, f, p};
    sy::host::expert_dims hdm;
    hdm.tokens = tokens, hdm.width = width, hdm.experts = E, hdm.d = d, hdm.d_ff = f, hdm.p = p;
    hdm.max_rows = policy.max_rows(tokens, width, E);

    // Host groups, then the device's version of them.
    std::vector<index_t> hb(E), hc(E), hd(E), hpr(tokens * width),
        hrp(std::max(hdm.max_rows, tokens * width));
    sy::dispatch::expert_groups hg;
    hg.row_begin = {hb.data(), hb.size()};
    hg.row_count = {hc.data(), hc.size()};
    hg.dropped = {hd.data(), hd.size()};
    hg.pair_row = {hpr.data(), hpr.size()};
    hg.row_pair = {hrp.data(), hrp.size()};
    sy::host::plan_groups(policy, plan, hg);
    const device_style_groups g(policy, hg, tokens, width, E);

    const host_exec exec;
    // ---- forward
    std::vector<T> y(tokens * d, sy::from_float<T>(-9.0f)), y_ref(tokens * d);
    std::vector<index_t> dropped(E, -1), dropped_ref(E, -1);
    const auto extra = sy::test::normal(rng, tokens * d);
    {
      sy::workspace_arena mws, mhws;
      sy::cuda::experts_forward_phase(exec, policy, Act{}, dm, sy::matrix_view<const T>{}, plan,
                                      w.view, sy::cuda::expert_groups_ref{}, nullptr,
                                      sy::matrix_view<T>{}, nullptr, mws, mhws);
      BOOST_TEST(exec.strided_calls + exec.grouped_calls + exec.pointer_builds +
                     exec.single_calls ==
                 0);  // measuring touches nothing
      std::vector<std::byte> dev(mws.required()), host(mhws.required());
      sy::workspace_arena ws({dev.data(), dev.size()}), hws({host.data(), host.size()});
      sy::cuda::experts_forward_phase(exec, policy, Act{}, dm, x, plan, w.view, g.ref, extra.data(),
                                      sy::make_view(y.data(), tokens, d), dropped.data(), ws, hws);
      sy::workspace_arena mh;
      sy::host::experts_forward(policy, Act{}, hdm, x, plan, w.view, extra.data(),
                                sy::make_view(y_ref.data(), tokens, d),
                                sy::span<index_t>{dropped_ref.data(), dropped_ref.size()}, mh);
      std::vector<std::byte> hbuf(mh.required());
      sy::workspace_arena hw({hbuf.data(), hbuf.size()});
      sy::host::experts_forward(policy, Act{}, hdm, x, plan, w.view, extra.data(),
                                sy::make_view(y_ref.data(), tokens, d),
                                sy::span<index_t>{dropped_ref.data(), dropped_ref.size()}, hw);
    }
    expect_near(y, y_ref, tolerance<T>(), "y");
    BOOST_TEST(dropped == dropped_ref, boost::test_tools::per_element());

    // ---- backward
    const auto dyv = as<T>(sy::test::normal(rng, tokens * d));
    const auto dy = sy::make_view<const T>(dyv.data(), tokens, d);
    const auto g1 = sy::test::normal(rng, E * (p * (d + 1) + 2)),
               g2 = sy::test::normal(rng, E * d * (f + 2));
    const auto c1 = sy::test::normal(rng, E * p * 3), c2 = sy::test::normal(rng, E * d);
    strided_grads gr(g1, g2, c1, c2, E, p, d, f, grads_present, grads_present && bias);
    strided_grads gr_ref(g1, g2, c1, c2, E, p, d, f, grads_present, grads_present && bias);
    const auto dx0 = sy::test::normal(rng, tokens * d);
    auto dxv = dx0, dxv_ref = dx0;
    const auto dx = dx_present ? sy::make_view(dxv.data(), tokens, d) : sy::matrix_view<float>{};
    const auto dx_ref =
        dx_present ? sy::make_view(dxv_ref.data(), tokens, d) : sy::matrix_view<float>{};
    std::vector<float> dw(tokens * width, 0.0f), dw_ref(tokens * width, 5.0f);
    {
      sy::workspace_arena mws, mhws;
      sy::cuda::experts_backward_phase(exec, policy, Act{}, dm, sy::matrix_view<const T>{}, plan,
                                       w.view, sy::cuda::expert_groups_ref{},
                                       sy::matrix_view<const T>{}, sy::matrix_view<float>{},
                                       sy::expert_grads{}, nullptr, mws, mhws);
      std::vector<std::byte> dev(mws.required()), host(mhws.required());
      sy::workspace_arena ws({dev.data(), dev.size()}), hws({host.data(), host.size()});
      sy::cuda::experts_backward_phase(exec, policy, Act{}, dm, x, plan, w.view, g.ref, dy, dx,
                                       gr.view, dw.data(), ws, hws);
      sy::workspace_arena mh;
      sy::host::experts_backward(policy, Act{}, hdm, x, plan, w.view, dy, dx_ref, gr_ref.view,
                                 dw_ref.data(), mh);
      std::vector<std::byte> hbuf(mh.required());
      sy::workspace_arena hw({hbuf.data(), hbuf.size()});
      sy::host::experts_backward(policy, Act{}, hdm, x, plan, w.view, dy, dx_ref, gr_ref.view,
                                 dw_ref.data(), hw);
    }
    const double tol = tolerance<T>();
    expect_near(dw, dw_ref, tol, "d_weights");
    expect_near(dxv, dxv_ref, tol, "dx");
    expect_near(gr.w1, gr_ref.w1, tol, "grads.w1");
    expect_near(gr.w2, gr_ref.w2, tol, "grads.w2");
    expect_near(gr.b1, gr_ref.b1, tol, "grads.b1");
    expect_near(gr.b2, gr_ref.b2, tol, "grads.b2");
    if (std::is_same_v<D, sy::dispatch::sorted_grouped>) {
      BOOST_TEST(exec.strided_calls == 0);
      // float: grouped calls over pointer arrays; half/bfloat16: one GEMM per expert.
      if (std::is_same_v<T, float>)
        BOOST_TEST(exec.single_calls == 0);
      else
        BOOST_TEST(exec.grouped_calls + exec.pointer_builds == 0);
    } else {
      BOOST_TEST(exec.grouped_calls + exec.pointer_builds + exec.single_calls == 0);
    }
  }
}

template <class D, class Act>
void all_types(std::mt19937_64& rng, const D& policy) {
  for (int round = 0; round < 3; ++round) {
    const bool bias = round != 1, grads = round != 2, dx = round != 1;
    compare_pipeline<D, Act, float>(rng, policy, bias, grads, dx);
    compare_pipeline<D, Act, sy::half>(rng, policy, bias, grads, dx);
    compare_pipeline<D, Act, sy::bfloat16>(rng, policy, bias, grads, dx);
  }
}

template <class D>
void all_activations(std::mt19937_64& rng, const D& policy) {
  all_types<D, sy::activation::swiglu>(rng, policy);
  all_types<D, sy::activation::gelu>(rng, policy);
  all_types<D, sy::activation::relu>(rng, policy);
  // An expert no pair names may hold NaN (DynMoE's masked slots): nothing of it may reach y,
  // dx, d_weights or another expert's gradients, and its own gradients stay as they were.
  compare_pipeline<D, sy::activation::swiglu, float>(rng, policy, true, true, true, true);
  compare_pipeline<D, sy::activation::gelu, sy::half>(rng, policy, true, true, true, true);
  compare_pipeline<D, sy::activation::relu, sy::bfloat16>(rng, policy, false, true, true, true);
}

}  // namespace

BOOST_AUTO_TEST_CASE(device_pipeline_matches_host_sorted_grouped) {
  std::mt19937_64 rng(sy::test::base_seed() + 20);
  all_activations(rng, sy::dispatch::sorted_grouped{});
}

BOOST_AUTO_TEST_CASE(device_pipeline_matches_host_padded_capacity) {
  std::mt19937_64 rng(sy::test::base_seed() + 21);
  sy::dispatch::padded_capacity tight;  // drops pairs
  tight.capacity_factor = 0.5f, tight.min_capacity = 1, tight.capacity_multiple = 1;
  all_activations(rng, tight);
  sy::dispatch::padded_capacity pass = tight;  // dropped pairs pass x through
  pass.drop = sy::dispatch::dropped_output::scaled_input;
  all_activations(rng, pass);
  all_activations(rng, sy::dispatch::padded_capacity{});  // default: blocks of 8 with padding
}

BOOST_AUTO_TEST_CASE(device_pipeline_matches_host_dense) {
  std::mt19937_64 rng(sy::test::base_seed() + 22);
  all_activations(rng, sy::dispatch::dense{});
}
