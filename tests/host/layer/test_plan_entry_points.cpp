// SPDX-License-Identifier: Apache-2.0
// The public functions that take an owning routing::routing_plan outside the layer's forward
// (HyperMoE's Switch capacity and load-balance loss, the GPT-2 cv² loss, DynMoE's recorder)
// validate it before indexing with it (issue #9 follow-up): an expert id outside [0, E), an
// expert repeated among one token's used slots, a count outside [0, width] or arrays of the
// wrong size are rejected with a typed error naming the plan array, while a valid plan gives
// exactly what it gave before (checked against plain re-computations of each documented rule,
// bit for bit: the same operations in the same order).
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include <switchyard/switchyard.hpp>

#include "support/random.hpp"

namespace sy = switchyard;
using sy::index_t;
using sy::routing::routing_plan;

namespace {

// A random valid plan: token t uses counts[t] in [min_count, width] distinct experts in a
// random order, random positive weights and random positive probs rows (logits unused here).
routing_plan random_plan(std::mt19937_64& g, index_t tokens, index_t width, index_t experts,
                         index_t min_count = 0) {
  routing_plan plan;
  plan.resize(tokens, width, experts);
  std::vector<std::int32_t> all(static_cast<std::size_t>(experts));
  for (index_t e = 0; e < experts; ++e) all[e] = static_cast<std::int32_t>(e);
  std::uniform_real_distribution<float> w(0.05f, 1.0f);
  for (index_t t = 0; t < tokens; ++t) {
    std::shuffle(all.begin(), all.end(), g);
    const index_t c = min_count + static_cast<index_t>(g() % (width - min_count + 1));
    plan.counts[t] = static_cast<std::int32_t>(c);
    for (index_t j = 0; j < c; ++j) {
      plan.expert_ids[t * width + j] = all[j];
      plan.weights[t * width + j] = w(g);
    }
  }
  plan.probs = sy::test::uniform(g, static_cast<std::size_t>(tokens * experts), 0.01f, 1.0f);
  plan.logits = sy::test::normal(g, static_cast<std::size_t>(tokens * experts));
  return plan;
}

// Expects `f` to throw E whose argument() is `argument` and whose message contains `fragment`.
template <class E>
void expect_error(const std::function<void()>& f, const std::string& argument,
                  const std::string& fragment, const std::string& what) {
  try {
    f();
    BOOST_ERROR(what << ": no exception; expected one naming " << argument << " with '"
                     << fragment << "'");
  } catch (const E& e) {
    BOOST_TEST(e.argument() == argument, what << ": argument '" << e.argument() << "'");
    BOOST_TEST(std::string(e.what()).find(fragment) != std::string::npos,
               what << ": message '" << e.what() << "' lacks '" << fragment << "'");
  } catch (const std::exception& e) {
    BOOST_ERROR(what << ": wrong exception type: " << e.what());
  }
}

// T·width, 0 for a (bad) negative product.
std::size_t slots(const routing_plan& p) {
  return static_cast<std::size_t>(std::max<index_t>(0, p.num_tokens * p.width));
}

// The entry points under test, each as "call it on this plan" (inputs sized from the plan).
struct entry_point {
  std::string name;
  std::function<void(const routing_plan&)> call;
};

std::vector<entry_point> entry_points(const std::vector<float>& x, index_t d) {
  return {
      {"switch_capacity_drop",
       [](const routing_plan& p) {
         std::vector<std::int32_t> dropped(slots(p), 7);
         (void)sy::layer::switch_capacity_drop(p, 2, dropped);
       }},
      {"switch_hf_load_balance_loss",
       [](const routing_plan& p) {
         const std::vector<std::int32_t> dropped(slots(p), 0);
         (void)sy::layer::switch_hf_load_balance_loss(p, dropped);
       }},
      {"gpt2_cv_loss_eval", [](const routing_plan& p) { (void)sy::layer::gpt2_cv_loss_eval(p); }},
      {"dynmoe_recorder::record",
       [&x, d](const routing_plan& p) {
         sy::training::dynmoe_recorder rec;
         rec.record(p, sy::matrix_view<const float>(sy::make_view(x.data(), p.num_tokens, d)));
       }},
  };
}

// --- Plain re-computations of the documented rules (the code before validation was added) ---

index_t ref_capacity_drop(const routing_plan& p, index_t cap, std::vector<std::int32_t>& dropped) {
  std::vector<index_t> load(static_cast<std::size_t>(p.num_experts), 0);
  index_t n = 0;
  for (index_t t = 0; t < p.num_tokens; ++t) {
    for (index_t j = 0; j < p.width; ++j) {
      const auto slot = static_cast<std::size_t>(t * p.width + j);
      dropped[slot] = 0;
      if (j >= p.counts[t]) continue;
      const auto e = p.expert_ids[slot];
      if (load[e] >= cap) {
        dropped[slot] = 1;
        ++n;
      } else {
        ++load[e];
      }
    }
  }
  return n;
}

float ref_lb_loss(const routing_plan& p, const std::vector<std::int32_t>& dropped) {
  const index_t T = p.num_tokens, E = p.num_experts;
  std::vector<double> f(static_cast<std::size_t>(E), 0.0), pbar(f);
  for (index_t t = 0; t < T; ++t) {
    const bool kept = p.counts[t] > 0 && dropped[static_cast<std::size_t>(t * p.width)] == 0;
    f[kept ? p.id(t, 0) : 0] += 1.0;
    for (index_t e = 0; e < E; ++e) pbar[e] += p.probs[t * E + e];
  }
  double s = 0.0;
  for (index_t e = 0; e < E; ++e) s += (f[e] / T) * (pbar[e] / T);
  return static_cast<float>(s * E);
}

float ref_cv_loss(const routing_plan& p, double coef) {
  std::vector<double> imp(static_cast<std::size_t>(p.num_experts), 0.0), load(imp);
  for (index_t t = 0; t < p.num_tokens; ++t) {
    for (index_t j = 0; j < p.counts[t]; ++j) {
      imp[p.id(t, j)] += p.weight(t, j);
      if (p.weight(t, j) > 0.0f) load[p.id(t, j)] += 1.0;
    }
  }
  const auto cv2 = [](const std::vector<double>& v) {
    const auto n = static_cast<double>(v.size());
    if (v.size() < 2) return 0.0;
    double mean = 0.0;
    for (double a : v) mean += a;
    mean /= n;
    double var = 0.0;
    for (double a : v) var += (a - mean) * (a - mean);
    var /= n - 1.0;
    return var / (mean * mean + 1e-10);
  };
  return static_cast<float>(coef * (cv2(imp) + cv2(load)));
}

}  // namespace

// An id E (one past the last expert) and a negative id in a used slot: every entry point
// throws range_error naming "plan.expert_ids", with the token, slot and value in the message.
BOOST_AUTO_TEST_CASE(out_of_range_expert_id_is_rejected_by_every_entry_point) {
  std::mt19937_64 g(sy::test::base_seed() + 1701);
  const index_t T = 9, width = 3, E = 5, d = 4;
  const auto x = sy::test::normal(g, static_cast<std::size_t>(T * d));
  for (const auto& ep : entry_points(x, d)) {
    for (const std::int32_t bad : {static_cast<std::int32_t>(E), std::int32_t{E + 1000},
                                   std::int32_t{-2}, std::int32_t{-1}}) {
      auto plan = random_plan(g, T, width, E, /*min_count=*/1);
      const index_t t = static_cast<index_t>(g() % T);
      const index_t j = static_cast<index_t>(g() % plan.counts[t]);
      plan.expert_ids[t * width + j] = bad;
      expect_error<sy::range_error>(
          [&] { ep.call(plan); }, "plan.expert_ids",
          "plan.expert_ids[" + std::to_string(t) + ", " + std::to_string(j) + "] must be in [0, " +
              std::to_string(E) + "), got " + std::to_string(bad),
          ep.name + " id " + std::to_string(bad));
    }
    // A real id in an unused slot (a count too small for the ids written) is rejected too.
    auto plan = random_plan(g, T, width, E, /*min_count=*/0);
    plan.counts[2] = 0;
    for (index_t j = 0; j < width; ++j) plan.expert_ids[2 * width + j] = sy::routing::unused_slot;
    plan.expert_ids[2 * width + 1] = 1;
    expect_error<sy::range_error>([&] { ep.call(plan); }, "plan.expert_ids",
                                  "plan.expert_ids[2, 1] must be -1 (unused), got 1",
                                  ep.name + " id in unused slot");
  }
}

// An expert named twice among one token's used slots (every earlier-slot placement): every
// entry point throws range_error naming "plan.expert_ids" and the repeat.
BOOST_AUTO_TEST_CASE(duplicated_expert_id_is_rejected_by_every_entry_point) {
  std::mt19937_64 g(sy::test::base_seed() + 1702);
  const index_t T = 7, width = 3, E = 6, d = 3;
  const auto x = sy::test::normal(g, static_cast<std::size_t>(T * d));
  for (const auto& ep : entry_points(x, d)) {
    for (index_t j = 1; j < width; ++j) {
      for (index_t first = 0; first < j; ++first) {
        auto plan = random_plan(g, T, width, E, /*min_count=*/width);
        const index_t t = static_cast<index_t>(g() % T);
        const auto e = plan.expert_ids[t * width + first];
        plan.expert_ids[t * width + j] = e;
        expect_error<sy::range_error>(
            [&] { ep.call(plan); }, "plan.expert_ids",
            "plan.expert_ids[" + std::to_string(t) + ", " + std::to_string(j) +
                "] repeats expert " + std::to_string(e) + " (also in slot " +
                std::to_string(first) + ")",
            ep.name + " repeat in slots " + std::to_string(first) + ", " + std::to_string(j));
      }
    }
  }
}

// counts[t] outside [0, width] (reading past the token's slots, or negative): range_error
// naming "plan.counts".
BOOST_AUTO_TEST_CASE(count_outside_width_is_rejected_by_every_entry_point) {
  std::mt19937_64 g(sy::test::base_seed() + 1703);
  const index_t T = 6, width = 2, E = 4, d = 5;
  const auto x = sy::test::normal(g, static_cast<std::size_t>(T * d));
  for (const auto& ep : entry_points(x, d)) {
    for (const std::int32_t bad : {std::int32_t{width + 1}, std::int32_t{-1}}) {
      auto plan = random_plan(g, T, width, E);
      plan.counts[4] = bad;
      expect_error<sy::range_error>([&] { ep.call(plan); }, "plan.counts",
                                    "plan.counts[4] must be in [0, " + std::to_string(width) +
                                        "], got " + std::to_string(bad),
                                    ep.name + " count " + std::to_string(bad));
    }
  }
}

// Arrays shorter than T·width (or T) would be read past their end: shape_error naming the
// array and its expected size.
BOOST_AUTO_TEST_CASE(plan_arrays_of_the_wrong_size_are_rejected) {
  std::mt19937_64 g(sy::test::base_seed() + 1704);
  const index_t T = 5, width = 2, E = 3, d = 2;
  const auto x = sy::test::normal(g, static_cast<std::size_t>(T * d));
  for (const auto& ep : entry_points(x, d)) {
    auto plan = random_plan(g, T, width, E);
    plan.expert_ids.pop_back();
    expect_error<sy::shape_error>([&] { ep.call(plan); }, "plan.expert_ids",
                                  "plan.expert_ids: expected 10 elements [T·width], got 9",
                                  ep.name + " ids");
    plan = random_plan(g, T, width, E);
    plan.weights.push_back(0.5f);
    expect_error<sy::shape_error>([&] { ep.call(plan); }, "plan.weights",
                                  "plan.weights: expected 10 elements [T·width], got 11",
                                  ep.name + " weights");
    plan = random_plan(g, T, width, E);
    plan.counts.pop_back();
    expect_error<sy::shape_error>([&] { ep.call(plan); }, "plan.counts",
                                  "plan.counts: expected 5 elements [T], got 4", ep.name + " counts");
    plan = random_plan(g, T, width, E);
    plan.width = -1;
    if (ep.name == "switch_capacity_drop")  // checks `dropped` against T·width first
      expect_error<sy::shape_error>([&] { ep.call(plan); }, "dropped", "", ep.name + " width");
    else
      expect_error<sy::range_error>([&] { ep.call(plan); }, "plan.width", "-1", ep.name + " width");
  }
  // The load-balance loss also reads probs [T·E] and dropped [T·width].
  auto plan = random_plan(g, T, width, E);
  const std::vector<std::int32_t> dropped(static_cast<std::size_t>(T * width), 0);
  plan.probs.resize(static_cast<std::size_t>(T * E - 1));
  expect_error<sy::shape_error>([&] { (void)sy::layer::switch_hf_load_balance_loss(plan, dropped); },
                                "plan.probs", "expected 15 elements [T·E], got 14", "lb probs");
  plan = random_plan(g, T, width, E);
  expect_error<sy::shape_error>(
      [&] {
        (void)sy::layer::switch_hf_load_balance_loss(
            plan, ::cuda::std::span<const std::int32_t>(dropped.data(), dropped.size() - 1));
      },
      "dropped", "expected 10 elements [T·width], got 9", "lb dropped");
}

// Valid plans (random widths, counts 0..width, T including 1) give exactly the documented
// results, as before validation was added.
BOOST_AUTO_TEST_CASE(valid_plans_give_unchanged_results) {
  std::mt19937_64 g(sy::test::base_seed() + 1705);
  for (const index_t width : {1, 2, 4}) {
    for (const index_t T : {1, 2, 13, 40}) {
      const index_t E = width + 3;
      const auto plan = random_plan(g, T, width, E);
      for (const index_t cap : {0, 1, 3, 100}) {
        std::vector<std::int32_t> got(static_cast<std::size_t>(T * width), 5), want(got);
        const index_t n = sy::layer::switch_capacity_drop(plan, cap, got);
        BOOST_TEST(n == ref_capacity_drop(plan, cap, want));
        BOOST_TEST(got == want);
        // Bitwise: the same double sums in the same order.
        const float lb = sy::layer::switch_hf_load_balance_loss(plan, got);
        const float lb_want = ref_lb_loss(plan, want);
        BOOST_TEST(std::memcmp(&lb, &lb_want, sizeof lb) == 0, lb << " vs " << lb_want);
      }
      for (const double coef : {0.01, 0.5}) {
        const float cv = sy::layer::gpt2_cv_loss_eval(plan, coef);
        const float cv_want = ref_cv_loss(plan, coef);
        BOOST_TEST(std::memcmp(&cv, &cv_want, sizeof cv) == 0, cv << " vs " << cv_want);
      }
      // Recorder, twice (accumulates): token counts per expert and Σ x of unrouted tokens.
      const index_t d = 3;
      const auto x = sy::test::normal(g, static_cast<std::size_t>(T * d));
      const sy::matrix_view<const float> xv(sy::make_view(x.data(), T, d));
      sy::training::dynmoe_recorder rec;
      rec.record(plan, xv);
      rec.record(plan, xv);
      std::vector<float> want_r(static_cast<std::size_t>(E), 0.0f), want_s(d, 0.0f);
      for (int pass = 0; pass < 2; ++pass) {
        for (index_t t = 0; t < T; ++t) {
          for (index_t j = 0; j < plan.counts[t]; ++j) want_r[plan.id(t, j)] += 1.0f;
          if (plan.counts[t] == 0)
            for (index_t i = 0; i < d; ++i) want_s[i] += x[t * d + i];
        }
      }
      BOOST_TEST(rec.routing_records == want_r, boost::test_tools::per_element());
      BOOST_TEST(rec.sample_records == want_s, boost::test_tools::per_element());
      BOOST_TEST(rec.recorded_forwards == 2);
      BOOST_TEST(rec.recorded_tokens == 2 * T);
    }
  }
  // An empty batch: nothing dropped, loss 0, nothing recorded but the forward.
  routing_plan empty;
  empty.resize(0, 2, 4);
  std::vector<std::int32_t> none;
  BOOST_TEST(sy::layer::switch_capacity_drop(empty, 1, none) == 0);
  BOOST_TEST(sy::layer::switch_hf_load_balance_loss(empty, none) == 0.0f);
  const std::vector<float> nox;
  sy::training::dynmoe_recorder rec;
  rec.record(empty, sy::matrix_view<const float>(sy::make_view(nox.data(), 0, 3)));
  BOOST_TEST(rec.recorded_forwards == 1);
  BOOST_TEST(rec.routing_records == std::vector<float>(4, 0.0f), boost::test_tools::per_element());
}

// A rejected record() leaves the recorder as it was (sized or not).
BOOST_AUTO_TEST_CASE(rejected_record_leaves_the_recorder_unchanged) {
  std::mt19937_64 g(sy::test::base_seed() + 1706);
  const index_t T = 8, width = 2, E = 4, d = 3;
  const auto x = sy::test::normal(g, static_cast<std::size_t>(T * d));
  const sy::matrix_view<const float> xv(sy::make_view(x.data(), T, d));
  auto bad = random_plan(g, T, width, E, /*min_count=*/1);
  bad.expert_ids[0] = static_cast<std::int32_t>(E);
  sy::training::dynmoe_recorder rec;
  BOOST_CHECK_THROW(rec.record(bad, xv), sy::range_error);
  BOOST_TEST(rec.routing_records.empty());
  BOOST_TEST(rec.sample_records.empty());
  const auto good = random_plan(g, T, width, E);
  rec.record(good, xv);
  const auto before = rec.routing_records;
  BOOST_CHECK_THROW(rec.record(bad, xv), sy::range_error);
  BOOST_TEST(rec.routing_records == before, boost::test_tools::per_element());
  BOOST_TEST(rec.recorded_forwards == 1);
}

// Switch load balance on a batch with no experts has no expert 0 to count dropped tokens in.
BOOST_AUTO_TEST_CASE(load_balance_loss_rejects_zero_experts_for_a_non_empty_batch) {
  routing_plan plan;
  plan.resize(3, 1, 0);
  const std::vector<std::int32_t> dropped(3, 0);
  expect_error<sy::range_error>([&] { (void)sy::layer::switch_hf_load_balance_loss(plan, dropped); },
                                "plan.num_experts", "must be >= 1", "lb E = 0");
}
