// SPDX-License-Identifier: Apache-2.0
// static_bound's device-side exchange planning (ops/exchange_plan.hpp), run on the host
// around std::stable_sort exactly as the CUDA backend runs it around CUB's radix sort, against
// the host planner (`detail::plan_exchange`, which defines the layout) on thread ranks: every
// pair's send row (kept, dropped, unused), the drops per expert, each send row's pair, local
// expert and weight, and the receiver's one-slot plan built from the exchanged row_local
// blocks (no count exchange) equal to the one the host builds from the exchanged counts.
// Random plans over N = 1…5 ranks, E/N = 1…3, bounds from 0 to past every destination's load.
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "support/random.hpp"
#include "switchyard/backend/host/expert_parallel.hpp"
#include "switchyard/ops/exchange_plan.hpp"
#include "switchyard/parallel/thread_comm.hpp"

namespace sy = switchyard;
using sy::index_t;
using sy::ops::sort_key;

namespace {

//! A random valid plan: distinct ids per token, unused slots -1, counts in [0, width].
struct random_plan {
  index_t tokens, width, experts;
  std::vector<std::int32_t> ids, counts;
  std::vector<float> weights;

  random_plan(std::mt19937_64& g, index_t t, index_t w, index_t e)
      : tokens(t), width(w), experts(e) {
    ids.assign(static_cast<std::size_t>(t * w), -1);
    counts.assign(static_cast<std::size_t>(t), 0);
    weights = sy::test::uniform(g, static_cast<std::size_t>(t * w), 0.05f, 1.0f);
    std::vector<std::int32_t> perm(static_cast<std::size_t>(e));
    std::iota(perm.begin(), perm.end(), 0);
    for (index_t i = 0; i < t; ++i) {
      const index_t c = static_cast<index_t>(g() % static_cast<std::uint64_t>(std::min(w, e) + 1));
      counts[static_cast<std::size_t>(i)] = static_cast<std::int32_t>(c);
      // Skewed: half the tokens pick among the first experts first.
      std::shuffle(perm.begin(), perm.end(), g);
      if (g() % 2 == 0) std::sort(perm.begin(), perm.end());
      for (index_t j = 0; j < c; ++j) ids[static_cast<std::size_t>(i * w + j)] = perm[static_cast<std::size_t>(j)];
    }
  }

  [[nodiscard]] sy::routing::plan_view<const std::int32_t, const float> view() const {
    return {sy::make_view<const std::int32_t>(ids.data(), tokens, width),
            sy::make_view<const float>(weights.data(), tokens, width),
            sy::make_view<const std::int32_t>(counts.data(), tokens), experts};
  }
};

//! A radix sort's result, by std::stable_sort: sorted keys and each one's position before.
void stable_sort_pairs(const std::vector<sort_key>& keys, std::vector<sort_key>& sorted_keys,
                       std::vector<index_t>& sorted_pairs) {
  sorted_pairs.resize(keys.size());
  std::iota(sorted_pairs.begin(), sorted_pairs.end(), index_t{0});
  std::stable_sort(sorted_pairs.begin(), sorted_pairs.end(),
                   [&](index_t a, index_t b) { return keys[a] < keys[b]; });
  sorted_keys.resize(keys.size());
  for (std::size_t i = 0; i < keys.size(); ++i) sorted_keys[i] = keys[sorted_pairs[i]];
}

struct fault_log {
  std::vector<std::pair<sy::ops::plan_fault, index_t>>* log;
  void operator()(sy::ops::plan_fault k, index_t i) const { log->emplace_back(k, i); }
};

//! The device pipeline on the host: what each array holds after it.
struct device_plan {
  std::vector<index_t> pair_row, row_pair, row_local, dropped;
  std::vector<float> row_weight;
  std::vector<std::pair<sy::ops::plan_fault, index_t>> faults;
  bool iota_ok = true;  //!< both sorts' values written as 0..P-1

  device_plan(const random_plan& p, index_t ranks, index_t local, index_t peer_rows) {
    const index_t pairs = p.tokens * p.width, rows = ranks * peer_rows;
    const auto plan = p.view();
    std::vector<sort_key> keys(static_cast<std::size_t>(pairs)), sorted, keys2(keys.size());
    std::vector<index_t> idx(keys.size(), -7), sorted_pairs, idx2(keys.size(), -7);
    pair_row.assign(keys.size(), 12345);
    row_pair.assign(static_cast<std::size_t>(rows), -1);
    row_local.assign(static_cast<std::size_t>(rows), -1);
    row_weight.assign(static_cast<std::size_t>(rows), -3.0f);
    dropped.assign(static_cast<std::size_t>(p.experts), 0);
    const sy::ops::ep_destination_keys<const std::int32_t, fault_log> k1{
        plan.expert_ids, plan.counts, p.width, p.experts, local, ranks,
        keys.data(), idx.data(), pair_row.data(), fault_log{&faults}};
    for (index_t t = 0; t < p.tokens; ++t) k1(t);
    for (index_t i = 0; i < pairs; ++i) iota_ok = iota_ok && idx[static_cast<std::size_t>(i)] == i;
    stable_sort_pairs(keys, sorted, sorted_pairs);
    const sy::ops::ep_claim<const std::int32_t> claim{
        sorted.data(), sorted_pairs.data(), pairs, plan.expert_ids, p.width, p.experts, ranks,
        peer_rows, keys2.data(), idx2.data(), pair_row.data(), dropped.data()};
    for (index_t i = 0; i < pairs; ++i) claim(i);
    for (index_t i = 0; i < pairs; ++i) iota_ok = iota_ok && idx2[static_cast<std::size_t>(i)] == i;
    stable_sort_pairs(keys2, sorted, sorted_pairs);
    const sy::ops::ep_place<const float> place{
        sorted.data(), sorted_pairs.data(), pairs, p.experts, local, peer_rows,
        pair_row.data(), row_pair.data(), row_local.data(), plan.weights, p.width,
        row_weight.data()};
    for (index_t i = 0; i < pairs; ++i) place(i);
  }
};

void check_rank(const sy::parallel::thread_comm& comm, std::uint64_t seed, index_t local,
                index_t peer_rows) {
  const index_t ranks = comm.size(), experts = ranks * local;
  std::mt19937_64 g(seed + 7919 * static_cast<std::uint64_t>(comm.rank()));
  const index_t tokens = static_cast<index_t>(g() % 41), width = 1 + static_cast<index_t>(g() % 4);
  const random_plan p(g, tokens, width, experts);
  const std::string where = "N = " + std::to_string(ranks) + ", E/N = " + std::to_string(local) +
                            ", R = " + std::to_string(peer_rows) + ", rank " +
                            std::to_string(comm.rank()) + ", T = " + std::to_string(tokens) +
                            ", width = " + std::to_string(width);
  // Everything collective first (Boost.Test is not thread-safe: the checks run under a lock,
  // after the last exchange).
  const sy::parallel::ExpertParallel<sy::parallel::thread_comm, sy::parallel::static_bound> ep{
      &comm, {.peer_rows = peer_rows}};
  std::vector<index_t> host_dropped(static_cast<std::size_t>(experts), -1);
  const sy::detail::ep_exchange ex = sy::detail::plan_exchange(
      ep, p.view(), experts, local, sy::span<index_t>(host_dropped.data(), host_dropped.size()));
  const device_plan dp(p, ranks, local, peer_rows);
  // The receiver: row_local blocks (and weights) exchanged, its one-slot plan built from
  // them, to equal the host's, built from the exchanged counts.
  const std::size_t rows = static_cast<std::size_t>(ranks * peer_rows);
  std::vector<index_t> recv_local(rows, -5);
  std::vector<float> recv_weight(rows, -5.0f);
  comm.all_to_all(dp.row_local.data(), recv_local.data(),
                  peer_rows * static_cast<index_t>(sizeof(index_t)), nullptr);
  comm.all_to_all(dp.row_weight.data(), recv_weight.data(),
                  peer_rows * static_cast<index_t>(sizeof(float)), nullptr);
  std::vector<std::int32_t> ids(rows, 99), counts(rows, 99);
  std::vector<float> weights(rows, 99.0f);
  const sy::ops::ep_receiver_rows rr{recv_local.data(), recv_weight.data(), ids.data(),
                                     counts.data(), weights.data()};
  for (std::size_t r = 0; r < rows; ++r) rr(static_cast<index_t>(r));
  const sy::detail::ep_receiver_plan host_rp(ex, recv_weight.data());

  static std::mutex lock;
  const std::lock_guard<std::mutex> guard(lock);
  BOOST_TEST_CONTEXT(where) {
    BOOST_TEST(dp.iota_ok);
    BOOST_TEST(dp.faults.empty());
    BOOST_TEST(dp.pair_row == ex.pair_row, boost::test_tools::per_element());
    BOOST_TEST(dp.dropped == host_dropped, boost::test_tools::per_element());
    // Each send row: its pair, local expert and weight; per (destination, expert) counts.
    std::vector<index_t> count(static_cast<std::size_t>(experts), 0);
    for (index_t r = 0; r < ranks * peer_rows; ++r) {
      const index_t pr = dp.row_pair[static_cast<std::size_t>(r)];
      if (pr < 0) {
        BOOST_TEST(dp.row_local[static_cast<std::size_t>(r)] == -1);
        continue;
      }
      BOOST_TEST(dp.pair_row[static_cast<std::size_t>(pr)] == r);
      const index_t e = p.ids[static_cast<std::size_t>(pr)];
      BOOST_TEST(r / peer_rows == e / local);
      BOOST_TEST(dp.row_local[static_cast<std::size_t>(r)] == e % local);
      BOOST_TEST(dp.row_weight[static_cast<std::size_t>(r)] == p.weights[static_cast<std::size_t>(pr)]);
      ++count[static_cast<std::size_t>(e)];
    }
    BOOST_TEST(count == ex.send_count, boost::test_tools::per_element());
    BOOST_TEST(static_cast<index_t>(rows) == ex.recv_rows);
    BOOST_TEST(counts == host_rp.counts, boost::test_tools::per_element());
    for (std::size_t r = 0; r < rows && r < host_rp.counts.size(); ++r) {
      if (counts[r] == 1) {
        BOOST_TEST(ids[r] == host_rp.ids[r]);
        BOOST_TEST(weights[r] == host_rp.weights[r]);
      } else {
        BOOST_TEST(ids[r] == sy::routing::unused_slot);
        BOOST_TEST(weights[r] == 0.0f);
      }
    }
  }
}

}  // namespace

BOOST_AUTO_TEST_CASE(device_planning_matches_the_host_planner) {
  const std::uint64_t seed = sy::test::base_seed();
  for (int n = 1; n <= 5; ++n) {
    sy::parallel::thread_group group(n);
    for (index_t local = 1; local <= 3; ++local) {
      for (const index_t peer_rows : {index_t{0}, index_t{1}, index_t{2}, index_t{5}, index_t{200}}) {
        sy::parallel::run_ranks(group, [&](const sy::parallel::thread_comm& comm) {
          check_rank(comm, seed + 131 * static_cast<std::uint64_t>(n * 10 + local) +
                               static_cast<std::uint64_t>(peer_rows),
                     local, peer_rows);
        });
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(a_faulty_token_is_reported_and_routes_nowhere) {
  std::mt19937_64 g(sy::test::base_seed() + 5);
  random_plan p(g, 6, 3, 4);
  p.counts[2] = 2;
  p.ids[2 * 3 + 0] = 1;
  p.ids[2 * 3 + 1] = 7;  // outside [0, E = 4)
  p.ids[2 * 3 + 2] = -1;
  p.counts[4] = 5;  // outside [0, width = 3]
  const device_plan dp(p, 2, 2, 100);
  BOOST_TEST(dp.iota_ok);
  BOOST_REQUIRE_EQUAL(dp.faults.size(), 2u);
  BOOST_TEST((dp.faults[0].first == sy::ops::plan_fault::ids && dp.faults[0].second == 2 * 3 + 1));
  BOOST_TEST((dp.faults[1].first == sy::ops::plan_fault::counts && dp.faults[1].second == 4));
  for (const index_t t : {2, 4})
    for (index_t j = 0; j < 3; ++j)
      BOOST_TEST(dp.pair_row[static_cast<std::size_t>(t * 3 + j)] == sy::dispatch::unused_pair);
  for (const index_t pr : dp.row_pair) BOOST_TEST((pr < 0 || (pr / 3 != 2 && pr / 3 != 4)));
}
