// SPDX-License-Identifier: Apache-2.0
// routing::validate_plan rejects a plan that names the same expert twice for one token (with
// `dense` dispatch backward would add that expert's dx twice), directly and through every
// user-facing plan entry point of MoELayer (forward_experts, backward_experts) for each
// dispatch; and no router in the library produces such a plan, even on exact score ties.
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <switchyard/switchyard.hpp>

#include "host/layer/layer_reference.hpp"
#include "support/random.hpp"

namespace sy = switchyard;
using namespace switchyard;

namespace {

// A random valid plan: token t uses counts[t] in [min_count, width] distinct experts, in a
// random order, with random positive weights.
routing::routing_plan random_plan(std::mt19937_64& g, index_t tokens, index_t width,
                                  index_t experts, index_t min_count = 0) {
  routing::routing_plan plan;
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
  return plan;
}

// Expects `f` to throw E whose argument() is `argument` and whose message contains `fragment`.
template <class E, class F>
void expect_error(F&& f, const std::string& argument, const std::string& fragment) {
  try {
    f();
    BOOST_ERROR("no exception; expected one naming " << argument << " with '" << fragment << "'");
  } catch (const E& e) {
    BOOST_TEST(e.argument() == argument);
    BOOST_TEST(std::string(e.what()).find(fragment) != std::string::npos,
               "message '" << e.what() << "' lacks '" << fragment << "'");
  }
}

// The message validate_plan gives for slot (t, j) repeating the expert of slot `first`.
std::string repeat_message(const std::string& argument, index_t t, index_t j, std::int32_t e,
                           index_t first) {
  return argument + ".expert_ids[" + std::to_string(t) + ", " + std::to_string(j) +
         "] repeats expert " + std::to_string(e) + " (also in slot " + std::to_string(first) + ")";
}

using dispatches = std::tuple<dispatch::sorted_grouped, dispatch::padded_capacity, dispatch::dense>;

}  // namespace

BOOST_AUTO_TEST_CASE(valid_random_plans_pass) {
  std::mt19937_64 g(test::base_seed() + 901);
  for (index_t width : {1, 2, 3, 6}) {
    const auto plan = random_plan(g, 41, width, 6);
    BOOST_CHECK_NO_THROW(routing::validate_plan("plan", plan.view(), 41, 6));
  }
}

// Every (slot j, earlier slot i) placement of a repeat, in a random valid plan: the error is a
// range_error on "<argument>.expert_ids" naming the token, the slot, the expert and the first
// slot holding it.
BOOST_AUTO_TEST_CASE(validate_plan_rejects_a_repeated_expert_naming_token_and_slot) {
  std::mt19937_64 g(test::base_seed() + 902);
  constexpr index_t tokens = 23, width = 4, experts = 9;
  const auto base = random_plan(g, tokens, width, experts, width);  // every slot used
  for (index_t j = 1; j < width; ++j) {
    for (index_t i = 0; i < j; ++i) {
      auto plan = base;
      const index_t t = static_cast<index_t>(g() % tokens);
      const std::int32_t e = plan.expert_ids[t * width + i];
      plan.expert_ids[t * width + j] = e;
      expect_error<range_error>([&] { routing::validate_plan("plan", plan.view(), tokens, experts); },
                                "plan.expert_ids", repeat_message("plan", t, j, e, i));
      // The argument name is the caller's.
      expect_error<range_error>(
          [&] { routing::validate_plan("layer3.plan", std::as_const(plan).view(), tokens, experts); },
          "layer3.plan.expert_ids", repeat_message("layer3.plan", t, j, e, i));
    }
  }
}

// An id repeated three times is reported at its first repeat, against its first slot.
BOOST_AUTO_TEST_CASE(validate_plan_reports_the_first_repeat) {
  std::mt19937_64 g(test::base_seed() + 903);
  constexpr index_t tokens = 5, width = 5, experts = 7;
  auto plan = random_plan(g, tokens, width, experts, width);
  const std::int32_t e = plan.expert_ids[3 * width + 1];
  plan.expert_ids[3 * width + 2] = e;
  plan.expert_ids[3 * width + 4] = e;
  expect_error<range_error>([&] { routing::validate_plan("plan", plan.view(), tokens, experts); },
                            "plan.expert_ids", repeat_message("plan", 3, 2, e, 1));
}

// Only used slots count: an unused slot must be -1 anyway, and a token using fewer slots may
// not hide a repeat behind its count (the repeat is inside the used slots here).
BOOST_AUTO_TEST_CASE(validate_plan_checks_only_used_slots_for_repeats) {
  std::mt19937_64 g(test::base_seed() + 904);
  constexpr index_t tokens = 4, width = 4, experts = 6;
  auto plan = random_plan(g, tokens, width, experts, 1);
  plan.counts[2] = 2;
  plan.expert_ids[2 * width + 0] = 4;
  plan.expert_ids[2 * width + 1] = 4;
  plan.expert_ids[2 * width + 2] = routing::unused_slot;
  plan.expert_ids[2 * width + 3] = routing::unused_slot;
  plan.weights[2 * width + 2] = plan.weights[2 * width + 3] = 0.0f;
  expect_error<range_error>([&] { routing::validate_plan("plan", plan.view(), tokens, experts); },
                            "plan.expert_ids", repeat_message("plan", 2, 1, 4, 0));
}

// MoELayer's plan entry points (forward_experts, backward_experts) reject the repeat before
// any expert runs, for every dispatch; the same plan without the repeat is accepted.
BOOST_AUTO_TEST_CASE_TEMPLATE(moe_layer_plan_entry_points_reject_a_repeated_expert, D, dispatches) {
  std::mt19937_64 g(test::base_seed() + 905);
  constexpr index_t tokens = 7, d = 6, f = 5, experts = 5, width = 3;
  test::layer_data<float> L(g, tokens, d, f, experts, false, true);
  MoELayer<routers::TopK, activation::gelu, D> layer{};
  const auto good = random_plan(g, tokens, width, experts, width);
  auto bad = good;
  bad.expert_ids[4 * width + 2] = bad.expert_ids[4 * width + 0];
  const std::int32_t e = bad.expert_ids[4 * width + 0];
  const auto dy = test::normal(g, tokens * d);
  std::vector<float> y(tokens * d), dx(tokens * d), dw(tokens * width);
  std::vector<index_t> dropped(experts);
  auto forward = [&](const routing::routing_plan& plan) {
    layer.template forward_experts<float>(switchyard::host_context{}, L.xv(), plan.view(), L.weights(),
                                          make_view(y.data(), tokens, d),
                                          {dropped.data(), dropped.size()});
  };
  auto backward = [&](const routing::routing_plan& plan) {
    layer.template backward_experts<float>(switchyard::host_context{}, L.xv(), plan.view(), L.weights(),
                                           make_view<const float>(dy.data(), tokens, d),
                                           make_view(dx.data(), tokens, d), {},
                                           {dw.data(), dw.size()});
  };
  BOOST_CHECK_NO_THROW(forward(good));
  BOOST_CHECK_NO_THROW(backward(good));
  const auto message = repeat_message("plan", 4, 2, e, 0);
  expect_error<range_error>([&] { forward(bad); }, "plan.expert_ids", message);
  expect_error<range_error>([&] { backward(bad); }, "plan.expert_ids", message);
}

// The HyperMoE module's plan entry point (selection_embedding; forward and backward share
// its check) rejects the repeat too.
BOOST_AUTO_TEST_CASE(hypermoe_selection_embedding_rejects_a_repeated_expert) {
  std::mt19937_64 g(test::base_seed() + 907);
  constexpr index_t tokens = 9, width = 3, experts = 6, d_emb = 5;
  const auto emb = test::normal(g, experts * d_emb);
  std::vector<float> u(tokens * d_emb);
  const layer::hypermoe_module mod{.layer_idx = 0, .adapter_dim = 2};
  auto plan = random_plan(g, tokens, width, experts, width);
  auto run = [&] {
    mod.selection_embedding(plan.view(), make_view<const float>(emb.data(), experts, d_emb),
                            make_view(u.data(), tokens, d_emb));
  };
  BOOST_CHECK_NO_THROW(run());
  const std::int32_t e = plan.expert_ids[6 * width + 1];
  plan.expert_ids[6 * width + 2] = e;
  expect_error<range_error>(run, "plan.expert_ids", repeat_message("plan", 6, 2, e, 1));
}

// No router of the library routes a token to one expert twice, also when scores tie exactly
// (experts 1, 3 and 4 share one gate row, so their logits and probabilities are equal).
template <class R>
void check_router_plans_distinct(const char* name, R r, std::uint64_t seed) {
  std::mt19937_64 g(seed);
  constexpr index_t tokens = 64, d = 8, experts = 6;
  test::router_setup<R> rs(g, r, tokens, d, experts);
  auto tie = [&](std::vector<float>& w, bool rows) {
    for (index_t i = 0; i < d; ++i)
      for (index_t e : {3, 4}) {
        if (rows) w[e * d + i] = w[1 * d + i];  // [E, d]
        else w[i * experts + e] = w[i * experts + 1];  // [d, E]
      }
  };
  if constexpr (std::is_same_v<R, routers::DynMoE>) {
    tie(rs.w_gate, false);
    rs.thresholds[3] = rs.thresholds[4] = rs.thresholds[1];
  } else {
    tie(rs.w, true);
  }
  const auto x = test::normal(g, tokens * d);
  routing::routing_plan plan;
  typename R::losses_type losses;
  switchyard::host::route(rs.router, make_view<const float>(x.data(), tokens, d), rs.params(d), plan,
                          losses);
  BOOST_TEST(plan.total_assignments() > 0, name);
  // The ties are real: the scores the selection rule saw are equal for experts 1, 3 and 4.
  index_t tied = 0;
  for (index_t t = 0; t < tokens; ++t) {
    const float* p = &plan.probs[static_cast<std::size_t>(t * experts)];
    tied += p[1] == p[3] && p[1] == p[4];
  }
  BOOST_TEST(tied == tokens, name << ": " << tied << " of " << tokens << " tokens tie");
  try {
    routing::validate_plan("plan", std::as_const(plan).view(), tokens, experts);
  } catch (const std::exception& ex) {
    BOOST_ERROR(name << " (seed " << seed << "): " << ex.what());
  }
}

BOOST_AUTO_TEST_CASE(no_router_repeats_an_expert_even_on_ties) {
  const auto s = test::base_seed() + 906;
  for (int k : {1, 2, 3, 6}) check_router_plans_distinct("TopK", routers::TopK{.k = k}, s + k);
  for (float p : {0.3f, 0.6f, 1.0f})
    check_router_plans_distinct("TopP", routers::TopP{.p = p, .max_k = 6}, s + 10);
  check_router_plans_distinct("AdaptiveGating", routers::AdaptiveGating{.threshold = 0.2f}, s + 11);
  check_router_plans_distinct(
      "DAMoE", routers::DAMoE<routing::importance::precomputed>{.k_rule = {.k_min = 1, .k_max = 6}},
      s + 12);
  check_router_plans_distinct("DynMoE training", routers::DynMoE{.training = true}, s + 13);
  check_router_plans_distinct("DynMoE eval", routers::DynMoE{.training = false}, s + 14);
}
