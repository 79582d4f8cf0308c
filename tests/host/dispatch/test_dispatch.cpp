// SPDX-License-Identifier: Apache-2.0
// Dispatch planning (host::plan_groups of sorted_grouped, padded_capacity in token-major and
// slot-major order with a factor or an absolute expert_capacity, dense) against plainly
// computed expectations, and the host GEMM (CBLAS and the blocked fallback) against float64.
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cmath>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <switchyard/backend/host/dispatch_plan.hpp>
#include <switchyard/backend/host/gemm.hpp>
#include <switchyard/dispatch/dense.hpp>
#include <switchyard/dispatch/padded_capacity.hpp>
#include <switchyard/dispatch/sorted_grouped.hpp>
#include <switchyard/routing/plan.hpp>

#include "support/random.hpp"

namespace sy = switchyard;
using namespace switchyard;

namespace {

// A random plan: each token uses 0..width distinct experts.
routing::routing_plan random_plan(std::mt19937_64& g, index_t tokens, index_t width, index_t experts) {
  routing::routing_plan plan;
  plan.resize(tokens, width, experts);
  std::vector<std::int32_t> all(experts);
  for (index_t e = 0; e < experts; ++e) all[e] = static_cast<std::int32_t>(e);
  for (index_t t = 0; t < tokens; ++t) {
    std::shuffle(all.begin(), all.end(), g);
    const index_t c = static_cast<index_t>(g() % (width + 1));
    plan.counts[t] = static_cast<std::int32_t>(c);
    for (index_t j = 0; j < c; ++j) {
      plan.expert_ids[t * width + j] = all[j];
      plan.weights[t * width + j] = 1.0f / static_cast<float>(c);
    }
  }
  return plan;
}

struct group_storage {
  std::vector<index_t> begin, count, dropped, pair_row, row_pair;
  dispatch::expert_groups g;
  group_storage(index_t experts, index_t pairs, index_t rows)
      : begin(experts), count(experts), dropped(experts), pair_row(pairs, -99), row_pair(rows, -99) {
    g.row_begin = {begin.data(), begin.size()};
    g.row_count = {count.data(), count.size()};
    g.dropped = {dropped.data(), dropped.size()};
    g.pair_row = {pair_row.data(), pair_row.size()};
    g.row_pair = {row_pair.data(), row_pair.size()};
  }
};

}  // namespace

BOOST_AUTO_TEST_CASE(sorted_grouped_is_a_stable_sort_by_expert) {
  std::mt19937_64 g(test::base_seed() + 101);
  const index_t tokens = 57, width = 3, experts = 7;
  const auto plan = random_plan(g, tokens, width, experts);
  const dispatch::sorted_grouped sg;
  group_storage s(experts, tokens * width, sg.max_rows(tokens, width, experts));
  host::plan_groups(sg, plan.view(), s.g);

  // Expected: std::stable_sort of the pairs by key (id, or E for an unused slot).
  std::vector<index_t> pairs(tokens * width);
  for (index_t p = 0; p < tokens * width; ++p) pairs[p] = p;
  auto key = [&](index_t p) {
    const index_t t = p / width, j = p % width;
    return j < plan.counts[t] ? static_cast<index_t>(plan.id(t, j)) : experts;
  };
  std::stable_sort(pairs.begin(), pairs.end(), [&](index_t a, index_t b) { return key(a) < key(b); });
  BOOST_TEST(s.row_pair == pairs, boost::test_tools::per_element());
  index_t offset = 0;
  for (index_t e = 0; e < experts; ++e) {
    const auto n = std::count_if(pairs.begin(), pairs.end(), [&](index_t p) { return key(p) == e; });
    BOOST_TEST(s.begin[e] == offset);
    BOOST_TEST(s.count[e] == n);
    BOOST_TEST(s.dropped[e] == 0);
    offset += n;
  }
  BOOST_TEST(s.g.num_rows == plan.total_assignments());
  for (index_t r = 0; r < tokens * width; ++r) {
    const index_t p = s.row_pair[r];
    BOOST_TEST(s.pair_row[p] == (r < s.g.num_rows ? r : dispatch::unused_pair));
  }
}

BOOST_AUTO_TEST_CASE(padded_capacity_drops_in_token_order) {
  std::mt19937_64 g(test::base_seed() + 102);
  const index_t tokens = 64, width = 2, experts = 5;
  const auto plan = random_plan(g, tokens, width, experts);
  for (float cf : {0.5f, 1.0f, 1.25f, 4.0f}) {
    const dispatch::padded_capacity pc{.capacity_factor = cf, .min_capacity = 3, .capacity_multiple = 4};
    // C from the documented formula.
    index_t c = static_cast<index_t>(std::ceil(static_cast<double>(cf) * plan.total_assignments() / experts));
    c = std::max<index_t>(c, 3);
    c = (c + 3) / 4 * 4;
    c = std::min<index_t>(c, (tokens + 3) / 4 * 4);
    BOOST_TEST(pc.capacity(tokens, plan.total_assignments(), experts) == c);
    group_storage s(experts, tokens * width, pc.max_rows(tokens, width, experts));
    host::plan_groups(pc, plan.view(), s.g);
    BOOST_TEST(s.g.num_rows == experts * c);
    std::vector<index_t> seen(experts, 0), dropped(experts, 0);
    for (index_t t = 0; t < tokens; ++t)
      for (index_t j = 0; j < width; ++j) {
        const index_t p = t * width + j;
        if (j >= plan.counts[t]) {
          BOOST_TEST(s.pair_row[p] == dispatch::unused_pair);
          continue;
        }
        const index_t e = plan.id(t, j);
        if (seen[e] < c) {
          BOOST_TEST(s.pair_row[p] == e * c + seen[e]);
          BOOST_TEST(s.row_pair[e * c + seen[e]] == p);
          ++seen[e];
        } else {
          BOOST_TEST(s.pair_row[p] == dispatch::dropped_pair);
          ++dropped[e];
        }
      }
    BOOST_TEST(s.dropped == dropped, boost::test_tools::per_element());
    BOOST_TEST(s.count == seen, boost::test_tools::per_element());
  }
}

namespace {

// Replays padded_capacity's documented fill with capacity `c` (a literal of the test, not
// the formula): pairs in token order, then slot order, take their expert's next row until it
// holds c. Checks every pair's row (or drop), every row's pair and the per-expert counts.
void check_fill(const routing::routing_plan& plan, const group_storage& s, index_t c) {
  const index_t width = plan.width, experts = plan.num_experts;
  std::vector<index_t> seen(experts, 0), dropped(experts, 0);
  for (index_t t = 0; t < plan.num_tokens; ++t)
    for (index_t j = 0; j < width; ++j) {
      const index_t p = t * width + j;
      if (j >= plan.counts[t]) {
        BOOST_TEST(s.pair_row[p] == dispatch::unused_pair);
        continue;
      }
      const index_t e = plan.id(t, j);
      if (seen[e] < c) {
        const index_t row = e * c + seen[e];
        BOOST_TEST(s.pair_row[p] == row, "token " << t << " slot " << j);
        if (row < static_cast<index_t>(s.row_pair.size())) BOOST_TEST(s.row_pair[row] == p);
        else BOOST_ERROR("row " << row << " lies beyond max_rows = " << s.row_pair.size());
        ++seen[e];
      } else {
        BOOST_TEST(s.pair_row[p] == dispatch::dropped_pair, "token " << t << " slot " << j);
        ++dropped[e];
      }
    }
  BOOST_TEST(s.dropped == dropped, boost::test_tools::per_element());
  BOOST_TEST(s.count == seen, boost::test_tools::per_element());
  for (index_t e = 0; e < experts; ++e) BOOST_TEST(s.begin[e] == e * c);
  BOOST_TEST(s.g.num_rows == experts * c);
}

}  // namespace

// min_capacity decides: cf·T·k/E = 0.5·12·2/6 = 2 pairs per expert, below the floor of 5.
// Every token sends slot 0 to expert 0 (12 pairs), slot 1 to a random other expert: expert 0
// keeps tokens 0..C-1 and drops the rest, the others drop nothing. The floor applies before
// rounding to capacity_multiple (5 -> 8 with multiple 4; 2 alone would round to 4).
BOOST_AUTO_TEST_CASE(padded_capacity_min_capacity_floor_decides) {
  std::mt19937_64 g(test::base_seed() + 105);
  constexpr index_t tokens = 12, width = 2, experts = 6;
  routing::routing_plan plan;
  plan.resize(tokens, width, experts);
  for (index_t t = 0; t < tokens; ++t) {
    plan.counts[t] = 2;
    plan.expert_ids[t * width + 0] = 0;
    plan.expert_ids[t * width + 1] = static_cast<std::int32_t>(1 + g() % (experts - 1));
    plan.weights[t * width + 0] = 0.6f;
    plan.weights[t * width + 1] = 0.4f;
  }
  routing::validate_plan("plan", plan.view(), tokens, experts);
  BOOST_TEST(std::ceil(0.5 * tokens * width / experts) == 2.0);  // the factor's capacity
  for (auto [multiple, c] : {std::pair<index_t, index_t>{1, 5}, {4, 8}}) {
    BOOST_TEST_CONTEXT("capacity_multiple " << multiple) {
      const dispatch::padded_capacity pc{
          .capacity_factor = 0.5f, .min_capacity = 5, .capacity_multiple = multiple};
      BOOST_TEST(pc.capacity(tokens, plan.total_assignments(), experts) == c);
      BOOST_TEST(pc.max_rows(tokens, width, experts) == experts * c);
      group_storage s(experts, tokens * width, pc.max_rows(tokens, width, experts));
      host::plan_groups(pc, plan.view(), s.g);
      check_fill(plan, s, c);
      // Expert 0: tokens 0..c-1 kept in rows 0..c-1, tokens c..11 dropped.
      BOOST_TEST(s.dropped[0] == tokens - c);
      for (index_t t = 0; t < tokens; ++t)
        BOOST_TEST(s.pair_row[t * width] == (t < c ? t : dispatch::dropped_pair));
      BOOST_TEST(s.g.total_dropped() == tokens - c);
    }
  }
}

// The cap decides: cf·T·k/E = 4·10·2/2 = 40 rows per expert, but an expert of a plan with
// distinct experts per token receives at most T = 10 pairs, so C is capped at T rounded up to
// capacity_multiple (12 with multiple 4, 10 with multiple 1) and nothing is dropped.
BOOST_AUTO_TEST_CASE(padded_capacity_is_capped_at_the_rounded_token_count) {
  std::mt19937_64 g(test::base_seed() + 106);
  constexpr index_t tokens = 10, width = 2, experts = 2;
  const auto plan = [&] {  // every token uses both experts, in a random slot order
    routing::routing_plan p;
    p.resize(tokens, width, experts);
    const auto w = test::uniform(g, tokens, 0.05f, 0.95f);
    for (index_t t = 0; t < tokens; ++t) {
      const std::int32_t first = static_cast<std::int32_t>(g() % 2);
      p.counts[t] = 2;
      p.expert_ids[t * width + 0] = first;
      p.expert_ids[t * width + 1] = 1 - first;
      p.weights[t * width + 0] = std::max(w[t], 1.0f - w[t]);
      p.weights[t * width + 1] = std::min(w[t], 1.0f - w[t]);
    }
    return p;
  }();
  BOOST_TEST(std::ceil(4.0 * tokens * width / experts) == 40.0);  // the factor's capacity
  for (auto [multiple, c] : {std::pair<index_t, index_t>{4, 12}, {1, 10}}) {
    BOOST_TEST_CONTEXT("capacity_multiple " << multiple) {
      const dispatch::padded_capacity pc{
          .capacity_factor = 4.0f, .min_capacity = 4, .capacity_multiple = multiple};
      BOOST_TEST(pc.capacity(tokens, plan.total_assignments(), experts) == c);
      BOOST_TEST(pc.max_rows(tokens, width, experts) == experts * c);
      group_storage s(experts, tokens * width, pc.max_rows(tokens, width, experts));
      host::plan_groups(pc, plan.view(), s.g);
      check_fill(plan, s, c);
      BOOST_TEST(s.g.total_dropped() == 0);
      BOOST_TEST(s.count[0] == tokens);
      BOOST_TEST(s.count[1] == tokens);
    }
  }
}

namespace {

// The rule of ../shared/hf-cases/README.md "Capacity", brute force: the pairs in the
// priority's order (token_major: t then j; slot_major: j then t); a pair is kept if the
// number of pairs considered so far for its expert, itself included, is <= C. Returns the
// pairs in that order with their keep flag.
std::vector<std::pair<index_t, bool>> ref_capacity_order(const routing::routing_plan& plan,
                                                         index_t c, bool slot_major) {
  const index_t width = plan.width;
  std::vector<index_t> order;
  if (slot_major) {
    for (index_t j = 0; j < width; ++j)
      for (index_t t = 0; t < plan.num_tokens; ++t)
        if (j < plan.counts[t]) order.push_back(t * width + j);
  } else {
    for (index_t t = 0; t < plan.num_tokens; ++t)
      for (index_t j = 0; j < width; ++j)
        if (j < plan.counts[t]) order.push_back(t * width + j);
  }
  std::vector<std::pair<index_t, bool>> out;
  for (std::size_t i = 0; i < order.size(); ++i) {
    index_t considered = 0;
    for (std::size_t k = 0; k <= i; ++k)
      considered += plan.expert_ids[order[k]] == plan.expert_ids[order[i]];
    out.emplace_back(order[i], considered <= c);
  }
  return out;
}

// Checks the planned groups against the brute-force rule: each kept pair's row is
// e·C + (its rank among e's kept pairs in the order), dropped pairs are marked and counted
// per expert, unused slots stay unused. Returns the kept flags [T·width].
std::vector<char> check_capacity_rule(const routing::routing_plan& plan, const group_storage& s,
                                      index_t c, bool slot_major) {
  const index_t experts = plan.num_experts;
  std::vector<char> kept(static_cast<std::size_t>(plan.num_tokens * plan.width), 0);
  std::vector<index_t> rank(experts, 0), dropped(experts, 0);
  for (auto [p, keep] : ref_capacity_order(plan, c, slot_major)) {
    const index_t e = plan.expert_ids[p];
    if (keep) {
      kept[p] = 1;
      const index_t row = e * c + rank[e]++;
      BOOST_TEST(s.pair_row[p] == row, "pair " << p);
      BOOST_TEST(s.row_pair[row] == p, "row " << row);
    } else {
      BOOST_TEST(s.pair_row[p] == dispatch::dropped_pair, "pair " << p);
      ++dropped[e];
    }
  }
  for (index_t t = 0; t < plan.num_tokens; ++t)
    for (index_t j = plan.counts[t]; j < plan.width; ++j)
      BOOST_TEST(s.pair_row[t * plan.width + j] == dispatch::unused_pair);
  BOOST_TEST(s.dropped == dropped, boost::test_tools::per_element());
  BOOST_TEST(s.count == rank, boost::test_tools::per_element());
  for (index_t e = 0; e < experts; ++e) BOOST_TEST(s.begin[e] == e * c);
  BOOST_TEST(s.g.num_rows == experts * c);
  return kept;
}

}  // namespace

// A plan where the orders keep different pairs (k = 2, C = 2): tokens 0 and 1 send their first
// choice to expert 1 and their second to expert 0; tokens 2 and 3 their first to expert 0 and
// their second to expert 2. Token-major order fills expert 0 with the second choices of tokens
// 0 and 1 and drops the first choices of tokens 2 and 3; slot-major order keeps those first
// choices and drops the second choices instead.
BOOST_AUTO_TEST_CASE(padded_capacity_slot_major_keeps_first_choices) {
  constexpr index_t tokens = 4, width = 2, experts = 3;
  routing::routing_plan plan;
  plan.resize(tokens, width, experts);
  const std::int32_t ids[tokens][width] = {{1, 0}, {1, 0}, {0, 2}, {0, 2}};
  for (index_t t = 0; t < tokens; ++t) {
    plan.counts[t] = 2;
    for (index_t j = 0; j < width; ++j) {
      plan.expert_ids[t * width + j] = ids[t][j];
      plan.weights[t * width + j] = j == 0 ? 0.7f : 0.3f;
    }
  }
  routing::validate_plan("plan", plan.view(), tokens, experts);
  for (bool slot_major : {false, true}) {
    BOOST_TEST_CONTEXT((slot_major ? "slot_major" : "token_major")) {
      const dispatch::padded_capacity pc{
          .priority = slot_major ? dispatch::capacity_priority::slot_major
                                 : dispatch::capacity_priority::token_major,
          .expert_capacity = 2};
      BOOST_TEST(pc.capacity(tokens, plan.total_assignments(), experts) == 2);
      group_storage s(experts, tokens * width, pc.max_rows(tokens, width, experts));
      host::plan_groups(pc, plan.view(), s.g);
      check_capacity_rule(plan, s, 2, slot_major);
      BOOST_TEST(s.g.total_dropped() == 2);
      BOOST_TEST(s.dropped[0] == 2);
      const index_t d = dispatch::dropped_pair;
      // pair_row per pair (t·2 + j): expert e's block starts at row 2e.
      const std::vector<index_t> expected =
          slot_major ? std::vector<index_t>{2, d, 3, d, 0, 4, 1, 5}
                     : std::vector<index_t>{2, 0, 3, 1, d, 4, d, 5};
      BOOST_TEST(s.pair_row == expected, boost::test_tools::per_element());
    }
  }
}

// Random plans (k = 2 with some tokens using fewer slots): both orders against the brute-force
// rule, with C from the factor and an absolute expert_capacity; the orders differ somewhere.
BOOST_AUTO_TEST_CASE(padded_capacity_orders_follow_the_rule) {
  std::mt19937_64 g(test::base_seed() + 107);
  const index_t tokens = 48, width = 2, experts = 5;
  int differ = 0;
  for (int trial = 0; trial < 4; ++trial) {
    const auto plan = random_plan(g, tokens, width, experts);
    for (index_t absolute : {index_t{0}, index_t{3}, index_t{7}}) {
      std::vector<char> kept[2];
      for (bool slot_major : {false, true}) {
        BOOST_TEST_CONTEXT("trial " << trial << ", expert_capacity " << absolute << ", "
                                    << (slot_major ? "slot_major" : "token_major")) {
          const dispatch::padded_capacity pc{
              .capacity_factor = 0.8f, .min_capacity = 2, .capacity_multiple = 4,
              .priority = slot_major ? dispatch::capacity_priority::slot_major
                                     : dispatch::capacity_priority::token_major,
              .expert_capacity = absolute};
          index_t c = absolute;
          if (c == 0) {  // the factor's formula (file comment of padded_capacity.hpp)
            c = static_cast<index_t>(std::ceil(0.8 * plan.total_assignments() / experts));
            c = std::max<index_t>(c, 2);
            c = std::min<index_t>((c + 3) / 4 * 4, (tokens + 3) / 4 * 4);
          }
          BOOST_TEST(pc.capacity(tokens, plan.total_assignments(), experts) == c);
          group_storage s(experts, tokens * width, pc.max_rows(tokens, width, experts));
          host::plan_groups(pc, plan.view(), s.g);
          kept[slot_major] = check_capacity_rule(plan, s, c, slot_major);
          BOOST_TEST(s.g.total_dropped() > 0);
        }
      }
      differ += kept[0] != kept[1];
    }
  }
  BOOST_TEST(differ > 0);
}

// expert_capacity > 0 is C whatever the factor, floor and multiple say (even above T), and
// bounds max_rows; a negative one is rejected naming it.
BOOST_AUTO_TEST_CASE(padded_capacity_absolute_expert_capacity) {
  const dispatch::padded_capacity pc{
      .capacity_factor = 4.0f, .min_capacity = 16, .capacity_multiple = 8, .expert_capacity = 3};
  BOOST_TEST(pc.capacity(100, 200, 4) == 3);
  BOOST_TEST(pc.capacity(2, 4, 4) == 3);
  BOOST_TEST(pc.max_rows(100, 2, 4) == 12);
  BOOST_CHECK_NO_THROW(pc.validate());
  try {
    dispatch::padded_capacity{.expert_capacity = -1}.validate();
    BOOST_ERROR("expert_capacity -1 accepted");
  } catch (const range_error& e) {
    BOOST_TEST(e.argument() == "expert_capacity");
    BOOST_TEST(std::string(e.what()).find("got -1") != std::string::npos);
  }
  // With k = 1 both orders keep the same pairs (every pair is a first choice).
  std::mt19937_64 g(test::base_seed() + 108);
  const auto plan = random_plan(g, 30, 1, 4);
  group_storage a(4, 30, pc.max_rows(30, 1, 4)), b(4, 30, pc.max_rows(30, 1, 4));
  dispatch::padded_capacity slot = pc;
  slot.priority = dispatch::capacity_priority::slot_major;
  host::plan_groups(pc, plan.view(), a.g);
  host::plan_groups(slot, plan.view(), b.g);
  BOOST_TEST(a.pair_row == b.pair_row, boost::test_tools::per_element());
  BOOST_TEST(a.dropped == b.dropped, boost::test_tools::per_element());
  check_capacity_rule(plan, a, 3, false);
}

BOOST_AUTO_TEST_CASE(padded_capacity_rejects_bad_hyperparameters) {
  for (float cf : {0.0f, -0.5f, INFINITY, NAN}) {
    const dispatch::padded_capacity pc{.capacity_factor = cf};
    try {
      pc.validate();
      BOOST_ERROR("capacity_factor " << cf << " accepted");
    } catch (const range_error& e) {
      BOOST_TEST(e.argument() == "capacity_factor");
      BOOST_TEST(std::string(e.what()).find("> 0") != std::string::npos);
    }
  }
  BOOST_CHECK_THROW((dispatch::padded_capacity{.min_capacity = -1}.validate()), range_error);
  BOOST_CHECK_THROW((dispatch::padded_capacity{.capacity_multiple = 0}.validate()), range_error);
}

BOOST_AUTO_TEST_CASE(dense_maps_each_used_slot_to_itself) {
  std::mt19937_64 g(test::base_seed() + 103);
  const index_t tokens = 20, width = 3, experts = 4;
  const auto plan = random_plan(g, tokens, width, experts);
  const dispatch::dense dn;
  group_storage s(experts, tokens * width, dn.max_rows(tokens, width, experts));
  host::plan_groups(dn, plan.view(), s.g);
  std::vector<index_t> per_expert(experts, 0);
  for (index_t t = 0; t < tokens; ++t)
    for (index_t j = 0; j < width; ++j) {
      const index_t p = t * width + j;
      if (j < plan.counts[t]) ++per_expert[plan.id(t, j)];
      BOOST_TEST(s.pair_row[p] == (j < plan.counts[t] ? p : dispatch::unused_pair));
    }
  BOOST_TEST(s.count == per_expert, boost::test_tools::per_element());
}

BOOST_AUTO_TEST_CASE(gemm_matches_float64_for_every_transpose) {
  std::mt19937_64 g(test::base_seed() + 104);
  const index_t m = 67, n = 45, k = 300;  // several 64 × 128 × 128 tiles, ragged edges
  for (int ta = 0; ta < 2; ++ta)
    for (int tb = 0; tb < 2; ++tb) {
      const auto a = test::normal(g, m * k), b = test::normal(g, k * n);
      const index_t lda = ta ? m : k, ldb = tb ? k : n;
      auto at = [&](index_t i, index_t p) { return ta ? a[p * lda + i] : a[i * lda + p]; };
      auto bt = [&](index_t p, index_t j) { return tb ? b[j * ldb + p] : b[p * ldb + j]; };
      const auto c0 = test::normal(g, m * n);
      std::vector<float> c1 = c0, c2 = c0;
      const host::op oa = ta ? host::op::transpose : host::op::none;
      const host::op ob = tb ? host::op::transpose : host::op::none;
      host::sgemm(oa, ob, m, n, k, 0.5f, a.data(), lda, b.data(), ldb, 0.25f, c1.data(), n);
      ::switchyard::detail::sgemm_blocked(oa, ob, m, n, k, 0.5f, a.data(), lda, b.data(), ldb, 0.25f, c2.data(), n);
      for (index_t i = 0; i < m; ++i)
        for (index_t j = 0; j < n; ++j) {
          double s = 0, abs_s = 0;
          for (index_t p = 0; p < k; ++p) {
            s += static_cast<double>(at(i, p)) * bt(p, j);
            abs_s += std::abs(static_cast<double>(at(i, p)) * bt(p, j));
          }
          const double ref = 0.5 * s + 0.25 * c0[i * n + j];
          const double tol = 1e-6 * (abs_s + std::abs(c0[i * n + j])) + 1e-6;
          BOOST_TEST(std::abs(c1[i * n + j] - ref) <= tol);
          BOOST_TEST(std::abs(c2[i * n + j] - ref) <= tol);
        }
    }
  BOOST_TEST_MESSAGE("host GEMM backend: " << host::gemm_backend_name());
}
