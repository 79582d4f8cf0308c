// SPDX-License-Identifier: Apache-2.0
// DynMoE top-any router (spec §3): plan properties on fresh random inputs, losses and
// straight-through gradients against a float64 reference written here (central differences),
// the adaptive expert update on crafted records, the record/update schedule, every
// bad-input error, and that forward and backward given workspace_size bytes allocate nothing
// (global operator new counts) and give the bits of the allocating conveniences.
#include <boost/test/unit_test.hpp>

#include <switchyard/backend/host/route.hpp>
#include <switchyard/routing/routers/dynmoe.hpp>
#include <switchyard/routing/selection/topany.hpp>
#include <switchyard/training/dynmoe_update.hpp>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <new>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "support/random.hpp"

// Global operator new/delete that count allocations while `counting` is set.
namespace {
std::atomic<bool> counting{false};
std::atomic<long> allocations{0};
void* counted_alloc(std::size_t n, std::size_t align = 0) {
  if (counting.load()) allocations.fetch_add(1);
  if (n == 0) n = 1;
  void* p = align > alignof(std::max_align_t) ? std::aligned_alloc(align, (n + align - 1) / align * align)
                                              : std::malloc(n);
  if (p == nullptr) throw std::bad_alloc();
  return p;
}
// Every replaced delete frees through this one function, kept out of line: once GCC inlined
// both a replaced new (malloc) and a replaced delete (free) into one caller it warned
// -Wmismatched-new-delete (under the asan preset's -O1) although the pair is malloc / free.
[[gnu::noinline]] void counted_free(void* p) noexcept { std::free(p); }
}  // namespace
void* operator new(std::size_t n) { return counted_alloc(n); }
void* operator new[](std::size_t n) { return counted_alloc(n); }
void* operator new(std::size_t n, std::align_val_t a) { return counted_alloc(n, static_cast<std::size_t>(a)); }
void* operator new[](std::size_t n, std::align_val_t a) { return counted_alloc(n, static_cast<std::size_t>(a)); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  try {
    return counted_alloc(n);
  } catch (...) {
    return nullptr;
  }
}
void* operator new[](std::size_t n, const std::nothrow_t& t) noexcept { return operator new(n, t); }
void operator delete(void* p) noexcept { counted_free(p); }
void operator delete[](void* p) noexcept { counted_free(p); }
void operator delete(void* p, std::size_t) noexcept { counted_free(p); }
void operator delete[](void* p, std::size_t) noexcept { counted_free(p); }
void operator delete(void* p, std::align_val_t) noexcept { counted_free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { counted_free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { counted_free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { counted_free(p); }

namespace sy = switchyard;
using sy::routing::routing_plan;
using losses_t = sy::routing::dynmoe_losses;

namespace {

double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }

// One DynMoE problem: x [T, d], W [d, E] (column per expert), G [E], mask [E], log τ.
struct problem {
  int tokens, d, experts;
  std::vector<float> x, w, g;
  std::vector<std::int32_t> mask;
  float log_t;

  problem(int t, int dd, int e, std::uint64_t seed, float log_temperature = 0.0f,
          float g_lo = -0.6f, float g_hi = 0.4f, int masked = 0)
      : tokens(t), d(dd), experts(e), log_t(log_temperature) {
    std::mt19937_64 gen(seed);
    x = sy::test::normal(gen, static_cast<std::size_t>(t) * dd);
    w = sy::test::normal(gen, static_cast<std::size_t>(dd) * e, 0.4f);
    g = sy::test::uniform(gen, static_cast<std::size_t>(e), g_lo, g_hi);
    mask.assign(static_cast<std::size_t>(e), 1);
    // mask `masked` distinct random experts
    std::vector<int> ids(static_cast<std::size_t>(e));
    for (int i = 0; i < e; ++i) ids[i] = i;
    std::shuffle(ids.begin(), ids.end(), gen);
    for (int i = 0; i < masked; ++i) mask[ids[i]] = 0;
  }
  [[nodiscard]] sy::matrix_view<const float> xv() const { return sy::make_view(x.data(), tokens, d); }
  [[nodiscard]] sy::routing::dynmoe_params params() const {
    return {sy::make_view(w.data(), d, experts), sy::make_view(g.data(), experts),
            sy::make_view(mask.data(), experts), log_t};
  }
};

routing_plan route(const sy::routers::DynMoE& r, const problem& p, losses_t* losses = nullptr) {
  routing_plan plan;
  losses_t l;
  switchyard::host::route(r, p.xv(), p.params(), plan, l);
  if (losses) *losses = l;
  return plan;
}

// ---- float64 reference ------------------------------------------------------------------
struct ref_state {
  int tokens, d, experts;
  std::vector<double> x, w, g;  // x [T, d], w [d, E], g [E]
  std::vector<int> mask;
  double s;
};

ref_state to_ref(const problem& p) {
  ref_state r{p.tokens, p.d, p.experts, {}, {}, {}, {}, 0.0};
  r.x.assign(p.x.begin(), p.x.end());
  r.w.assign(p.w.begin(), p.w.end());
  r.g.assign(p.g.begin(), p.g.end());
  r.mask.assign(p.mask.begin(), p.mask.end());
  r.s = std::exp(std::min<double>(p.log_t, std::log(100.0)));
  return r;
}

// u[t, e] = S_te − θ_e in float64.
std::vector<double> margins(const ref_state& r) {
  std::vector<double> u(static_cast<std::size_t>(r.tokens * r.experts));
  for (int t = 0; t < r.tokens; ++t) {
    double xn = 0;
    for (int i = 0; i < r.d; ++i) xn += r.x[t * r.d + i] * r.x[t * r.d + i];
    xn = std::max(std::sqrt(xn), 1e-12);
    for (int e = 0; e < r.experts; ++e) {
      double wn = 0, dot = 0;
      for (int i = 0; i < r.d; ++i) {
        wn += r.w[i * r.experts + e] * r.w[i * r.experts + e];
        dot += r.x[t * r.d + i] * r.w[i * r.experts + e];
      }
      wn = std::max(std::sqrt(wn), 1e-12);
      const double S = sigmoid(r.s * dot / (xn * wn)) * r.mask[e];
      u[t * r.experts + e] = S - sigmoid(r.s * r.g[e]);
    }
  }
  return u;
}

// The gate pattern frozen at the evaluation point (selection is piecewise constant).
struct frozen {
  std::vector<double> b0, u0;  // gates (eval fallbacks included), margins
  std::vector<int> active, k;  // S > θ entries, integer count per token
};

frozen freeze(const ref_state& r, const routing_plan& plan) {
  frozen f;
  f.u0 = margins(r);
  f.b0.assign(f.u0.size(), 0.0);
  f.active.assign(f.u0.size(), 0);
  f.k.assign(static_cast<std::size_t>(r.tokens), 0);
  for (int t = 0; t < r.tokens; ++t) {
    f.k[t] = plan.counts[t];
    for (int j = 0; j < plan.counts[t]; ++j) f.b0[t * r.experts + plan.id(t, j)] = 1.0;
    for (int e = 0; e < r.experts; ++e) f.active[t * r.experts + e] = f.u0[t * r.experts + e] > 0;
  }
  return f;
}

struct ref_losses {
  double sim = 0, simple = 0, lb = 0, eff = 0, combine = 0;
};

// Straight-through objective: b = b0 + (u − u0) on active entries; combine weight b/K with
// the integer K of the plan; L_lb with the differentiable k = Σ b; all four DeepSpeed losses.
ref_losses reference(const ref_state& r, const frozen& f, const std::vector<float>& cot_dense,
                     bool* pattern_changed = nullptr) {
  const auto u = margins(r);
  const int T = r.tokens, E = r.experts;
  std::vector<double> b(f.b0);
  for (std::size_t i = 0; i < b.size(); ++i) {
    if (f.active[i]) b[i] += u[i] - f.u0[i];
    if (pattern_changed && ((u[i] > 0) != (f.u0[i] > 0))) *pattern_changed = true;
  }
  ref_losses L;
  std::vector<double> ce(E, 0), me(E, 0);
  int routed = 0;
  for (int t = 0; t < T; ++t) {
    if (f.k[t] == 0) continue;
    ++routed;
    for (int e = 0; e < E; ++e) ce[e] += f.b0[t * E + e];
    for (int e = 0; e < E; ++e) L.combine += cot_dense[t * E + e] * b[t * E + e] / f.k[t];
  }
  for (int t = 0; t < T; ++t) {
    if (f.k[t] == 0) continue;
    double k = 0;
    for (int e = 0; e < E; ++e) k += b[t * E + e];
    for (int e = 0; e < E; ++e) me[e] += b[t * E + e] / k / routed;
  }
  if (routed > 0)
    for (int e = 0; e < E; ++e) L.lb += E * me[e] * (ce[e] / routed);
  for (double v : b) L.eff += v / (static_cast<double>(T) * E);
  std::vector<double> wn(E, 0);
  for (int e = 0; e < E; ++e) {
    for (int i = 0; i < r.d; ++i) wn[e] += r.w[i * E + e] * r.w[i * E + e];
    wn[e] = std::sqrt(wn[e]);
    L.simple += wn[e] / E;
  }
  double a2 = 0;
  for (int e = 0; e < E; ++e)
    for (int q = 0; q < E; ++q) {
      if (!r.mask[e] || !r.mask[q]) continue;
      double dot = 0;
      for (int i = 0; i < r.d; ++i) dot += r.w[i * E + e] * r.w[i * E + q];
      const double v = dot / (std::max(wn[e], 1e-12) * std::max(wn[q], 1e-12)) - (e == q ? 1 : 0);
      a2 += v * v;
    }
  L.sim = std::sqrt(a2);
  return L;
}

double objective(const ref_losses& L, const losses_t& c) {
  return L.combine + c.sim_loss * L.sim + c.simple_loss * L.simple + c.load_balance_loss * L.lb +
         c.efficiency_loss * L.eff;
}

double min_abs_margin(const problem& p) {
  const auto u = margins(to_ref(p));
  double m = std::numeric_limits<double>::infinity();
  for (int t = 0; t < p.tokens; ++t)
    for (int e = 0; e < p.experts; ++e)
      if (p.mask[e]) m = std::min(m, std::abs(u[t * p.experts + e]));
  return m;
}

// A problem whose gates all sit at least 1e-4 away from their thresholds, so that float32
// and float64 agree on the pattern and finite differences never flip a gate.
problem well_separated(int t, int d, int e, std::uint64_t seed, float log_t, float g_lo, float g_hi,
                       int masked) {
  for (int attempt = 0;; ++attempt) {
    problem p(t, d, e, seed + 1000003ull * attempt, log_t, g_lo, g_hi, masked);
    if (min_abs_margin(p) > 1e-4 || attempt > 50) return p;
  }
}

template <class F>
void expect_error(F&& f, const std::string& argument, std::initializer_list<const char*> in_message) {
  bool thrown = false;
  try {
    f();
  } catch (const sy::invalid_argument& e) {
    thrown = true;
    BOOST_TEST(e.argument() == argument);
    const std::string msg = e.what();
    BOOST_TEST(msg.find(argument) != std::string::npos, "message names the argument: " << msg);
    for (const char* s : in_message)
      BOOST_TEST(msg.find(s) != std::string::npos, "message '" << msg << "' contains '" << s << "'");
  }
  BOOST_TEST(thrown, "expected an error naming " << argument);
}

}  // namespace

BOOST_AUTO_TEST_SUITE(dynmoe_rule)

BOOST_AUTO_TEST_CASE(strict_threshold_descending_order_ties_to_lower_index) {
  const std::vector<float> scores{0.6f, 0.7f, 0.6f, 0.5f, 0.2f};
  const std::vector<float> theta{0.5f, 0.5f, 0.5f, 0.5f, 0.1f};  // 0.5 is not > 0.5
  std::vector<std::int32_t> ids(5);
  std::vector<float> w(5);
  const sy::routing::topany_rule rule{theta, {}, true};
  BOOST_TEST(rule.width(5) == 5);
  const int n = rule.select(scores, ids, w);
  BOOST_TEST(n == 4);
  BOOST_TEST(ids == (std::vector<std::int32_t>{1, 0, 2, 4, -1}), boost::test_tools::per_element());
  for (int j = 0; j < 4; ++j) BOOST_TEST(w[j] == 1.0f / 4.0f);
  BOOST_TEST(w[4] == 0.0f);
}

BOOST_AUTO_TEST_CASE(empty_token_training_none_eval_first_argmax_among_active) {
  const std::vector<float> scores{0.3f, 0.4f, 0.4f, 0.1f};
  const std::vector<float> theta{0.9f, 0.9f, 0.9f, 0.9f};
  std::vector<std::int32_t> ids(4);
  std::vector<float> w(4);
  BOOST_TEST((sy::routing::topany_rule{theta, {}, true}.select(scores, ids, w)) == 0);
  BOOST_TEST(ids == (std::vector<std::int32_t>(4, -1)), boost::test_tools::per_element());
  BOOST_TEST((sy::routing::topany_rule{theta, {}, false}.select(scores, ids, w)) == 1);
  BOOST_TEST(ids[0] == 1);  // first of the tied maxima
  BOOST_TEST(w[0] == 1.0f);
  // All-zero scores (every active score underflowed): the fallback skips masked experts.
  const std::vector<float> zeros(4, 0.0f);
  const std::vector<std::int32_t> mask{0, 1, 0, 1};
  BOOST_TEST((sy::routing::topany_rule{theta, mask, false}.select(zeros, ids, w)) == 1);
  BOOST_TEST(ids[0] == 1);
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(dynmoe_forward)

BOOST_AUTO_TEST_CASE(plan_properties_on_random_inputs) {
  const auto seed = sy::test::base_seed();
  int case_id = 0;
  for (float log_t : {0.0f, std::log(10.0f), 7.0f /* clamped to log 100 */}) {
    for (int masked : {0, 3}) {
      for (bool training : {true, false}) {
        ++case_id;
        BOOST_TEST_CONTEXT("log_t=" << log_t << " masked=" << masked << " training=" << training) {
          const float spread = 0.5f / std::exp(std::min(log_t, std::log(100.0f)));
          const problem p(96, 16, 8, seed + case_id, log_t, -spread, spread, masked);
          const sy::routers::DynMoE r{.training = training};
          const auto plan = route(r, p);
          const auto theta = sy::routers::DynMoE::threshold_probs(p.params());
          const auto ref_u = margins(to_ref(p));
          std::vector<int> seen_counts(p.experts + 1, 0);
          for (int t = 0; t < p.tokens; ++t) {
            const int k = plan.counts[t];
            BOOST_TEST_REQUIRE((k >= 0 && k <= p.experts));
            if (!training) BOOST_TEST(k >= 1);
            ++seen_counts[k];
            int on = 0;
            for (int e = 0; e < p.experts; ++e) {
              const float S = plan.probs[t * p.experts + e];
              // scores agree with the float64 reference
              BOOST_TEST(std::abs((S - theta[e]) - ref_u[t * p.experts + e]) < 1e-5);
              if (!p.mask[e]) BOOST_TEST(S == 0.0f);
              on += S > theta[e] ? 1 : 0;
            }
            BOOST_TEST(k == (training ? on : std::max(on, 1)));
            double sum = 0;
            for (int j = 0; j < p.experts; ++j) {
              const int id = plan.id(t, j);
              if (j >= k) {
                BOOST_TEST(id == -1);
                BOOST_TEST(plan.weight(t, j) == 0.0f);
                continue;
              }
              BOOST_TEST_REQUIRE((id >= 0 && id < p.experts));
              BOOST_TEST(p.mask[id] == 1, "masked expert " << id << " selected");
              BOOST_TEST(plan.weight(t, j) == 1.0f / static_cast<float>(k));
              sum += plan.weight(t, j);
              const float S = plan.probs[t * p.experts + id];
              if (on > 0) BOOST_TEST(S > theta[id]);
              if (j > 0) {
                const float prev = plan.probs[t * p.experts + plan.id(t, j - 1)];
                BOOST_TEST((prev > S || (prev == S && plan.id(t, j - 1) < id)));
              }
            }
            if (k > 0) BOOST_TEST(std::abs(sum - 1.0) < 1e-6);
            if (on == 0 && !training) {  // fallback: the first maximum among active experts
              int best = -1;
              for (int e = 0; e < p.experts; ++e)
                if (p.mask[e] && (best < 0 || plan.probs[t * p.experts + e] > plan.probs[t * p.experts + best]))
                  best = e;
              BOOST_TEST(plan.id(t, 0) == best);
            }
          }
          // the inputs exercise varied counts (not a vacuous test)
          int distinct = 0;
          for (int c : seen_counts) distinct += c > 0 ? 1 : 0;
          BOOST_TEST(distinct >= 2);
        }
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(high_thresholds_route_nothing_in_training_and_argmax_in_eval) {
  const problem p(32, 12, 6, sy::test::base_seed() + 5, 0.0f, 8.0f, 9.0f, 2);
  losses_t lt, le;
  const auto train = route(sy::routers::DynMoE{.training = true}, p, &lt);
  const auto eval = route(sy::routers::DynMoE{.training = false}, p, &le);
  for (int t = 0; t < p.tokens; ++t) {
    BOOST_TEST(train.counts[t] == 0);
    BOOST_TEST(eval.counts[t] == 1);
    BOOST_TEST(eval.weight(t, 0) == 1.0f);
  }
  BOOST_TEST(lt.load_balance_loss == 0.0f);
  BOOST_TEST(lt.efficiency_loss == 0.0f);
  BOOST_TEST(std::abs(le.efficiency_loss - 1.0 / p.experts) < 1e-7);  // one fallback per token
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(dynmoe_forward_more)

BOOST_AUTO_TEST_CASE(deterministic_and_per_token_invariant) {
  const problem p(40, 16, 8, sy::test::base_seed() + 99, 0.0f, -0.5f, 0.3f, 2);
  for (bool training : {true, false}) {
    const sy::routers::DynMoE r{.training = training};
    const auto a = route(r, p), b = route(r, p);
    BOOST_TEST(a.expert_ids == b.expert_ids);
    BOOST_TEST(std::memcmp(a.weights.data(), b.weights.data(), a.weights.size() * 4) == 0);
    BOOST_TEST(std::memcmp(a.probs.data(), b.probs.data(), a.probs.size() * 4) == 0);
    // Token 17 alone, and token 17 among other (fresh) tokens, give the same row.
    for (int variant = 0; variant < 2; ++variant) {
      problem q = p;
      if (variant == 0) {
        q.tokens = 1;
        q.x.assign(p.x.begin() + 17 * p.d, p.x.begin() + 18 * p.d);
      } else {
        std::mt19937_64 g(sy::test::base_seed() + 123);
        q.x = sy::test::normal(g, q.x.size());
        std::copy(p.x.begin() + 17 * p.d, p.x.begin() + 18 * p.d, q.x.begin() + 3 * p.d);
      }
      const int row = variant == 0 ? 0 : 3;
      const auto s = route(r, q);
      BOOST_TEST(s.counts[row] == a.counts[17]);
      for (int j = 0; j < p.experts; ++j) {
        BOOST_TEST(s.id(row, j) == a.id(17, j));
        BOOST_TEST(s.weight(row, j) == a.weight(17, j));
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(temperature_is_clamped_at_100) {
  problem a(24, 8, 5, sy::test::base_seed() + 3, 9.0f, -0.02f, 0.02f);
  problem b = a;
  b.log_t = std::log(100.0f);
  const auto pa = route(sy::routers::DynMoE{}, a), pb = route(sy::routers::DynMoE{}, b);
  BOOST_TEST(pa.expert_ids == pb.expert_ids);
  BOOST_TEST(pa.probs == pb.probs);
}

BOOST_AUTO_TEST_CASE(losses_match_float64_reference) {
  for (bool training : {true, false}) {
    const problem p = well_separated(30, 12, 7, sy::test::base_seed() + 11, 0.0f, -0.5f, 0.4f, 2);
    losses_t l;
    const auto plan = route(sy::routers::DynMoE{.training = training}, p, &l);
    const auto r = to_ref(p);
    const auto L = reference(r, freeze(r, plan), std::vector<float>(plan.probs.size(), 0.0f));
    BOOST_TEST_CONTEXT("training=" << training) {
      BOOST_TEST(std::abs(l.sim_loss - L.sim) <= 1e-6 + 1e-5 * L.sim);
      BOOST_TEST(std::abs(l.simple_loss - L.simple) <= 1e-6 + 1e-5 * L.simple);
      BOOST_TEST(std::abs(l.load_balance_loss - L.lb) <= 1e-6 + 1e-5 * L.lb);
      BOOST_TEST(std::abs(l.efficiency_loss - L.eff) <= 1e-6 + 1e-5 * L.eff);
      BOOST_TEST(l.aux_loss() == l.sim_loss + l.simple_loss + l.load_balance_loss + l.efficiency_loss);
      BOOST_TEST(L.lb > 0.0);
    }
  }
}

BOOST_AUTO_TEST_CASE(empty_batch_is_not_an_error) {
  const problem p(0, 8, 4, 1);
  losses_t l{1, 1, 1, 1};
  routing_plan plan;
  const sy::routers::DynMoE r;
  switchyard::host::route(r, sy::matrix_view<const float>(sy::make_view(static_cast<const float*>(nullptr), 0, 8)),
            p.params(), plan, l);
  BOOST_TEST(plan.num_tokens == 0);
  BOOST_TEST(plan.counts.empty());
  BOOST_TEST(l.aux_loss() == 0.0f);
  std::vector<float> gw(8 * 4, 0.0f), gg(4, 0.0f);
  switchyard::host::route_backward(r, sy::matrix_view<const float>(sy::make_view(static_cast<const float*>(nullptr), 0, 8)),
             p.params(), plan, nullptr, losses_t::uniform(1.0f), sy::matrix_view<float>{},
             {sy::make_view(gw.data(), 8, 4), sy::make_view(gg.data(), 4)});
  BOOST_TEST(std::all_of(gw.begin(), gw.end(), [](float v) { return v == 0.0f; }));
  BOOST_TEST(std::all_of(gg.begin(), gg.end(), [](float v) { return v == 0.0f; }));
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(dynmoe_backward)

// Gradients of Σ cot ⊙ dense_combine + Σ c·loss vs float64 central differences of the
// straight-through reference (the gate pattern is frozen; perturbations never flip a gate).
BOOST_AUTO_TEST_CASE(gradients_match_float64_central_differences) {
  struct setting {
    bool training;
    float log_t, g_lo, g_hi;
    int masked;
  };
  const setting settings[] = {{true, 0.0f, -0.5f, 0.4f, 0},
                              {true, std::log(10.0f), -0.05f, 0.05f, 2},
                              {false, 0.0f, -0.2f, 0.6f, 1},
                              {true, 0.0f, 2.0f, 3.0f, 1} /* every token routes nowhere */};
  int n = 0;
  for (const auto& st : settings) {
    ++n;
    BOOST_TEST_CONTEXT("setting " << n << " training=" << st.training << " log_t=" << st.log_t) {
      const problem p = well_separated(10, 6, 5, sy::test::base_seed() + 40 + n, st.log_t, st.g_lo,
                                       st.g_hi, st.masked);
      BOOST_TEST_REQUIRE(min_abs_margin(p) > 1e-4);
      const sy::routers::DynMoE r{.training = st.training};
      const auto plan = route(r, p);
      std::mt19937_64 gen(sy::test::base_seed() + 77 + n);
      const auto cot = sy::test::normal(gen, plan.probs.size());  // dense [T, E]
      const losses_t coeff{.sim_loss = 0.7f, .simple_loss = 0.3f, .load_balance_loss = 1.3f,
                           .efficiency_loss = 2.0f};
      std::vector<float> slots(plan.weights.size());
      sy::routing::dense_to_slot_cotangent(plan, cot.data(), slots.data());
      std::vector<float> gw(p.w.size(), 0.0f), gg(p.g.size(), 0.0f), dx(p.x.size(), 0.0f);
      switchyard::host::route_backward(r, p.xv(), p.params(), plan, slots.data(), coeff,
                 sy::make_view(dx.data(), p.tokens, p.d),
                 {sy::make_view(gw.data(), p.d, p.experts), sy::make_view(gg.data(), p.experts)});

      const ref_state r0 = to_ref(p);
      const frozen f = freeze(r0, plan);
      const double h = 1e-6;
      auto fd = [&](std::vector<double> ref_state::*member, std::size_t i) {
        ref_state up = r0, dn = r0;
        (up.*member)[i] += h;
        (dn.*member)[i] -= h;
        bool flipped = false;
        const double v = (objective(reference(up, f, cot, &flipped), coeff) -
                          objective(reference(dn, f, cot, &flipped), coeff)) / (2 * h);
        BOOST_TEST_REQUIRE(!flipped);  // the perturbation stays inside one gate pattern
        return v;
      };
      auto close = [](double got, double want) { return std::abs(got - want) <= 2e-5 + 1e-4 * std::abs(want); };
      double norm_gw = 0;
      for (std::size_t i = 0; i < gw.size(); ++i) {
        const double want = fd(&ref_state::w, i);
        norm_gw += std::abs(want);
        BOOST_TEST(close(gw[i], want), "grad_w_gate[" << i << "] = " << gw[i] << ", fd " << want);
      }
      double norm_gg = 0;
      for (std::size_t i = 0; i < gg.size(); ++i) {
        const double want = fd(&ref_state::g, i);
        norm_gg += std::abs(want);
        BOOST_TEST(close(gg[i], want), "grad_thresholds[" << i << "] = " << gg[i] << ", fd " << want);
        if (!p.mask[i]) BOOST_TEST(gg[i] == 0.0f);  // a masked expert is never on
      }
      for (std::size_t i = 0; i < dx.size(); ++i) {
        const double want = fd(&ref_state::x, i);
        BOOST_TEST(close(dx[i], want), "dx[" << i << "] = " << dx[i] << ", fd " << want);
      }
      BOOST_TEST(norm_gw > 1e-3);  // not vacuous
      if (n != 4) BOOST_TEST(norm_gg > 1e-3);
    }
  }
}

BOOST_AUTO_TEST_CASE(gradients_accumulate_and_empty_views_are_skipped) {
  const problem p = well_separated(8, 6, 4, sy::test::base_seed() + 3, 0.0f, -0.5f, 0.3f, 0);
  const sy::routers::DynMoE r;
  const auto plan = route(r, p);
  std::vector<float> slots(plan.weights.size(), 0.5f);
  std::vector<float> g1(p.w.size(), 0.0f), g2(p.w.size(), 1.0f);
  switchyard::host::route_backward(r, p.xv(), p.params(), plan, slots.data(), losses_t::deepspeed(), sy::matrix_view<float>{},
             {sy::make_view(g1.data(), p.d, p.experts), {}});
  switchyard::host::route_backward(r, p.xv(), p.params(), plan, slots.data(), losses_t::deepspeed(), sy::matrix_view<float>{},
             {sy::make_view(g2.data(), p.d, p.experts), {}});
  for (std::size_t i = 0; i < g1.size(); ++i) BOOST_TEST(g2[i] == 1.0f + g1[i]);
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(dynmoe_workspace)

// Forward and backward given workspace_size bytes (an arena over caller memory, a plan sized
// beforehand) allocate nothing and give the bits of host::route / host::route_backward. The
// large case runs the OpenMP loops in parallel.
BOOST_AUTO_TEST_CASE(workspace_gives_the_same_bits_and_no_allocation) {
  struct setting {
    int tokens, d, experts;
    bool training;
    int masked;
  };
  for (const setting st : {setting{24, 8, 6, true, 1}, setting{19, 6, 5, false, 2},
                           setting{700, 32, 8, true, 0}}) {
    BOOST_TEST_CONTEXT("T=" << st.tokens << " training=" << st.training) {
      const problem p(st.tokens, st.d, st.experts, sy::test::base_seed() + 900 + st.tokens, 0.0f,
                      -0.5f, 0.4f, st.masked);
      const sy::routers::DynMoE r{.training = st.training};
      const auto params = p.params();
      const losses_t coeff{.sim_loss = 0.7f, .simple_loss = 0.3f, .load_balance_loss = 1.3f,
                           .efficiency_loss = 2.0f};
      // Reference: the conveniences that allocate their scratch.
      losses_t l_ref;
      const auto plan_ref = route(r, p, &l_ref);
      std::mt19937_64 gen(sy::test::base_seed() + 901);
      const auto slots = sy::test::normal(gen, plan_ref.weights.size());
      std::vector<float> gw_ref(p.w.size(), 0.0f), gg_ref(p.g.size(), 0.0f), dx_ref(p.x.size(), 0.0f);
      switchyard::host::route_backward(r, p.xv(), params, plan_ref, slots.data(), coeff,
                                       sy::make_view(dx_ref.data(), p.tokens, p.d),
                                       {sy::make_view(gw_ref.data(), p.d, p.experts),
                                        sy::make_view(gg_ref.data(), p.experts)});

      const std::size_t size = r.workspace_size(p.tokens, params);
      BOOST_TEST(size == sy::host::router_workspace_size(r, p.tokens, params));
      std::vector<std::byte> bytes(size + 1);
      // A workspace starting off alignment still suffices (workspace_size includes the slack).
      const ::cuda::std::span<std::byte> ws_bytes(bytes.data() + 1, size);
      routing_plan plan;
      plan.resize(p.tokens, r.width(params), r.num_experts(params));
      std::vector<float> gw(p.w.size()), gg(p.g.size()), dx(p.x.size());
      const sy::routing::dynmoe_grads grads{sy::make_view(gw.data(), p.d, p.experts),
                                            sy::make_view(gg.data(), p.experts)};
      const auto dxv = sy::make_view(dx.data(), p.tokens, p.d);
      losses_t l;
      auto run = [&] {
        std::fill(gw.begin(), gw.end(), 0.0f);
        std::fill(gg.begin(), gg.end(), 0.0f);
        std::fill(dx.begin(), dx.end(), 0.0f);
        sy::workspace_arena ws_f(ws_bytes), ws_b(ws_bytes);
        sy::host::router_forward(r, p.xv(), params, plan.ref(), l, ws_f);
        sy::host::router_backward(r, p.xv(), params, plan.ref(), slots.data(), coeff, dxv, grads, ws_b);
      };
      run();  // warm-up (OpenMP's thread pool, ...)
      allocations = 0;
      counting = true;
      run();
      counting = false;
      BOOST_TEST(allocations.load() == 0, allocations.load() << " allocations");
      BOOST_TEST(plan.expert_ids == plan_ref.expert_ids);
      BOOST_TEST(plan.weights == plan_ref.weights);
      BOOST_TEST(plan.counts == plan_ref.counts);
      BOOST_TEST(plan.logits == plan_ref.logits);
      BOOST_TEST(plan.probs == plan_ref.probs);
      BOOST_TEST(std::memcmp(&l, &l_ref, sizeof l) == 0);
      BOOST_TEST(gw == gw_ref);
      BOOST_TEST(gg == gg_ref);
      BOOST_TEST(dx == dx_ref);
    }
  }
}

// A workspace one byte short of what forward and backward take is refused, naming it.
BOOST_AUTO_TEST_CASE(a_short_workspace_is_a_shape_error) {
  const problem p(12, 6, 4, sy::test::base_seed() + 950);
  const sy::routers::DynMoE r;
  const auto params = p.params();
  sy::workspace_arena measure;
  (void)sy::detail::dynmoe_backward_scratch::take(measure, p.tokens, p.d, p.experts);
  std::vector<std::byte> bytes(measure.used() - 1 + sy::workspace_arena::alignment);
  routing_plan plan;
  plan.resize(p.tokens, r.width(params), r.num_experts(params));
  losses_t l;
  sy::workspace_arena ws_f({bytes.data(), bytes.size()});
  sy::host::router_forward(r, p.xv(), params, plan.ref(), l, ws_f);  // forward takes less
  std::vector<float> slots(plan.weights.size(), 0.1f);
  // An aligned start: the arena pads nothing, so `used() - 1` bytes are one short.
  auto* aligned = reinterpret_cast<std::byte*>(
      (reinterpret_cast<std::uintptr_t>(bytes.data()) + sy::workspace_arena::alignment - 1) /
      sy::workspace_arena::alignment * sy::workspace_arena::alignment);
  sy::workspace_arena ws_b({aligned, measure.used() - 1});
  expect_error([&] {
    sy::host::router_backward(r, p.xv(), params, plan.ref(), slots.data(), losses_t{},
                              sy::matrix_view<float>{}, {}, ws_b);
  }, "workspace", {"at least"});
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(dynmoe_adaptive_update)

using sy::training::adaptive_update;
using sy::training::dynmoe_recorder;

struct gate {
  int d, e;
  std::vector<float> w, g;
  std::vector<std::int32_t> m;
  gate(int dd, int ee, std::uint64_t seed) : d(dd), e(ee), m(static_cast<std::size_t>(ee), 1) {
    std::mt19937_64 gen(seed);
    w = sy::test::normal(gen, static_cast<std::size_t>(dd) * ee);
    g = sy::test::uniform(gen, static_cast<std::size_t>(ee), -1.0f, 1.0f);
  }
  sy::training::dynmoe_update_result update(const dynmoe_recorder& rec) {
    return adaptive_update(rec, sy::make_view(w.data(), d, e), sy::make_view(g.data(), e),
                           sy::make_view(m.data(), e));
  }
};

dynmoe_recorder crafted(std::vector<float> routing, std::vector<float> samples) {
  dynmoe_recorder rec;
  rec.routing_records = std::move(routing);
  rec.sample_records = std::move(samples);
  rec.recorded_forwards = 1;
  return rec;
}

BOOST_AUTO_TEST_CASE(recorder_counts_routed_tokens_and_sums_unrouted_ones) {
  const problem p = well_separated(40, 8, 6, sy::test::base_seed() + 21, 0.0f, 0.3f, 0.8f, 1);
  const auto plan = route(sy::routers::DynMoE{.training = true}, p);
  dynmoe_recorder rec;
  rec.record(plan, p.xv());
  rec.record(plan.ref(), p.xv());  // accumulates; a plan in caller memory (plan_ref) as well
  std::vector<double> want_r(p.experts, 0), want_s(p.d, 0);
  int empty = 0;
  for (int t = 0; t < p.tokens; ++t) {
    int on = 0;
    for (int e = 0; e < p.experts; ++e) {
      const bool b = plan.probs[t * p.experts + e] >
                     sy::routers::DynMoE::threshold_probs(p.params())[e];
      want_r[e] += 2 * b;
      on += b;
    }
    if (on == 0) {
      ++empty;
      for (int i = 0; i < p.d; ++i) want_s[i] += 2.0 * p.x[t * p.d + i];
    }
  }
  BOOST_TEST(empty > 0);
  for (int e = 0; e < p.experts; ++e) BOOST_TEST(rec.routing_records[e] == want_r[e]);
  for (int i = 0; i < p.d; ++i) BOOST_TEST(std::abs(rec.sample_records[i] - want_s[i]) < 1e-4);
  BOOST_TEST(rec.recorded_forwards == 2);
  BOOST_TEST(rec.recorded_tokens == 2 * p.tokens);
}

BOOST_AUTO_TEST_CASE(remove_then_re_add_at_the_same_slot) {
  gate gt(5, 4, sy::test::base_seed() + 1);
  const std::vector<float> w_before = gt.w;
  const std::vector<float> s{1.0f, -2.0f, 0.5f, 3.0f, 1.5f};
  const auto res = gt.update(crafted({3, 0, 2, 0}, s));
  // experts 1 and 3 received nothing: both removed; the lowest (1) is re-added.
  BOOST_TEST(res.removed == 2);
  BOOST_TEST(res.added_expert == 1);
  BOOST_TEST(res.num_active_experts == 3);
  BOOST_TEST(gt.m == (std::vector<std::int32_t>{1, 1, 1, 0}), boost::test_tools::per_element());
  double n = 0;
  for (float v : s) n += double(v) * v;
  n = std::sqrt(n);
  for (int i = 0; i < gt.d; ++i) {
    BOOST_TEST(std::abs(gt.w[i * gt.e + 1] - s[i] / n) < 1e-6);
    for (int e : {0, 2, 3}) BOOST_TEST(gt.w[i * gt.e + e] == w_before[i * gt.e + e]);  // kept
  }
  BOOST_TEST(gt.g[1] == 0.0f);
}

BOOST_AUTO_TEST_CASE(add_goes_to_the_lowest_free_slot_even_if_it_was_masked_before) {
  gate gt(3, 5, sy::test::base_seed() + 2);
  gt.m = {1, 0, 1, 1, 1};
  const auto res = gt.update(crafted({4, 7, 0, 1, 2}, {1.0f, 1.0f, 1.0f}));
  // expert 1 stays masked despite its records (m ⊙ sign), 2 is removed, 1 is the lowest free.
  BOOST_TEST(res.removed == 1);
  BOOST_TEST(res.added_expert == 1);
  BOOST_TEST(gt.m == (std::vector<std::int32_t>{1, 1, 0, 1, 1}), boost::test_tools::per_element());
}

BOOST_AUTO_TEST_CASE(no_free_slot_changes_nothing) {
  gate gt(4, 3, sy::test::base_seed() + 3);
  const auto w0 = gt.w;
  const auto g0 = gt.g;
  const auto res = gt.update(crafted({1, 2, 3}, {0.5f, 0.5f, 0.5f, 0.5f}));
  BOOST_TEST(res.removed == 0);
  BOOST_TEST(res.added_expert == -1);
  BOOST_TEST(res.num_active_experts == 3);
  BOOST_TEST(gt.w == w0);
  BOOST_TEST(gt.g == g0);
}

BOOST_AUTO_TEST_CASE(sample_sum_zero_adds_nothing_even_with_nonzero_norm) {
  gate gt(4, 3, sy::test::base_seed() + 4);
  const auto w0 = gt.w;
  const auto res = gt.update(crafted({1, 0, 3}, {1.0f, -1.0f, 2.0f, -2.0f}));
  BOOST_TEST(res.removed == 1);
  BOOST_TEST(res.added_expert == -1);
  BOOST_TEST(res.num_active_experts == 2);
  BOOST_TEST(gt.m == (std::vector<std::int32_t>{1, 0, 1}), boost::test_tools::per_element());
  BOOST_TEST(gt.w == w0);
}

BOOST_AUTO_TEST_CASE(nothing_recorded_changes_nothing) {
  gate gt(4, 3, sy::test::base_seed() + 5);
  dynmoe_recorder rec;
  const auto res = gt.update(rec);
  BOOST_TEST(res.added_expert == -1);
  BOOST_TEST(res.num_active_experts == 3);
}

BOOST_AUTO_TEST_CASE(update_rejects_mismatched_views) {
  gate gt(4, 3, sy::test::base_seed() + 6);
  expect_error([&] { gt.update(crafted({1, 2}, {1, 1, 1, 1})); }, "records.routing_records", {"3", "2"});
  expect_error([&] { gt.update(crafted({1, 2, 3}, {1, 1})); }, "records.sample_records", {"4", "2"});
  expect_error([&] {
    adaptive_update(crafted({1, 2, 3}, {1, 1, 1, 1}), sy::make_view(gt.w.data(), 4, 3),
                    sy::make_view(gt.g.data(), 2), sy::make_view(gt.m.data(), 3));
  }, "thresholds", {"[3]", "[2]"});
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(dynmoe_schedule)

BOOST_AUTO_TEST_CASE(default_schedule_records_300_and_updates_every_900) {
  sy::training::dynmoe_schedule sched;
  std::vector<int> begins, updates;
  int recorded = 0;
  for (int c = 0; c < 2200; ++c) {
    const auto s = sched.on_forward();
    if (s.begin_recording) begins.push_back(c);
    if (s.update) updates.push_back(c);
    recorded += s.record;
    const bool in_window = (c >= 300 && c <= 600) || (c >= 1200 && c <= 1500) || c >= 2100;
    BOOST_TEST(s.record == in_window, "forward " << c);
    BOOST_TEST(s.update == (c == 600 || c == 1500), "forward " << c);
  }
  BOOST_TEST(begins == (std::vector<int>{300, 1200, 2100}), boost::test_tools::per_element());
  BOOST_TEST(updates == (std::vector<int>{600, 1500}), boost::test_tools::per_element());
  BOOST_TEST(sched.forward_count == 2200);
}

BOOST_AUTO_TEST_CASE(eval_forwards_do_not_advance_the_count) {
  sy::training::dynmoe_schedule sched{.period = 4};
  for (int c = 0; c < 4; ++c) sched.on_forward();
  const auto a = sched.on_forward(false);  // count 4: begins recording, does not advance
  BOOST_TEST(a.begin_recording);
  BOOST_TEST(sched.forward_count == 4);
  const auto b = sched.on_forward(true);  // still count 4
  BOOST_TEST(b.begin_recording);
  BOOST_TEST(sched.forward_count == 5);
  for (int c = 5; c < 8; ++c) BOOST_TEST(sched.on_forward().record);
  const auto u = sched.on_forward();  // count 8
  BOOST_TEST(u.update);
  BOOST_TEST(u.record);
  BOOST_TEST(!sched.on_forward().record);
}

BOOST_AUTO_TEST_CASE(bad_schedules_are_rejected) {
  expect_error([] { sy::training::dynmoe_schedule{.period = 0}.on_forward(); }, "period", {"0"});
  expect_error([] { sy::training::dynmoe_schedule{.phases = 1}.on_forward(); }, "phases", {"1"});
  expect_error([] { sy::training::dynmoe_schedule{.record_phase = 3}.on_forward(); }, "record_phase", {"3"});
  expect_error([] { sy::training::dynmoe_schedule{.record_phase = 2}.on_forward(); }, "update_phase", {"2"});
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(dynmoe_errors)

BOOST_AUTO_TEST_CASE(every_bad_input_throws_a_typed_error_naming_it) {
  const sy::routers::DynMoE r;
  routing_plan plan;
  losses_t l;
  auto run = [&](const problem& p) { switchyard::host::route(r, p.xv(), p.params(), plan, l); };

  problem none(4, 6, 3, 1);
  none.mask = {0, 0, 0};
  BOOST_CHECK_THROW(run(none), sy::range_error);
  expect_error([&] { run(none); }, "params.experts_mask", {"at least one active", "got 0"});

  problem bad_mask(4, 6, 3, 1);
  bad_mask.mask = {1, 2, 0};
  BOOST_CHECK_THROW(run(bad_mask), sy::range_error);
  expect_error([&] { run(bad_mask); }, "params.experts_mask", {"[1]", "0 or 1", "got 2"});

  const problem p(4, 6, 3, 1);
  // x [T, d'] with d' != d
  BOOST_CHECK_THROW(switchyard::host::route(r, sy::matrix_view<const float>(sy::make_view(p.x.data(), 3, 5)),
                              p.params(), plan, l), sy::shape_error);
  expect_error([&] {
    switchyard::host::route(r, sy::matrix_view<const float>(sy::make_view(p.x.data(), 3, 5)), p.params(), plan, l);
  }, "x", {"[*, 6]", "[3, 5]"});
  // thresholds / mask length
  auto params = p.params();
  params.thresholds = sy::make_view(p.g.data(), 2);
  BOOST_CHECK_THROW(switchyard::host::route(r, p.xv(), params, plan, l), sy::shape_error);
  expect_error([&] { switchyard::host::route(r, p.xv(), params, plan, l); }, "params.thresholds", {"[3]", "[2]"});
  params = p.params();
  params.experts_mask = sy::make_view(p.mask.data(), 4 - 2);
  BOOST_CHECK_THROW(switchyard::host::route(r, p.xv(), params, plan, l), sy::shape_error);
  expect_error([&] { switchyard::host::route(r, p.xv(), params, plan, l); }, "params.experts_mask", {"[3]", "[2]"});
  // non-finite x names the token
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    problem q = p;
    q.x[2 * q.d + 4] = bad;
    BOOST_CHECK_THROW(run(q), sy::non_finite_error);
    expect_error([&] { run(q); }, "x", {"token 2"});
  }
  // non-finite parameters
  problem qw = p;
  qw.w[5] = std::numeric_limits<float>::quiet_NaN();
  BOOST_CHECK_THROW(run(qw), sy::non_finite_error);
  expect_error([&] { run(qw); }, "params.w_gate", {"nan"});
  problem qg = p;
  qg.g[1] = std::numeric_limits<float>::infinity();
  expect_error([&] { run(qg); }, "params.thresholds", {"[1]", "inf"});
  problem qt = p;
  qt.log_t = std::numeric_limits<float>::quiet_NaN();
  expect_error([&] { run(qt); }, "params.log_temperature", {"finite"});

  // backward: output shapes and the plan must match
  const auto good = route(r, p);
  std::vector<float> slots(good.weights.size(), 0.1f), buf(100, 0.0f);
  BOOST_CHECK_THROW(switchyard::host::route_backward(r, p.xv(), p.params(), good, slots.data(), losses_t{},
                               sy::make_view(buf.data(), 4, 5), {}), sy::shape_error);
  expect_error([&] {
    switchyard::host::route_backward(r, p.xv(), p.params(), good, slots.data(), losses_t{}, sy::make_view(buf.data(), 4, 5), {});
  }, "dx", {"[4, 6]", "[4, 5]"});
  expect_error([&] {
    switchyard::host::route_backward(r, p.xv(), p.params(), good, slots.data(), losses_t{}, sy::matrix_view<float>{},
               {sy::make_view(buf.data(), 3, 6), {}});
  }, "grads.w_gate", {"[6, 3]", "[3, 6]"});
  expect_error([&] {
    switchyard::host::route_backward(r, p.xv(), p.params(), good, slots.data(), losses_t{}, sy::matrix_view<float>{},
               {{}, sy::make_view(buf.data(), 2)});
  }, "grads.thresholds", {"[3]", "[2]"});
  const problem other(5, 6, 3, 2);
  expect_error([&] {
    switchyard::host::route_backward(r, other.xv(), other.params(), good, slots.data(), losses_t{}, sy::matrix_view<float>{}, {});
  }, "plan", {"5 tokens"});
  expect_error([&] {
    switchyard::host::route_backward(r, p.xv(), p.params(), good, nullptr, losses_t{}, sy::matrix_view<float>{}, {});
  }, "d_weights", {"null"});
}

BOOST_AUTO_TEST_SUITE_END()
