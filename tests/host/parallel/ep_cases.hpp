// SPDX-License-Identifier: Apache-2.0
#pragma once
// Expert-parallel acceptance cases, generic over the communicator: each function is what ONE
// rank runs, given its `Comm` (parallel/comm.hpp) and a `problem` every rank builds alike. The
// thread tests (test_expert_parallel.cpp) call them inside `parallel::run_ranks`; an MPI test
// calls the same functions once per process, e.g.
//
//   sy::test::ep::problem pb{.ranks = comm.size(), .seed = 7};
//   sy::test::ep::routed_case<sy::routers::TopP, float>(comm, pb);          // (a) and (b)
//   sy::test::ep::plan_case<float>(comm, pb, sy::test::ep::edge::one_expert);
//   sy::test::ep::static_bound_case<float>(comm, pb, 2);
//   sy::test::ep::padded_case<float>(comm, pb, plans, 64, padded);  // static_bound + padded
//   sy::test::ep::bad_input_cases(comm);                                     // needs size() >= 2
//
// Checks are BOOST_CHECK-style (thread-safe through the test's lock, see `check`), so one
// failing rank reports and every rank still runs its collectives to the end.
//
// What is compared (docs/expert-parallel.md, "Same bits"):
// (a) every rank's expert outputs (y, forward_experts' y), backward_experts' dx rows and
//     d_weights, and its E/N experts' weight gradients equal, bit for bit, those of the
//     single-process host layer holding all E experts run on the concatenation x_0 ++ x_1 ++
//     ... with the concatenation of the ranks' plans;
// (b) with batch_invariant, rank r's y, plan, losses, dx and router gradients from forward +
//     backward equal the single-process layer's on x_r alone.
// Every rank computes the references itself (the problem is a function of the seed).

#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include <switchyard/parallel/comm.hpp>
#include <switchyard/parallel/expert_parallel.hpp>
#include <switchyard/switchyard.hpp>

#include "support/random.hpp"

namespace switchyard::test::ep {

//! Boost.Test's assertion macros are not thread-safe: thread ranks take this lock.
inline std::mutex& check_lock() {
  static std::mutex m;
  return m;
}

//! BOOST_CHECK_MESSAGE under the lock.
inline void check(bool ok, const std::string& what) {
  const std::lock_guard<std::mutex> lock(check_lock());
  BOOST_CHECK_MESSAGE(ok, what);
}

//! A problem every rank builds alike: sizes, features and the seed of every input.
struct problem {
  int ranks = 1;                 //!< N (the communicator's size)
  index_t experts_per_rank = 2;  //!< E/N
  index_t d = 8, d_ff = 6;       //!< toy shapes: the host's own blocked GEMM (row_panels.hpp)
  index_t identity = 0, zero = 0;  //!< non-FFN experts (never sent)
  bool shared = false;           //!< one shared expert (never sent)
  bool batch_invariant = false;  //!< also check (b)
  std::uint64_t seed = 1;

  [[nodiscard]] index_t experts() const { return experts_per_rank * ranks; }  //!< E
  [[nodiscard]] index_t routed() const { return experts() + identity + zero; }
  //! Uneven batches: rank r holds tokens(r) tokens, in [2, 8].
  [[nodiscard]] index_t tokens(int r) const { return 2 + (r * 5 + 3) % 7; }
  [[nodiscard]] index_t offset(int r) const {
    index_t o = 0;
    for (int s = 0; s < r; ++s) o += tokens(s);
    return o;
  }
  [[nodiscard]] index_t total_tokens() const { return offset(ranks); }
};

//! Values converted to T.
template <ElementType T>
std::vector<T> as(const std::vector<float>& v) {
  std::vector<T> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = from_float<T>(v[i]);
  return out;
}

//! All E experts' weights (and the shared expert's), the same on every rank.
template <ElementType T>
struct weights {
  index_t e, p, d, f;
  std::vector<T> w1, b1, w2, b2, sw1, sw2;
  bool shared;

  explicit weights(const problem& pb) : e(pb.experts()), p(2 * pb.d_ff), d(pb.d), f(pb.d_ff), shared(pb.shared) {
    std::mt19937_64 g(pb.seed * 7919 + 11);
    w1 = as<T>(normal(g, static_cast<std::size_t>(e * p * d), 0.4f));
    b1 = as<T>(normal(g, static_cast<std::size_t>(e * p), 0.1f));
    w2 = as<T>(normal(g, static_cast<std::size_t>(e * d * f), 0.4f));
    b2 = as<T>(normal(g, static_cast<std::size_t>(e * d), 0.1f));
    sw1 = as<T>(normal(g, static_cast<std::size_t>(p * d), 0.4f));
    sw2 = as<T>(normal(g, static_cast<std::size_t>(d * f), 0.4f));
  }

  //! Experts [first, first + n) (and the shared expert when the problem has one).
  [[nodiscard]] expert_weights<T> view(index_t first, index_t n) const {
    expert_weights<T> w;
    w.w1 = make_view<const T>(w1.data() + first * p * d, n, p, d);
    w.b1 = make_view<const T>(b1.data() + first * p, n, p);
    w.w2 = make_view<const T>(w2.data() + first * d * f, n, d, f);
    w.b2 = make_view<const T>(b2.data() + first * d, n, d);
    if (shared) {
      w.shared.w1 = make_view<const T>(sw1.data(), index_t{1}, p, d);
      w.shared.w2 = make_view<const T>(sw2.data(), index_t{1}, d, f);
    }
    return w;
  }
};

//! Expert-weight gradients of n experts, initialised to `base` values (backward accumulates).
struct grads {
  std::vector<float> w1, b1, w2, b2;
  grads(index_t n, const problem& pb, std::uint64_t seed) {
    std::mt19937_64 g(seed);
    const index_t p = 2 * pb.d_ff;
    w1 = normal(g, static_cast<std::size_t>(n * p * pb.d));
    b1 = normal(g, static_cast<std::size_t>(n * p));
    w2 = normal(g, static_cast<std::size_t>(n * pb.d * pb.d_ff));
    b2 = normal(g, static_cast<std::size_t>(n * pb.d));
  }
  //! Experts [first, first + n) of these arrays.
  expert_grads view(const problem& pb, index_t first, index_t n) {
    const index_t p = 2 * pb.d_ff, d = pb.d, f = pb.d_ff;
    expert_grads gr;
    gr.w1 = make_view<float>(w1.data() + first * p * d, n, p, d);
    gr.b1 = make_view<float>(b1.data() + first * p, n, p);
    gr.w2 = make_view<float>(w2.data() + first * d * f, n, d, f);
    gr.b2 = make_view<float>(b2.data() + first * d, n, d);
    return gr;
  }
};

//! The router's parameters (replicated: every rank scores all experts) and gradients.
template <class Router>
struct router_data {
  static constexpr bool dynmoe = std::is_same_v<Router, routers::DynMoE>;
  index_t e, d;
  std::vector<float> w, gw, thr, gthr;
  std::vector<std::int32_t> mask;

  explicit router_data(const problem& pb) : e(pb.routed()), d(pb.d) {
    std::mt19937_64 g(pb.seed * 104729 + 3);
    w = normal(g, static_cast<std::size_t>(e * d), 0.8f);
    gw.assign(w.size(), 0.25f);
    // DynMoE thresholds (cosines beat them) spread so that some tokens activate no expert.
    thr = uniform(g, static_cast<std::size_t>(e), -0.2f, 0.6f);
    gthr.assign(thr.size(), 0.5f);
    mask.assign(static_cast<std::size_t>(e), 1);
  }

  [[nodiscard]] typename Router::params_type params() const {
    if constexpr (dynmoe) {
      return {make_view<const float>(w.data(), d, e), make_view<const float>(thr.data(), e),
              make_view<const std::int32_t>(mask.data(), e), 0.0f};
    } else {
      return {make_view<const float>(w.data(), e, d)};
    }
  }
  [[nodiscard]] typename Router::grads_type grads_view() {
    if constexpr (dynmoe) {
      return {make_view<float>(gw.data(), d, e), make_view<float>(gthr.data(), e)};
    } else {
      return {make_view<float>(gw.data(), e, d)};
    }
  }
};

//! The router under test, with settings that give variable k.
template <class Router>
Router make_router() {
  if constexpr (std::is_same_v<Router, routers::TopK>) return Router{.k = 2};
  else if constexpr (std::is_same_v<Router, routers::TopP>) return Router{.p = 0.5f};
  else if constexpr (std::is_same_v<Router, routers::AdaptiveGating>) return Router{.threshold = 0.2f};
  else return Router{.training = true};
}

//! Sets one coefficient field to 0.01.
template <class S, auto M>
void set_field(S& c, routing::loss_field<M>) {
  c.*M = 0.01f;
}

//! Coefficients 0.01 for every aux loss backward reads.
template <class Losses>
Losses coefficients() {
  Losses c{};
  std::apply([&](auto... f) { (set_field(c, f), ...); }, Losses::coefficient_fields());
  return c;
}

//! Rank s's tokens x_s [T_s, d] and output cotangent dy_s, as T.
template <ElementType T>
std::vector<T> tokens_of(const problem& pb, int s, std::uint64_t which) {
  std::mt19937_64 g(pb.seed * 31 + static_cast<std::uint64_t>(s) * 1000003 + which);
  return as<T>(normal(g, static_cast<std::size_t>(pb.tokens(s) * pb.d)));
}

inline std::string concat_msg(const std::string& what, int rank, std::size_t i, float a, float b) {
  std::ostringstream os;
  os << "rank " << rank << ": " << what << " differs at element " << i << ": " << std::hexfloat
     << a << " vs " << b;
  return os.str();
}

//! Bitwise equality of n elements; reports the first difference.
template <class U>
void same_bits(const std::string& what, const U* a, const U* b, std::size_t n, int rank) {
  for (std::size_t i = 0; i < n; ++i) {
    if (std::memcmp(a + i, b + i, sizeof(U)) != 0) {
      float fa = 0, fb = 0;
      if constexpr (ElementType<U>) {
        fa = to_float(a[i]);
        fb = to_float(b[i]);
      } else {
        fa = static_cast<float>(a[i]);
        fb = static_cast<float>(b[i]);
      }
      check(false, concat_msg(what, rank, i, fa, fb));
      return;
    }
  }
  check(true, what);
}

template <class Router, ElementType T, class Local = dispatch::sorted_grouped>
using single_layer = MoELayer<Router, activation::swiglu, Local>;
template <class Router, ElementType T, class C, class Capacity = parallel::eager,
          class Local = dispatch::sorted_grouped>
using ep_layer =
    MoELayer<Router, activation::swiglu, parallel::ExpertParallel<C, Capacity, Local>>;

//! The layer's settings shared by both sides.
template <class Layer>
Layer configure(Layer l, const problem& pb, const typename Layer::router_type& router) {
  l.router = router;
  l.batch_invariant = pb.batch_invariant;
  l.identity_experts = pb.identity;
  l.zero_experts = pb.zero;
  return l;
}

//! A plan held in vectors (ids, weights, counts) with its view.
struct plan_store {
  index_t tokens = 0, width = 0, experts = 0;
  std::vector<std::int32_t> ids, counts;
  std::vector<float> weights;
  [[nodiscard]] routing::plan_view<const std::int32_t, const float> view() const {
    return {make_view<const std::int32_t>(ids.data(), tokens, width),
            make_view<const float>(weights.data(), tokens, width),
            make_view<const std::int32_t>(counts.data(), tokens), experts};
  }
  //! Appends `other`'s tokens (same width).
  void append(const plan_store& o) {
    tokens += o.tokens;
    ids.insert(ids.end(), o.ids.begin(), o.ids.end());
    weights.insert(weights.end(), o.weights.begin(), o.weights.end());
    counts.insert(counts.end(), o.counts.begin(), o.counts.end());
  }
};

//! The (a) comparison for given per-rank plans: this rank's forward_experts / backward_experts
//! under ExpertParallel against the single-process layer on the concatenation. `kept` (per
//! rank, per pair) marks the pairs the exchange's bound keeps: the others are compacted away
//! from the concatenation. `local` is the dispatch each rank runs over its received rows and
//! the single-process layer's own (padded_capacity: its drops stay in the concatenation).
//! `want_dropped` [N][E], when given, is the expected `dropped` per rank (else, with `kept`,
//! the bound's drops of this rank's pairs).
template <class Router, ElementType T, parallel::Comm C, class Capacity = parallel::eager,
          class Local = dispatch::sorted_grouped>
void compare_with_concatenation(const C& comm, const problem& pb, const Router& router,
                                const std::vector<plan_store>& plans, Capacity capacity = {},
                                const std::vector<std::vector<char>>& kept = {},
                                const Local& local = {},
                                const std::vector<std::vector<index_t>>& want_dropped = {}) {
  const int r = comm.rank();
  const index_t d = pb.d, el = pb.experts_per_rank, tr = pb.tokens(r), off = pb.offset(r);
  const host_context ctx;
  const weights<T> wt(pb);
  // The concatenation (only the kept pairs when a capacity dropped some).
  std::vector<T> x_cat, dy_cat;
  plan_store cat{0, plans[0].width, plans[0].experts, {}, {}, {}};
  for (int s = 0; s < pb.ranks; ++s) {
    const auto xs = tokens_of<T>(pb, s, 1), dys = tokens_of<T>(pb, s, 2);
    x_cat.insert(x_cat.end(), xs.begin(), xs.end());
    dy_cat.insert(dy_cat.end(), dys.begin(), dys.end());
    plan_store ps = plans[static_cast<std::size_t>(s)];
    if (!kept.empty()) {  // compact the dropped FFN slots away
      const auto& k = kept[static_cast<std::size_t>(s)];
      for (index_t t = 0; t < ps.tokens; ++t) {
        index_t n = 0;
        for (index_t j = 0; j < ps.counts[t]; ++j) {
          const std::size_t q = static_cast<std::size_t>(t * ps.width + j);
          if (!k[q]) continue;
          ps.ids[static_cast<std::size_t>(t * ps.width + n)] = ps.ids[q];
          ps.weights[static_cast<std::size_t>(t * ps.width + n)] = ps.weights[q];
          ++n;
        }
        for (index_t j = n; j < ps.counts[t]; ++j) {
          ps.ids[static_cast<std::size_t>(t * ps.width + j)] = -1;
          ps.weights[static_cast<std::size_t>(t * ps.width + j)] = 0.0f;
        }
        ps.counts[t] = static_cast<std::int32_t>(n);
      }
    }
    cat.append(ps);
  }
  const index_t tc = pb.total_tokens(), e = pb.experts();
  single_layer<Router, T, Local> ref = configure(single_layer<Router, T, Local>{}, pb, router);
  ref.dispatch = local;
  std::vector<T> y_cat(static_cast<std::size_t>(tc * d));
  std::vector<index_t> dropped_cat(static_cast<std::size_t>(e));
  ref.forward_experts(ctx, make_view<const T>(x_cat.data(), tc, d), cat.view(), wt.view(0, e),
                      make_view<T>(y_cat.data(), tc, d), {dropped_cat.data(), dropped_cat.size()});
  std::mt19937_64 g(pb.seed + 99);
  const std::vector<float> dx_base = normal(g, static_cast<std::size_t>(tc * d));
  std::vector<float> dx_cat = dx_base, dw_cat(static_cast<std::size_t>(tc * cat.width), -7.0f);
  grads g_cat(e, pb, pb.seed + 5);
  ref.backward_experts(ctx, make_view<const T>(x_cat.data(), tc, d), cat.view(), wt.view(0, e),
                       make_view<const T>(dy_cat.data(), tc, d),
                       make_view<float>(dx_cat.data(), tc, d), g_cat.view(pb, 0, e),
                       {dw_cat.data(), dw_cat.size()});

  // This rank under expert parallelism.
  using layer_ep = ep_layer<Router, T, C, Capacity, Local>;
  layer_ep lep = configure(layer_ep{}, pb, router);
  lep.dispatch = {.comm = &comm, .capacity = capacity, .local = local};
  const auto xr = tokens_of<T>(pb, r, 1), dyr = tokens_of<T>(pb, r, 2);
  const plan_store& pr = plans[static_cast<std::size_t>(r)];
  std::vector<T> y(static_cast<std::size_t>(tr * d), from_float<T>(-123.0f));  // poisoned
  std::vector<index_t> dropped(static_cast<std::size_t>(e), -1);
  lep.forward_experts(ctx, make_view<const T>(xr.data(), tr, d), pr.view(), wt.view(r * el, el),
                      make_view<T>(y.data(), tr, d), {dropped.data(), dropped.size()});
  same_bits("forward_experts y vs the concatenation's rows", y.data(), y_cat.data() + off * d,
            y.size(), r);
  std::vector<float> dx(dx_base.begin() + off * d, dx_base.begin() + (off + tr) * d);
  std::vector<float> dw(static_cast<std::size_t>(tr * pr.width), -7.0f);
  grads g_ep(e, pb, pb.seed + 5);  // the same base values; this rank's experts are a slice
  lep.backward_experts(ctx, make_view<const T>(xr.data(), tr, d), pr.view(), wt.view(r * el, el),
                       make_view<const T>(dyr.data(), tr, d), make_view<float>(dx.data(), tr, d),
                       g_ep.view(pb, r * el, el), {dw.data(), dw.size()});
  same_bits("backward_experts dx", dx.data(), dx_cat.data() + off * d, dx.size(), r);
  const std::size_t gw1 = static_cast<std::size_t>(el * 2 * pb.d_ff * d),
                    gw2 = static_cast<std::size_t>(el * d * pb.d_ff);
  same_bits("grads.w1 of this rank's experts", g_ep.w1.data() + r * gw1, g_cat.w1.data() + r * gw1,
            gw1, r);
  same_bits("grads.w2 of this rank's experts", g_ep.w2.data() + r * gw2, g_cat.w2.data() + r * gw2,
            gw2, r);
  same_bits("grads.b1", g_ep.b1.data() + r * el * 2 * pb.d_ff, g_cat.b1.data() + r * el * 2 * pb.d_ff,
            static_cast<std::size_t>(el * 2 * pb.d_ff), r);
  same_bits("grads.b2", g_ep.b2.data() + r * el * d, g_cat.b2.data() + r * el * d,
            static_cast<std::size_t>(el * d), r);
  // d_weights: slot by slot (the concatenation's plan may be compacted).
  const plan_store& full = plans[static_cast<std::size_t>(r)];
  for (index_t t = 0; t < tr; ++t) {
    index_t n = 0;
    for (index_t j = 0; j < full.width; ++j) {
      const std::size_t q = static_cast<std::size_t>(t * full.width + j);
      const bool used = j < full.counts[t];
      const bool is_kept = kept.empty() || !used || full.ids[q] >= e || kept[static_cast<std::size_t>(r)][q];
      float want = 0.0f;
      if (used && is_kept) want = dw_cat[static_cast<std::size_t>((off + t) * full.width + n++)];
      if (!used) want = dw_cat[static_cast<std::size_t>((off + t) * full.width + j)];
      if (std::memcmp(&want, &dw[q], sizeof(float)) != 0) {
        check(false, concat_msg("backward_experts d_weights", r, q, dw[q], want));
        return;
      }
    }
  }
  if (!want_dropped.empty()) {
    const auto& want = want_dropped[static_cast<std::size_t>(r)];
    check(want.size() == dropped.size(), "want_dropped holds E entries per rank");
    same_bits("dropped per expert", dropped.data(), want.data(),
              std::min(want.size(), dropped.size()), r);
  } else if (!kept.empty()) {  // the drops counted per expert, this rank's pairs only
    std::vector<index_t> want(static_cast<std::size_t>(e), 0);
    for (std::size_t q = 0; q < full.ids.size(); ++q) {
      const index_t t = static_cast<index_t>(q) / full.width, j = static_cast<index_t>(q) % full.width;
      if (j < full.counts[t] && full.ids[q] < e && !kept[static_cast<std::size_t>(r)][q]) ++want[static_cast<std::size_t>(full.ids[q])];
    }
    same_bits("dropped per expert", dropped.data(), want.data(), want.size(), r);
  }
}

//! Routes rank s's batch with the single-process layer (all E experts): its plan.
template <class Router, ElementType T>
plan_store route_alone(const problem& pb, const Router& router, int s,
                       moe_result<typename Router::losses_type>* keep = nullptr,
                       std::vector<T>* y_out = nullptr) {
  const host_context ctx;
  const weights<T> wt(pb);
  const router_data<Router> rd(pb);
  single_layer<Router, T> ref = configure(single_layer<Router, T>{}, pb, router);
  const auto xs = tokens_of<T>(pb, s, 1);
  const index_t ts = pb.tokens(s);
  std::vector<T> y(static_cast<std::size_t>(ts * pb.d));
  moe_result<typename Router::losses_type> res;
  ref.forward(ctx, make_view<const T>(xs.data(), ts, pb.d), rd.params(), wt.view(0, pb.experts()),
              make_view<T>(y.data(), ts, pb.d), res);
  plan_store p{ts, res.plan.width, res.plan.num_experts, res.plan.expert_ids, res.plan.counts,
               res.plan.weights};
  if (keep != nullptr) *keep = res;
  if (y_out != nullptr) *y_out = y;
  return p;
}

//! Rank r's routed forward of its batch `xr` under `lep` (y poisoned first), its plan checked
//! bitwise against `want` (the plan routing the batch alone gives).
template <class Layer, class RouterData, ElementType T, class Result>
void routed_forward(const Layer& lep, const problem& pb, int r, RouterData& rd,
                    const weights<T>& wt, const std::vector<T>& xr, const plan_store& want,
                    std::vector<T>& y, Result& res) {
  const index_t d = pb.d, el = pb.experts_per_rank, tr = pb.tokens(r);
  std::fill(y.begin(), y.end(), from_float<T>(-321.0f));
  lep.forward(host_context{}, make_view<const T>(xr.data(), tr, d), rd.params(),
              wt.view(r * el, el), make_view<T>(y.data(), tr, d), res);
  same_bits("plan.expert_ids", res.plan.expert_ids.data(), want.ids.data(), want.ids.size(), r);
  same_bits("plan.weights", res.plan.weights.data(), want.weights.data(), want.weights.size(), r);
  same_bits("plan.counts", res.plan.counts.data(), want.counts.data(), want.counts.size(), r);
}

//! The routed acceptance case for `Router`: (a) always; (b) when pb.batch_invariant.
template <class Router, ElementType T, parallel::Comm C>
void routed_case(const C& comm, const problem& pb) {
  const Router router = make_router<Router>();
  std::vector<plan_store> plans;
  for (int s = 0; s < pb.ranks; ++s) plans.push_back(route_alone<Router, T>(pb, router, s));
  compare_with_concatenation<Router, T>(comm, pb, router, plans);

  // The full layer (routing, experts, backward) on this rank.
  const int r = comm.rank();
  const index_t d = pb.d, el = pb.experts_per_rank, tr = pb.tokens(r), e = pb.experts();
  const host_context ctx;
  const weights<T> wt(pb);
  router_data<Router> rd(pb);
  ep_layer<Router, T, C> lep = configure(ep_layer<Router, T, C>{}, pb, router);
  lep.dispatch = {.comm = &comm};
  const auto xr = tokens_of<T>(pb, r, 1), dyr = tokens_of<T>(pb, r, 2);
  std::vector<T> y(static_cast<std::size_t>(tr * d));
  moe_result<typename Router::losses_type> res;
  const plan_store& want = plans[static_cast<std::size_t>(r)];
  routed_forward(lep, pb, r, rd, wt, xr, want, y, res);
  if (!pb.shared) {
    // (a) for the whole forward: y equals forward_experts' on the concatenation (checked
    // above against this plan), recomputed here from the same plan.
    std::vector<T> y2(y.size());
    std::vector<index_t> dropped(static_cast<std::size_t>(e));
    lep.forward_experts(ctx, make_view<const T>(xr.data(), tr, d), want.view(), wt.view(r * el, el),
                        make_view<T>(y2.data(), tr, d), {dropped.data(), dropped.size()});
    same_bits("forward y vs forward_experts y", y.data(), y2.data(), y.size(), r);
  }
  std::vector<float> dx(static_cast<std::size_t>(tr * d), 0.5f);
  grads g_ep(el, pb, pb.seed + 17);
  lep.backward(ctx, make_view<const T>(xr.data(), tr, d), rd.params(), wt.view(r * el, el), res,
               make_view<const T>(dyr.data(), tr, d),
               coefficients<typename Router::losses_type>(), make_view<float>(dx.data(), tr, d),
               g_ep.view(pb, 0, el), rd.grads_view());
  if (!pb.batch_invariant) return;

  // (b) the single-process layer on x_r alone.
  moe_result<typename Router::losses_type> ref_res;
  std::vector<T> ref_y;
  (void)route_alone<Router, T>(pb, router, r, &ref_res, &ref_y);
  same_bits("(b) y", y.data(), ref_y.data(), y.size(), r);
  same_bits("(b) plan.logits", res.plan.logits.data(), ref_res.plan.logits.data(),
            ref_res.plan.logits.size(), r);
  same_bits("(b) plan.probs", res.plan.probs.data(), ref_res.plan.probs.data(),
            ref_res.plan.probs.size(), r);
  check(std::memcmp(&res.losses, &ref_res.losses, sizeof(res.losses)) == 0,
        detail::concat("rank ", r, ": (b) losses"));
  single_layer<Router, T> ref = configure(single_layer<Router, T>{}, pb, router);
  router_data<Router> rd_ref(pb);
  std::vector<float> dx_ref(dx.size(), 0.5f);
  grads g_ref(e, pb, pb.seed + 17);
  ref.backward(ctx, make_view<const T>(xr.data(), tr, d), rd_ref.params(), wt.view(0, e), ref_res,
               make_view<const T>(dyr.data(), tr, d),
               coefficients<typename Router::losses_type>(), make_view<float>(dx_ref.data(), tr, d),
               g_ref.view(pb, 0, e), rd_ref.grads_view());
  same_bits("(b) dx", dx.data(), dx_ref.data(), dx.size(), r);
  same_bits("(b) router grads", rd.gw.data(), rd_ref.gw.data(), rd.gw.size(), r);
  if constexpr (router_data<Router>::dynmoe)
    same_bits("(b) threshold grads", rd.gthr.data(), rd_ref.gthr.data(), rd.gthr.size(), r);
}

//! Hand-made routings for the plan cases.
enum class edge {
  one_expert,      //!< every token of every rank to global expert 1 (k = 1)
  last_rank_idle,  //!< no pair for the last rank's experts: it receives nothing
  k_extremes,      //!< tokens alternate k = 0 and k = width (every expert incl. non-FFN)
  mixed,           //!< random k in [0, width], random ids (non-FFN ones included)
};

//! Rank s's plan for `which` (width 3, or E + non-FFN for k_extremes).
inline plan_store edge_plan(const problem& pb, int s, edge which) {
  plan_store p;
  p.tokens = pb.tokens(s);
  p.experts = pb.routed();
  p.width = which == edge::k_extremes ? pb.routed() : std::min<index_t>(3, pb.routed());
  p.ids.assign(static_cast<std::size_t>(p.tokens * p.width), -1);
  p.weights.assign(p.ids.size(), 0.0f);
  p.counts.assign(static_cast<std::size_t>(p.tokens), 0);
  std::mt19937_64 g(pb.seed * 13 + static_cast<std::uint64_t>(s));
  const index_t e = pb.experts();
  for (index_t t = 0; t < p.tokens; ++t) {
    std::vector<std::int32_t> ids;
    switch (which) {
      case edge::one_expert: ids = {1}; break;
      case edge::last_rank_idle: {
        const index_t avail = e - pb.experts_per_rank;  // experts of ranks 0 .. N-2
        for (index_t j = 0; j < std::min<index_t>(2, avail); ++j)
          ids.push_back(static_cast<std::int32_t>((t + 3 * j + s) % avail));
        if (avail == 0) ids.clear();
        break;
      }
      case edge::k_extremes:
        if (t % 2 == 1)
          for (index_t k = 0; k < p.width; ++k) ids.push_back(static_cast<std::int32_t>((k + t) % p.width));
        break;
      case edge::mixed: {
        const index_t k = static_cast<index_t>(g() % static_cast<std::uint64_t>(p.width + 1));
        std::vector<std::int32_t> all(static_cast<std::size_t>(pb.routed()));
        for (std::size_t i = 0; i < all.size(); ++i) all[i] = static_cast<std::int32_t>(i);
        std::shuffle(all.begin(), all.end(), g);
        ids.assign(all.begin(), all.begin() + k);
        break;
      }
    }
    const auto w = uniform(g, ids.size(), 0.1f, 1.0f);
    p.counts[static_cast<std::size_t>(t)] = static_cast<std::int32_t>(ids.size());
    for (std::size_t j = 0; j < ids.size(); ++j) {
      p.ids[static_cast<std::size_t>(t * p.width) + j] = ids[j];
      p.weights[static_cast<std::size_t>(t * p.width) + j] = w[j];
    }
  }
  return p;
}

//! The (a) comparison for a hand-made routing (forward_experts / backward_experts).
template <ElementType T, parallel::Comm C>
void plan_case(const C& comm, const problem& pb, edge which) {
  std::vector<plan_store> plans;
  for (int s = 0; s < pb.ranks; ++s) plans.push_back(edge_plan(pb, s, which));
  compare_with_concatenation<routers::TopK, T>(comm, pb, routers::TopK{.k = 2}, plans);
}

//! The pairs of `p` that static_bound{peer_rows} keeps (the documented rule: per destination
//! rank, the pairs claim its peer_rows rows in (token, slot) order; non-FFN pairs are never
//! sent, never dropped), 1 per kept or unused slot.
inline std::vector<char> bound_kept(const problem& pb, const plan_store& p, index_t peer_rows) {
  const index_t e = pb.experts();
  std::vector<char> k(p.ids.size(), 1);
  std::vector<index_t> claimed(static_cast<std::size_t>(pb.ranks), 0);
  for (index_t t = 0; t < p.tokens; ++t)
    for (index_t j = 0; j < p.counts[t]; ++j) {
      const std::size_t q = static_cast<std::size_t>(t * p.width + j);
      if (p.ids[q] >= e) continue;  // non-FFN: never sent, never dropped
      index_t& c = claimed[static_cast<std::size_t>(p.ids[q] / pb.experts_per_rank)];
      if (c >= peer_rows) k[q] = 0;
      else ++c;
    }
  return k;
}

//! static_bound{peer_rows}: the drops follow the documented rule (per destination, pairs claim
//! its rows in (token, slot) order), are counted per expert, and the kept pairs' results equal
//! the single-process layer's on the concatenation without the dropped pairs.
template <ElementType T, parallel::Comm C>
void static_bound_case(const C& comm, const problem& pb, index_t peer_rows, edge which = edge::mixed) {
  std::vector<plan_store> plans;
  std::vector<std::vector<char>> kept;
  for (int s = 0; s < pb.ranks; ++s) {
    plans.push_back(edge_plan(pb, s, which));
    kept.push_back(bound_kept(pb, plans.back(), peer_rows));
  }
  compare_with_concatenation<routers::TopK, T>(comm, pb, routers::TopK{.k = 2}, plans,
                                               parallel::static_bound{.peer_rows = peer_rows},
                                               kept);
}

//! The drops ExpertParallel<C, static_bound, padded_capacity> must report, computed here from
//! the rules alone: per rank [E], the bound's drops (`kept` 0) plus the local capacity's: per
//! global FFN expert, the pairs the bound kept claim `capacity` rows in the concatenation's
//! (rank, token, slot) order, the first `capacity` kept (an absolute expert_capacity,
//! priority token_major).
inline std::vector<std::vector<index_t>> padded_drops(const problem& pb,
                                                      const std::vector<plan_store>& plans,
                                                      const std::vector<std::vector<char>>& kept,
                                                      index_t capacity) {
  const index_t e = pb.experts();
  std::vector<std::vector<index_t>> want(static_cast<std::size_t>(pb.ranks),
                                         std::vector<index_t>(static_cast<std::size_t>(e), 0));
  std::vector<index_t> claimed(static_cast<std::size_t>(e), 0);
  for (int s = 0; s < pb.ranks; ++s) {
    const plan_store& p = plans[static_cast<std::size_t>(s)];
    auto& w = want[static_cast<std::size_t>(s)];
    for (index_t t = 0; t < p.tokens; ++t)
      for (index_t j = 0; j < p.counts[static_cast<std::size_t>(t)]; ++j) {
        const std::size_t q = static_cast<std::size_t>(t * p.width + j);
        const index_t id = p.ids[q];
        if (id >= e) continue;  // non-FFN: never sent, never dropped
        if (!kept.empty() && !kept[static_cast<std::size_t>(s)][q]) {
          ++w[static_cast<std::size_t>(id)];  // the bound's drop
        } else if (claimed[static_cast<std::size_t>(id)]++ >= capacity) {
          ++w[static_cast<std::size_t>(id)];  // the receiver's capacity
        }
      }
  }
  return want;
}

//! ExpertParallel<C, static_bound{peer_rows}, padded_capacity `local`> (local.expert_capacity
//! absolute, priority token_major) against the single-process padded_capacity layer on the
//! concatenation, the bound's drops compacted away from it (as static_bound_case does; only
//! with local.drop zero when the bound drops anything: a pass-through pair would then count
//! on one side only); `dropped` per expert against padded_drops.
template <ElementType T, parallel::Comm C>
void padded_case(const C& comm, const problem& pb, const std::vector<plan_store>& plans,
                 index_t peer_rows, const dispatch::padded_capacity& local) {
  std::vector<std::vector<char>> kept;
  for (int s = 0; s < pb.ranks; ++s)
    kept.push_back(bound_kept(pb, plans[static_cast<std::size_t>(s)], peer_rows));
  const auto want = padded_drops(pb, plans, kept, local.expert_capacity);
  compare_with_concatenation<routers::TopK, T>(comm, pb, routers::TopK{.k = 2}, plans,
                                               parallel::static_bound{.peer_rows = peer_rows},
                                               kept, local, want);
}

//! The routed layer (TopK k = 2, `forward` with the router) under ExpertParallel<C,
//! static_bound{peer_rows}, padded_capacity `local`>: this rank's plan is its batch's alone, y
//! equals the single-process padded_capacity layer's forward_experts on the concatenation
//! (bitwise) and the state's `dropped` equals padded_drops. Then a backward runs through.
template <ElementType T, parallel::Comm C>
void padded_routed_case(const C& comm, const problem& pb, index_t peer_rows,
                        const dispatch::padded_capacity& local) {
  using Router = routers::TopK;
  const Router router = make_router<Router>();
  std::vector<plan_store> plans;
  std::vector<std::vector<char>> kept;
  for (int s = 0; s < pb.ranks; ++s) {
    plans.push_back(route_alone<Router, T>(pb, router, s));
    kept.push_back(bound_kept(pb, plans.back(), peer_rows));
  }
  const auto want = padded_drops(pb, plans, kept, local.expert_capacity);
  bool none = true;
  for (const auto& k : kept) none = none && std::find(k.begin(), k.end(), 0) == k.end();
  check(none, "padded_routed_case: the bound must drop nothing");
  const int r = comm.rank();
  const index_t d = pb.d, el = pb.experts_per_rank, tr = pb.tokens(r), e = pb.experts();
  const index_t tc = pb.total_tokens(), off = pb.offset(r);
  const host_context ctx;
  const weights<T> wt(pb);

  // The single-process padded layer on the concatenation.
  std::vector<T> x_cat;
  plan_store cat{0, plans[0].width, plans[0].experts, {}, {}, {}};
  for (int s = 0; s < pb.ranks; ++s) {
    const auto xs = tokens_of<T>(pb, s, 1);
    x_cat.insert(x_cat.end(), xs.begin(), xs.end());
    cat.append(plans[static_cast<std::size_t>(s)]);
  }
  using single = single_layer<Router, T, dispatch::padded_capacity>;
  single ref = configure(single{}, pb, router);
  ref.dispatch = local;
  std::vector<T> y_cat(static_cast<std::size_t>(tc * d));
  std::vector<index_t> dropped_cat(static_cast<std::size_t>(e));
  ref.forward_experts(ctx, make_view<const T>(x_cat.data(), tc, d), cat.view(), wt.view(0, e),
                      make_view<T>(y_cat.data(), tc, d), {dropped_cat.data(), dropped_cat.size()});
  // The expectation's drops summed over ranks are the single-process layer's.
  std::vector<index_t> want_sum(static_cast<std::size_t>(e), 0);
  for (const auto& w : want)
    for (std::size_t i = 0; i < w.size(); ++i) want_sum[i] += w[i];
  same_bits("single-process padded drops vs the expectation summed over ranks",
            dropped_cat.data(), want_sum.data(), want_sum.size(), r);

  // This rank: the whole layer.
  using layer_ep = ep_layer<Router, T, C, parallel::static_bound, dispatch::padded_capacity>;
  layer_ep lep = configure(layer_ep{}, pb, router);
  lep.dispatch = {.comm = &comm, .capacity = {.peer_rows = peer_rows}, .local = local};
  router_data<Router> rd(pb);
  const auto xr = tokens_of<T>(pb, r, 1), dyr = tokens_of<T>(pb, r, 2);
  std::vector<T> y(static_cast<std::size_t>(tr * d));
  moe_result<typename Router::losses_type> res;
  routed_forward(lep, pb, r, rd, wt, xr, plans[static_cast<std::size_t>(r)], y, res);
  same_bits("routed y vs the concatenation's rows", y.data(), y_cat.data() + off * d, y.size(),
            r);
  const auto& w = want[static_cast<std::size_t>(r)];
  check(res.dropped.size() == w.size(), "state.dropped holds E entries");
  same_bits("state.dropped per expert", res.dropped.data(), w.data(),
            std::min(w.size(), res.dropped.size()), r);
  std::vector<float> dx(static_cast<std::size_t>(tr * d), 0.5f);
  grads g_ep(el, pb, pb.seed + 17);
  lep.backward(ctx, make_view<const T>(xr.data(), tr, d), rd.params(), wt.view(r * el, el), res,
               make_view<const T>(dyr.data(), tr, d),
               coefficients<typename Router::losses_type>(), make_view<float>(dx.data(), tr, d),
               g_ep.view(pb, 0, el), rd.grads_view());
  bool finite = true;
  for (float v : dx) finite = finite && std::isfinite(v);
  check(finite, "routed backward: dx finite");
}

}  // namespace switchyard::test::ep
