// SPDX-License-Identifier: Apache-2.0
// Main of every GPU test executable. Without a GPU it prints why and exits 77, which CTest
// maps to "Skipped" (SKIP_RETURN_CODE), never "Passed". Only two answers of
// cudaGetDeviceCount mean "this machine has no GPU": cudaErrorNoDevice (a driver, no device;
// also a count of 0) and cudaErrorInsufficientDriver (no driver at all, or one older than
// the runtime: what CUDA 13's runtime reports on a machine without libcuda). Any other error
// (a broken driver, cudaErrorInitializationError, the stub libcuda found before the real one,
// ...) is a misconfigured GPU machine and fails the test with the error's name and string.
//
// SWITCHYARD_CUDA_TEST_MAIN_STATUS=<cudaError_t value> replaces the status cudaGetDeviceCount
// returned, so that CTest can check this decision without a GPU (tests/cuda/CMakeLists.txt).
#include <boost/test/unit_test.hpp>

#include <cuda_runtime_api.h>

#include <cstdio>
#include <cstdlib>

static_assert(__cplusplus >= 202002L, "CUDA translation units must be compiled as C++20");

namespace {
bool init_suite() { return true; }

//! True for the statuses that mean "no GPU on this machine" (skip); every other error fails.
bool means_no_gpu(cudaError_t status) {
  return status == cudaErrorNoDevice || status == cudaErrorInsufficientDriver;
}
}  // namespace

int main(int argc, char* argv[]) {
  int count = 0;
  cudaError_t status = cudaGetDeviceCount(&count);
  if (const char* forced = std::getenv("SWITCHYARD_CUDA_TEST_MAIN_STATUS")) {
    status = static_cast<cudaError_t>(std::atoi(forced));
    if (status != cudaSuccess) count = 0;
    std::printf("SWITCHYARD_CUDA_TEST_MAIN_STATUS: cudaGetDeviceCount status replaced by %d\n",
                static_cast<int>(status));
  }
  if (status == cudaSuccess && count == 0) {
    std::printf("SKIPPED: no CUDA device (device count is 0)\n");
    return 77;
  }
  if (status != cudaSuccess) {
    if (means_no_gpu(status)) {
      std::printf("SKIPPED: no CUDA device (%s: %s)\n", cudaGetErrorName(status),
                  cudaGetErrorString(status));
      return 77;
    }
    std::fprintf(stderr,
                 "FAILED: cudaGetDeviceCount returned %s (%d): %s. Only cudaErrorNoDevice and "
                 "cudaErrorInsufficientDriver mean 'no GPU' and skip; this error means the GPU "
                 "or its driver is misconfigured.\n",
                 cudaGetErrorName(status), static_cast<int>(status), cudaGetErrorString(status));
    return 1;
  }
  return boost::unit_test::unit_test_main(&init_suite, argc, argv);
}
