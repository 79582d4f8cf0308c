// SPDX-License-Identifier: Apache-2.0
// The CUDA dispatch's permutation functors (switchyard/ops/permute.hpp) run on the host, in
// the order backend/cuda/dispatch.cuh launches them, with std::stable_sort standing in for
// the radix sort and a plain count for the histogram: on random plans (several T, width, E,
// capacity rules and drop modes, tokens with fewer slots) every array equals what
// host::plan_groups plans, up to the documented layout differences (padding rows hold
// unused_pair; padded_capacity's blocks are C_max rows apart). A bad plan is recorded in a
// device_status and its token routed nowhere.
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <switchyard/backend/cuda/status.hpp>
#include <switchyard/backend/host/dispatch_plan.hpp>
#include <switchyard/dispatch/dense.hpp>
#include <switchyard/dispatch/groups.hpp>
#include <switchyard/dispatch/padded_capacity.hpp>
#include <switchyard/dispatch/sorted_grouped.hpp>
#include <switchyard/ops/permute.hpp>
#include <switchyard/routing/plan.hpp>

#include "support/random.hpp"

namespace sy = switchyard;
using sy::index_t;
namespace ops = sy::ops;
namespace dispatch = sy::dispatch;

namespace {

template <class F>
void run(index_t n, const F& f) {
  for (index_t i = 0; i < n; ++i) f(i);
}

sy::cuda::device_status fresh_status() {
  sy::cuda::device_status s;
  std::memset(&s, 0xFF, sizeof s);  // what the executor's cudaMemsetAsync writes
  return s;
}

// The same mapping as cuda::record_plan_fault in dispatch.cuh (which g++ cannot include).
struct record_on_host {
  sy::cuda::device_status* status = nullptr;
  void operator()(ops::plan_fault fault, index_t index) const {
    status->record(fault == ops::plan_fault::counts ? sy::cuda::status_kind::invalid_counts
                                                    : sy::cuda::status_kind::invalid_ids,
                   index);
  }
};

// A random valid plan: each token uses c <= min(width, E) distinct experts (c = width for
// most tokens when `full`), drawn from a skewed distribution so that capacity drops happen.
sy::routing::routing_plan random_plan(std::mt19937_64& g, index_t tokens, index_t width,
                                      index_t experts, bool full) {
  sy::routing::routing_plan plan;
  plan.resize(tokens, width, experts);
  std::vector<double> weight(static_cast<std::size_t>(experts));
  for (index_t e = 0; e < experts; ++e) weight[static_cast<std::size_t>(e)] = 1.0 + 3.0 / (1.0 + e);
  const index_t most = std::min(width, experts);
  for (index_t t = 0; t < tokens; ++t) {
    index_t c = most;
    if (!full && g() % 3 == 0) c = static_cast<index_t>(g() % static_cast<std::uint64_t>(most + 1));
    std::vector<double> w = weight;
    for (index_t j = 0; j < c; ++j) {
      std::discrete_distribution<index_t> pick(w.begin(), w.end());
      const index_t e = pick(g);
      w[static_cast<std::size_t>(e)] = 0.0;  // distinct within the token
      plan.expert_ids[static_cast<std::size_t>(t * width + j)] = static_cast<std::int32_t>(e);
      plan.weights[static_cast<std::size_t>(t * width + j)] = 0.5f;
    }
    plan.counts[static_cast<std::size_t>(t)] = static_cast<std::int32_t>(c);
  }
  return plan;
}

// The arrays of a plan, host or device layout.
struct groups_arrays {
  std::vector<index_t> row_begin, row_count, dropped, pair_row, row_pair;
  index_t rows = 0;      // device: g.rows; host: expert_groups::num_rows
  index_t capacity = 0;  // device only
  dispatch::dropped_output drop = dispatch::dropped_output::zero;
};

template <class D>
groups_arrays host_plan(const D& policy, const sy::routing::routing_plan& plan) {
  const index_t e = plan.num_experts, n = plan.num_tokens * plan.width;
  groups_arrays a;
  a.row_begin.assign(static_cast<std::size_t>(e), -7);
  a.row_count.assign(static_cast<std::size_t>(e), -7);
  a.dropped.assign(static_cast<std::size_t>(e), -7);
  a.pair_row.assign(static_cast<std::size_t>(n), -7);
  a.row_pair.assign(static_cast<std::size_t>(policy.max_rows(plan.num_tokens, plan.width, e)), -7);
  dispatch::expert_groups g{{a.row_begin.data(), a.row_begin.size()},
                            {a.row_count.data(), a.row_count.size()},
                            {a.dropped.data(), a.dropped.size()},
                            {a.pair_row.data(), a.pair_row.size()},
                            {a.row_pair.data(), a.row_pair.size()}};
  sy::host::plan_groups(policy, plan.view(), g);
  a.rows = g.num_rows;
  a.drop = g.drop;
  return a;
}

// Steps 1 and 2 of dispatch.cuh: keys per token, then a stable sort by key.
struct sorted_on_host {
  std::vector<ops::sort_key> keys, sorted_keys;
  std::vector<index_t> pairs, sorted_pairs;
};

sorted_on_host sort_on_host(const sy::routing::routing_plan& plan, sy::cuda::device_status& st) {
  const index_t t = plan.num_tokens, w = plan.width, e = plan.num_experts, n = t * w;
  const auto view = plan.view();
  sorted_on_host s;
  s.keys.assign(static_cast<std::size_t>(n), -7);
  s.pairs.assign(static_cast<std::size_t>(n), -7);
  run(t, ops::plan_sort_keys<const std::int32_t, record_on_host>{
             view.expert_ids, view.counts, w, e, s.keys.data(), s.pairs.data(), {&st}});
  std::vector<index_t> order(static_cast<std::size_t>(n));
  std::iota(order.begin(), order.end(), index_t{0});
  std::stable_sort(order.begin(), order.end(), [&](index_t a, index_t b) {
    return s.keys[static_cast<std::size_t>(a)] < s.keys[static_cast<std::size_t>(b)];
  });
  for (index_t i : order) {
    s.sorted_keys.push_back(s.keys[static_cast<std::size_t>(i)]);
    s.sorted_pairs.push_back(s.pairs[static_cast<std::size_t>(i)]);
  }
  return s;
}

groups_arrays device_arrays(index_t experts, index_t pairs, index_t row_pairs) {
  groups_arrays a;
  a.row_begin.assign(static_cast<std::size_t>(experts), -7);
  a.row_count.assign(static_cast<std::size_t>(experts), -7);
  a.dropped.assign(static_cast<std::size_t>(experts), -7);
  a.pair_row.assign(static_cast<std::size_t>(pairs), -7);
  a.row_pair.assign(static_cast<std::size_t>(row_pairs), -7);
  return a;
}

// cuda_plan_sorted_grouped's launches.
groups_arrays device_plan(const dispatch::sorted_grouped&, const sy::routing::routing_plan& plan,
                          sy::cuda::device_status& st) {
  const index_t e = plan.num_experts, n = plan.num_tokens * plan.width;
  const sorted_on_host s = sort_on_host(plan, st);
  groups_arrays a = device_arrays(e, n, n);
  a.rows = n;
  run(e, ops::grouped_counts{s.sorted_keys.data(), n, a.row_begin.data(), a.row_count.data(),
                             a.dropped.data()});
  run(n, ops::grouped_placement{s.sorted_keys.data(), s.sorted_pairs.data(), e, a.pair_row.data(),
                                a.row_pair.data()});
  return a;
}

// cuda_plan_padded_capacity's launches.
groups_arrays device_plan(const dispatch::padded_capacity& policy,
                          const sy::routing::routing_plan& plan, sy::cuda::device_status& st) {
  const index_t t = plan.num_tokens, e = plan.num_experts, n = t * plan.width;
  const index_t block = policy.capacity(t, n, e);
  const sorted_on_host s = sort_on_host(plan, st);
  groups_arrays a = device_arrays(e, n, e * block);
  a.rows = e * block;
  a.capacity = block;
  a.drop = policy.drop;
  std::vector<index_t> sorted_begin(static_cast<std::size_t>(e + 1), -7);
  run(e + 1, ops::capacity_counts{policy, s.sorted_keys.data(), n, t, e, block, sorted_begin.data(),
                                  a.row_begin.data(), a.row_count.data(), a.dropped.data()});
  run(n, ops::capacity_placement{policy, s.sorted_keys.data(), s.sorted_pairs.data(),
                                 sorted_begin.data(), t, e, block, a.pair_row.data()});
  run(a.rows, ops::capacity_rows{s.sorted_pairs.data(), sorted_begin.data(), a.row_count.data(),
                                 block, a.row_pair.data()});
  return a;
}

// cuda_plan_dense's launches (the histogram counted plainly, as CUB's HistogramEven does).
groups_arrays device_plan(const dispatch::dense&, const sy::routing::routing_plan& plan,
                          sy::cuda::device_status& st) {
  const index_t t = plan.num_tokens, w = plan.width, e = plan.num_experts, n = t * w;
  const auto view = plan.view();
  std::vector<ops::sort_key> keys(static_cast<std::size_t>(n), -7);
  run(t, ops::plan_sort_keys<const std::int32_t, record_on_host>{
             view.expert_ids, view.counts, w, e, keys.data(), nullptr, {&st}});
  std::vector<unsigned long long> histogram(static_cast<std::size_t>(e), 0);
  for (ops::sort_key k : keys)
    if (k >= 0 && k < e) ++histogram[static_cast<std::size_t>(k)];
  groups_arrays a = device_arrays(e, n, n);
  a.rows = t;
  a.capacity = t;
  run(e,
      ops::dense_counts<unsigned long long>{n > 0 ? histogram.data() : nullptr, a.row_begin.data(),
                                            a.row_count.data(), a.dropped.data()});
  run(n, ops::dense_placement{keys.data(), e, a.pair_row.data(), a.row_pair.data()});
  return a;
}

// The comparisons, per policy, with the documented layout differences.
void compare(const dispatch::sorted_grouped&, const groups_arrays& dev, const groups_arrays& host,
             index_t pairs) {
  BOOST_TEST(dev.row_begin == host.row_begin, boost::test_tools::per_element());
  BOOST_TEST(dev.row_count == host.row_count, boost::test_tools::per_element());
  BOOST_TEST(dev.dropped == host.dropped, boost::test_tools::per_element());
  BOOST_TEST(dev.pair_row == host.pair_row, boost::test_tools::per_element());
  BOOST_TEST(dev.rows == pairs);
  // Real rows identical; the host stores the unused pairs past them, the device padding.
  for (index_t r = 0; r < pairs; ++r) {
    const auto i = static_cast<std::size_t>(r);
    BOOST_TEST(dev.row_pair[i] == (r < host.rows ? host.row_pair[i] : dispatch::unused_pair),
               "row " << r);
  }
}

void compare(const dispatch::padded_capacity& policy, const groups_arrays& dev,
             const groups_arrays& host, index_t pairs) {
  const index_t experts = static_cast<index_t>(host.row_count.size());
  const index_t cap = experts > 0 ? host.rows / experts : 0, block = dev.capacity;
  BOOST_TEST(cap <= block);
  BOOST_TEST(dev.rows == experts * block);
  BOOST_TEST((dev.drop == host.drop && dev.drop == policy.drop));
  BOOST_TEST(dev.row_count == host.row_count, boost::test_tools::per_element());
  BOOST_TEST(dev.dropped == host.dropped, boost::test_tools::per_element());
  for (index_t e = 0; e < experts; ++e) {
    const auto ei = static_cast<std::size_t>(e);
    BOOST_TEST(host.row_begin[ei] == e * cap);
    BOOST_TEST(dev.row_begin[ei] == e * block);
    for (index_t rank = 0; rank < block; ++rank) {  // same pair at the same rank, then padding
      const index_t want = rank < host.row_count[ei]
                               ? host.row_pair[static_cast<std::size_t>(e * cap + rank)]
                               : dispatch::unused_pair;
      BOOST_TEST(dev.row_pair[static_cast<std::size_t>(e * block + rank)] == want,
                 "expert " << e << " rank " << rank);
    }
  }
  for (index_t p = 0; p < pairs; ++p) {  // the same rank of the same expert, or the same mark
    const index_t h = host.pair_row[static_cast<std::size_t>(p)];
    const index_t want = h < 0 ? h : (h / cap) * block + h % cap;
    BOOST_TEST(dev.pair_row[static_cast<std::size_t>(p)] == want, "pair " << p);
  }
  if (cap == block) {  // then the layouts coincide: every array bitwise
    BOOST_TEST(dev.row_begin == host.row_begin, boost::test_tools::per_element());
    BOOST_TEST(dev.pair_row == host.pair_row, boost::test_tools::per_element());
  }
}

void compare(const dispatch::dense&, const groups_arrays& dev, const groups_arrays& host,
             index_t pairs) {
  BOOST_TEST(dev.row_begin == host.row_begin, boost::test_tools::per_element());
  BOOST_TEST(dev.row_count == host.row_count, boost::test_tools::per_element());
  BOOST_TEST(dev.dropped == host.dropped, boost::test_tools::per_element());
  BOOST_TEST(dev.pair_row == host.pair_row, boost::test_tools::per_element());
  BOOST_TEST(dev.row_pair == host.row_pair, boost::test_tools::per_element());
  BOOST_TEST(host.rows == pairs);
  BOOST_TEST(dev.capacity == dev.rows);  // every expert over all T tokens
}

template <class D>
groups_arrays check_policy(const D& policy, const sy::routing::routing_plan& plan) {
  groups_arrays dev;
  BOOST_TEST_CONTEXT("T = " << plan.num_tokens << ", width = " << plan.width
                            << ", E = " << plan.num_experts) {
    auto st = fresh_status();
    dev = device_plan(policy, plan, st);
    BOOST_TEST(st.ok());
    const groups_arrays host = host_plan(policy, plan);
    compare(policy, dev, host, plan.num_tokens * plan.width);
  }
  return dev;
}

struct shape {
  index_t tokens, width, experts;
};
const shape shapes[] = {{0, 2, 4},  {1, 1, 1},    {1, 4, 3},   {7, 2, 8},    {33, 1, 5},
                        {64, 2, 8}, {129, 4, 16}, {300, 3, 7}, {517, 2, 64}, {40, 8, 8}};

}  // namespace

BOOST_AUTO_TEST_CASE(sorted_grouped_matches_the_host_plan) {
  std::mt19937_64 g(sy::test::base_seed());
  for (const shape& s : shapes) {
    for (bool full : {true, false}) {
      check_policy(dispatch::sorted_grouped{}, random_plan(g, s.tokens, s.width, s.experts, full));
    }
  }
}

BOOST_AUTO_TEST_CASE(padded_capacity_matches_the_host_plan) {
  std::mt19937_64 g(sy::test::base_seed() + 1);
  index_t drops = 0, smaller_capacity = 0;
  for (const shape& s : shapes) {
    for (float cf : {0.5f, 1.0f, 1.25f, 2.0f}) {
      for (index_t multiple : {1, 8}) {
        dispatch::padded_capacity policy;
        policy.capacity_factor = cf;
        policy.min_capacity = multiple == 1 ? 0 : 4;
        policy.capacity_multiple = multiple;
        policy.drop =
            multiple == 1 ? dispatch::dropped_output::scaled_input : dispatch::dropped_output::zero;
        for (bool full : {true, false}) {
          const auto plan = random_plan(g, s.tokens, s.width, s.experts, full);
          const groups_arrays dev = check_policy(policy, plan);
          for (index_t d : dev.dropped) drops += d;
          const index_t assigned = plan.total_assignments();
          if (policy.capacity(s.tokens, assigned, s.experts) < dev.capacity) ++smaller_capacity;
        }
      }
    }
  }
  // The cases exercised what they should: drops, and a capacity below the block size.
  BOOST_TEST(drops > 100);
  BOOST_TEST(smaller_capacity > 10);
}

BOOST_AUTO_TEST_CASE(padded_capacity_drops_pairs_in_token_order) {
  // Every token names expert 0 first: with C below T the last tokens' pairs are the dropped
  // ones, exactly as the host's token-order fill drops them.
  std::mt19937_64 g(sy::test::base_seed() + 2);
  auto plan = random_plan(g, 50, 2, 6, true);
  for (index_t t = 0; t < 50; ++t) {
    auto* ids = &plan.expert_ids[static_cast<std::size_t>(t * 2)];
    if (ids[1] == 0) std::swap(ids[0], ids[1]);
    if (ids[0] != 0) ids[0] = 0;
  }
  dispatch::padded_capacity policy;
  policy.capacity_factor = 1.0f;
  policy.min_capacity = 0;
  policy.capacity_multiple = 1;
  auto st = fresh_status();
  const groups_arrays dev = device_plan(policy, plan, st);
  BOOST_TEST(st.ok());
  const index_t cap = dev.row_count[0];
  BOOST_TEST(cap == 17);  // ceil(1.0 · 100 / 6)
  BOOST_TEST(dev.dropped[0] == 50 - cap);
  for (index_t t = 0; t < 50; ++t) {
    const index_t row = dev.pair_row[static_cast<std::size_t>(t * 2)];
    BOOST_TEST(row == (t < cap ? t : dispatch::dropped_pair), "token " << t);
  }
  compare(policy, dev, host_plan(policy, plan), 100);
}

BOOST_AUTO_TEST_CASE(dense_matches_the_host_plan) {
  std::mt19937_64 g(sy::test::base_seed() + 3);
  for (const shape& s : shapes) {
    for (bool full : {true, false}) {
      check_policy(dispatch::dense{}, random_plan(g, s.tokens, s.width, s.experts, full));
    }
  }
}

BOOST_AUTO_TEST_CASE(check_token_follows_validate_plan) {
  // One random fault at a time: validate_plan throws exactly when check_token finds it, and
  // check_token names the slot (or token) validate_plan's message names.
  std::mt19937_64 g(sy::test::base_seed() + 4);
  const index_t tokens = 9, width = 3, experts = 5;
  for (int round = 0; round < 200; ++round) {
    auto plan = random_plan(g, tokens, width, experts, false);
    const index_t t = static_cast<index_t>(g() % tokens);
    const index_t j = static_cast<index_t>(g() % width);
    auto& id = plan.expert_ids[static_cast<std::size_t>(t * width + j)];
    auto& count = plan.counts[static_cast<std::size_t>(t)];
    switch (round % 5) {
      case 0:
        count = static_cast<std::int32_t>(width + 1 + static_cast<index_t>(g() % 3));
        break;
      case 1:
        count = -1 - static_cast<std::int32_t>(g() % 3);
        break;
      case 2:
        id = static_cast<std::int32_t>(j < count ? experts + static_cast<index_t>(g() % 3) : 2);
        break;
      case 3:
        id = j < count ? -1 : -2;
        break;
      default:
        if (j > 0 && j < count) id = plan.expert_ids[static_cast<std::size_t>(t * width)];
        break;  // a repeat (no fault when the slot cannot repeat an earlier one)
    }
    const auto view = plan.view();
    index_t first_token = -1;
    ops::token_fault first{};
    for (index_t u = 0; u < tokens && first_token < 0; ++u) {
      const ops::token_fault f = ops::check_token(view.expert_ids, view.counts, u, width, experts);
      if (f.kind != ops::plan_fault::none) {
        first_token = u;
        first = f;
      }
    }
    bool threw = false;
    std::string message;
    try {
      sy::routing::validate_plan("plan", view, tokens, experts);
    } catch (const sy::range_error& e) {
      threw = true;
      message = e.what();
    }
    BOOST_TEST(threw == (first_token >= 0), "round " << round);
    if (!threw || first_token < 0) continue;
    const std::string where = first.kind == ops::plan_fault::counts
                                  ? sy::detail::concat("plan.counts[", first.index, "]")
                                  : sy::detail::concat("plan.expert_ids[", first.index / width,
                                                       ", ", first.index % width, "]");
    BOOST_TEST(message.find(where) != std::string::npos, message << " vs " << where);
  }
}

BOOST_AUTO_TEST_CASE(a_bad_plan_is_recorded_and_its_tokens_route_nowhere) {
  std::mt19937_64 g(sy::test::base_seed() + 5);
  const index_t tokens = 12, width = 3, experts = 5;
  auto plan = random_plan(g, tokens, width, experts, true);
  auto at = [&](index_t t, index_t j) -> std::int32_t& {
    return plan.expert_ids[static_cast<std::size_t>(t * width + j)];
  };
  plan.counts[2] = 4;   // count past width          -> invalid_counts at 2
  plan.counts[4] = -1;  // negative count            -> invalid_counts at 4
  at(5, 1) = 5;         // id == E                   -> invalid_ids at 5·3 + 1 = 16
  at(7, 2) = at(7, 0);  // repeated expert           -> invalid_ids at 23
  plan.counts[8] = 1;   // unused slot with an id    -> invalid_ids at 8·3 + 1 = 25
  at(9, 0) = -1;        // used slot without an id   -> invalid_ids at 27
  // The host's view of the same data once the faulty tokens route nowhere.
  auto clean = plan;
  for (index_t t : {2, 4, 5, 7, 8, 9}) {
    clean.counts[static_cast<std::size_t>(t)] = 0;
    for (index_t j = 0; j < width; ++j)
      clean.expert_ids[static_cast<std::size_t>(t * width + j)] = sy::routing::unused_slot;
  }
  BOOST_CHECK_NO_THROW(sy::routing::validate_plan("clean", clean.view(), tokens, experts));

  const auto expect_recorded = [&](const sy::cuda::device_status& st) {
    BOOST_TEST(st.first[static_cast<int>(sy::cuda::status_kind::invalid_counts)] == 2u);
    BOOST_TEST(st.first[static_cast<int>(sy::cuda::status_kind::invalid_ids)] == 16u);
    BOOST_TEST(st.first[static_cast<int>(sy::cuda::status_kind::non_finite_x)] ==
               sy::cuda::device_status::none);
    try {
      sy::cuda::throw_status(st, {8, experts, width, "plan"});
      BOOST_FAIL("nothing thrown");
    } catch (const sy::range_error& e) {
      BOOST_TEST(e.argument() == "plan.counts");
      BOOST_TEST(std::string(e.what()).find("plan.counts[2]") != std::string::npos, e.what());
    }
  };
  {
    auto st = fresh_status();
    const groups_arrays dev = device_plan(dispatch::sorted_grouped{}, plan, st);
    expect_recorded(st);
    compare(dispatch::sorted_grouped{}, dev, host_plan(dispatch::sorted_grouped{}, clean),
            tokens * width);
  }
  {
    dispatch::padded_capacity policy;
    policy.capacity_factor = 0.75f;
    policy.min_capacity = 0;
    policy.capacity_multiple = 1;
    auto st = fresh_status();
    const groups_arrays dev = device_plan(policy, plan, st);
    expect_recorded(st);
    compare(policy, dev, host_plan(policy, clean), tokens * width);
  }
  {
    auto st = fresh_status();
    const groups_arrays dev = device_plan(dispatch::dense{}, plan, st);
    expect_recorded(st);
    compare(dispatch::dense{}, dev, host_plan(dispatch::dense{}, clean), tokens * width);
  }
}

BOOST_AUTO_TEST_CASE(ids_out_of_every_range_stay_in_bounds) {
  // Garbage everywhere: every token is faulty or valid, every key is in [0, E], every row
  // written is in range (the vectors are exactly sized; at() would throw otherwise).
  std::mt19937_64 g(sy::test::base_seed() + 6);
  const index_t tokens = 40, width = 4, experts = 6;
  sy::routing::routing_plan plan;
  plan.resize(tokens, width, experts);
  for (auto& id : plan.expert_ids)
    id = static_cast<std::int32_t>(static_cast<index_t>(g() % 20) - 10);
  for (auto& c : plan.counts) c = static_cast<std::int32_t>(static_cast<index_t>(g() % 9) - 2);
  auto st = fresh_status();
  const sorted_on_host s = sort_on_host(plan, st);
  BOOST_TEST(!st.ok());
  for (ops::sort_key k : s.keys) BOOST_TEST((k >= 0 && k <= experts));
  const groups_arrays sorted = device_plan(dispatch::sorted_grouped{}, plan, st);
  index_t used = 0;
  for (index_t c : sorted.row_count) used += c;
  for (index_t r : sorted.pair_row)
    BOOST_TEST((r == dispatch::unused_pair || (r >= 0 && r < used)));
  dispatch::padded_capacity policy;
  const groups_arrays padded = device_plan(policy, plan, st);
  for (index_t r : padded.pair_row) BOOST_TEST(r < padded.rows);
  for (index_t p : padded.row_pair) BOOST_TEST(p < tokens * width);
}

BOOST_AUTO_TEST_CASE(no_experts_routes_every_pair_nowhere) {
  // E == 0: bit_width(E) == 0 bits to sort (the device copies the keys instead), every slot
  // unused, and a used slot is a fault.
  std::mt19937_64 g(sy::test::base_seed() + 7);
  const auto plan = random_plan(g, 5, 2, 0, true);
  check_policy(dispatch::sorted_grouped{}, plan);
  check_policy(dispatch::dense{}, plan);
  auto bad = plan;
  bad.counts[3] = 1;
  bad.expert_ids[6] = 0;
  auto st = fresh_status();
  const groups_arrays dev = device_plan(dispatch::sorted_grouped{}, bad, st);
  BOOST_TEST(st.first[static_cast<int>(sy::cuda::status_kind::invalid_ids)] == 6u);
  for (index_t r : dev.pair_row) BOOST_TEST(r == dispatch::unused_pair);
}
