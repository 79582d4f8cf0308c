// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file checked.hpp
//! Checked 64-bit size arithmetic: `detail::checked_mul` / `detail::checked_add` compute a
//! product or a sum of sizes that come from user input (extents, token counts, widths) and
//! throw `range_error` naming the argument when the exact result does not fit in `index_t`
//! (signed overflow would be undefined behaviour and, in practice, a wrapped size: a too
//! small buffer or a loop that never ends). A negative operand is an error too.

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <string_view>

#include "switchyard/core/config.hpp"
#include "switchyard/core/error.hpp"

namespace switchyard::detail {

//! a · b for sizes a, b >= 0; throws range_error naming `argument` when it overflows index_t.
inline index_t checked_mul(std::string_view argument, index_t a, index_t b) {
  index_t r = 0;
  if (a < 0 || b < 0 || __builtin_mul_overflow(a, b, &r)) {
    throw range_error(std::string(argument),
                      concat(argument, ": the size ", a, " x ", b,
                             " is negative or does not fit in a signed 64-bit integer"));
  }
  return r;
}

//! The product of every size in `sizes` (checked_mul, left to right).
inline index_t checked_product(std::string_view argument, std::initializer_list<index_t> sizes) {
  index_t r = 1;
  for (index_t s : sizes) r = checked_mul(argument, r, s);
  return r;
}

//! a + b for sizes a, b >= 0; throws range_error naming `argument` when it overflows index_t.
inline index_t checked_add(std::string_view argument, index_t a, index_t b) {
  index_t r = 0;
  if (a < 0 || b < 0 || __builtin_add_overflow(a, b, &r)) {
    throw range_error(std::string(argument),
                      concat(argument, ": the size ", a, " + ", b,
                             " is negative or does not fit in a signed 64-bit integer"));
  }
  return r;
}

//! n elements of `bytes_each` bytes as a byte count (std::size_t); throws range_error naming
//! `argument` when n < 0 or the product overflows index_t.
inline std::size_t checked_bytes(std::string_view argument, index_t n, std::size_t bytes_each) {
  return static_cast<std::size_t>(checked_mul(argument, n, static_cast<index_t>(bytes_each)));
}

}  // namespace switchyard::detail
