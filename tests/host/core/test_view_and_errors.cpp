// SPDX-License-Identifier: Apache-2.0
// Views: extents and strides are 64-bit; check_view names the argument and shapes.
#include <boost/test/unit_test.hpp>

#include <switchyard/core/error.hpp>
#include <switchyard/core/view.hpp>

#include <string>
#include <vector>

namespace sy = switchyard;

BOOST_AUTO_TEST_CASE(strided_view_indexes_with_64_bit_offsets) {
  // A logical [3, 2^31 + 8] view with stride 2^31+8 in dim 0 over a buffer it never reads
  // beyond: the mapping's offset arithmetic must not wrap at 2^31.
  const sy::index_t big = (sy::index_t{1} << 31) + 8;
  float dummy = 0.0f;
  auto v = sy::make_strided_view<float, 2>(&dummy, {3, big}, {big, 1});
  BOOST_TEST(v.mapping()(2, 5) == 2 * big + 5);
  BOOST_TEST(v.mapping()(2, 5) > (sy::index_t{1} << 32));
  BOOST_TEST(sy::element_count(v) == 3 * big);
}

BOOST_AUTO_TEST_CASE(contiguous_views_are_detected) {
  std::vector<float> buf(24, 1.5f);
  auto v = sy::make_view(buf.data(), 4, 6);
  BOOST_TEST(sy::is_row_major_contiguous(v));
  auto t = sy::make_strided_view<float, 2>(buf.data(), {6, 4}, {1, 6});  // transposed
  BOOST_TEST(!sy::is_row_major_contiguous(t));
  BOOST_TEST(&t(5, 3) == &v(3, 5));
}

BOOST_AUTO_TEST_CASE(check_view_reports_argument_and_shapes) {
  std::vector<float> buf(12, 2.0f);
  auto v = sy::make_view(buf.data(), 3, 4);
  BOOST_CHECK_NO_THROW(sy::check_view("x", v, {3, -1}));
  try {
    sy::check_view("x", v, {3, 5}, "[T, d]");
    BOOST_FAIL("expected shape_error");
  } catch (const sy::shape_error& e) {
    const std::string m = e.what();
    BOOST_TEST(e.argument() == "x");
    BOOST_TEST(m.find("[3, 5]") != std::string::npos, m);
    BOOST_TEST(m.find("[3, 4]") != std::string::npos, m);
  }
  auto null_view = sy::make_view(static_cast<float*>(nullptr), 2, 2);
  BOOST_CHECK_THROW(sy::check_view("w", null_view, {2, 2}), sy::null_pointer_error);
  auto empty = sy::make_view(static_cast<float*>(nullptr), 0, 2);
  BOOST_CHECK_NO_THROW(sy::check_view("x", empty, {0, 2}));
}

BOOST_AUTO_TEST_CASE(errors_are_typed_and_catchable_as_std) {
  BOOST_CHECK_THROW(sy::detail::require_in_range("p", 1.5, 0.0, 1.0), std::invalid_argument);
  try {
    sy::detail::require_in_range("k", 9, 1, 8);
  } catch (const sy::range_error& e) {
    BOOST_TEST(std::string(e.what()) == "k must be in [1, 8], got 9");
  }
}
