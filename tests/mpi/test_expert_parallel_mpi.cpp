// SPDX-License-Identifier: Apache-2.0
// Expert parallelism over parallel::mpi_comm, one rank per process, under mpiexec -n 2, 3, 4
// (CTest label mpi): the rank-level acceptance cases of tests/host/parallel/ep_cases.hpp, the
// ones the thread communicator runs, here over Open MPI. Bitwise equality with the
// single-process host layer, forward and backward, for TopK, TopP, DynMoE (tokens with no
// expert) and AdaptiveGating, float and bfloat16, with and without batch_invariant, with
// identity / zero / shared experts; the hand-made edge routings (every token to one expert,
// a rank that receives nothing, k = 0 and k = k_max tokens, random k with non-FFN slots); and
// the Static bound's overflow, counted per expert; padded_capacity on the receivers.
#include <boost/test/unit_test.hpp>

#include <cstdint>
#include <tuple>
#include <vector>

#include "host/parallel/ep_cases.hpp"
#include "mpi/mpi_fixture.hpp"
#include "switchyard/parallel/mpi_comm.hpp"

namespace sy = switchyard;
namespace ep = sy::test::ep;

using mpi_fixture = switchyard::test::mpi_global_fixture;
BOOST_TEST_GLOBAL_FIXTURE(mpi_fixture);

namespace {

template <class Router, class T>
struct combo {
  using router = Router;
  using element = T;
};

using combos =
    std::tuple<combo<sy::routers::TopK, float>, combo<sy::routers::TopK, sy::bfloat16>,
               combo<sy::routers::TopP, float>, combo<sy::routers::TopP, sy::bfloat16>,
               combo<sy::routers::DynMoE, float>, combo<sy::routers::DynMoE, sy::bfloat16>,
               combo<sy::routers::AdaptiveGating, float>,
               combo<sy::routers::AdaptiveGating, sy::bfloat16>>;

//! The problem of `variant` on this communicator (seeded the same on every rank).
ep::problem make_problem(const sy::parallel::mpi_comm& comm, int variant) {
  ep::problem pb;
  pb.ranks = comm.size();
  pb.seed = sy::test::base_seed() + 500 + static_cast<std::uint64_t>(comm.size() * 10 + variant);
  pb.batch_invariant = variant % 2 == 1;
  if (variant >= 2 || comm.size() % 2 == 1) {  // the non-FFN kinds: never sent
    pb.identity = 1;
    pb.zero = 1;
  }
  pb.shared = variant == 3;  // with batch_invariant: its rows do not depend on the batch
  return pb;
}

}  // namespace

BOOST_AUTO_TEST_CASE_TEMPLATE(bitwise_equal_to_the_single_process_layer, C, combos) {
  const sy::parallel::mpi_comm comm;
  for (int variant = 0; variant < 4; ++variant) {
    const ep::problem pb = make_problem(comm, variant);
    BOOST_TEST_CONTEXT("rank " << comm.rank() << " of " << comm.size() << ", batch_invariant = "
                               << pb.batch_invariant << ", identity/zero = " << pb.identity
                               << ", shared = " << pb.shared) {
      ep::routed_case<typename C::router, typename C::element>(comm, pb);
    }
  }
}

BOOST_AUTO_TEST_CASE(edge_routings) {
  const sy::parallel::mpi_comm comm;
  for (const ep::edge which :
       {ep::edge::one_expert, ep::edge::last_rank_idle, ep::edge::k_extremes, ep::edge::mixed}) {
    for (int variant = 0; variant < 2; ++variant) {
      ep::problem pb = make_problem(comm, variant == 0 ? 0 : 2);
      pb.seed += 70 + static_cast<std::uint64_t>(which);
      BOOST_TEST_CONTEXT("edge " << static_cast<int>(which) << ", rank " << comm.rank() << " of "
                                 << comm.size() << ", identity/zero = " << pb.identity) {
        ep::plan_case<float>(comm, pb, which);
        ep::plan_case<sy::bfloat16>(comm, pb, which);
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(static_bound_overflow_is_counted) {
  const sy::parallel::mpi_comm comm;
  for (const sy::index_t peer_rows : {sy::index_t{1}, sy::index_t{2}, sy::index_t{5}}) {
    for (const ep::edge which : {ep::edge::mixed, ep::edge::one_expert}) {
      ep::problem pb = make_problem(comm, 2);
      pb.seed += 90 + static_cast<std::uint64_t>(peer_rows);
      BOOST_TEST_CONTEXT("peer_rows " << peer_rows << ", edge " << static_cast<int>(which)
                                      << ", rank " << comm.rank() << " of " << comm.size()) {
        ep::static_bound_case<float>(comm, pb, peer_rows, which);
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(padded_capacity_on_the_receivers) {
  // ExpertParallel<mpi_comm, static_bound, padded_capacity>: an absolute C = 1 or 2 and a bound
  // nobody reaches (bitwise the single-process padded layer on the concatenation, drops
  // counted on the token's rank), then a bound that drops too (both kinds at once).
  const sy::parallel::mpi_comm comm;
  for (const sy::index_t c : {sy::index_t{1}, sy::index_t{2}}) {
    for (const auto drop :
         {sy::dispatch::dropped_output::zero, sy::dispatch::dropped_output::scaled_input}) {
      for (const sy::index_t peer_rows : {sy::index_t{64}, sy::index_t{2}}) {
        if (peer_rows == 2 && drop != sy::dispatch::dropped_output::zero) continue;
        ep::problem pb = make_problem(comm, 2);
        pb.seed += 110 + static_cast<std::uint64_t>(c);
        std::vector<ep::plan_store> plans;
        for (int s = 0; s < pb.ranks; ++s) plans.push_back(ep::edge_plan(pb, s, ep::edge::mixed));
        sy::dispatch::padded_capacity local;
        local.expert_capacity = c;
        local.drop = drop;
        BOOST_TEST_CONTEXT("C " << c << ", drop " << static_cast<int>(drop) << ", peer_rows "
                                << peer_rows << ", rank " << comm.rank() << " of "
                                << comm.size()) {
          ep::padded_case<float>(comm, pb, plans, peer_rows, local);
          ep::padded_case<sy::bfloat16>(comm, pb, plans, peer_rows, local);
        }
      }
    }
  }
}

// ---- bad input: detected on every rank, the same error type, nobody hangs ----------------

namespace {

//! A small code per error type, to check that every rank threw the same one.
sy::index_t error_code(const std::exception& e) {
  if (dynamic_cast<const sy::shape_error*>(&e) != nullptr) return 1;
  if (dynamic_cast<const sy::range_error*>(&e) != nullptr) return 2;
  if (dynamic_cast<const sy::null_pointer_error*>(&e) != nullptr) return 3;
  if (dynamic_cast<const sy::memory_space_error*>(&e) != nullptr) return 4;
  if (dynamic_cast<const sy::invalid_argument*>(&e) != nullptr) return 5;
  return 6;
}

//! Runs `body` on every rank: every rank must throw, the same error type everywhere.
template <class Body>
void expect_error_on_every_rank(const sy::parallel::mpi_comm& comm, const char* what, Body body) {
  sy::index_t code = 0;
  try {
    body();
  } catch (const std::exception& e) {
    code = error_code(e);
    BOOST_TEST_MESSAGE(what << ", rank " << comm.rank() << ": " << e.what());
  }
  std::vector<sy::index_t> codes(static_cast<std::size_t>(comm.size()));
  comm.all_gather(code, sy::span<sy::index_t>(codes.data(), codes.size()));
  BOOST_TEST(code != 0, what << ": rank " << comm.rank() << " did not throw");
  for (int r = 0; r < comm.size(); ++r) {
    BOOST_TEST(codes[r] == codes[0], what << ": rank " << r << " threw error type " << codes[r]
                                          << ", rank 0 type " << codes[0]);
  }
}

}  // namespace

BOOST_AUTO_TEST_CASE(bad_input_is_an_error_on_every_rank) {
  using Router = sy::routers::TopK;
  using Layer = ep::ep_layer<Router, float, sy::parallel::mpi_comm>;
  const sy::parallel::mpi_comm comm;
  ep::problem pb;
  pb.ranks = comm.size();
  pb.seed = sy::test::base_seed() + 900;
  pb.batch_invariant = true;  // the last forward is then compared with the rank's batch alone
  const int r = comm.rank(), n = comm.size();
  const sy::index_t d = pb.d, el = pb.experts_per_rank, tr = pb.tokens(r), e = pb.experts();
  const sy::host_context ctx;
  const ep::weights<float> wt(pb);
  const ep::router_data<Router> rd(pb);
  Layer layer = ep::configure(Layer{}, pb, ep::make_router<Router>());
  layer.dispatch = {.comm = &comm};
  const auto x = ep::tokens_of<float>(pb, r, 1);
  std::vector<float> y(static_cast<std::size_t>(tr * d), -5.0f);
  Layer::result_type result;
  auto forward = [&](const sy::routing::linear_router_params& rp,
                     const sy::expert_weights<float>& w, sy::index_t x_cols) {
    layer.forward(ctx, sy::make_view<const float>(x.data(), tr, x_cols), rp, w,
                  sy::make_view<float>(y.data(), tr, x_cols), result);
  };

  // Rank 0 holds one expert more than the others (mismatched expert counts).
  expect_error_on_every_rank(comm, "mismatched expert counts", [&] {
    forward(rd.params(), wt.view(0 + (r == 0 ? 0 : r * el), el + (r == 0 ? 1 : 0)), d);
  });
  // The last rank's tokens are narrower than the router's d.
  expect_error_on_every_rank(comm, "x width on one rank", [&] {
    forward(rd.params(), wt.view(r * el, el), r == n - 1 ? d - 1 : d);
  });
  // E not a multiple of N: the router scores E - 1 experts; the ranks hold E/N each but the
  // last, which holds E/N - 1 (uneven shards are not allowed: docs/expert-parallel.md).
  const sy::routing::linear_router_params uneven{sy::make_view<const float>(rd.w.data(), e - 1, d)};
  expect_error_on_every_rank(comm, "uneven shards", [&] {
    forward(uneven, wt.view(r * el, r == n - 1 ? el - 1 : el), d);
  });
  // After all of that the ranks are still in step: a correct forward runs everywhere.
  bool ok = true;
  try {
    forward(rd.params(), wt.view(r * el, el), d);
  } catch (const std::exception& ex) {
    ok = false;
    BOOST_TEST_MESSAGE("rank " << r << ": " << ex.what());
  }
  BOOST_TEST(comm.all_agree(ok), "a correct forward after the errors failed on some rank");
  // And its output is the single-process layer's on this rank's batch alone (batch_invariant).
  std::vector<float> y_alone;
  (void)ep::route_alone<Router, float>(pb, ep::make_router<Router>(), r, nullptr, &y_alone);
  ep::same_bits("y after the errors vs the single-process layer", y.data(), y_alone.data(),
                y.size(), r);
}
