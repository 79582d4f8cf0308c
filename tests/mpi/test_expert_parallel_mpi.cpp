// SPDX-License-Identifier: Apache-2.0
// Expert parallelism over parallel::mpi_comm, one rank per process, under mpiexec -n 2, 3, 4
// (CTest label mpi): the rank-level acceptance cases of tests/host/parallel/ep_cases.hpp, the
// ones the thread communicator runs, here over Open MPI. Bitwise equality with the
// single-process host layer, forward and backward, for TopK, TopP, DynMoE (tokens with no
// expert) and AdaptiveGating, float and bfloat16, with and without batch_invariant, with
// identity / zero / shared experts; the hand-made edge routings (every token to one expert,
// a rank that receives nothing, k = 0 and k = k_max tokens, random k with non-FFN slots); and
// the Static bound's overflow, counted per expert.
#include <boost/test/unit_test.hpp>

#include <cstdint>
#include <tuple>

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
