// SPDX-License-Identifier: Apache-2.0
// The device routing kernels run the same __host__ __device__ softmax and selection rules as
// the host backend: on fresh random logits the plans must match the host's (ids and counts
// exactly; weights to the last-ulp differences of expf/logf between host and device libm).
// Then the whole device route of every composed router (cuda::router_forward/backward: cuBLAS
// or kernel logits, per-token rules with DA-MoE's importance on the device, loss terms,
// d_logits, dx and the weight gradient) against host::route / host::route_backward, run to run
// bitwise, with a non-finite logit recorded in the status word.
#include <boost/test/unit_test.hpp>

#include <switchyard/backend/cuda/context.hpp>
#include <switchyard/backend/cuda/route.cuh>
#include <switchyard/backend/cuda/router.cuh>
#include <switchyard/backend/cuda/status.hpp>
#include <switchyard/backend/host/route.hpp>
#include <switchyard/routing/linear_softmax.hpp>
#include <switchyard/routing/routers/adaptive_gating.hpp>
#include <switchyard/routing/routers/da_moe.hpp>
#include <switchyard/routing/routers/topk.hpp>
#include <switchyard/routing/routers/topp.hpp>
#include <switchyard/routing/selection/adaptive.hpp>
#include <switchyard/routing/selection/topany.hpp>
#include <switchyard/routing/selection/topk.hpp>
#include <switchyard/routing/selection/topp.hpp>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "support/random.hpp"
#include "support/router_testbed.hpp"

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
  softmax_rule_matches_host(sy::routing::adaptive_rule{.threshold = 0.1f, .renormalize = true}, 900,
                            16, seed);
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

// ---- the device route of composed routers ----------------------------------------------------

namespace {

using sy::index_t;

//! |got - want| <= atol + rtol·|want| element by element.
void check_near(const std::vector<float>& got, const std::vector<float>& want, double atol,
                double rtol, const std::string& what) {
  BOOST_TEST_REQUIRE(got.size() == want.size(), what);
  std::size_t bad = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (std::abs(double(got[i]) - want[i]) <= atol + rtol * std::abs(double(want[i]))) continue;
    if (++bad <= 5) BOOST_ERROR(what << "[" << i << "]: got " << got[i] << ", want " << want[i]);
  }
  BOOST_TEST(bad == 0u, what << ": " << bad << " elements out of tolerance");
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

template <class Losses>
std::vector<float> loss_fields(const Losses& l) {
  std::vector<float> v(sizeof(Losses) / sizeof(float));
  std::memcpy(v.data(), static_cast<const void*>(&l), sizeof(Losses));
  return v;
}

//! The forward's outputs, downloaded.
template <class R>
struct route_outputs {
  sy::routing::routing_plan plan;
  typename R::losses_type losses{};
  sy::cuda::device_status status{};
};

//! A router problem on the device: x stored as T (optionally with a padded row stride: the
//! logits then take the kernel path), w, attention and importance.
template <class T>
struct device_problem {
  const sy::test::router_problem& p;
  index_t ld_x;
  std::vector<T> x_host;  // [T, ld_x]
  device_buffer<T> x;
  device_buffer<float> w, attention, importance;
  std::vector<float> importance_host;

  device_problem(const sy::test::router_problem& prob, index_t pad)
      : p(prob),
        ld_x(prob.d + pad),
        x_host(make_x(prob, pad)),
        x(x_host),
        w(prob.w),
        attention(prob.attn.empty() ? std::vector<float>{0.0f} : prob.attn),
        importance(make_importance(prob)),
        importance_host(make_importance(prob)) {}

  static std::vector<T> make_x(const sy::test::router_problem& prob, index_t pad) {
    std::vector<T> v(static_cast<std::size_t>(prob.tokens * (prob.d + pad)), T(0.5f));
    for (int t = 0; t < prob.tokens; ++t)
      for (int i = 0; i < prob.d; ++i) v[t * (prob.d + pad) + i] = T(prob.x[t * prob.d + i]);
    return v;
  }
  static std::vector<float> make_importance(const sy::test::router_problem& prob) {
    std::vector<float> v(static_cast<std::size_t>(prob.tokens));
    for (int t = 0; t < prob.tokens; ++t) v[t] = 0.1f + static_cast<float>((t * 7919) % 13);
    return v;
  }
  sy::matrix_view<const T> x_view(const T* base) const {
    return sy::make_strided_view<const T, 2>(base, {p.tokens, p.d}, {ld_x, 1});
  }
  template <class R>
  typename R::params_type params(bool device) const {
    const auto wv = sy::make_view<const float>(device ? w.p : p.w.data(), p.experts, p.d);
    if constexpr (std::is_same_v<typename R::params_type, sy::routing::da_moe_params>) {
      return {wv,
              sy::make_view<const float>(device ? attention.p : p.attn.data(), p.heads, p.tokens,
                                         p.tokens),
              sy::make_view<const float>(device ? importance.p : importance_host.data(), p.tokens)};
    } else {
      return {wv};
    }
  }
};

template <class R, class T>
route_outputs<R> device_forward(sy::cuda::stream_context& sc, const R& r,
                                const device_problem<T>& dp) {
  const auto p = dp.template params<R>(true);
  const index_t tokens = dp.p.tokens, width = r.width(p), experts = r.num_experts(p);
  device_buffer<std::int32_t> ids(tokens * width), counts(tokens);
  device_buffer<float> weights(tokens * width), logits(tokens * experts), probs(tokens * experts);
  device_buffer<typename R::losses_type> losses(1);
  device_buffer<sy::cuda::device_status> status(1);  // 0xFF: nothing recorded
  const std::size_t bytes = sy::cuda::router_workspace_size(r, tokens, p);
  device_buffer<std::byte> ws(bytes);
  sy::cuda::check(cudaDeviceSynchronize(), "setup");
  const sy::routing::plan_ref plan{tokens,
                                   width,
                                   experts,
                                   {ids.p, ids.n},
                                   {weights.p, weights.n},
                                   {counts.p, counts.n},
                                   {logits.p, logits.n},
                                   {probs.p, probs.n}};
  sy::workspace_arena arena({ws.p, bytes});
  sy::cuda::router_forward(sc.get(), r, dp.x_view(dp.x.p), p, plan, losses.p, status.p, arena);
  sc.synchronize();
  route_outputs<R> out;
  out.plan.resize(tokens, width, experts);
  out.plan.expert_ids = ids.download();
  out.plan.counts = counts.download();
  out.plan.weights = weights.download();
  out.plan.logits = logits.download();
  out.plan.probs = probs.download();
  out.losses = losses.download()[0];
  out.status = status.download()[0];
  return out;
}

//! dx and grads.w of the device backward from (dx0, dw0), on the device plan `plan`.
template <class R, class T>
std::pair<std::vector<float>, std::vector<float>> device_backward(
    sy::cuda::stream_context& sc, const R& r, const device_problem<T>& dp,
    const sy::routing::routing_plan& plan, const std::vector<float>& d_weights,
    const typename R::losses_type& coeff, const std::vector<float>& dx0,
    const std::vector<float>& dw0) {
  const auto p = dp.template params<R>(true);
  const index_t tokens = dp.p.tokens, d = dp.p.d, experts = dp.p.experts;
  device_buffer<std::int32_t> ids(plan.expert_ids), counts(plan.counts);
  device_buffer<float> weights(plan.weights), logits(plan.logits), probs(plan.probs),
      dw_in(d_weights), dx(dx0), dw(dw0);
  const std::size_t bytes = sy::cuda::router_workspace_size(r, tokens, p);
  device_buffer<std::byte> ws(bytes);
  sy::cuda::check(cudaDeviceSynchronize(), "setup");
  const sy::routing::plan_ref ref{tokens,
                                  plan.width,
                                  experts,
                                  {ids.p, ids.n},
                                  {weights.p, weights.n},
                                  {counts.p, counts.n},
                                  {logits.p, logits.n},
                                  {probs.p, probs.n}};
  sy::workspace_arena arena({ws.p, bytes});
  sy::cuda::router_backward(sc.get(), r, dp.x_view(dp.x.p), p, ref, dw_in.p, coeff,
                            sy::make_view(dx.p, tokens, d), {sy::make_view(dw.p, experts, d)},
                            arena);
  sc.synchronize();
  return {dx.download(), dw.download()};
}

//! The device route of `r` against the host's on problem `prob` with tokens stored as T.
template <class T, class R>
void device_route_matches_host(const R& r, const sy::test::router_problem& prob, index_t pad,
                               std::uint64_t seed) {
  sy::cuda::stream_context sc;
  const device_problem<T> dp(prob, pad);
  const auto p_host = dp.template params<R>(false);
  const auto x_host = dp.x_view(dp.x_host.data());
  const index_t tokens = prob.tokens, experts = prob.experts;

  sy::routing::routing_plan host_plan;
  typename R::losses_type host_losses{};
  sy::host::route(r, x_host, p_host, host_plan, host_losses);
  const auto dev = device_forward(sc, r, dp);
  BOOST_TEST(dev.status.ok());
  check_near(dev.plan.logits, host_plan.logits, 1e-5, 1e-5, "logits");
  check_near(dev.plan.probs, host_plan.probs, 1e-6, 1e-5, "probs");
  // The host's rules on the device's probabilities: a last-ulp softmax difference cannot flip
  // a selection between the two sides.
  sy::routing::routing_plan reselected = dev.plan;
  std::vector<std::byte> scratch(sy::host::router_workspace_size(r, tokens, p_host) + 1);
  sy::workspace_arena ws({scratch.data(), scratch.size()});
  const auto rules = sy::routing::token_rules(r, p_host, tokens, ws);
  for (index_t t = 0; t < tokens; ++t) {
    const index_t w = reselected.width;
    reselected.counts[t] = rules.rule(t).select(
        ::cuda::std::span<const float>(reselected.probs.data() + t * experts, experts),
        ::cuda::std::span<std::int32_t>(reselected.expert_ids.data() + t * w, w),
        ::cuda::std::span<float>(reselected.weights.data() + t * w, w));
  }
  BOOST_TEST(dev.plan.expert_ids == reselected.expert_ids, boost::test_tools::per_element());
  BOOST_TEST(dev.plan.counts == reselected.counts, boost::test_tools::per_element());
  check_near(dev.plan.weights, reselected.weights, 1e-7, 1e-6, "weights");
  check_near(loss_fields(dev.losses), loss_fields(host_losses), 1e-6, 1e-5, "losses");
  const auto again = device_forward(sc, r, dp);
  BOOST_TEST(same_bits(again.plan.logits, dev.plan.logits));
  BOOST_TEST(same_bits(again.plan.probs, dev.plan.probs));
  BOOST_TEST(again.plan.expert_ids == dev.plan.expert_ids);
  BOOST_TEST(same_bits(loss_fields(again.losses), loss_fields(dev.losses)));

  std::mt19937_64 g(seed);
  const auto d_weights = sy::test::normal(g, dev.plan.weights.size());
  typename R::losses_type coeff{};
  const auto cv = sy::test::uniform(g, sizeof(coeff) / sizeof(float), 0.1f, 1.0f);
  std::memcpy(static_cast<void*>(&coeff), cv.data(), sizeof(coeff));
  const auto dx0 = sy::test::normal(g, static_cast<std::size_t>(tokens * prob.d));
  const auto dw0 = sy::test::normal(g, static_cast<std::size_t>(experts * prob.d));
  auto dx_host = dx0, dw_host = dw0;
  sy::host::route_backward(r, x_host, p_host, dev.plan, d_weights.data(), coeff,
                           sy::make_view(dx_host.data(), tokens, prob.d),
                           {sy::make_view(dw_host.data(), experts, prob.d)});
  const auto [dx, dw] = device_backward(sc, r, dp, dev.plan, d_weights, coeff, dx0, dw0);
  check_near(dx, dx_host, 1e-4, 1e-4, "dx");
  check_near(dw, dw_host, 1e-4, 1e-4, "grads.w");
  const auto [dx2, dw2] = device_backward(sc, r, dp, dev.plan, d_weights, coeff, dx0, dw0);
  BOOST_TEST(same_bits(dx2, dx));
  BOOST_TEST(same_bits(dw2, dw));
}

template <class T, class R>
void every_storage(const R& r, const sy::test::router_problem& prob, std::uint64_t seed) {
  BOOST_TEST_CONTEXT(sy::element_type_name<T>() << ", contiguous") {
    device_route_matches_host<T>(r, prob, 0, seed);
  }
  BOOST_TEST_CONTEXT(sy::element_type_name<T>() << ", padded rows") {
    device_route_matches_host<T>(r, prob, 5, seed + 1);
  }
}

template <class R>
void every_dtype(const R& r, const sy::test::router_problem& prob, std::uint64_t seed) {
  every_storage<float>(r, prob, seed);
  every_storage<sy::half>(r, prob, seed + 10);
  every_storage<sy::bfloat16>(r, prob, seed + 20);
}

}  // namespace

BOOST_AUTO_TEST_CASE(device_route_topk_matches_host) {
  const sy::test::router_problem prob({300, 32, 16, 0}, sy::test::base_seed() + 400);
  every_dtype(sy::routers::TopK{.k = 2, .renormalize = true}, prob, 401);
  every_dtype(sy::routers::TopK{.k = 1, .renormalize = false}, prob, 402);
}

BOOST_AUTO_TEST_CASE(device_route_topp_matches_host) {
  const sy::test::router_problem prob({257, 24, 8, 0}, sy::test::base_seed() + 500);
  every_dtype(sy::routers::TopP{.p = 0.5f}, prob, 501);
  every_dtype(sy::routers::TopP{.p = 0.9f, .max_k = 3}, prob, 502);
}

BOOST_AUTO_TEST_CASE(device_route_adaptive_gating_matches_host) {
  const sy::test::router_problem prob({301, 16, 12, 0}, sy::test::base_seed() + 600);
  every_dtype(sy::routers::AdaptiveGating{.threshold = 0.1f}, prob, 601);
}

BOOST_AUTO_TEST_CASE(device_route_da_moe_matches_host) {
  const sy::test::router_problem prob({96, 16, 8, 2}, sy::test::base_seed() + 700, 0.5f, true);
  const sy::routing::k_rules::ceil_relative_to_max k{.k_min = 1, .k_max = 3};
  every_dtype(sy::routers::DAMoE<>{.k_rule = k}, prob, 701);
  every_dtype(sy::routers::DAMoE<sy::routing::importance::cls_row>{.k_rule = k}, prob, 702);
  every_dtype(sy::routers::DAMoE<sy::routing::importance::precomputed>{.k_rule = k}, prob, 703);
}

BOOST_AUTO_TEST_CASE(device_route_records_a_non_finite_logit) {
  sy::test::router_problem prob({40, 8, 6, 0}, sy::test::base_seed() + 800);
  const int bad_expert = 4;
  prob.w[bad_expert * prob.d + 3] = std::numeric_limits<float>::infinity();
  sy::cuda::stream_context sc;
  const device_problem<float> dp(prob, 0);
  const auto out = device_forward(sc, sy::routers::TopK{.k = 2}, dp);
  BOOST_TEST(out.status.first[static_cast<int>(sy::cuda::status_kind::non_finite_logits)] ==
             static_cast<unsigned long long>(bad_expert));  // token 0, expert 4: the smallest
  for (auto c : out.plan.counts) BOOST_TEST(c == 0);
  for (auto id : out.plan.expert_ids) BOOST_TEST(id == -1);
  sy::test::expect_error<sy::non_finite_error>(
      [&] {
        sy::cuda::throw_status(out.status, {prob.d, prob.experts, 2, "state.plan"});
      },
      "logits", "[0, 4]");
}
