// SPDX-License-Identifier: Apache-2.0
// The CUDA backend's device status word and the NaN scan run on the host (the very code the
// kernels run): the smallest index wins whatever the order of the records, each kind becomes
// the host backend's typed exception naming the argument and the coordinates, and the row
// scan finds the first non-finite column of every element type. Expert parallelism without a
// wait: every rank's flags folded into one rank's word (cuda_ep_fold_flags) name the peers.
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <switchyard/backend/cuda/ep_flags.hpp>
#include <switchyard/backend/cuda/status.hpp>
#include <switchyard/core/element_type.hpp>
#include <switchyard/ops/finite.hpp>

#include "support/random.hpp"

namespace sy = switchyard;
using sy::index_t;

namespace {
sy::cuda::device_status fresh() {
  sy::cuda::device_status s;
  std::memset(&s, 0xFF, sizeof s);  // what the executor's cudaMemsetAsync writes
  return s;
}

template <class E>
std::string message_of(const sy::cuda::device_status& s, const sy::cuda::status_shape& shape,
                       std::string& argument) {
  try {
    sy::cuda::throw_status(s, shape);
  } catch (const E& e) {
    argument = e.argument();
    return e.what();
  }
  return "(nothing thrown)";
}
}  // namespace

BOOST_AUTO_TEST_CASE(a_fresh_status_is_ok_and_throws_nothing) {
  const auto s = fresh();
  BOOST_TEST(s.ok());
  BOOST_CHECK_NO_THROW(sy::cuda::throw_status(s, {}));
}

BOOST_AUTO_TEST_CASE(the_smallest_index_wins_in_any_record_order) {
  std::mt19937_64 g(sy::test::base_seed());
  std::vector<index_t> idx(50);
  for (auto& v : idx) v = static_cast<index_t>(g() % 100000) + 7;
  const index_t smallest = *std::min_element(idx.begin(), idx.end());
  for (int round = 0; round < 3; ++round) {
    std::shuffle(idx.begin(), idx.end(), g);
    auto s = fresh();
    for (index_t v : idx) s.record(sy::cuda::status_kind::non_finite_x, v);
    BOOST_TEST(!s.ok());
    BOOST_TEST(s.first[0] == static_cast<unsigned long long>(smallest));
    BOOST_TEST(s.first[1] == sy::cuda::device_status::none);
  }
}

BOOST_AUTO_TEST_CASE(each_kind_becomes_the_typed_error_naming_the_element) {
  const sy::cuda::status_shape shape{/*d=*/8, /*experts=*/6, /*width=*/3, "state.plan"};
  std::string arg;
  auto s = fresh();
  s.record(sy::cuda::status_kind::non_finite_x, 3 * 8 + 5);
  std::string msg = message_of<sy::non_finite_error>(s, shape, arg);
  BOOST_TEST(arg == "x");
  BOOST_TEST(msg.find("x[3, 5]") != std::string::npos, msg);

  s = fresh();
  s.record(sy::cuda::status_kind::non_finite_logits, 2 * 6 + 4);
  msg = message_of<sy::non_finite_error>(s, shape, arg);
  BOOST_TEST(arg == "logits");
  BOOST_TEST(msg.find("[2, 4]") != std::string::npos, msg);

  s = fresh();
  s.record(sy::cuda::status_kind::invalid_counts, 9);
  msg = message_of<sy::range_error>(s, shape, arg);
  BOOST_TEST(arg == "state.plan.counts");
  BOOST_TEST(msg.find("[9]") != std::string::npos, msg);
  BOOST_TEST(msg.find("[0, 3]") != std::string::npos, msg);

  s = fresh();
  s.record(sy::cuda::status_kind::invalid_ids, 4 * 3 + 2);
  msg = message_of<sy::range_error>(s, {8, 6, 3, "plan"}, arg);
  BOOST_TEST(arg == "plan.expert_ids");
  BOOST_TEST(msg.find("[4, 2]") != std::string::npos, msg);
  BOOST_TEST(msg.find("[0, 6)") != std::string::npos, msg);
}

BOOST_AUTO_TEST_CASE(router_parameter_kinds_name_the_parameter) {
  const sy::cuda::status_shape shape{8, 6, 3, "state.plan", /*tokens=*/5};
  std::string arg;
  auto s = fresh();
  s.record(sy::cuda::status_kind::bad_attention, 1 * 25 + 3 * 5 + 4);  // [h = 1, i = 3, j = 4]
  std::string msg = message_of<sy::range_error>(s, shape, arg);
  BOOST_TEST(arg == "params.attention");
  BOOST_TEST(msg.find("[1, 3, 4]") != std::string::npos, msg);

  s = fresh();
  s.record(sy::cuda::status_kind::bad_importance, 2);
  msg = message_of<sy::range_error>(s, shape, arg);
  BOOST_TEST(arg == "params.importance");
  BOOST_TEST(msg.find("[2]") != std::string::npos, msg);

  s = fresh();
  s.record(sy::cuda::status_kind::bad_router_params, 17);
  msg = message_of<sy::range_error>(s, shape, arg);
  BOOST_TEST(arg == "params");
  BOOST_TEST(msg.find("17") != std::string::npos, msg);
}

BOOST_AUTO_TEST_CASE(reset_clears_every_kind_and_keeps_the_sizes_for_the_messages) {
  auto s = fresh();
  s.record(sy::cuda::status_kind::invalid_counts, 1);
  s.reset(/*d=*/8, /*experts=*/6, /*width=*/3, /*tokens=*/5, /*routed=*/true);
  BOOST_TEST(s.ok());
  s.record(sy::cuda::status_kind::invalid_ids, 4 * 3 + 2);
  std::string arg;
  const std::string msg = message_of<sy::range_error>(s, s.shape(), arg);
  BOOST_TEST(arg == "state.plan.expert_ids");
  BOOST_TEST(msg.find("[4, 2]") != std::string::npos, msg);
  s.reset(8, 6, 3, 5, false);
  BOOST_TEST(std::string(s.shape().plan_argument) == "plan");
}

BOOST_AUTO_TEST_CASE(non_finite_tokens_are_reported_before_plan_errors) {
  auto s = fresh();
  s.record(sy::cuda::status_kind::invalid_ids, 0);
  s.record(sy::cuda::status_kind::non_finite_x, 40);
  std::string arg;
  (void)message_of<sy::non_finite_error>(s, {8, 6, 3, "plan"}, arg);
  BOOST_TEST(arg == "x");
}

// ExpertParallel<C, static_bound, padded_capacity>: rank 1 (of 4) folds the gathered flags of
// every rank. Its own non-finite element becomes non_finite_x; rank 2's bad plan and rank 3's
// (and rank 0's) non-finite tokens become the peer kinds, the smallest rank kept; its own
// errors are thrown first, then a peer's plan, then a peer's token.
BOOST_AUTO_TEST_CASE(expert_parallel_flags_fold_into_the_status_word_naming_the_peers) {
  constexpr unsigned long long none = ~0ULL;
  sy::detail::cuda_ep_flags all[4] = {{17, none}, {8 * 2 + 3, none}, {none, 5}, {4, none}};
  auto s = fresh();
  s.reset(/*d=*/8, /*experts=*/2, /*width=*/1, /*tokens=*/6, /*routed=*/false);
  // The records in reverse order: the smallest index still wins.
  for (index_t r = 3; r >= 0; --r) sy::detail::cuda_ep_fold_flags{all, 1, &s}(r);
  BOOST_TEST(s.first[static_cast<int>(sy::cuda::status_kind::non_finite_x)] == 8u * 2 + 3);
  BOOST_TEST(s.first[static_cast<int>(sy::cuda::status_kind::peer_bad_plan)] == 2u);
  BOOST_TEST(s.first[static_cast<int>(sy::cuda::status_kind::peer_non_finite)] == 0u);
  std::string arg;
  std::string msg = message_of<sy::non_finite_error>(s, s.shape(), arg);
  BOOST_TEST(arg == "x");
  BOOST_TEST(msg.find("x[2, 3]") != std::string::npos, msg);

  s.first[static_cast<int>(sy::cuda::status_kind::non_finite_x)] = none;
  msg = message_of<sy::range_error>(s, s.shape(), arg);
  BOOST_TEST(arg == "rank 2");
  BOOST_TEST(msg.find("malformed plan") != std::string::npos, msg);

  s.first[static_cast<int>(sy::cuda::status_kind::peer_bad_plan)] = none;
  msg = message_of<sy::non_finite_error>(s, s.shape(), arg);
  BOOST_TEST(arg == "rank 0");

  // A rank whose peers found nothing stays ok; spread copies the rank's flags to every block.
  sy::detail::cuda_ep_flags mine{none, none}, blocks[3] = {{1, 2}, {3, 4}, {5, 6}};
  for (index_t r = 0; r < 3; ++r) sy::detail::cuda_ep_spread_flags{&mine, blocks}(r);
  auto t = fresh();
  t.reset(8, 2, 1, 6, false);
  for (index_t r = 0; r < 3; ++r) sy::detail::cuda_ep_fold_flags{blocks, 0, &t}(r);
  BOOST_TEST(t.ok());
}

template <class T>
void check_scan() {
  std::mt19937_64 g(sy::test::base_seed() + 11);
  const index_t tokens = 7, d = 13;
  const auto vals = sy::test::normal(g, static_cast<std::size_t>(tokens * d));
  std::vector<T> x(vals.size());
  for (std::size_t i = 0; i < vals.size(); ++i) x[i] = sy::from_float<T>(vals[i]);
  x[2 * d + 9] = sy::from_float<T>(std::numeric_limits<float>::quiet_NaN());
  x[2 * d + 11] = sy::from_float<T>(std::numeric_limits<float>::infinity());
  x[5 * d + 0] = sy::from_float<T>(-std::numeric_limits<float>::infinity());
  const sy::ops::first_non_finite<T> scan{sy::make_view<const T>(x.data(), tokens, d)};
  for (index_t t = 0; t < tokens; ++t) {
    const index_t want = t == 2 ? 9 : t == 5 ? 0 : -1;
    BOOST_TEST(scan(t) == want, "row " << t);
  }
}

BOOST_AUTO_TEST_CASE(the_row_scan_finds_the_first_non_finite_column) {
  check_scan<float>();
  check_scan<sy::half>();
  check_scan<sy::bfloat16>();
}
