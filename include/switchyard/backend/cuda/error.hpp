// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file error.hpp
//! The one place CUDA runtime and cuBLAS statuses are checked: every call goes through
//! `check(status, "what")`, which throws switchyard::cuda_error naming the call, the status
//! and where it was made.

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <source_location>
#include <string>

#include "switchyard/core/error.hpp"

namespace switchyard::detail {
inline std::string where(const std::source_location& loc) {
  return detail::concat(loc.file_name(), ":", loc.line());
}
}  // namespace switchyard::detail

namespace switchyard::cuda {

//! Throws cuda_error unless `status == cudaSuccess`.
inline void check(cudaError_t status, const char* what,
                  std::source_location loc = std::source_location::current()) {
  if (status != cudaSuccess) {
    throw cuda_error(static_cast<int>(status),
                     detail::concat(what, " failed: ", cudaGetErrorName(status), " (",
                                                  cudaGetErrorString(status), ") at ",
                                                  detail::where(loc)));
  }
}

//! Throws cuda_error unless `status == CUBLAS_STATUS_SUCCESS`.
inline void check(cublasStatus_t status, const char* what,
                  std::source_location loc = std::source_location::current()) {
  if (status != CUBLAS_STATUS_SUCCESS) {
    throw cuda_error(static_cast<int>(status),
                     detail::concat(what, " failed: ", cublasGetStatusName(status),
                                                  " (", cublasGetStatusString(status), ") at ",
                                                  detail::where(loc)));
  }
}

//! Checks the launch that just happened (configuration errors) without synchronising.
inline void check_launch(const char* kernel,
                         std::source_location loc = std::source_location::current()) {
  check(cudaGetLastError(), kernel, loc);
}

}  // namespace switchyard::cuda
