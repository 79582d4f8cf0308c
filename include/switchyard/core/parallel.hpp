#pragma once
//! \file parallel.hpp
//! `parallel_for`: an OpenMP loop that no exception escapes. Each body runs inside a try; the
//! exception of the lowest failing index is rethrown on the calling thread after the region
//! (so which error a caller sees does not depend on the thread count either).

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

}  // namespace switchyard::detail
