// Main of every GPU test executable: with no usable CUDA device it prints why and exits 77,
// which CTest maps to "Skipped" (SKIP_RETURN_CODE), never "Passed".
#include <boost/test/unit_test.hpp>

#include <cuda_runtime_api.h>

#include <cstdio>

static_assert(__cplusplus >= 202002L, "CUDA translation units must be compiled as C++20");

namespace {
bool init_suite() { return true; }
}  // namespace

int main(int argc, char* argv[]) {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess || count == 0) {
    std::printf("SKIPPED: no CUDA device (%s)\n",
                status != cudaSuccess ? cudaGetErrorString(status) : "device count is 0");
    return 77;
  }
  return boost::unit_test::unit_test_main(&init_suite, argc, argv);
}
