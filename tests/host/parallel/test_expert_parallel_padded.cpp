// SPDX-License-Identifier: Apache-2.0
// ExpertParallel<thread_comm, static_bound, padded_capacity> on the host, N = 1 … 5 thread
// ranks, float and bfloat16 (ep_cases.hpp's padded_case / padded_routed_case): with an
// absolute expert_capacity C, priority token_major and a bound nobody reaches, every rank's
// forward_experts / backward_experts equal the single-process padded_capacity layer's on the
// concatenation of the ranks' batches, bit for bit (y, dx, d_weights, its experts' weight
// gradients), for drop zero and scaled_input; `dropped` per expert holds the drops of this
// rank's pairs, computed independently (per global expert, the first C pairs in concatenated
// (rank, token, slot) order kept). With a bound that does drop, both kinds of drop at once;
// the edge routings with C = 1; ops::ep_local_drops on a hand-made example; the routed layer.
#include <boost/test/unit_test.hpp>

#include <cstdint>
#include <tuple>
#include <vector>

#include <switchyard/ops/exchange_plan.hpp>

#include "host/parallel/ep_cases.hpp"

namespace sy = switchyard;
namespace ep = sy::test::ep;
using sy::index_t;
using sy::parallel::thread_comm;

namespace {

using elements = std::tuple<float, sy::bfloat16>;

//! A bound no rank reaches in these problems (at most 8 tokens · width pairs per peer).
constexpr index_t large_bound = 64;

//! The padded_capacity policy under test: an absolute C, token_major.
sy::dispatch::padded_capacity padded(index_t c, sy::dispatch::dropped_output drop) {
  sy::dispatch::padded_capacity p;
  p.expert_capacity = c;
  p.drop = drop;
  p.priority = sy::dispatch::capacity_priority::token_major;
  return p;
}

//! The problem for N ranks (odd N also routes to identity / zero experts: never sent).
ep::problem make_problem(int n, std::uint64_t salt) {
  ep::problem pb;
  pb.ranks = n;
  pb.seed = sy::test::base_seed() + 7000 + salt * 100 + static_cast<std::uint64_t>(n);
  if (n % 2 == 1) {
    pb.identity = 1;
    pb.zero = 1;
  }
  return pb;
}

std::vector<ep::plan_store> edge_plans(const ep::problem& pb, ep::edge which) {
  std::vector<ep::plan_store> plans;
  for (int s = 0; s < pb.ranks; ++s) plans.push_back(ep::edge_plan(pb, s, which));
  return plans;
}

//! How many pairs the capacity drops in all (the cases must drop something to mean much).
index_t total_drops(const ep::problem& pb, const std::vector<ep::plan_store>& plans,
                    index_t peer_rows, index_t c) {
  std::vector<std::vector<char>> kept;
  for (const auto& p : plans) kept.push_back(ep::bound_kept(pb, p, peer_rows));
  index_t n = 0;
  for (const auto& w : ep::padded_drops(pb, plans, kept, c))
    for (index_t v : w) n += v;
  return n;
}

}  // namespace

BOOST_AUTO_TEST_CASE_TEMPLATE(bitwise_equal_to_the_single_process_padded_layer, T, elements) {
  index_t drops_seen = 0;
  for (int n = 1; n <= 5; ++n) {
    const ep::problem pb = make_problem(n, 1);
    const auto plans = edge_plans(pb, ep::edge::mixed);
    for (const index_t c : {index_t{1}, index_t{2}, index_t{1000}}) {
      drops_seen += total_drops(pb, plans, large_bound, c);
      for (const auto drop :
           {sy::dispatch::dropped_output::zero, sy::dispatch::dropped_output::scaled_input}) {
        BOOST_TEST_CONTEXT("N = " << n << ", C = " << c << ", drop = " << static_cast<int>(drop)) {
          sy::parallel::thread_group group(n);
          sy::parallel::run_ranks(group, [&](const thread_comm& comm) {
            ep::padded_case<T>(comm, pb, plans, large_bound, padded(c, drop));
          });
        }
      }
    }
  }
  BOOST_TEST(drops_seen > 0, "the capacities drop pairs somewhere");
}

BOOST_AUTO_TEST_CASE_TEMPLATE(the_bound_and_the_capacity_drop_together, T, elements) {
  index_t bound_drops = 0, capacity_drops = 0;
  for (int n = 1; n <= 5; ++n) {
    const ep::problem pb = make_problem(n, 2);
    const auto plans = edge_plans(pb, ep::edge::mixed);
    for (const index_t r : {index_t{1}, index_t{2}}) {
      for (const index_t c : {index_t{1}, index_t{2}}) {
        bound_drops += total_drops(pb, plans, r, 1000);
        capacity_drops += total_drops(pb, plans, r, c) - total_drops(pb, plans, r, 1000);
        BOOST_TEST_CONTEXT("N = " << n << ", peer_rows = " << r << ", C = " << c) {
          sy::parallel::thread_group group(n);
          sy::parallel::run_ranks(group, [&](const thread_comm& comm) {
            ep::padded_case<T>(comm, pb, plans, r, padded(c, sy::dispatch::dropped_output::zero));
          });
        }
      }
    }
  }
  BOOST_TEST(bound_drops > 0);
  BOOST_TEST(capacity_drops > 0);
}

BOOST_AUTO_TEST_CASE_TEMPLATE(edge_routings_with_capacity_one, T, elements) {
  for (int n = 1; n <= 5; ++n) {
    for (const ep::edge which :
         {ep::edge::one_expert, ep::edge::last_rank_idle, ep::edge::k_extremes}) {
      const ep::problem pb = make_problem(n, 3 + static_cast<std::uint64_t>(which));
      const auto plans = edge_plans(pb, which);
      for (const auto drop :
           {sy::dispatch::dropped_output::zero, sy::dispatch::dropped_output::scaled_input}) {
        BOOST_TEST_CONTEXT("N = " << n << ", edge " << static_cast<int>(which)
                                  << ", drop = " << static_cast<int>(drop)) {
          sy::parallel::thread_group group(n);
          sy::parallel::run_ranks(group, [&](const thread_comm& comm) {
            ep::padded_case<T>(comm, pb, plans, large_bound, padded(1, drop));
          });
        }
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(ep_local_drops_marks_and_counts_the_receivers_drops) {
  // 3 tokens, width 2, E = 4. Pairs (t, j) -> p = 2t + j; pair 3 (t = 1, j = 1) unused, pair 4
  // dropped by the bound. Send rows 0 … 5; the receivers dropped rows 1 and 4, row 5 unclaimed.
  const std::vector<std::int32_t> ids = {2, 0, 3, -1, 1, 2};
  std::vector<index_t> pair_row = {0, 1, 2, sy::dispatch::unused_pair, sy::dispatch::dropped_pair,
                                   4};
  const std::vector<index_t> verdict = {7, sy::dispatch::dropped_pair, 0, 3,
                                        sy::dispatch::dropped_pair, sy::dispatch::unused_pair};
  std::vector<index_t> dropped = {10, 20, 30, 40};
  const sy::ops::ep_local_drops<const std::int32_t> f{
      sy::make_view<const std::int32_t>(ids.data(), index_t{3}, index_t{2}), 2, verdict.data(),
      pair_row.data(), dropped.data()};
  for (index_t p = 0; p < 6; ++p) f(p);
  const std::vector<index_t> want_rows = {0, sy::dispatch::dropped_pair, 2,
                                          sy::dispatch::unused_pair, sy::dispatch::dropped_pair,
                                          sy::dispatch::dropped_pair};
  BOOST_TEST(pair_row == want_rows, boost::test_tools::per_element());
  // Pair 1 (expert 0) and pair 5 (expert 2); the bound's drop (pair 4) is not counted again.
  const std::vector<index_t> want_dropped = {11, 20, 31, 40};
  BOOST_TEST(dropped == want_dropped, boost::test_tools::per_element());

  // Without a count array: the same marks, nothing written elsewhere.
  std::vector<index_t> rows2 = {0, 1, 2, sy::dispatch::unused_pair, sy::dispatch::dropped_pair, 4};
  const sy::ops::ep_local_drops<const std::int32_t> g{
      sy::make_view<const std::int32_t>(ids.data(), index_t{3}, index_t{2}), 2, verdict.data(),
      rows2.data(), nullptr};
  for (index_t p = 0; p < 6; ++p) g(p);
  BOOST_TEST(rows2 == want_rows, boost::test_tools::per_element());
}

BOOST_AUTO_TEST_CASE_TEMPLATE(the_routed_layer_equals_the_single_process_padded_layer, T,
                              elements) {
  for (const int n : {2, 3}) {
    ep::problem pb = make_problem(n, 9);
    pb.identity = 0;
    pb.zero = 0;
    for (const index_t c : {index_t{1}, index_t{2}}) {
      for (const auto drop :
           {sy::dispatch::dropped_output::zero, sy::dispatch::dropped_output::scaled_input}) {
        BOOST_TEST_CONTEXT("N = " << n << ", C = " << c << ", drop = " << static_cast<int>(drop)) {
          sy::parallel::thread_group group(n);
          sy::parallel::run_ranks(group, [&](const thread_comm& comm) {
            ep::padded_routed_case<T>(comm, pb, large_bound, padded(c, drop));
          });
        }
      }
    }
  }
}
