// SPDX-License-Identifier: Apache-2.0
// The CUDA backend's generic route, run on the host: the very functors and launch sequence
// the GPU runs (ops/route_rows.hpp, ops/route_losses.hpp, ops/route_steps.hpp,
// routing/da_moe_rows.hpp), through a sequential launcher, against the host backend's route
// bit for bit: logits (index-order kernel path), probabilities, plan, every loss value, the
// per-token d_logits with every loss coefficient, dx and the weight gradient (element kernels),
// for TopK, TopP, Adaptive Gating and DA-MoE (three importance policies) over several shapes
// and float, half and bfloat16 tokens. Also: the GEMM intents (mapped by
// cuda::to_column_major) against a naive column-major loop, a non-finite token routed to no expert
// and recorded, DA-MoE's bad input routing every token to no expert, the workspace measured by the
// carving code, the empty batch.
#include <boost/test/unit_test.hpp>

#include <switchyard/backend/cuda/route_gemm.hpp>
#include <switchyard/ops/route_steps.hpp>
#include <switchyard/routing/routers/adaptive_gating.hpp>
#include <switchyard/routing/routers/da_moe.hpp>
#include <switchyard/routing/routers/topk.hpp>
#include <switchyard/routing/routers/topp.hpp>
#include <switchyard/routing/selection/topany.hpp>

#include <algorithm>
#include <bit>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <ios>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "support/router_testbed.hpp"

namespace sy = switchyard;
using sy::index_t;
using sy::routing::routing_plan;
using sy::test::router_problem;
using sy::test::router_shape;

namespace {

const std::vector<router_shape> shapes{
    {1, 5, 3, 1}, {7, 16, 8, 2}, {64, 32, 16, 3}, {33, 8, 64, 1}, {130, 12, 6, 2}};

//! The faults sink of a host run: the smallest index of each kind (the host side of the
//! status word).
struct captured_faults {
  unsigned long long logit = ULLONG_MAX, attention = ULLONG_MAX, importance = ULLONG_MAX;
};
struct capture_faults {
  captured_faults* out;
  void non_finite_logit(index_t i) const { sy::ops::record_first(&out->logit, i); }
  void bad_attention(index_t i) const { sy::ops::record_first(&out->attention, i); }
  void bad_importance(index_t i) const { sy::ops::record_first(&out->importance, i); }
};

std::uint32_t bits(float v) {
  return std::bit_cast<std::uint32_t>(v);
}

//! got == want bit for bit, element by element.
void check_bits(const std::vector<float>& got, const std::vector<float>& want,
                const std::string& what) {
  BOOST_TEST_REQUIRE(got.size() == want.size(), what);
  std::size_t bad = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (bits(got[i]) == bits(want[i])) continue;
    if (++bad <= 5)
      BOOST_ERROR(what << "[" << i << "]: got " << std::hexfloat << got[i] << ", want " << want[i]);
  }
  BOOST_TEST(bad == 0u, what << ": " << bad << " elements differ");
}

//! The float fields of a losses struct.
template <class Losses>
std::vector<float> fields(const Losses& l) {
  static_assert(sizeof(Losses) % sizeof(float) == 0);
  std::vector<float> v(sizeof(Losses) / sizeof(float));
  std::memcpy(v.data(), &l, sizeof(Losses));
  return v;
}

//! Units in the last place between two finite floats of the same sign.
std::int64_t ulps(float a, float b) {
  return std::abs(static_cast<std::int64_t>(bits(a)) - static_cast<std::int64_t>(bits(b)));
}

//! A problem in host memory with the params every router takes.
struct problem {
  router_problem p;
  std::vector<float> importance;  //!< [T] for importance::precomputed
  std::vector<float> x_padded;    //!< x with a row stride of d + 3 (a strided view)

  problem(router_shape s, std::uint64_t seed) : p(s, seed, 0.5f, seed % 2 == 0) {
    std::mt19937_64 g(seed ^ 0x5eed);
    importance = sy::test::uniform(g, static_cast<std::size_t>(p.tokens), 0.01f, 3.0f);
    x_padded.assign(static_cast<std::size_t>(p.tokens) * (p.d + 3), -7.0f);
    for (int t = 0; t < p.tokens; ++t)
      for (int i = 0; i < p.d; ++i) x_padded[t * (p.d + 3) + i] = p.x[t * p.d + i];
  }
  [[nodiscard]] sy::matrix_view<const float> x_strided() const {
    return sy::make_strided_view<const float, 2>(x_padded.data(), {p.tokens, p.d}, {p.d + 3, 1});
  }
  [[nodiscard]] sy::routing::linear_router_params linear() const { return {p.wv()}; }
  [[nodiscard]] sy::routing::da_moe_params da_moe() const {
    return {p.wv(), p.attention(), sy::make_view(importance.data(), p.tokens)};
  }
};

template <class R>
typename R::params_type params_for(const problem& pr) {
  if constexpr (std::is_same_v<typename R::params_type, sy::routing::da_moe_params>) {
    return pr.da_moe();
  } else {
    return pr.linear();
  }
}

//! Tokens stored as T (rounded from the problem's floats).
template <class T>
std::vector<T> stored(const std::vector<float>& v) {
  std::vector<T> out;
  out.reserve(v.size());
  for (float f : v) out.push_back(sy::from_float<T>(f));
  return out;
}

//! Fills a plan with garbage the route must overwrite.
void poison(routing_plan& plan) {
  std::fill(plan.expert_ids.begin(), plan.expert_ids.end(), 77);
  std::fill(plan.weights.begin(), plan.weights.end(), std::numeric_limits<float>::quiet_NaN());
  std::fill(plan.counts.begin(), plan.counts.end(), 99);
  std::fill(plan.logits.begin(), plan.logits.end(), std::numeric_limits<float>::quiet_NaN());
  std::fill(plan.probs.begin(), plan.probs.end(), std::numeric_limits<float>::quiet_NaN());
}

//! What the device forward produced (on the host).
template <class R>
struct device_result {
  routing_plan plan;
  typename R::losses_type losses{};
  captured_faults faults;
};

//! The device forward, run on the host: the logits functor (the non-GEMM path), then the
//! route's steps on a workspace of exactly the measured size.
template <class R, class T>
device_result<R> device_forward(const R& r, const sy::matrix_view<const T>& x,
                                const typename R::params_type& p) {
  device_result<R> out;
  const index_t tokens = x.extent(0), experts = r.num_experts(p);
  out.plan.resize(tokens, r.width(p), experts);
  poison(out.plan);
  std::memset(static_cast<void*>(&out.losses), 0xFF, sizeof out.losses);  // NaN in every field
  const auto w = r.scoring().params(p).w;
  const sy::ops::router_logits<T> logits{x, w, out.plan.logits.data()};
  for (index_t i = 0; i < tokens * experts; ++i) logits(i);
  sy::workspace_arena measure;
  const sy::ops::forward_route<R> sized(tokens, experts, measure);
  std::vector<std::byte> bytes(measure.required());
  sy::workspace_arena ws({bytes.data(), bytes.size()});
  const sy::ops::forward_route<R> steps(tokens, experts, ws);
  steps.run(sy::ops::sequential_launcher{}, r, p, out.plan.ref(), &out.losses,
            capture_faults{&out.faults});
  return out;
}

//! The device backward's d_logits, run on the host.
template <class R>
std::vector<float> device_d_logits(const R& r, const routing_plan& plan,
                                   const std::vector<float>& d_weights,
                                   const typename R::losses_type& coeff) {
  const index_t tokens = plan.num_tokens, experts = plan.num_experts;
  std::vector<float> d_logits(static_cast<std::size_t>(tokens * experts),
                              std::numeric_limits<float>::quiet_NaN());
  sy::workspace_arena measure;
  const sy::ops::backward_route<R> sized(tokens, experts, measure);
  std::vector<std::byte> bytes(measure.required());
  sy::workspace_arena ws({bytes.data(), bytes.size()});
  const sy::ops::backward_route<R> steps(tokens, experts, ws);
  steps.run(sy::ops::sequential_launcher{}, r, plan.ref(), d_weights.data(), coeff,
            d_logits.data());
  return d_logits;
}

//! Random non-zero coefficients (or all zero) for every loss field.
template <class Losses>
Losses coefficients(std::mt19937_64& g, bool zero) {
  Losses c{};
  if (zero) return c;
  auto v = sy::test::uniform(g, sizeof(Losses) / sizeof(float), 0.05f, 1.5f);
  std::memcpy(static_cast<void*>(&c), v.data(), sizeof(Losses));
  return c;
}

//! Forward (plan, logits, probs, losses), d_logits and the linear backward of router `r` on
//! problem `pr` with tokens stored as T, device functors against the host route.
template <class T, class R>
void check_router(const R& r, const problem& pr, std::uint64_t seed, bool entropy_first) {
  const auto p = params_for<R>(pr);
  const auto x_store = stored<T>(pr.p.x);
  const auto x = sy::make_view<const T>(x_store.data(), pr.p.tokens, pr.p.d);

  routing_plan host_plan;
  typename R::losses_type host_losses{};
  sy::host::route(r, x, p, host_plan, host_losses);
  const auto dev = device_forward(r, x, p);

  BOOST_TEST(dev.faults.logit == ULLONG_MAX);
  BOOST_TEST(dev.faults.attention == ULLONG_MAX);
  BOOST_TEST(dev.faults.importance == ULLONG_MAX);
  check_bits(dev.plan.logits, host_plan.logits, "logits");
  check_bits(dev.plan.probs, host_plan.probs, "probs");
  BOOST_TEST(dev.plan.expert_ids == host_plan.expert_ids, boost::test_tools::per_element());
  BOOST_TEST(dev.plan.counts == host_plan.counts, boost::test_tools::per_element());
  check_bits(dev.plan.weights, host_plan.weights, "weights");
  const auto got = fields(dev.losses), want = fields(host_losses);
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (entropy_first && i == 0) {
      // The entropy's device sum is per token, then over tokens (route_losses.hpp).
      BOOST_TEST(ulps(got[i], want[i]) <= 1, "entropy " << got[i] << " vs " << want[i]);
    } else {
      BOOST_TEST(bits(got[i]) == bits(want[i]),
                 "loss field " << i << ": " << std::hexfloat << got[i] << " vs " << want[i]);
    }
  }

  std::mt19937_64 g(seed);
  const auto d_weights = sy::test::normal(g, host_plan.weights.size());
  for (bool zero : {false, true}) {
    BOOST_TEST_CONTEXT("zero coefficients " << zero) {
      const auto coeff = coefficients<typename R::losses_type>(g, zero);
      const auto want_dl = sy::test::backward_logits(r, host_plan, d_weights, coeff);
      const auto got_dl = device_d_logits(r, host_plan, d_weights, coeff);
      check_bits(got_dl, want_dl, "d_logits");

      // dx and grads.w accumulate into random values: the element functors against the host.
      const auto dx0 = sy::test::normal(g, pr.p.x.size());
      const auto dw0 = sy::test::normal(g, pr.p.w.size());
      auto dx_host = dx0, dw_host = dw0, dx_dev = dx0, dw_dev = dw0;
      sy::host::route_backward(r, x, p, host_plan, d_weights.data(), coeff,
                               sy::make_view(dx_host.data(), pr.p.tokens, pr.p.d),
                               {sy::make_view(dw_host.data(), pr.p.experts, pr.p.d)});
      const sy::ops::linear_dx_elements dx_rows{got_dl.data(), pr.p.wv(),
                                                sy::make_view(dx_dev.data(), pr.p.tokens, pr.p.d)};
      for (index_t i = 0; i < static_cast<index_t>(dx_dev.size()); ++i) dx_rows(i);
      const sy::ops::linear_dw_elements<T> dw_rows{
          got_dl.data(), x, sy::make_view(dw_dev.data(), pr.p.experts, pr.p.d)};
      for (index_t i = 0; i < static_cast<index_t>(dw_dev.size()); ++i) dw_rows(i);
      check_bits(dx_dev, dx_host, "dx");
      check_bits(dw_dev, dw_host, "grads.w");
    }
  }
}

//! Every router on every shape and element type.
template <class T>
void check_every_router(std::uint64_t seed) {
  for (std::size_t s = 0; s < shapes.size(); ++s) {
    const problem pr(shapes[s], seed + 31 * s);
    const int e = pr.p.experts;
    BOOST_TEST_CONTEXT("shape " << s << " T=" << pr.p.tokens << " d=" << pr.p.d << " E=" << e << " "
                                << sy::element_type_name<T>()) {
      BOOST_TEST_CONTEXT("TopK") {
        check_router<T>(sy::routers::TopK{.k = 1, .renormalize = false}, pr, seed + 1, false);
        check_router<T>(sy::routers::TopK{.k = std::min(2, e), .renormalize = true}, pr, seed + 2,
                        false);
        check_router<T>(sy::routers::TopK{.k = std::min(4, e), .renormalize = false}, pr, seed + 3,
                        false);
      }
      BOOST_TEST_CONTEXT("TopP") {
        check_router<T>(sy::routers::TopP{.p = 0.4f}, pr, seed + 4, true);
        check_router<T>(sy::routers::TopP{.p = 0.8f, .max_k = std::min(3, e)}, pr, seed + 5, true);
      }
      BOOST_TEST_CONTEXT("AdaptiveGating") {
        check_router<T>(sy::routers::AdaptiveGating{.threshold = 0.1f, .renormalize = true}, pr,
                        seed + 6, false);
        check_router<T>(sy::routers::AdaptiveGating{.threshold = 0.3f, .renormalize = false}, pr,
                        seed + 7, false);
      }
      BOOST_TEST_CONTEXT("DAMoE") {
        using sy::routing::importance::cls_row;
        using sy::routing::importance::col_mean;
        using sy::routing::importance::precomputed;
        const sy::routing::k_rules::ceil_relative_to_max k{.k_min = 1, .k_max = std::min(4, e)};
        check_router<T>(sy::routers::DAMoE<col_mean>{.k_rule = k}, pr, seed + 8, false);
        check_router<T>(sy::routers::DAMoE<cls_row>{.k_rule = k, .renormalize = false}, pr,
                        seed + 9, false);
        check_router<T>(sy::routers::DAMoE<precomputed>{.k_rule = k}, pr, seed + 10, false);
      }
    }
  }
}

//! What cuBLAS is asked for, naively: the intent mapped by cuda::to_column_major, then
//! column-major C = alpha·op(A)·op(B) + beta·C in float, l in order (C unread when beta = 0).
void naive_gemm(const sy::cuda::gemm_desc& intent, const float* a, const float* b, float* c) {
  const sy::cuda::blas_gemm g = sy::cuda::to_column_major(intent, "test GEMM");
  const auto operands = sy::cuda::column_major_operands(a, b);
  const bool ta = g.trans_a == sy::cuda::gemm_op::transpose;
  const bool tb = g.trans_b == sy::cuda::gemm_op::transpose;
  for (index_t j = 0; j < g.n; ++j)
    for (index_t i = 0; i < g.m; ++i) {
      float acc = 0.0f;
      for (index_t l = 0; l < g.k; ++l) {
        const float av = ta ? operands.a[l + i * g.lda] : operands.a[i + l * g.lda];
        const float bv = tb ? operands.b[j + l * g.ldb] : operands.b[l + j * g.ldb];
        acc += av * bv;
      }
      float& out = c[i + j * g.ldc];
      out = g.beta == 0.0f ? g.alpha * acc : g.beta * out + g.alpha * acc;
    }
}

//! Runs DA-MoE's device rules on the host; returns the relative importance and the flags.
template <class I>
std::pair<std::vector<float>, sy::routing::importance_flags> device_relative(
    const sy::routers::DAMoE<I>& r, const sy::routing::da_moe_params& p, index_t tokens) {
  using rules = sy::ops::device_token_rules<sy::routers::DAMoE<I>>;
  sy::workspace_arena measure;
  (void)rules::carve(measure, tokens);
  std::vector<std::byte> bytes(measure.required());
  sy::workspace_arena ws({bytes.data(), bytes.size()});
  const auto s = rules::carve(ws, tokens);
  captured_faults faults;
  (void)rules::make(sy::ops::sequential_launcher{}, r, p, tokens, s, capture_faults{&faults});
  BOOST_TEST(faults.attention == s.flags->bad_attention);
  BOOST_TEST(faults.importance == s.flags->bad_importance);
  return {std::vector<float>(s.relative, s.relative + tokens), *s.flags};
}

//! The route steps S carve what their measuring pass counted (any start address), and a
//! shape_error naming the workspace for one byte less.
template <class S>
void check_workspace() {
  const index_t tokens = 37, experts = 9;
  sy::workspace_arena measure;
  const S sized(tokens, experts, measure);
  BOOST_TEST(measure.used() > 0u);
  std::vector<std::byte> bytes(measure.required() + 64);
  for (std::size_t offset : {0, 1, 17, 63}) {
    sy::workspace_arena ws({bytes.data() + offset, measure.required()});
    BOOST_CHECK_NO_THROW((void)S(tokens, experts, ws));
  }
  std::byte* base = bytes.data();
  while (reinterpret_cast<std::uintptr_t>(base) % sy::workspace_arena::alignment != 0) ++base;
  sy::workspace_arena exact({base, measure.used()});
  BOOST_CHECK_NO_THROW((void)S(tokens, experts, exact));
  sy::test::expect_error<sy::shape_error>(
      [&] {
        sy::workspace_arena small({base, measure.used() - 1});
        (void)S(tokens, experts, small);
      },
      "workspace");
}

}  // namespace

BOOST_AUTO_TEST_CASE(every_router_matches_the_host_route_bitwise_float) {
  check_every_router<float>(sy::test::base_seed());
}

BOOST_AUTO_TEST_CASE(every_router_matches_the_host_route_bitwise_half) {
  check_every_router<sy::half>(sy::test::base_seed() + 1000);
}

BOOST_AUTO_TEST_CASE(every_router_matches_the_host_route_bitwise_bfloat16) {
  check_every_router<sy::bfloat16>(sy::test::base_seed() + 2000);
}

BOOST_AUTO_TEST_CASE(strided_tokens_match_the_host_route) {
  // The logits and weight-gradient element functors read x through its strides.
  const problem pr({19, 10, 8, 0}, sy::test::base_seed() + 3000);
  const sy::routers::TopK r{.k = 2};
  routing_plan host_plan;
  sy::routing::softmax_router_losses host_losses{};
  sy::host::route(r, pr.x_strided(), pr.linear(), host_plan, host_losses);
  const auto dev = device_forward(r, pr.x_strided(), pr.linear());
  check_bits(dev.plan.logits, host_plan.logits, "logits");
  BOOST_TEST(dev.plan.expert_ids == host_plan.expert_ids, boost::test_tools::per_element());
  std::mt19937_64 g(sy::test::base_seed() + 3001);
  const auto d_weights = sy::test::normal(g, host_plan.weights.size());
  const sy::routing::softmax_router_losses coeff{0.3f, 0.2f, 0.1f};
  const auto dl = device_d_logits(r, host_plan, d_weights, coeff);
  std::vector<float> dw_host(pr.p.w.size(), 0.5f), dw_dev = dw_host;
  sy::host::route_backward(r, pr.x_strided(), pr.linear(), host_plan, d_weights.data(), coeff, {},
                           {sy::make_view(dw_host.data(), pr.p.experts, pr.p.d)});
  const sy::ops::linear_dw_elements<float> rows{dl.data(), pr.x_strided(),
                                                sy::make_view(dw_dev.data(), pr.p.experts, pr.p.d)};
  for (index_t i = 0; i < static_cast<index_t>(dw_dev.size()); ++i) rows(i);
  check_bits(dw_dev, dw_host, "grads.w");
}

BOOST_AUTO_TEST_CASE(gemm_descriptions_match_the_host_linear_scoring) {
  // The cuBLAS arguments (row-major intent -> column-major) against the host's loops, with
  // padded leading dimensions: bitwise, as the naive loop adds in the host's order.
  for (const auto& s : shapes) {
    const problem pr(s, sy::test::base_seed() + 4000 + s.tokens);
    const index_t t = pr.p.tokens, d = pr.p.d, e = pr.p.experts, ld_x = d + 3;
    BOOST_TEST_CONTEXT("T=" << t << " d=" << d << " E=" << e) {
      BOOST_TEST(sy::ops::row_major_ld(pr.x_strided()) == (t > 1 ? ld_x : d));
      BOOST_TEST(sy::ops::row_major_ld(pr.p.wv()) == d);
      routing_plan host_plan;
      sy::routing::softmax_router_losses losses{};
      const sy::routers::TopK r{.k = 1};
      sy::host::route(r, pr.x_strided(), pr.linear(), host_plan, losses);

      const auto g_logits =
          sy::ops::router_logits_gemm(t, d, e, sy::ops::row_major_ld(pr.x_strided()), d);
      BOOST_TEST(sy::ops::blas_compatible(g_logits));
      std::vector<float> logits(host_plan.logits.size(), std::numeric_limits<float>::quiet_NaN());
      naive_gemm(g_logits, pr.x_padded.data(), pr.p.w.data(), logits.data());
      check_bits(logits, host_plan.logits, "logits GEMM");

      std::mt19937_64 g(sy::test::base_seed() + 4100 + s.tokens);
      const auto dl = sy::test::normal(g, static_cast<std::size_t>(t * e));
      std::vector<float> dx_host(static_cast<std::size_t>(t * d), 0.25f);
      std::vector<float> dw_host(static_cast<std::size_t>(e * d), -0.5f);
      sy::routing::linear_backward(pr.x_strided(), pr.linear(), dl.data(),
                                   sy::make_view(dx_host.data(), t, d),
                                   {sy::make_view(dw_host.data(), e, d)});
      // dx with a padded row stride too.
      const index_t ld_dx = d + 1;
      std::vector<float> dx_dev(static_cast<std::size_t>(t * ld_dx), 0.25f);
      const auto g_dx = sy::ops::router_dx_gemm(t, d, e, d, ld_dx);
      BOOST_TEST(sy::ops::blas_compatible(g_dx));
      naive_gemm(g_dx, dl.data(), pr.p.w.data(), dx_dev.data());
      std::vector<float> dx_packed;
      for (index_t r0 = 0; r0 < t; ++r0)
        for (index_t i = 0; i < d; ++i) dx_packed.push_back(dx_dev[r0 * ld_dx + i]);
      check_bits(dx_packed, dx_host, "dx GEMM");

      std::vector<float> dw_dev(static_cast<std::size_t>(e * d), -0.5f);
      const auto g_dw =
          sy::ops::router_grad_w_gemm(t, d, e, sy::ops::row_major_ld(pr.x_strided()), d);
      BOOST_TEST(sy::ops::blas_compatible(g_dw));
      naive_gemm(g_dw, dl.data(), pr.x_padded.data(), dw_dev.data());
      check_bits(dw_dev, dw_host, "grads.w GEMM");
    }
  }
  // Operands cuBLAS cannot take fall back to the element functors.
  std::vector<float> buf(64, 1.0f);
  BOOST_TEST(sy::ops::row_major_ld(
                 sy::make_strided_view<const float, 2>(buf.data(), {4, 4}, {1, 4})) == -1);
  BOOST_TEST(sy::ops::row_major_ld(
                 sy::make_strided_view<const float, 2>(buf.data(), {4, 4}, {2, 1})) == -1);
  BOOST_TEST(!sy::ops::blas_compatible(sy::ops::router_logits_gemm(5, 0, 3, 1, 1)));
  BOOST_TEST(!sy::ops::blas_compatible(sy::ops::router_dx_gemm(index_t{1} << 31, 4, 3, 4, 4)));
  BOOST_TEST(!sy::ops::blas_compatible(sy::ops::router_grad_w_gemm(6, 4, 3, 3, 4)));
}

BOOST_AUTO_TEST_CASE(non_finite_token_routes_to_no_expert_and_is_recorded) {
  const problem clean({9, 6, 5, 0}, sy::test::base_seed() + 5000);
  problem bad = clean;
  const int t_bad = 4;
  bad.p.x[t_bad * bad.p.d + 2] = std::numeric_limits<float>::quiet_NaN();
  const sy::routers::TopK r{.k = 2};
  sy::test::expect_error<sy::non_finite_error>(
      [&] {
        routing_plan plan;
        sy::routing::softmax_router_losses l{};
        sy::host::route(r, bad.p.xv(), bad.linear(), plan, l);
      },
      "x", "not finite");
  const auto dev = device_forward(r, bad.p.xv(), bad.linear());
  BOOST_TEST(dev.faults.logit == static_cast<unsigned long long>(t_bad * bad.p.experts));
  const auto want = sy::test::route_plan(r, clean.p.xv(), clean.linear());
  for (int t = 0; t < bad.p.tokens; ++t) {
    for (int j = 0; j < 2; ++j) {
      if (t == t_bad) {
        BOOST_TEST(dev.plan.id(t, j) == -1);
        BOOST_TEST(dev.plan.weight(t, j) == 0.0f);
      } else {
        BOOST_TEST(dev.plan.id(t, j) == want.id(t, j));
        BOOST_TEST(bits(dev.plan.weight(t, j)) == bits(want.weight(t, j)));
      }
    }
    BOOST_TEST(dev.plan.counts[t] == (t == t_bad ? 0 : want.counts[t]));
  }
  for (int e = 0; e < bad.p.experts; ++e)
    BOOST_TEST(dev.plan.probs[t_bad * bad.p.experts + e] == 0.0f);
  // Backward stays memory safe on that plan (count 0: no combine gradient for the token).
  const std::vector<float> d_weights(dev.plan.weights.size(), 1.0f);
  const auto dl = device_d_logits(r, dev.plan, d_weights, {});
  for (int e = 0; e < bad.p.experts; ++e) BOOST_TEST(dl[t_bad * bad.p.experts + e] == 0.0f);
}

BOOST_AUTO_TEST_CASE(corrupt_plan_rows_give_no_combine_gradient) {
  const problem pr({6, 4, 5, 0}, sy::test::base_seed() + 5500);
  const sy::routers::TopK r{.k = 2};
  auto plan = sy::test::route_plan(r, pr.p.xv(), pr.linear());
  plan.counts[1] = 3;          // > width
  plan.expert_ids[2 * 2] = 9;  // >= E
  plan.counts[3] = -1;
  const std::vector<float> d_weights(plan.weights.size(), 1.0f);
  const auto dl = device_d_logits(r, plan, d_weights, {});
  for (int t : {1, 2, 3})
    for (int e = 0; e < 5; ++e) BOOST_TEST(dl[t * 5 + e] == 0.0f, "t=" << t << " e=" << e);
}

BOOST_AUTO_TEST_CASE(da_moe_relative_importance_matches_the_host) {
  for (const auto& s : shapes) {
    const problem pr(s, sy::test::base_seed() + 6000 + s.tokens);
    BOOST_TEST_CONTEXT("T=" << s.tokens << " H=" << s.heads) {
      const auto check = [&](const auto& r) {
        sy::routing::da_moe_importance stats;
        r.token_importance(pr.da_moe(), pr.p.tokens, stats);
        const auto [relative, flags] = device_relative(r, pr.da_moe(), pr.p.tokens);
        check_bits(relative, stats.relative, "relative");
        BOOST_TEST(flags.bad_attention == sy::routing::importance_flags::none);
        BOOST_TEST(flags.bad_importance == sy::routing::importance_flags::none);
      };
      check(sy::routers::DAMoE<sy::routing::importance::col_mean>{});
      check(sy::routers::DAMoE<sy::routing::importance::cls_row>{});
      check(sy::routers::DAMoE<sy::routing::importance::precomputed>{});
    }
  }
  // All-zero importance: relative 1 for every token, as the host.
  const problem pr({5, 4, 4, 1}, sy::test::base_seed() + 6100);
  std::vector<float> zeros(5, 0.0f);
  zeros[2] = -0.0f;
  sy::routing::da_moe_params p = pr.da_moe();
  p.importance = sy::make_view<const float>(zeros.data(), 5);
  const sy::routers::DAMoE<sy::routing::importance::precomputed> r{};
  sy::routing::da_moe_importance stats;
  r.token_importance(p, 5, stats);
  check_bits(device_relative(r, p, 5).first, stats.relative, "relative (all zero)");
}

BOOST_AUTO_TEST_CASE(da_moe_bad_input_routes_every_token_to_no_expert) {
  const problem pr({6, 4, 5, 2}, sy::test::base_seed() + 7000);
  const sy::routing::k_rules::ceil_relative_to_max k{.k_min = 1, .k_max = 3};
  const auto expect_no_route = [&](const auto& r, const sy::routing::da_moe_params& p,
                                   const std::string& argument) {
    sy::test::expect_error<sy::invalid_argument>(
        [&] {
          routing_plan plan;
          sy::routing::softmax_router_losses l{};
          sy::host::route(r, pr.p.xv(), p, plan, l);
        },
        argument);
    const auto dev = device_forward(r, pr.p.xv(), p);
    for (auto c : dev.plan.counts) BOOST_TEST(c == 0);
    for (auto id : dev.plan.expert_ids) BOOST_TEST(id == -1);
    for (auto w : dev.plan.weights) BOOST_TEST(w == 0.0f);
    BOOST_TEST(dev.faults.logit == ULLONG_MAX);
    return dev.faults;
  };
  {
    problem bad = pr;  // a negative attention probability (head 1, query 2, key 3)
    const std::size_t at = (1 * 6 + 2) * 6 + 3;
    bad.p.attn[at] = -bad.p.attn[at] - 0.01f;
    const sy::routers::DAMoE<> r{.k_rule = k};
    BOOST_TEST(expect_no_route(r, bad.da_moe(), "params.attention").attention == at);
    BOOST_TEST(device_relative(r, bad.da_moe(), 6).second.bad_attention == at);
  }
  {
    problem bad = pr;  // a row that does not sum to 1 (head 0, query 4)
    for (int j = 0; j < 6; ++j) bad.p.attn[(0 * 6 + 4) * 6 + j] *= 1.5f;
    const sy::routers::DAMoE<sy::routing::importance::cls_row> r{.k_rule = k};
    const auto faults = expect_no_route(r, bad.da_moe(), "params.attention");
    BOOST_TEST(faults.attention == (0 * 6 + 4) * 6 + 5);
    BOOST_TEST(faults.importance == ULLONG_MAX);
  }
  {
    problem bad = pr;  // a non-finite importance
    bad.importance[3] = std::numeric_limits<float>::infinity();
    const sy::routers::DAMoE<sy::routing::importance::precomputed> r{.k_rule = k};
    const auto faults = expect_no_route(r, bad.da_moe(), "params.importance");
    BOOST_TEST(faults.importance == 3u);
    BOOST_TEST(faults.attention == ULLONG_MAX);
  }
}

BOOST_AUTO_TEST_CASE(empty_batch_gives_the_host_losses) {
  const problem pr({0, 4, 5, 0}, sy::test::base_seed() + 8000);
  const auto check = [&](const auto& r) {
    using R = std::remove_cvref_t<decltype(r)>;
    routing_plan host_plan;
    typename R::losses_type host_losses{};
    sy::host::route(r, pr.p.xv(), pr.linear(), host_plan, host_losses);
    const auto dev = device_forward(r, pr.p.xv(), pr.linear());
    check_bits(fields(dev.losses), fields(host_losses), "losses");
  };
  check(sy::routers::TopK{.k = 2});
  check(sy::routers::TopP{.p = 0.5f});
  check(sy::routers::AdaptiveGating{});
}

BOOST_AUTO_TEST_CASE(workspace_is_what_the_carving_takes) {
  using DA = sy::routers::DAMoE<>;
  check_workspace<sy::ops::forward_route<sy::routers::TopK>>();
  check_workspace<sy::ops::backward_route<sy::routers::TopP>>();
  check_workspace<sy::ops::forward_route<sy::routers::AdaptiveGating>>();
  check_workspace<sy::ops::forward_route<DA>>();
  check_workspace<sy::ops::backward_route<DA>>();
}

BOOST_AUTO_TEST_CASE(select_token_is_the_host_selection) {
  // cuda::select's functor (scores computed elsewhere, e.g. DynMoE's) against select_all.
  const int tokens = 77, experts = 8;
  std::mt19937_64 g(sy::test::base_seed() + 9000);
  auto scores = sy::test::uniform(g, static_cast<std::size_t>(tokens) * experts, 0.05f, 0.95f);
  const auto theta = sy::test::uniform(g, experts, 0.3f, 0.7f);
  const std::vector<std::int32_t> mask{1, 0, 1, 1, 1, 0, 1, 1};
  for (int t = 0; t < tokens; ++t)
    for (int e = 0; e < experts; ++e) scores[t * experts + e] *= static_cast<float>(mask[e]);
  for (bool training : {true, false}) {
    const sy::routing::topany_rule rule{.thresholds = {theta.data(), theta.size()},
                                        .experts_mask = {mask.data(), mask.size()},
                                        .training = training};
    routing_plan want;
    want.resize(tokens, experts, experts);
    want.probs = scores;
    sy::routing::select_all(rule, want);
    routing_plan got;
    got.resize(tokens, experts, experts);
    poison(got);
    const sy::ops::select_token<sy::routing::same_rule<sy::routing::topany_rule>> row{
        {rule},  scores.data(), got.expert_ids.data(), got.weights.data(), got.counts.data(),
        experts, experts};
    for (index_t t = 0; t < tokens; ++t) row(t);
    BOOST_TEST(got.expert_ids == want.expert_ids, boost::test_tools::per_element());
    BOOST_TEST(got.counts == want.counts, boost::test_tools::per_element());
    check_bits(got.weights, want.weights, "weights");
  }
}
