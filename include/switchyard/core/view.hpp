// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file view.hpp
//! Non-owning views over caller memory: `::cuda::std::mdspan` (libcu++, header-only, usable
//! from g++ and nvcc alike) with 64-bit extents and a strided layout, so sub-views and
//! transposed storage are views too.

#include <cuda/std/array>
#include <cuda/std/mdspan>
#include <cuda/std/span>

#include <cstdint>
#include <limits>
#include <string_view>

#include "switchyard/core/checked.hpp"
#include "switchyard/core/config.hpp"
#include "switchyard/core/span.hpp"
#include "switchyard/core/error.hpp"

namespace switchyard {

//! Extents of a rank-R view, 64-bit.
template <std::size_t R>
using extents = ::cuda::std::dextents<index_t, R>;

//! A rank-R strided view of T over caller memory.
template <class T, std::size_t R>
using tensor_view = ::cuda::std::mdspan<T, extents<R>, ::cuda::std::layout_stride>;

//! [rows, cols] view.
template <class T>
using matrix_view = tensor_view<T, 2>;

//! [n] view.
template <class T>
using vector_view = tensor_view<T, 1>;

//! Row-major contiguous view of `p` with the given extents.
template <class T, class... I>
  requires(sizeof...(I) >= 1 && (std::is_integral_v<I> && ...))
tensor_view<T, sizeof...(I)> make_view(T* p, I... dims) {
  constexpr std::size_t R = sizeof...(I);
  const extents<R> e(static_cast<index_t>(dims)...);
  return tensor_view<T, R>(p, ::cuda::std::layout_right::mapping<extents<R>>(e));
}

//! Strided view of `p`: `dims` extents, `strides` in elements (each > 0).
template <class T, std::size_t R>
tensor_view<T, R> make_strided_view(T* p, const ::cuda::std::array<index_t, R>& dims,
                                    const ::cuda::std::array<index_t, R>& strides) {
  return tensor_view<T, R>(p, ::cuda::std::layout_stride::mapping<extents<R>>(extents<R>(dims),
                                                                           strides));
}

namespace detail {
//! True when an optional view is present, i.e. is anything but the empty view `{}` (how an
//! absent gradient, bias or output is passed). The one test of the library: a present view is
//! then validated (`check_view`), so a null pointer with extents is an error, never skipped.
template <class V>
SWITCHYARD_HD bool present(const V& v) {
  return v.data_handle() != nullptr || v.size() != 0;
}
}  // namespace detail

//! Number of elements a view spans (product of its extents); throws range_error naming
//! `argument` when the product does not fit in index_t.
template <class V>
index_t element_count(const V& v, std::string_view argument = "view") {
  index_t n = 1;
  for (std::size_t r = 0; r < V::rank(); ++r) n = detail::checked_mul(argument, n, v.extent(r));
  return n;
}

namespace detail {
//! The bytes a view can touch, [begin, end) as addresses (begin == end: none, e.g. an empty
//! view): from its pointer to its last element, Σ_r (extent_r − 1)·stride_r elements on
//! (strides >= 0). Saturates at the top of the address space instead of wrapping.
struct byte_range {
  std::uintptr_t begin = 0, end = 0;
  [[nodiscard]] bool empty() const { return begin == end; }
  //! Whether the two ranges share a byte.
  [[nodiscard]] bool overlaps(const byte_range& o) const {
    return !empty() && !o.empty() && begin < o.end && o.begin < end;
  }
};

template <class V>
byte_range bytes_of(const V& v) {
  using element = typename V::element_type;
  if (v.data_handle() == nullptr) return {};
  const auto top = std::numeric_limits<std::uintptr_t>::max();
  std::uintptr_t last = 0;  // offset of the last element, in elements (saturating)
  bool saturated = false;
  for (std::size_t r = 0; r < V::rank(); ++r) {
    if (v.extent(r) <= 0) return {};
    std::uintptr_t term = 0;
    saturated = saturated ||
                __builtin_mul_overflow(static_cast<std::uintptr_t>(v.extent(r) - 1),
                                       static_cast<std::uintptr_t>(v.stride(r) < 0 ? 0 : v.stride(r)),
                                       &term) ||
                __builtin_add_overflow(last, term, &last);
  }
  const auto begin = reinterpret_cast<std::uintptr_t>(v.data_handle());
  std::uintptr_t end = 0;
  saturated = saturated || __builtin_add_overflow(last, std::uintptr_t{1}, &last) ||
              __builtin_mul_overflow(last, sizeof(element), &last) ||
              __builtin_add_overflow(begin, last, &end);
  return {begin, saturated ? top : end};
}

//! Bytes of a contiguous span.
template <class T, std::size_t X>
byte_range bytes_of(const ::cuda::std::span<T, X>& s) {
  if (s.data() == nullptr || s.empty()) return {};
  const auto begin = reinterpret_cast<std::uintptr_t>(s.data());
  return {begin, begin + s.size() * sizeof(T)};
}

//! Throws aliasing_error naming `output` and `other` when their byte ranges overlap (a
//! cheap address test: two strided views whose ranges interleave without sharing an element
//! are reported too; pass disjoint memory).
inline void require_disjoint(std::string_view output, const byte_range& out,
                             std::string_view other, const byte_range& in) {
  if (out.overlaps(in)) {
    throw aliasing_error(std::string(output), std::string(other),
                         concat(output, " overlaps ", other, " in memory (", output, ": [0x",
                                std::hex, out.begin, ", 0x", out.end, "), ", other, ": [0x",
                                in.begin, ", 0x", in.end,
                                ")); outputs must not share memory with inputs or with each "
                                "other (docs/errors.md, aliasing)"));
  }
}
}  // namespace detail

//! True when the view is row-major contiguous (stride of the last dim 1, and so on).
template <class V>
bool is_row_major_contiguous(const V& v) {
  index_t expected = 1;
  for (std::size_t r = V::rank(); r-- > 0;) {
    if (v.extent(r) > 1 && v.stride(r) != expected) return false;
    expected *= v.extent(r);
  }
  return true;
}

//! Validates a view argument: a non-null pointer unless empty and, per dimension, the
//! expected extent (a negative expected extent means "any").
template <class V>
void check_view(std::string_view argument, const V& v,
                const ::cuda::std::array<index_t, V::rank()>& expected,
                std::string_view meaning = {}) {
  detail::require_data(argument, v.data_handle(), element_count(v, argument));
  for (std::size_t r = 0; r < V::rank(); ++r) {
    if (expected[r] >= 0 && v.extent(r) != expected[r]) {
      std::ostringstream want, got;
      want << '[';
      got << '[';
      for (std::size_t q = 0; q < V::rank(); ++q) {
        want << (q ? ", " : "");
        if (expected[q] >= 0) want << expected[q];
        else want << '*';
        got << (q ? ", " : "") << v.extent(q);
      }
      want << ']';
      got << ']';
      throw shape_error(std::string(argument),
                        detail::concat(argument, ": expected shape ", want.str(),
                                       meaning.empty() ? "" : " ", meaning, ", got ", got.str()));
    }
  }
}

}  // namespace switchyard
