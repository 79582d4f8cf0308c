// A packaging consumer: includes Switchyard the way its route (CMake file next to it) provides,
// routes a known batch and exits non-zero when the plan is wrong.
#include "route_check.hpp"

#ifndef SWITCHYARD_ROUTE
#  define SWITCHYARD_ROUTE "unknown route"
#endif

#ifdef SWITCHYARD_EXPECT_NO_CUDA
// The host headers must not drag in the CUDA runtime, cuBLAS or the driver API.
#  if defined(__CUDA_RUNTIME_H__) || defined(__CUDA_RUNTIME_API_H__) || defined(CUBLAS_V2_H_) || \
      defined(__cuda_cuda_h__) || defined(__CUDACC__)
#    error "switchyard's host headers included a CUDA runtime/cuBLAS header"
#  endif
#endif

int main() { return packaging_check::route_and_check(SWITCHYARD_ROUTE) == 0 ? 0 : 1; }
