// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file parallel.hpp
//! `parallel_for`: an OpenMP loop that no exception escapes. Each body runs inside a try; the
//! exception of the lowest failing index is rethrown on the calling thread after the region
//! (so which error a caller sees does not depend on the thread count either).
//! `parallel_for_slots`: the same loop on at most `slots` threads, each body told which of the
//! `slots` scratch slots (e.g. a conversion panel carved from a workspace) is its thread's.

#include <algorithm>
#include <exception>

#include "switchyard/core/config.hpp"

#if defined(_OPENMP)
#  include <omp.h>
#endif

namespace switchyard::detail {

//! Whether more than one OpenMP thread would run a parallel region started here.
inline bool openmp_parallel_available() {
#if defined(_OPENMP)
  return omp_get_max_threads() > 1 && !omp_in_parallel();
#else
  return false;
#endif
}

//! Runs body(i) for i in [0, n): on OpenMP threads (dynamic schedule, one index at a time)
//! when `parallel`, else in increasing i. Rethrows the exception of the lowest failing i.
template <class Body>
void parallel_for(index_t n, bool parallel, Body&& body) {
  std::exception_ptr error;
  index_t error_index = n;
  if (!parallel || n <= 1) {
    for (index_t i = 0; i < n; ++i) body(i);
    return;
  }
#pragma omp parallel for schedule(dynamic, 1)
  for (index_t i = 0; i < n; ++i) {
    try {
      body(i);
    } catch (...) {
#pragma omp critical(switchyard_parallel_for_error)
      {
        if (i < error_index) {
          error_index = i;
          error = std::current_exception();
        }
      }
    }
  }
  if (error) std::rethrow_exception(error);
}

//! Runs body(i, slot) for i in [0, n) with slot in [0, slots): on at most `slots` OpenMP
//! threads (dynamic schedule, one index at a time; slot = the thread's number, so no two
//! bodies running at once share a slot) when `parallel`, else in increasing i with slot 0.
//! Rethrows the exception of the lowest failing i. Which slot an index gets may vary between
//! runs: a body must give the same result in any slot.
template <class Body>
void parallel_for_slots(index_t n, index_t slots, bool parallel, Body&& body) {
  if (!parallel || n <= 1 || slots <= 1) {
    for (index_t i = 0; i < n; ++i) body(i, index_t{0});
    return;
  }
#if defined(_OPENMP)
  std::exception_ptr error;
  index_t error_index = n;
  const int threads = static_cast<int>(
      std::min<index_t>({slots, n, static_cast<index_t>(omp_get_max_threads())}));
#  pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (index_t i = 0; i < n; ++i) {
    try {
      body(i, static_cast<index_t>(omp_get_thread_num()));
    } catch (...) {
#  pragma omp critical(switchyard_parallel_for_error)
      {
        if (i < error_index) {
          error_index = i;
          error = std::current_exception();
        }
      }
    }
  }
  if (error) std::rethrow_exception(error);
#else
  for (index_t i = 0; i < n; ++i) body(i, index_t{0});
#endif
}

}  // namespace switchyard::detail
