// SPDX-License-Identifier: Apache-2.0
// A packaging consumer: includes Switchyard the way its route (CMake file next to it) provides,
// routes a known batch and exits non-zero when the plan is wrong.
// Consumers linking switchyard::host_blas also define what that target must have brought:
//   SWITCHYARD_EXPECT_CBLAS   SWITCHYARD_HAS_CBLAS, a reachable <cblas.h> and a linked sgemm
//   SWITCHYARD_EXPECT_OPENMP  -fopenmp (or the compiler's flag) and a linked OpenMP runtime
#include "route_check.hpp"

#include <cstdio>

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

#ifdef SWITCHYARD_EXPECT_CBLAS
#  ifndef SWITCHYARD_HAS_CBLAS
#    error "switchyard::host_blas did not define SWITCHYARD_HAS_CBLAS although the build found a CBLAS"
#  endif
#  if !__has_include(<cblas.h>)
#    error "switchyard::host_blas defines SWITCHYARD_HAS_CBLAS but <cblas.h> is not reachable"
#  endif
#  include <cblas.h>
#endif

#ifdef SWITCHYARD_EXPECT_OPENMP
#  ifndef _OPENMP
#    error "switchyard::host_blas did not enable OpenMP although the build found it"
#  endif
#  include <omp.h>
#endif

#if __has_include(<switchyard/backend/host/gemm.hpp>)
#  include <switchyard/backend/host/gemm.hpp>
#  define SWITCHYARD_CONSUMER_GEMM_NAME switchyard::host::gemm_backend_name()
#else
#  define SWITCHYARD_CONSUMER_GEMM_NAME "(gemm.hpp moved)"
#endif

int main() {
  int errors = packaging_check::route_and_check(SWITCHYARD_ROUTE);
#ifdef SWITCHYARD_EXPECT_CBLAS
  // The BLAS really is linked: [1 2] · [3 4]ᵀ = 11.
  const float a[2] = {1, 2}, b[2] = {3, 4};
  float c = 0;
#  ifdef SWITCHYARD_BLAS_SCIPY_OPENBLAS  // scipy-openblas32: every symbol prefixed scipy_
  scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, 1, 1, 2, 1.0f, a, 2, b, 2, 0.0f, &c, 1);
#  else
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, 1, 1, 2, 1.0f, a, 2, b, 2, 0.0f, &c, 1);
#  endif
  std::printf("switchyard::host_blas: SWITCHYARD_HAS_CBLAS, %s -> %g (host GEMM: %s)\n",
#  ifdef SWITCHYARD_BLAS_SCIPY_OPENBLAS
              "scipy_cblas_sgemm",
#  else
              "cblas_sgemm",
#  endif
              static_cast<double>(c), SWITCHYARD_CONSUMER_GEMM_NAME);
  errors += c == 11.0f ? 0 : 1;
#endif
#ifdef SWITCHYARD_EXPECT_OPENMP
  std::printf("switchyard::host_blas: OpenMP %d, %d threads\n", _OPENMP, omp_get_max_threads());
  errors += omp_get_max_threads() >= 1 ? 0 : 1;
#endif
  return errors == 0 ? 0 : 1;
}
