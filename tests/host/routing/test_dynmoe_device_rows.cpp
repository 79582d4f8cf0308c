// SPDX-License-Identifier: Apache-2.0
// The DynMoE device route's functors (backend/cuda/dynmoe_rows.hpp), run on the host by a
// serial launcher in the very order the CUDA backend launches them, against
// routers::DynMoE::forward/backward: plan, logits, probs, the four losses, dx and every
// gradient must be equal bit for bit, on fresh random inputs (float, half and bfloat16 x,
// masked experts, training and eval, a near-zero token, absent outputs); a token with a NaN
// is recorded as a non-finite logit and routed to no expert; the routing records equal
// training::dynmoe_recorder's.
#include <boost/test/unit_test.hpp>

#include <switchyard/backend/cuda/status.hpp>
#include <switchyard/backend/cuda/dynmoe_rows.hpp>
#include <switchyard/routing/routers/dynmoe.hpp>
#include <switchyard/training/dynmoe_update.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "support/random.hpp"

namespace sy = switchyard;
using sy::index_t;
using losses_t = sy::routing::dynmoe_losses;

namespace {

//! The launcher the pipelines take, as a host loop (what cuda::for_each does on the device).
struct serial_runner {
  mutable int launches = 0;
  template <class F>
  void operator()(index_t n, const F& f, const char*) const {
    ++launches;
    for (index_t i = 0; i < n; ++i) f(i);
  }
};

template <class V>
bool same_bits(const V& a, const V& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(a[0])) == 0);
}

bool same_losses(const losses_t& a, const losses_t& b) {
  return std::memcmp(&a, &b, sizeof a) == 0;
}

// One problem: x [T, d] of X, W [d, E], G [E], mask [E], log τ.
template <class X>
struct problem {
  index_t tokens, d, experts;
  std::vector<X> x;
  std::vector<float> w, g;
  std::vector<std::int32_t> mask;
  float log_t;

  problem(index_t t, index_t dd, index_t e, std::mt19937_64& gen, int masked, float log_temperature)
      : tokens(t), d(dd), experts(e), log_t(log_temperature) {
    for (float v : sy::test::normal(gen, static_cast<std::size_t>(t * dd))) x.push_back(X(v));
    w = sy::test::normal(gen, static_cast<std::size_t>(dd * e), 0.4f);
    g = sy::test::uniform(gen, static_cast<std::size_t>(e), -0.6f, 0.4f);
    mask.assign(static_cast<std::size_t>(e), 1);
    std::vector<index_t> ids(static_cast<std::size_t>(e));
    for (index_t i = 0; i < e; ++i) ids[i] = i;
    std::shuffle(ids.begin(), ids.end(), gen);
    for (int i = 0; i < masked; ++i) mask[ids[i]] = 0;
  }
  [[nodiscard]] sy::matrix_view<const X> xv() const {
    return sy::make_view<const X>(x.data(), tokens, d);
  }
  [[nodiscard]] sy::routing::dynmoe_params params() const {
    return {sy::make_view<const float>(w.data(), d, experts),
            sy::make_view<const float>(g.data(), experts),
            sy::make_view<const std::int32_t>(mask.data(), experts), log_t};
  }
};

sy::routing::routing_plan sized_plan(index_t t, index_t e) {
  sy::routing::routing_plan plan;
  plan.resize(t, e, e);
  // poison everything the forward must overwrite
  std::fill(plan.expert_ids.begin(), plan.expert_ids.end(), 77);
  std::fill(plan.weights.begin(), plan.weights.end(), 9.0f);
  std::fill(plan.counts.begin(), plan.counts.end(), 55);
  std::fill(plan.logits.begin(), plan.logits.end(), -3.0f);
  std::fill(plan.probs.begin(), plan.probs.end(), -3.0f);
  return plan;
}

sy::cuda::device_status fresh_status() {
  sy::cuda::device_status s{};
  for (auto& v : s.first) v = sy::cuda::device_status::none;
  return s;
}

struct workspace {
  std::vector<std::byte> bytes;
  sy::workspace_arena arena;
  explicit workspace(std::size_t n) : bytes(n), arena({bytes.data(), bytes.size()}) {}
};

// Host forward and the device pipeline on the host; returns both plans and losses.
template <class X>
struct forward_pair {
  sy::routing::routing_plan host, dev;
  losses_t host_losses{}, dev_losses{};
  sy::cuda::device_status status = fresh_status();

  forward_pair(const sy::routers::DynMoE& r, const problem<X>& p) {
    host = sized_plan(p.tokens, p.experts);
    dev = sized_plan(p.tokens, p.experts);
    workspace hw(r.workspace_size(p.tokens, p.params()));
    r.forward(p.xv(), p.params(), host.ref(), host_losses, hw.arena);
    workspace dw(sy::detail::dynmoe_device_workspace_size(p.tokens, p.d, p.experts));
    const auto sc =
        sy::detail::dynmoe_device_scratch::take(dw.arena, p.tokens, p.d, p.experts, false);
    dev_losses = losses_t{-1.0f, -1.0f, -1.0f, -1.0f};
    sy::detail::dynmoe_forward_pipeline(serial_runner{}, p.xv(), p.params(), r.training, dev.ref(),
                                        &dev_losses, &status, sc);
  }
  [[nodiscard]] bool plans_equal() const {
    return same_bits(host.expert_ids, dev.expert_ids) && same_bits(host.weights, dev.weights) &&
           same_bits(host.counts, dev.counts) && same_bits(host.logits, dev.logits) &&
           same_bits(host.probs, dev.probs);
  }
};

template <class X>
void check_forward(std::mt19937_64& gen, index_t t, index_t d, index_t e, int masked, float log_t,
                   bool training) {
  const problem<X> p(t, d, e, gen, masked, log_t);
  const sy::routers::DynMoE r{.training = training};
  forward_pair<X> f(r, p);
  BOOST_TEST(f.plans_equal());
  BOOST_TEST(same_losses(f.host_losses, f.dev_losses));
  BOOST_TEST(f.status.ok());
  if (t > 4) BOOST_TEST(f.host.total_assignments() > 0);  // the test routes something
}

// Backward with random d_weights on the used slots, the given coefficients, gradients
// starting at random values; host and device pipeline must agree bitwise.
template <class X>
void check_backward(std::mt19937_64& gen, index_t t, index_t d, index_t e, int masked, float log_t,
                    bool training, const losses_t& coeff, bool want_dx, bool want_w, bool want_g,
                    float tiny_row_scale = 0.0f) {
  problem<X> p(t, d, e, gen, masked, log_t);
  if (tiny_row_scale != 0.0f && t > 1)
    for (index_t i = 0; i < d; ++i) p.x[d + i] = X(tiny_row_scale * static_cast<float>(p.x[d + i]));
  const sy::routers::DynMoE r{.training = training};
  forward_pair<X> f(r, p);
  BOOST_REQUIRE(f.plans_equal());
  std::vector<float> dw = sy::test::normal(gen, static_cast<std::size_t>(t * e));
  for (index_t tt = 0; tt < t; ++tt)
    for (index_t j = f.host.counts[tt]; j < e; ++j) dw[tt * e + j] = 0.0f;

  const auto dx0 = sy::test::normal(gen, static_cast<std::size_t>(t * d));
  const auto gw0 = sy::test::normal(gen, static_cast<std::size_t>(d * e));
  const auto gg0 = sy::test::normal(gen, static_cast<std::size_t>(e));
  std::vector<float> dx_h = dx0, dx_d = dx0, gw_h = gw0, gw_d = gw0, gg_h = gg0, gg_d = gg0;
  auto views = [&](std::vector<float>& dx, std::vector<float>& gw, std::vector<float>& gg) {
    sy::routing::dynmoe_grads g;
    if (want_w) g.w_gate = sy::make_view(gw.data(), d, e);
    if (want_g) g.thresholds = sy::make_view(gg.data(), e);
    return std::pair{want_dx ? sy::make_view(dx.data(), t, d) : sy::matrix_view<float>{}, g};
  };
  {
    auto [dxv, g] = views(dx_h, gw_h, gg_h);
    workspace hw(r.workspace_size(t, p.params()));
    r.backward(p.xv(), p.params(), f.host.ref(), dw.data(), coeff, dxv, g, hw.arena);
  }
  {
    auto [dxv, g] = views(dx_d, gw_d, gg_d);
    workspace dws(sy::detail::dynmoe_device_workspace_size(t, d, e));
    const auto sc = sy::detail::dynmoe_device_scratch::take(dws.arena, t, d, e, true);
    sy::detail::dynmoe_backward_pipeline(serial_runner{}, p.xv(), p.params(), f.dev.ref(),
                                         dw.data(), coeff, dxv, g, sc);
  }
  BOOST_TEST(same_bits(dx_h, dx_d));
  BOOST_TEST(same_bits(gw_h, gw_d));
  BOOST_TEST(same_bits(gg_h, gg_d));
  if (want_dx && t > 0) BOOST_TEST(!same_bits(dx_h, dx0));  // something flowed
  if (want_w && t > 0) BOOST_TEST(!same_bits(gw_h, gw0));
}

}  // namespace

BOOST_AUTO_TEST_CASE(device_forward_rows_give_the_host_plan_and_losses_bitwise) {
  std::mt19937_64 gen(sy::test::base_seed() + 1101);
  for (int rep = 0; rep < 3; ++rep) {
    check_forward<float>(gen, 37, 24, 8, 0, 0.0f, true);
    check_forward<float>(gen, 50, 16, 12, 3, 0.7f, true);
    check_forward<float>(gen, 23, 9, 5, 1, 0.3f, false);  // eval: argmax fallback
    check_forward<float>(gen, 41, 12, 6, 0, 6.0f, true);  // scale capped at 100
    check_forward<sy::half>(gen, 29, 16, 7, 2, 0.2f, true);
    check_forward<sy::bfloat16>(gen, 31, 20, 9, 0, 0.5f, false);
    check_forward<float>(gen, 1, 33, 4, 0, 0.0f, true);  // decode
  }
}

BOOST_AUTO_TEST_CASE(device_forward_of_an_empty_batch_zeroes_the_losses) {
  std::mt19937_64 gen(sy::test::base_seed() + 1102);
  const problem<float> p(0, 8, 4, gen, 0, 0.0f);
  forward_pair<float> f(sy::routers::DynMoE{}, p);
  BOOST_TEST(same_losses(f.dev_losses, losses_t{}));
  BOOST_TEST(same_losses(f.host_losses, f.dev_losses));
}

BOOST_AUTO_TEST_CASE(device_forward_records_a_non_finite_token_and_routes_it_nowhere) {
  std::mt19937_64 gen(sy::test::base_seed() + 1103);
  problem<float> p(12, 10, 6, gen, 0, 0.0f);
  p.x[5 * 10 + 3] = std::numeric_limits<float>::quiet_NaN();
  p.x[9 * 10 + 0] = std::numeric_limits<float>::infinity();
  auto plan = sized_plan(12, 6);
  losses_t losses{};
  auto status = fresh_status();
  std::vector<std::byte> bytes(sy::detail::dynmoe_device_workspace_size(12, 10, 6));
  sy::workspace_arena ws({bytes.data(), bytes.size()});
  const auto sc = sy::detail::dynmoe_device_scratch::take(ws, 12, 10, 6, false);
  sy::detail::dynmoe_forward_pipeline(serial_runner{}, p.xv(), p.params(), true, plan.ref(),
                                      &losses, &status, sc);
  BOOST_TEST(!status.ok());
  BOOST_TEST(status.first[static_cast<int>(sy::cuda::status_kind::non_finite_logits)] == 5u * 6u);
  for (index_t t : {5, 9}) {
    BOOST_TEST(plan.counts[t] == 0);
    for (index_t j = 0; j < 6; ++j) {
      BOOST_TEST(plan.id(t, j) == -1);
      BOOST_TEST(plan.weight(t, j) == 0.0f);
    }
  }
  // The other tokens are routed as the host routes them.
  problem<float> q = p;
  for (index_t i = 0; i < 10; ++i) q.x[5 * 10 + i] = q.x[9 * 10 + i] = 1.0f + i;
  forward_pair<float> f(sy::routers::DynMoE{}, q);
  for (index_t t = 0; t < 12; ++t) {
    if (t == 5 || t == 9) continue;
    BOOST_TEST(plan.counts[t] == f.host.counts[t]);
    for (index_t j = 0; j < 6; ++j) BOOST_TEST(plan.id(t, j) == f.host.id(t, j));
  }
  BOOST_TEST(std::isfinite(losses.load_balance_loss));
}

BOOST_AUTO_TEST_CASE(device_backward_rows_give_the_host_gradients_bitwise) {
  std::mt19937_64 gen(sy::test::base_seed() + 1104);
  const losses_t all{0.3f, 0.7f, 1.1f, 0.9f};
  const losses_t no_sim{0.0f, 0.0f, 0.8f, 0.4f};
  for (int rep = 0; rep < 3; ++rep) {
    check_backward<float>(gen, 37, 24, 8, 0, 0.0f, true, all, true, true, true);
    check_backward<float>(gen, 45, 16, 10, 3, 0.6f, true, all, true, true, true);
    check_backward<float>(gen, 26, 12, 6, 1, 0.2f, false, all, true, true, true);  // eval fallbacks
    check_backward<float>(gen, 30, 14, 7, 0, 0.1f, true, no_sim, true, true, true);
    check_backward<float>(gen, 33, 18, 6, 0, 0.0f, true, all, false, true, false);  // no dx
    check_backward<float>(gen, 33, 18, 6, 0, 0.0f, true, all, true, false, true);   // no dW
    check_backward<float>(gen, 20, 11, 5, 0, 0.0f, true, all, true, true, true,
                          1e-14f);  // ‖x‖ < eps
    check_backward<sy::half>(gen, 28, 16, 7, 2, 0.3f, true, all, true, true, true);
    check_backward<sy::bfloat16>(gen, 24, 20, 8, 0, 0.5f, true, all, true, true, true);
  }
}

BOOST_AUTO_TEST_CASE(device_workspace_covers_the_carving) {
  for (index_t t : {0, 1, 17, 300})
    for (index_t e : {1, 5, 64}) {
      sy::workspace_arena m;
      (void)sy::detail::dynmoe_device_scratch::take(m, t, 33, e, true);
      BOOST_TEST(m.required() == sy::detail::dynmoe_device_workspace_size(t, 33, e));
      std::vector<std::byte> bytes(m.required());
      sy::workspace_arena ws({bytes.data() + 1, bytes.size() - 1});  // misaligned start
      BOOST_CHECK_NO_THROW((void)sy::detail::dynmoe_device_scratch::take(ws, t, 33, e, true));
    }
}

BOOST_AUTO_TEST_CASE(device_routing_records_equal_the_host_recorder) {
  std::mt19937_64 gen(sy::test::base_seed() + 1105);
  for (bool training : {true, false}) {
    const index_t e = 7, d = 13;
    sy::training::dynmoe_recorder host;
    std::vector<float> routing(static_cast<std::size_t>(e), 0.0f),
        samples(static_cast<std::size_t>(d), 0.0f);
    for (int forward = 0; forward < 3; ++forward) {
      problem<sy::bfloat16> p(40 + forward, d, e, gen, 2, 0.1f);
      for (auto& g : p.g) g += 0.5f;  // high thresholds: some tokens use no expert
      forward_pair<sy::bfloat16> f(sy::routers::DynMoE{.training = training}, p);
      BOOST_REQUIRE(f.plans_equal());
      host.record(f.host.ref(), p.xv());
      serial_runner run;
      run(e,
          sy::ops::dynmoe_record_experts{p.tokens, e, f.dev.expert_ids.data(), f.dev.counts.data(),
                                         routing.data()},
          "");
      run(d,
          sy::ops::dynmoe_record_samples<sy::bfloat16>{p.xv(), f.dev.counts.data(), samples.data()},
          "");
    }
    BOOST_TEST(same_bits(host.routing_records, routing));
    BOOST_TEST(same_bits(host.sample_records, samples));
    if (training)
      BOOST_TEST(std::any_of(samples.begin(), samples.end(), [](float v) { return v != 0.0f; }));
  }
}
