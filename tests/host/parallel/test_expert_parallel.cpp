// SPDX-License-Identifier: Apache-2.0
// Expert parallelism on the thread communicator, N = 1 … 8 ranks: the acceptance cases of
// ep_cases.hpp (bitwise equality with the single-process host layer, forward and backward)
// for TopK, TopP, DynMoE (tokens with no expert included) and AdaptiveGating, float and
// bfloat16, with and without batch_invariant, with identity / zero / shared experts.
#include <boost/test/unit_test.hpp>

#include <boost/mp11/list.hpp>

#include <tuple>

#include "host/parallel/ep_cases.hpp"

namespace sy = switchyard;
using sy::parallel::thread_comm;

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

}  // namespace

BOOST_AUTO_TEST_CASE_TEMPLATE(bitwise_equal_to_the_single_process_layer, C, combos) {
  for (int n = 1; n <= 8; ++n) {
    for (int variant = 0; variant < 2; ++variant) {
      sy::test::ep::problem pb;
      pb.ranks = n;
      pb.seed = sy::test::base_seed() + static_cast<std::uint64_t>(n * 10 + variant);
      pb.batch_invariant = variant == 1;
      // Odd rank counts also carry the non-FFN kinds; the shared expert with batch_invariant
      // (its rows then do not depend on the batch, so (a) compares whole outputs).
      if (n % 2 == 1) {
        pb.identity = 1;
        pb.zero = 1;
      }
      pb.shared = variant == 1 && n % 3 == 0;
      BOOST_TEST_CONTEXT("N = " << n << ", batch_invariant = " << pb.batch_invariant
                                << ", identity/zero = " << pb.identity << ", shared = "
                                << pb.shared) {
        sy::parallel::thread_group group(n);
        sy::parallel::run_ranks(group, [&](const thread_comm& comm) {
          sy::test::ep::routed_case<typename C::router, typename C::element>(comm, pb);
        });
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(dynmoe_problems_have_tokens_with_no_expert_and_with_every_expert) {
  // The DynMoE case above is only meaningful if its routing has k = 0 and k = E tokens.
  sy::test::ep::problem pb;
  pb.ranks = 4;
  pb.seed = sy::test::base_seed() + 40;
  sy::index_t zero = 0, all = 0;
  for (int s = 0; s < pb.ranks; ++s) {
    const auto p = sy::test::ep::route_alone<sy::routers::DynMoE, float>(
        pb, sy::test::ep::make_router<sy::routers::DynMoE>(), s);
    for (auto c : p.counts) {
      zero += c == 0;
      all += c == p.width;
    }
  }
  BOOST_TEST_MESSAGE("DynMoE tokens with k = 0: " << zero << ", with k = E: " << all);
  BOOST_CHECK_GT(zero, 0);
}
