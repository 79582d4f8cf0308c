// SPDX-License-Identifier: Apache-2.0
// Same bits on any machine (docs/design.md): the host layer's outputs do not depend on the
// OpenMP / OpenBLAS thread count (every output of forward and backward, every router ×
// dispatch × dtype), and a token's y and dx do not depend on the other tokens of its batch
// (T = 1 vs the whole batch, reversed order, other neighbours) for every router whose plan
// for a token depends on that token alone, with every dispatch where no capacity drop
// applies: always with `batch_invariant`, and without it where the linked BLAS computes every
// row position alike (host::blas_batch_invariant(); else that case reports Skipped).
//
// The shapes put the expert GEMMs on the BLAS path of the row-panel rule (row_panels.hpp):
// one where calls may be as short as 12 rows, one where the small-kernel floor raises it to 164.
#include <boost/mp11/algorithm.hpp>
#include <boost/mp11/list.hpp>
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <string>
#include <tuple>
#include <vector>

#include <omp.h>

#include <switchyard/switchyard.hpp>

#include "host/layer/layer_reference.hpp"
#include "support/random.hpp"

using namespace switchyard;

namespace {

//! Sets the OpenMP and (where the BLAS offers it) the BLAS thread count.
void set_threads(int n) {
  omp_set_num_threads(n);
  host::set_blas_threads(n);
}

struct thread_guard {
  int omp = omp_get_max_threads();
  int blas = host::blas_threads();
  ~thread_guard() {
    omp_set_num_threads(omp);
    host::set_blas_threads(blas);
  }
};

// ---- per-router coefficients and gradient storage ---------------------------------------
template <class R>
typename R::losses_type coefficients() {
  using L = typename R::losses_type;
  if constexpr (std::is_same_v<L, routing::softmax_router_losses>) return {0.01f, 0.02f, 0.001f};
  else if constexpr (std::is_same_v<L, routing::topp_losses>) return {0.01f, 0.02f, 0.001f};
  else if constexpr (std::is_same_v<L, routing::adaptive_gating_losses>) return {0.01f, 0.001f, 0.0f};
  else return L::uniform(0.01f);
}

template <class R>
struct router_grads_storage {
  std::vector<float> w;
  router_grads_storage(index_t experts, index_t d) : w(static_cast<std::size_t>(experts * d), 0.0f) {}
  typename R::grads_type view(index_t experts, index_t d) {
    return {make_view(w.data(), experts, d)};
  }
  bool operator==(const router_grads_storage&) const = default;
};
template <>
struct router_grads_storage<routers::DynMoE> {
  std::vector<float> w, th;
  router_grads_storage(index_t experts, index_t d)
      : w(static_cast<std::size_t>(experts * d), 0.0f), th(static_cast<std::size_t>(experts), 0.0f) {}
  routing::dynmoe_grads view(index_t experts, index_t d) {
    return {make_view(w.data(), d, experts), make_view(th.data(), experts)};
  }
  bool operator==(const router_grads_storage&) const = default;
};

template <class R>
R make_router() {
  if constexpr (std::is_same_v<R, routers::TopK>) return {.k = 2};
  else if constexpr (std::is_same_v<R, routers::TopP>) return {.p = 0.5f};
  else if constexpr (std::is_same_v<R, routers::AdaptiveGating>) return {.threshold = 0.2f};
  else return R{};
}

template <class D>
D make_dispatch() {
  // Capacity far above the load: nothing is dropped (C is capped at T rounded up).
  if constexpr (std::is_same_v<D, dispatch::padded_capacity>) return {.capacity_factor = 100.0f};
  else return D{};
}

//! Everything one forward + backward produces, compared bitwise.
template <class R>
struct outputs {
  std::vector<std::uint16_t> y16;  // y for half / bfloat16 (bits)
  std::vector<float> y, dx, dw1, db1, dw2, db2;
  router_grads_storage<R> rg;
  std::vector<float> losses;
  std::vector<index_t> dropped;
  bool operator==(const outputs&) const = default;
};

//! One problem: inputs in storage type T, dy, and a layer of router R and dispatch D.
template <class R, class D, class T>
struct problem {
  static constexpr index_t experts = 6;
  index_t tokens, d, f;
  test::layer_data<T> L;
  test::router_setup<R> rs;
  std::vector<T> dy;
  MoELayer<R, activation::swiglu, D> layer;

  problem(std::mt19937_64& g, index_t t, index_t d_, index_t f_, bool fixed)
      : tokens(t), d(d_), f(f_), L(g, t, d_, f_, experts, true, true),
        rs(g, make_router<R>(), t, d_, experts),
        layer{.router = rs.router, .dispatch = make_dispatch<D>(), .batch_invariant = fixed} {
    const auto r = test::normal(g, static_cast<std::size_t>(t * d_));
    for (float v : r) dy.push_back(from_float<T>(v));
  }

  //! Forward + backward over the token subset `rows` (in that order) of this problem's batch;
  //! `coeffs` weights the aux losses in backward.
  outputs<R> run(const std::vector<index_t>& rows, const typename R::losses_type& coeffs) const {
    const index_t n = static_cast<index_t>(rows.size());
    std::vector<T> x(static_cast<std::size_t>(n * d)), dys(x.size());
    for (index_t i = 0; i < n; ++i)
      for (index_t c = 0; c < d; ++c) {
        x[i * d + c] = L.x[rows[i] * d + c];
        dys[i * d + c] = dy[rows[i] * d + c];
      }
    outputs<R> o{{}, {}, std::vector<float>(x.size(), 0.5f), std::vector<float>(L.w1.size()),
                 std::vector<float>(L.b1.size()), std::vector<float>(L.w2.size()),
                 std::vector<float>(L.b2.size()), router_grads_storage<R>(experts, d), {}, {}};
    std::vector<T> y(x.size(), from_float<T>(-7.0f));  // poisoned
    typename decltype(layer)::result_type res;
    const auto xv = make_view<const T>(x.data(), n, d);
    layer.template forward<T>(switchyard::host_context{}, xv, rs.params(d), L.weights(), make_view(y.data(), n, d), res);
    layer.template backward<T>(switchyard::host_context{}, xv, rs.params(d), L.weights(), res, make_view<const T>(dys.data(), n, d), coeffs,
        make_view(o.dx.data(), n, d),
        {make_view(o.dw1.data(), experts, L.p, d), make_view(o.db1.data(), experts, L.p),
         make_view(o.dw2.data(), experts, d, f), make_view(o.db2.data(), experts, d)},
        o.rg.view(experts, d));
    for (const T& v : y) {
      if constexpr (std::is_same_v<T, float>) o.y.push_back(v);
      else {
        std::uint16_t bits;
        std::memcpy(&bits, &v, sizeof bits);
        o.y16.push_back(bits);
      }
    }
    o.losses.resize(sizeof(res.losses) / sizeof(float));
    std::memcpy(o.losses.data(), &res.losses, sizeof(res.losses));
    o.dropped = res.dropped;
    return o;
  }

  //! Row i of y (as bits) and dx of a run.
  static std::vector<std::uint32_t> row_bits(const outputs<R>& o, index_t i, index_t d) {
    std::vector<std::uint32_t> b;
    for (index_t c = 0; c < d; ++c) {
      std::uint32_t v = 0;
      if constexpr (std::is_same_v<T, float>) std::memcpy(&v, &o.y[i * d + c], 4);
      else v = o.y16[i * d + c];
      b.push_back(v);
    }
    for (index_t c = 0; c < d; ++c) {
      std::uint32_t v;
      std::memcpy(&v, &o.dx[i * d + c], 4);
      b.push_back(v);
    }
    return b;
  }
};

std::vector<index_t> iota(index_t n) {
  std::vector<index_t> v(static_cast<std::size_t>(n));
  std::iota(v.begin(), v.end(), index_t{0});
  return v;
}

template <class R, class D>
struct combo {
  using router = R;
  using dispatch_type = D;
};

using dispatches = boost::mp11::mp_list<dispatch::sorted_grouped, dispatch::padded_capacity, dispatch::dense>;
// DA-MoE's K depends on the token's importance relative to the batch maximum, so its plan for
// a token depends on the batch: it is covered by thread invariance only.
using batch_combos = boost::mp11::mp_product<
    combo, boost::mp11::mp_list<routers::TopK, routers::TopP, routers::AdaptiveGating, routers::DynMoE>,
    dispatches>;
using thread_combos = boost::mp11::mp_append<
    batch_combos,
    boost::mp11::mp_product<combo, boost::mp11::mp_list<routers::DAMoE<routing::importance::precomputed>>,
                            dispatches>>;

// Shapes: d·d_ff = 256·336 passes the small-kernel bound at 12 rows (calls of 12, 16, 20, …
// rows); 96·64 needs calls of >= 164 rows (the floor); both use the BLAS where one is linked.
// Float runs both; half and bfloat16 (converted weight panels, experts in parallel on panel slots) the second.
struct shape {
  index_t tokens, d, f;
};
constexpr shape wide{64, 256, 336}, narrow{90, 96, 64};

template <class R, class D, class T>
void check_threads(const shape& s, std::uint64_t seed, bool fixed = false) {
  std::mt19937_64 g(seed);
  const problem<R, D, T> pb(g, s.tokens, s.d, s.f, fixed);
  const thread_guard guard;
  const auto all = iota(s.tokens);
  set_threads(1);
  const auto ref = pb.run(all, coefficients<R>());
  BOOST_TEST(std::any_of(ref.dw1.begin(), ref.dw1.end(), [](float v) { return v != 0.0f; }));
  for (int threads : {2, 3, 4, 8}) {
    set_threads(threads);
    const auto o = pb.run(all, coefficients<R>());
    BOOST_TEST((o.y == ref.y && o.y16 == ref.y16), "y differs with " << threads << " threads");
    BOOST_TEST((o.dx == ref.dx), "dx differs with " << threads << " threads");
    BOOST_TEST((o.dw1 == ref.dw1 && o.db1 == ref.db1 && o.dw2 == ref.dw2 && o.db2 == ref.db2),
               "expert gradients differ with " << threads << " threads");
    BOOST_TEST((o.rg == ref.rg), "router gradients differ with " << threads << " threads");
    BOOST_TEST((o.losses == ref.losses && o.dropped == ref.dropped),
               "losses / drops differ with " << threads << " threads");
  }
}

template <class R, class D, class T>
void check_batch(const shape& s, std::uint64_t seed, bool fixed) {
  std::mt19937_64 g(seed);
  // 2·T tokens: the first T form the batch; the others are fresh neighbours.
  const problem<R, D, T> pb(g, 2 * s.tokens, s.d, s.f, fixed);
  const typename R::losses_type no_aux{};  // aux-loss gradients depend on the whole batch
  const auto full = pb.run(iota(s.tokens), no_aux);
  BOOST_TEST(std::all_of(full.dropped.begin(), full.dropped.end(), [](index_t v) { return v == 0; }));
  const std::vector<index_t> probes = {0, 1, s.tokens / 2, s.tokens - 1};
  using P = problem<R, D, T>;
  // T = 1 for each probe.
  for (index_t t : probes) {
    const auto one = pb.run({t}, no_aux);
    BOOST_TEST((P::row_bits(one, 0, s.d) == P::row_bits(full, t, s.d)),
               "token " << t << " alone differs from the same token in a batch of " << s.tokens);
  }
  // Reversed order.
  std::vector<index_t> rev = iota(s.tokens);
  std::reverse(rev.begin(), rev.end());
  const auto r = pb.run(rev, no_aux);
  for (index_t i = 0; i < s.tokens; ++i)
    BOOST_TEST((P::row_bits(r, i, s.d) == P::row_bits(full, rev[i], s.d)),
               "token " << rev[i] << " differs in the reversed batch");
  // Other neighbours: the probes spread among fresh tokens (a batch of 37).
  std::vector<index_t> mixed;
  for (index_t i = 0; i < 33; ++i) mixed.push_back(s.tokens + (i * 7) % s.tokens);
  for (std::size_t k = 0; k < probes.size(); ++k) {
    const index_t pos = static_cast<index_t>(k * 9 + 2);
    mixed.insert(mixed.begin() + pos, probes[k]);
  }
  const auto m = pb.run(mixed, no_aux);
  for (index_t i = 0; i < static_cast<index_t>(mixed.size()); ++i) {
    if (mixed[i] >= s.tokens) continue;
    BOOST_TEST((P::row_bits(m, i, s.d) == P::row_bits(full, mixed[i], s.d)),
               "token " << mixed[i] << " differs among other neighbours");
  }
}

}  // namespace

BOOST_AUTO_TEST_CASE_TEMPLATE(bitwise_equal_for_every_thread_count, C, thread_combos) {
  using R = typename C::router;
  using D = typename C::dispatch_type;
  const std::uint64_t seed = test::base_seed() + 9001;
  check_threads<R, D, float>(wide, seed);
  check_threads<R, D, float>(narrow, seed + 1);
  check_threads<R, D, switchyard::half>(narrow, seed + 2);
  check_threads<R, D, switchyard::bfloat16>(narrow, seed + 3);
  check_threads<R, D, float>(narrow, seed + 4, true);  // batch_invariant layers too
}

BOOST_AUTO_TEST_CASE_TEMPLATE(batch_invariant_layer_token_bits_independent_of_batch, C,
                              batch_combos) {
  using R = typename C::router;
  using D = typename C::dispatch_type;
  const std::uint64_t seed = test::base_seed() + 9101;
  check_batch<R, D, float>(wide, seed, true);
  check_batch<R, D, float>(narrow, seed + 1, true);
  check_batch<R, D, switchyard::half>(narrow, seed + 2, true);
  check_batch<R, D, switchyard::bfloat16>(narrow, seed + 3, true);
}

// Without `batch_invariant` the token-row GEMMs are BLAS calls under the row-panel rule: the
// promise holds where the BLAS's kernels treat every row position alike.
// Boost.Test reports these cases skipped where the probe says the BLAS is position-dependent.
BOOST_AUTO_TEST_SUITE(blas_rows, *boost::unit_test::precondition([](boost::unit_test::test_unit_id) {
  return boost::test_tools::assertion_result(host::blas_batch_invariant());
}))
BOOST_AUTO_TEST_CASE_TEMPLATE(blas_layer_token_bits_independent_of_batch, C, batch_combos) {
  using R = typename C::router;
  using D = typename C::dispatch_type;
  const std::uint64_t seed = test::base_seed() + 9201;
  check_batch<R, D, float>(wide, seed, false);
  check_batch<R, D, float>(narrow, seed + 1, false);
  check_batch<R, D, switchyard::half>(narrow, seed + 2, false);
}
BOOST_AUTO_TEST_SUITE_END()

// Where the probe says the BLAS is position-dependent, the layer without batch_invariant
// really does give a token other bits in another batch (so the probe is not too strict),
// and the batch_invariant layer does not.
BOOST_AUTO_TEST_CASE(probe_agrees_with_the_layer) {
  std::mt19937_64 g(test::base_seed() + 9301);
  using P = problem<routers::TopK, dispatch::sorted_grouped, float>;
  const P pb(g, 2 * wide.tokens, wide.d, wide.f, false);
  std::vector<index_t> rev = iota(wide.tokens);
  std::reverse(rev.begin(), rev.end());
  const auto full = pb.run(iota(wide.tokens), {}), r = pb.run(rev, {});
  bool same = true;
  for (index_t i = 0; i < wide.tokens; ++i)
    same = same && P::row_bits(r, i, wide.d) == P::row_bits(full, rev[i], wide.d);
  BOOST_TEST_MESSAGE("host::blas_batch_invariant() = " << host::blas_batch_invariant()
                     << ", reversed batch bitwise equal: " << same);
  if (host::blas_batch_invariant()) BOOST_TEST(same);
  else BOOST_TEST(!same, "the probe says position-dependent but the layer was invariant");
}
