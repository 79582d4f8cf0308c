// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file view.hpp
//! Non-owning views over caller memory: `::cuda::std::mdspan` (libcu++, header-only, usable
//! from g++ and nvcc alike) with 64-bit extents and a strided layout, so sub-views and
//! transposed storage are views too.

#include <cuda/std/array>
#include <cuda/std/mdspan>
#include <cuda/std/span>

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

//! Number of elements a view spans (product of its extents).
template <class V>
index_t element_count(const V& v) {
  index_t n = 1;
  for (std::size_t r = 0; r < V::rank(); ++r) n *= v.extent(r);
  return n;
}

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
  detail::require_data(argument, v.data_handle(), element_count(v));
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
