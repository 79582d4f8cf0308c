// The device routing kernels run the same __host__ __device__ softmax and selection rules as
// the host backend: on fresh random logits the plans must match the host's (ids and counts
// exactly; weights to the last-ulp differences of expf/logf between host and device libm).
#include <boost/test/unit_test.hpp>

#include <switchyard/backend/cuda/route.cuh>
#include <switchyard/routing/linear_softmax.hpp>
#include <switchyard/routing/selection/adaptive.hpp>
#include <switchyard/routing/selection/topany.hpp>
#include <switchyard/routing/selection/topk.hpp>
#include <switchyard/routing/selection/topp.hpp>

#include <cmath>
#include <random>
#include <vector>

#include "support/random.hpp"

static_assert(__cplusplus >= 202002L, "CUDA translation units must be compiled as C++20");

namespace sy = switchyard;

namespace {

template <class T>
struct device_buffer {
  T* p = nullptr;
  std::size_t n = 0;
  explicit device_buffer(std::size_t count) : n(count) {
    sy::cuda::check(cudaMalloc(&p, (n ? n : 1) * sizeof(T)), "cudaMalloc");
    sy::cuda::check(cudaMemset(p, 0xff, (n ? n : 1) * sizeof(T)), "cudaMemset(poison)");
  }
  explicit device_buffer(const std::vector<T>& host) : device_buffer(host.size()) {
    sy::cuda::check(cudaMemcpy(p, host.data(), n * sizeof(T), cudaMemcpyHostToDevice), "upload");
  }
  std::vector<T> download() const {
    std::vector<T> h(n);
    sy::cuda::check(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost), "download");
    return h;
  }
  ~device_buffer() { cudaFree(p); }
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;
};

void check_close(const std::vector<float>& got, const std::vector<float>& want) {
  BOOST_TEST_REQUIRE(got.size() == want.size());
  for (std::size_t i = 0; i < got.size(); ++i)
    BOOST_TEST(std::abs(got[i] - want[i]) <= 1e-6f + 1e-5f * std::abs(want[i]), "i=" << i);
}

// Softmax + rule on device vs host. Host probabilities are computed by the same shared
// function; the rule then runs on the *device's* probabilities on the host as well, so a
// last-ulp softmax difference cannot flip a top-p threshold decision between the two.
template <class Rule>
void softmax_rule_matches_host(const Rule& rule, int tokens, int experts, std::uint64_t seed) {
  std::mt19937_64 g(seed);
  const auto logits = sy::test::normal(g, static_cast<std::size_t>(tokens) * experts, 2.0f);
  const int width = rule.width(experts);

  device_buffer<float> d_logits(logits), d_probs(logits.size()),
      d_weights(static_cast<std::size_t>(tokens) * width);
  device_buffer<std::int32_t> d_ids(static_cast<std::size_t>(tokens) * width), d_counts(tokens);
  sy::cuda::softmax_select(rule, d_logits.p, d_probs.p, d_ids.p, d_weights.p, d_counts.p, tokens,
                           experts, nullptr);
  sy::cuda::check(cudaDeviceSynchronize(), "softmax_select");
  const auto probs = d_probs.download();

  sy::routing::routing_plan host;
  host.resize(tokens, width, experts);
  for (int t = 0; t < tokens; ++t)
    sy::routing::softmax(::cuda::std::span<const float>(logits.data() + t * experts, experts),
                         ::cuda::std::span<float>(host.probs.data() + t * experts, experts));
  check_close(probs, host.probs);
  host.probs = probs;
  sy::routing::select_all(rule, host);

  const auto ids = d_ids.download();
  const auto counts = d_counts.download();
  BOOST_TEST(ids == host.expert_ids, boost::test_tools::per_element());
  BOOST_TEST(counts == host.counts, boost::test_tools::per_element());
  check_close(d_weights.download(), host.weights);
}

}  // namespace

BOOST_AUTO_TEST_CASE(topk_matches_host) {
  const auto seed = sy::test::base_seed();
  for (int k : {1, 2, 4}) {
    BOOST_TEST_CONTEXT("k=" << k) {
      softmax_rule_matches_host(sy::routing::topk_rule{k, true}, 1000, 16, seed + k);
      softmax_rule_matches_host(sy::routing::topk_rule{k, false}, 333, 64, seed + 10 + k);
    }
  }
}

BOOST_AUTO_TEST_CASE(topp_matches_host) {
  const auto seed = sy::test::base_seed() + 100;
  softmax_rule_matches_host(sy::routing::topp_rule{.p = 0.4f}, 777, 8, seed);
  softmax_rule_matches_host(sy::routing::topp_rule{.p = 0.9f, .max_k = 3}, 500, 16, seed + 1);
  softmax_rule_matches_host(sy::routing::topp_rule{.p = 1.0f}, 64, 32, seed + 2);
}

BOOST_AUTO_TEST_CASE(adaptive_matches_host) {
  const auto seed = sy::test::base_seed() + 200;
  softmax_rule_matches_host(sy::routing::adaptive_rule{.threshold = 0.1f, .renormalize = true},
                            900, 16, seed);
  softmax_rule_matches_host(sy::routing::adaptive_rule{.threshold = 0.3f, .renormalize = false},
                            300, 4, seed + 1);
}

BOOST_AUTO_TEST_CASE(topany_matches_host) {
  // Scores in (0, 1) with a mask; thresholds live in device memory for the kernel.
  const int tokens = 513, experts = 8;
  std::mt19937_64 g(sy::test::base_seed() + 300);
  auto scores = sy::test::uniform(g, static_cast<std::size_t>(tokens) * experts, 0.05f, 0.95f);
  const auto theta = sy::test::uniform(g, experts, 0.3f, 0.7f);
  const std::vector<std::int32_t> mask{1, 1, 0, 1, 1, 1, 0, 1};
  for (int t = 0; t < tokens; ++t)
    for (int e = 0; e < experts; ++e) scores[t * experts + e] *= static_cast<float>(mask[e]);
  device_buffer<float> d_scores(scores), d_theta(theta),
      d_weights(static_cast<std::size_t>(tokens) * experts);
  device_buffer<std::int32_t> d_mask(mask), d_ids(static_cast<std::size_t>(tokens) * experts),
      d_counts(tokens);
  for (bool training : {true, false}) {
    BOOST_TEST_CONTEXT("training=" << training) {
      const sy::routing::topany_rule host_rule{.thresholds = {theta.data(), theta.size()},
                                               .experts_mask = {mask.data(), mask.size()},
                                               .training = training};
      const sy::routing::topany_rule device_rule{.thresholds = {d_theta.p, theta.size()},
                                                 .experts_mask = {d_mask.p, mask.size()},
                                                 .training = training};
      sy::cuda::select(device_rule, d_scores.p, d_ids.p, d_weights.p, d_counts.p, tokens, experts,
                       nullptr);
      sy::cuda::check(cudaDeviceSynchronize(), "select");
      sy::routing::routing_plan host;
      host.resize(tokens, experts, experts);
      host.probs = scores;
      sy::routing::select_all(host_rule, host);
      BOOST_TEST(d_ids.download() == host.expert_ids, boost::test_tools::per_element());
      BOOST_TEST(d_counts.download() == host.counts, boost::test_tools::per_element());
      // Uniform 1/k weights: the same float division on both sides.
      BOOST_TEST(d_weights.download() == host.weights, boost::test_tools::per_element());
    }
  }
}

BOOST_AUTO_TEST_CASE(empty_batch_launches_nothing) {
  sy::cuda::softmax_select(sy::routing::topk_rule{2, true}, nullptr, nullptr, nullptr, nullptr,
                           nullptr, 0, 8, nullptr);
  sy::cuda::select(sy::routing::topk_rule{2, true}, nullptr, nullptr, nullptr, nullptr, 0, 8,
                   nullptr);
  BOOST_TEST(cudaGetLastError() == cudaSuccess);
}
