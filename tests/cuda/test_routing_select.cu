// The device routing kernel runs the same __host__ __device__ softmax and selection rule as
// the host backend: the plans must be bitwise equal on fresh random logits.
#include <boost/test/unit_test.hpp>

#include <switchyard/backend/cuda/route.cuh>
#include <switchyard/routing/linear_softmax.hpp>
#include <switchyard/routing/selection/topk.hpp>

#include <cstring>
#include <random>
#include <vector>

#include "support/random.hpp"

static_assert(__cplusplus >= 202002L, "CUDA translation units must be compiled as C++20");

namespace sy = switchyard;

namespace {

template <class T>
struct device_buffer {
  T* p = nullptr;
  explicit device_buffer(std::size_t n) {
    sy::cuda::check(cudaMalloc(&p, n * sizeof(T)), "cudaMalloc");
    sy::cuda::check(cudaMemset(p, 0xff, n * sizeof(T)), "cudaMemset(poison)");
  }
  ~device_buffer() { cudaFree(p); }
};

template <class Rule>
void compare_with_host(const Rule& rule, int tokens, int experts, std::uint64_t seed) {
  std::mt19937_64 g(seed);
  const auto logits = sy::test::normal(g, static_cast<std::size_t>(tokens) * experts, 2.0f);
  const int width = rule.width(experts);

  sy::routing::routing_plan host;
  host.resize(tokens, width, experts);
  host.logits = logits;
  for (int t = 0; t < tokens; ++t)
    sy::routing::softmax(::cuda::std::span<const float>(logits.data() + t * experts, experts),
                         ::cuda::std::span<float>(host.probs.data() + t * experts, experts));
  sy::routing::select_all(rule, host);

  device_buffer<float> d_logits(logits.size()), d_probs(logits.size()),
      d_weights(static_cast<std::size_t>(tokens) * width);
  device_buffer<std::int32_t> d_ids(static_cast<std::size_t>(tokens) * width), d_counts(tokens);
  sy::cuda::check(cudaMemcpy(d_logits.p, logits.data(), logits.size() * 4, cudaMemcpyHostToDevice),
                  "cudaMemcpy(logits)");
  sy::cuda::softmax_select(rule, d_logits.p, d_probs.p, d_ids.p, d_weights.p, d_counts.p, tokens,
                           experts, nullptr);
  sy::cuda::check(cudaDeviceSynchronize(), "softmax_select");

  std::vector<float> probs(logits.size()), weights(host.weights.size());
  std::vector<std::int32_t> ids(host.expert_ids.size()), counts(tokens);
  sy::cuda::check(cudaMemcpy(probs.data(), d_probs.p, probs.size() * 4, cudaMemcpyDeviceToHost), "copy");
  sy::cuda::check(cudaMemcpy(weights.data(), d_weights.p, weights.size() * 4, cudaMemcpyDeviceToHost), "copy");
  sy::cuda::check(cudaMemcpy(ids.data(), d_ids.p, ids.size() * 4, cudaMemcpyDeviceToHost), "copy");
  sy::cuda::check(cudaMemcpy(counts.data(), d_counts.p, counts.size() * 4, cudaMemcpyDeviceToHost), "copy");

  BOOST_TEST(ids == host.expert_ids);
  BOOST_TEST(counts == host.counts);
  // softmax uses expf/logf: device and host libm may differ in the last ulp.
  for (std::size_t i = 0; i < probs.size(); ++i)
    BOOST_TEST(std::abs(probs[i] - host.probs[i]) <= 1e-6f + 1e-5f * host.probs[i]);
  for (std::size_t i = 0; i < weights.size(); ++i)
    BOOST_TEST(std::abs(weights[i] - host.weights[i]) <= 1e-6f + 1e-5f * host.weights[i]);
}

}  // namespace

BOOST_AUTO_TEST_CASE(topk_softmax_matches_host) {
  const auto seed = sy::test::base_seed();
  for (int k : {1, 2, 4}) {
    BOOST_TEST_CONTEXT("k=" << k) {
      compare_with_host(sy::routing::topk_rule{k, true}, 1000, 16, seed + k);
      compare_with_host(sy::routing::topk_rule{k, false}, 333, 64, seed + 10 + k);
    }
  }
}

BOOST_AUTO_TEST_CASE(empty_batch_launches_nothing) {
  sy::cuda::softmax_select(sy::routing::topk_rule{2, true}, nullptr, nullptr, nullptr, nullptr,
                           nullptr, 0, 8, nullptr);
  BOOST_TEST(cudaGetLastError() == cudaSuccess);
}
