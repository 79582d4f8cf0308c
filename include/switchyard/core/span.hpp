// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file span.hpp
//! The one span of the library: libcu++'s `cuda::std::span` (header-only, the same type in
//! host and device code), as `switchyard::span`.

#include <cuda/std/span>

namespace switchyard {

//! A contiguous view of `T` (host or device memory).
template <class T>
using span = ::cuda::std::span<T>;

}  // namespace switchyard
