// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file run_ops.hpp
//! How the host backend runs the backend-neutral functors of `switchyard/ops/`: `f(i)` for
//! every index, in increasing order on the calling thread, or over OpenMP threads with a
//! static schedule (each index writes its own outputs, so the bits do not depend on the
//! threads). A CUDA backend runs the same functors with `cub::DeviceFor::Bulk`.

#include "switchyard/core/config.hpp"

namespace switchyard::host {}  // (declared for the using-directive below)

namespace switchyard::detail {
using namespace ::switchyard::host;  // this block's helpers use switchyard::host's names

//! f(i) for i in [begin, end), in order, on the calling thread.
template <class F>
void run_range(index_t begin, index_t end, const F& f) {
  for (index_t i = begin; i < end; ++i) f(i);
}

//! f(i) for i in [0, n) on OpenMP threads (static schedule) when `parallel`, else in order.
template <class F>
void run_static(index_t n, bool parallel, const F& f) {
  static_cast<void>(parallel);  // read by the pragma only (unused without OpenMP)
#pragma omp parallel for schedule(static) if (parallel)
  for (index_t i = 0; i < n; ++i) f(i);
}

}  // namespace switchyard::detail
