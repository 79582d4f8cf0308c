// SPDX-License-Identifier: Apache-2.0
// CUDA packaging consumer: routes the known batch on the host (routers::TopK) and on the device
// (switchyard::cuda::softmax_select with the router's own rule), and checks both.
// Exits 77 (CTest: Skipped) when there is no CUDA device.
#include <switchyard/backend/cuda/route.cuh>

#include "route_check.hpp"

#include <cstdio>
#include <vector>

static_assert(__cplusplus >= 202002L, "switchyard::cuda must compile CUDA as C++20");

int main() {
  namespace sy = switchyard;
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("SKIPPED: no CUDA device\n");
    return 77;
  }
  if (packaging_check::route_and_check("find_package COMPONENTS cuda (host)") != 0) return 1;

  constexpr int tokens = 4, experts = 4, k = 2;
  const std::vector<float> logits = {4, 0, 3, 1, 0, 5, 1, 2, 1, 2, 3, 4, 2, 2, 0, 0};
  const std::vector<int> expected = {0, 2, 1, 3, 3, 2, 0, 1};
  const sy::routers::TopK router{.k = k, .renormalize = true};
  float *d_logits = nullptr, *d_probs = nullptr, *d_weights = nullptr;
  std::int32_t *d_ids = nullptr, *d_counts = nullptr;
  sy::cuda::check(cudaMalloc(&d_logits, sizeof(float) * logits.size()), "cudaMalloc");
  sy::cuda::check(cudaMalloc(&d_probs, sizeof(float) * logits.size()), "cudaMalloc");
  sy::cuda::check(cudaMalloc(&d_weights, sizeof(float) * tokens * k), "cudaMalloc");
  sy::cuda::check(cudaMalloc(&d_ids, sizeof(std::int32_t) * tokens * k), "cudaMalloc");
  sy::cuda::check(cudaMalloc(&d_counts, sizeof(std::int32_t) * tokens), "cudaMalloc");
  sy::cuda::check(cudaMemcpy(d_logits, logits.data(), sizeof(float) * logits.size(),
                             cudaMemcpyHostToDevice), "cudaMemcpy");
  sy::cuda::softmax_select(router.rule(), d_logits, d_probs, d_ids, d_weights, d_counts, tokens,
                           experts, nullptr);
  std::vector<std::int32_t> ids(tokens * k);
  sy::cuda::check(cudaMemcpy(ids.data(), d_ids, sizeof(std::int32_t) * ids.size(),
                             cudaMemcpyDeviceToHost), "cudaMemcpy");
  int errors = 0;
  for (int i = 0; i < tokens * k; ++i) errors += ids[i] == expected[i] ? 0 : 1;
  std::printf("device routing %s\n", errors == 0 ? "OK" : "WRONG");
  cudaFree(d_logits); cudaFree(d_probs); cudaFree(d_weights); cudaFree(d_ids); cudaFree(d_counts);
  return errors == 0 ? 0 : 1;
}
