// SPDX-License-Identifier: Apache-2.0
// The backend-neutral functors of switchyard/ops/ run one index at a time on the host, against
// plainly written expectations: gather with padding rows, in-place gated activation, bias
// gradient, combine with a dropped pass-through pair, an unused slot and the add-on term, and
// its backward.
#include <boost/test/unit_test.hpp>

#include <cstdint>
#include <vector>

#include <switchyard/activation/functors.hpp>
#include <switchyard/dispatch/groups.hpp>
#include <switchyard/ops/activate.hpp>
#include <switchyard/ops/bias.hpp>
#include <switchyard/ops/combine.hpp>
#include <switchyard/ops/drops.hpp>
#include <switchyard/ops/gather.hpp>

using namespace switchyard;

namespace {
template <class F>
void run(index_t n, const F& f) {
  for (index_t i = 0; i < n; ++i) f(i);
}
}  // namespace

BOOST_AUTO_TEST_CASE(gather_rows_reads_the_pairs_token_and_zeroes_padding) {
  const index_t d = 3, width = 2;
  std::vector<float> x = {1, 2, 3, 4, 5, 6};  // T = 2
  std::vector<index_t> row_pair = {3, dispatch::unused_pair, 0};  // pair 3 = token 1, pair 0 = token 0
  std::vector<float> rows(3 * d, -1.0f);
  run(3, ops::gather_rows<float>{make_view<const float>(x.data(), 2, d), row_pair.data(), width, d, rows.data()});
  BOOST_TEST(rows == (std::vector<float>{4, 5, 6, 0, 0, 0, 1, 2, 3}), boost::test_tools::per_element());
}

BOOST_AUTO_TEST_CASE(gated_activation_in_place_writes_the_gate_half) {
  const index_t f = 2, p = 2 * f;
  std::vector<float> h = {1, -1, 3, 4, 0.5f, 2, -2, 1};  // two rows of [gate | up]
  const activation::gated<activation::relu> act{};
  run(2, ops::activate_rows<activation::gated<activation::relu>>{act, h.data(), p, h.data(), p, f});
  BOOST_TEST(h[0] == 3.0f);   // relu(1) · 3
  BOOST_TEST(h[1] == 0.0f);   // relu(-1) · 4
  BOOST_TEST(h[4] == -1.0f);  // relu(0.5) · -2
  BOOST_TEST(h[5] == 2.0f);   // relu(2) · 1
}

BOOST_AUTO_TEST_CASE(bias_add_and_gradient) {
  std::vector<float> m = {1, 2, 3, 4};  // [2, 2]
  std::vector<float> bias = {10, 20};
  run(2, ops::add_bias_rows<float>{bias.data(), 1, m.data(), 2, 2});
  BOOST_TEST(m == (std::vector<float>{11, 22, 13, 24}), boost::test_tools::per_element());
  std::vector<float> db = {1, 0, 2, 0};  // strided: columns 2 apart
  run(2, ops::bias_grad_columns{m.data(), 2, 2, db.data(), 2});
  BOOST_TEST(db == (std::vector<float>{25, 0, 48, 0}), boost::test_tools::per_element());
}

BOOST_AUTO_TEST_CASE(combine_gathers_slots_in_order_with_pass_through_and_extra) {
  // T = 2, width = 3, d = 2. Token 0: slot 0 -> row 1, slot 1 dropped, slot 2 unused.
  // Token 1: slot 0 -> row 0.
  const index_t d = 2, width = 3;
  std::vector<std::int32_t> counts = {2, 1};
  std::vector<float> weights = {0.5f, 0.25f, 0, 2, 0, 0};
  std::vector<index_t> pair_row = {1, dispatch::dropped_pair, dispatch::unused_pair, 0,
                                   dispatch::unused_pair, dispatch::unused_pair};
  std::vector<float> rows = {1, 2, 3, 4};
  std::vector<float> x = {8, 16, 1, 1}, extra = {100, 200, 300, 400}, y(4);
  ops::combine_slots<float, const std::int32_t, const float> f{
      make_view<const float>(weights.data(), 2, width), make_view<const std::int32_t>(counts.data(), 2),
      pair_row.data(), width, d, rows.data(), make_view<const float>(x.data(), 2, d), true, extra.data(),
      make_view(y.data(), 2, d)};
  run(2, f);
  BOOST_TEST(y == (std::vector<float>{0.5f * 3 + 0.25f * 8 + 100, 0.5f * 4 + 0.25f * 16 + 200, 2 * 1 + 300,
                                      2 * 2 + 400}),
             boost::test_tools::per_element());
  f.pass_through = false;
  f.extra = nullptr;
  run(2, f);
  BOOST_TEST(y == (std::vector<float>{1.5f, 2, 2, 4}), boost::test_tools::per_element());

  // Backward: dx += dX rows of the slots (+ w · dy for the dropped pass-through pair), and
  // d_weights of the dropped pair = <dy, x>.
  std::vector<float> dy = {1, 2, 3, 4}, dx(4, 1.0f), d_weights(6, -1.0f);
  run(2, ops::combine_backward_slots<float, const std::int32_t, const float>{
             make_view<const float>(weights.data(), 2, width), make_view<const std::int32_t>(counts.data(), 2),
             pair_row.data(), width, d, rows.data(), make_view<const float>(x.data(), 2, d),
             make_view<const float>(dy.data(), 2, d), true, d_weights.data(), make_view(dx.data(), 2, d), true});
  BOOST_TEST(dx == (std::vector<float>{1 + 3 + 0.25f * 1, 1 + 4 + 0.25f * 2, 1 + 1, 1 + 2}),
             boost::test_tools::per_element());
  BOOST_TEST(d_weights[1] == 1 * 8 + 2 * 16);
  BOOST_TEST(d_weights[0] == -1.0f);  // used slots' cotangents come from the expert rows
}

BOOST_AUTO_TEST_CASE(report_drops_copies_the_per_expert_counts) {
  std::vector<index_t> planned = {0, 3, 1}, dropped(3, -1);
  run(3, ops::report_drops{planned.data(), dropped.data()});
  BOOST_TEST(dropped == planned, boost::test_tools::per_element());
}

BOOST_AUTO_TEST_CASE(combine_by_elements_is_bitwise_the_row_form) {
  // Random plan with used, unused and dropped pass-through slots, an add-on term, bf16 output.
  const index_t tokens = 9, width = 3, d = 7, n_rows = 20;
  std::vector<float> w(tokens * width), rows(n_rows * d), x(tokens * d), extra(tokens * d);
  std::vector<std::int32_t> counts(tokens);
  std::vector<index_t> pair_row(tokens * width);
  std::uint64_t state = 0x9E3779B97F4A7C15ull;
  auto next = [&] { state ^= state << 13; state ^= state >> 7; state ^= state << 17; return state; };
  auto uni = [&] { return static_cast<float>(next() % 20001) / 10000.0f - 1.0f; };
  for (auto& v : w) v = uni();
  for (auto& v : rows) v = uni() * 3.0f;
  for (auto& v : x) v = uni();
  for (auto& v : extra) v = uni();
  for (index_t t = 0; t < tokens; ++t) {
    counts[t] = static_cast<std::int32_t>(next() % (width + 1));
    for (index_t j = 0; j < width; ++j) {
      const auto k = next() % 5;
      pair_row[t * width + j] = j >= counts[t] ? dispatch::unused_pair
                                : k == 0       ? dispatch::dropped_pair
                                               : static_cast<index_t>(next() % n_rows);
    }
  }
  std::vector<bfloat16> xb(x.size()), y_rows(tokens * d), y_elems(tokens * d);
  for (std::size_t i = 0; i < x.size(); ++i) xb[i] = from_float<bfloat16>(x[i]);
  const auto wv = make_view<const float>(w.data(), tokens, width);
  const auto cv = make_view<const std::int32_t>(counts.data(), tokens);
  const auto xv = make_view<const bfloat16>(xb.data(), tokens, d);
  for (const bool pass : {false, true}) {
    for (const float* add : {static_cast<const float*>(nullptr), static_cast<const float*>(extra.data())}) {
      const ops::combine_slots<bfloat16, const std::int32_t, const float> rows_form{
          wv, cv, pair_row.data(), width, d, rows.data(), xv, pass, add,
          make_view(y_rows.data(), tokens, d)};
      auto elems_form = rows_form;
      elems_form.y = make_view(y_elems.data(), tokens, d);
      run(tokens, rows_form);
      run(tokens * d, ops::combine_slot_elements<bfloat16, const std::int32_t, const float>{elems_form});
      for (std::size_t i = 0; i < y_rows.size(); ++i)
        BOOST_TEST(y_rows[i].bits == y_elems[i].bits, "element " << i);
    }
  }
}

BOOST_AUTO_TEST_CASE(combine_backward_by_elements_is_bitwise_the_row_form) {
  const index_t tokens = 8, width = 3, d = 5, n_rows = 17;
  std::uint64_t state = 0xD1B54A32D192ED03ull;
  auto next = [&] { state ^= state << 13; state ^= state >> 7; state ^= state << 17; return state; };
  auto uni = [&] { return static_cast<float>(next() % 20001) / 10000.0f - 1.0f; };
  std::vector<float> w(tokens * width), dx_rows(n_rows * d), x(tokens * d), dy(tokens * d),
      dx0(tokens * d);
  for (auto* v : {&w, &dx_rows, &x, &dy, &dx0})
    for (auto& e : *v) e = uni();
  std::vector<std::int32_t> counts(tokens);
  std::vector<index_t> pair_row(tokens * width);
  for (index_t t = 0; t < tokens; ++t) {
    counts[t] = static_cast<std::int32_t>(next() % (width + 1));
    for (index_t j = 0; j < width; ++j)
      pair_row[t * width + j] = j >= counts[t] ? dispatch::unused_pair
                                : next() % 4 == 0 ? dispatch::dropped_pair
                                                  : static_cast<index_t>(next() % n_rows);
  }
  std::vector<switchyard::half> xh(x.size()), dyh(dy.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    xh[i] = from_float<switchyard::half>(x[i]);
    dyh[i] = from_float<switchyard::half>(dy[i]);
  }
  for (const bool pass : {false, true}) {
    std::vector<float> dx_a = dx0, dx_b = dx0, dw_a(tokens * width, -7.0f), dw_b(tokens * width, -7.0f);
    const ops::combine_backward_slots<switchyard::half, const std::int32_t, const float> rows_form{
        make_view<const float>(w.data(), tokens, width), make_view<const std::int32_t>(counts.data(), tokens),
        pair_row.data(), width, d, dx_rows.data(), make_view<const switchyard::half>(xh.data(), tokens, d),
        make_view<const switchyard::half>(dyh.data(), tokens, d), pass, dw_a.data(),
        make_view(dx_a.data(), tokens, d), true};
    auto split = rows_form;
    split.d_weights = dw_b.data();
    split.dx = make_view(dx_b.data(), tokens, d);
    run(tokens, rows_form);
    run(tokens, ops::combine_backward_pass_weights<switchyard::half, const std::int32_t, const float>{split});
    run(tokens * d, ops::combine_backward_elements<switchyard::half, const std::int32_t, const float>{split});
    BOOST_TEST(dx_a == dx_b, boost::test_tools::per_element());
    BOOST_TEST(dw_a == dw_b, boost::test_tools::per_element());
  }
}
