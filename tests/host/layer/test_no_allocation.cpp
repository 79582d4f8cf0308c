// SPDX-License-Identifier: Apache-2.0
// Forward and backward given a workspace of the queried size perform no heap allocation
// (issue #10): every router × every dispatch × float and bfloat16, the HyperMoE add-on, with
// the state in caller memory (moe_state views) and in a reused host owner (moe_result).
// Global operator new/delete are replaced by counting versions, active only while a test
// counts; each case runs once to warm up (OpenMP's thread pool, first-touch), then counts.
#include <boost/mp11/algorithm.hpp>
#include <boost/mp11/list.hpp>
#include <boost/test/unit_test.hpp>

#include <atomic>
#include <cstdlib>
#include <new>
#include <vector>

#include <switchyard/layer/hypermoe_addon.hpp>
#include <switchyard/switchyard.hpp>

#include "host/layer/hyper_setup.hpp"
#include "host/layer/layer_reference.hpp"
#include "support/random.hpp"

namespace {
std::atomic<bool> g_counting{false};
std::atomic<long> g_allocations{0};
void* counted(std::size_t n) {
  if (g_counting.load(std::memory_order_relaxed)) ++g_allocations;
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
}  // namespace

void* operator new(std::size_t n) { return counted(n); }
void* operator new[](std::size_t n) { return counted(n); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }

using namespace switchyard;

namespace {

//! Counts the allocations `fn` performs.
template <class F>
long allocations_of(F&& fn) {
  g_allocations = 0;
  g_counting = true;
  fn();
  g_counting = false;
  return g_allocations.load();
}

template <class R>
R make_router() {
  if constexpr (std::is_same_v<R, routers::TopK>) return {.k = 2};
  else if constexpr (std::is_same_v<R, routers::TopP>) return {.p = 0.5f};
  else if constexpr (std::is_same_v<R, routers::AdaptiveGating>) return {.threshold = 0.2f};
  else return R{};
}

template <class R>
typename R::losses_type coefficients() {
  using L = typename R::losses_type;
  if constexpr (requires { L::uniform(0.01f); }) return L::uniform(0.01f);
  else {
    L c{};
    auto* f = reinterpret_cast<float*>(&c);  // every coefficient 0.01 (losses are floats)
    for (std::size_t i = 0; i < sizeof(L) / sizeof(float); ++i) f[i] = 0.01f;
    return c;
  }
}

//! Router gradient storage: w [E, d] (DynMoE: w_gate [d, E] and thresholds [E]).
template <class R>
struct router_grads {
  std::vector<float> w, th;
  router_grads(index_t experts, index_t d)
      : w(static_cast<std::size_t>(experts * d), 0.0f), th(static_cast<std::size_t>(experts), 0.0f) {}
  typename R::grads_type view(index_t experts, index_t d) {
    if constexpr (std::is_same_v<R, routers::DynMoE>) {
      return {make_view(w.data(), d, experts), make_view(th.data(), experts)};
    } else {
      return {make_view(w.data(), experts, d)};
    }
  }
};

template <class R, class D, class AddOn, ElementType T>
void check_case(std::uint64_t seed, const D& dispatch) {
  constexpr index_t tokens = 48, d = 32, f = 24, experts = 6;
  constexpr bool hyper = !std::is_same_v<AddOn, no_addon>;
  std::mt19937_64 g(seed);
  test::layer_data<T> L(g, tokens, d, f, experts, true, true);
  test::router_setup<R> rs(g, make_router<R>(), tokens, d, experts);
  const test::hyper_parameters hp(g, experts, d, 4, 7, 3, 2, 2, 5, 3);
  auto hgs = hp.zeros();
  typename AddOn::params_type ap{};
  typename AddOn::grads_type ag{};
  if constexpr (hyper) {
    ap = hp.params();
    ag = hp.grads(hgs);
  }
  MoELayer<R, activation::swiglu, D, AddOn> layer{.router = rs.router, .dispatch = dispatch};
  if constexpr (hyper) layer.addon = {.hyper = {.layer_idx = 1, .adapter_dim = 3}};
  const host_context host{};
  const auto rp = rs.params(d);
  const auto w = L.weights();
  std::vector<T> y(static_cast<std::size_t>(tokens * d)), dy(y.size());
  for (auto& v : dy) v = from_float<T>(0.5f);
  std::vector<float> dx(y.size()), dw1(L.w1.size()), db1(L.b1.size()), dw2(L.w2.size()),
      db2(L.b2.size());
  router_grads<R> rg(experts, d);
  const expert_grads eg{make_view(dw1.data(), experts, L.p, d), make_view(db1.data(), experts, L.p),
                        make_view(dw2.data(), experts, d, f), make_view(db2.data(), experts, d)};
  const auto rgv = rg.view(experts, d);
  const auto yv = make_view(y.data(), tokens, d);
  const auto dyv = make_view<const T>(dy.data(), tokens, d);

  // The state in caller memory: plain arrays sized by plan_ref::required.
  const index_t width = layer.router.width(rp);
  const auto n = routing::plan_ref::required(tokens, width, experts);
  std::vector<std::int32_t> ids(n.slots), counts(n.tokens);
  std::vector<float> weights(n.slots), logits(n.scores), probs(n.scores);
  std::vector<index_t> dropped(experts);
  typename R::losses_type losses{};
  const typename decltype(layer)::state_type state{
      {tokens, width, experts, {ids.data(), ids.size()}, {weights.data(), weights.size()},
       {counts.data(), counts.size()}, {logits.data(), logits.size()}, {probs.data(), probs.size()}},
      &losses,
      {dropped.data(), dropped.size()}};
  std::vector<std::byte> fws(layer.workspace_size(host, tokens, rp, w, ap)),
      bws(layer.backward_workspace_size(host, tokens, rp, w, ap));
  auto forward = [&] { layer.forward(host, L.xv(), rp, w, yv, state, fws, ap); };
  auto backward = [&] {
    layer.backward(host, L.xv(), rp, w, state, dyv, coefficients<R>(), make_view(dx.data(), tokens, d),
                   eg, rgv, bws, ap, ag);
  };
  forward();  // warm up
  backward();
  BOOST_TEST(state.plan.total_assignments() > 0);
  BOOST_TEST(allocations_of(forward) == 0, "forward allocated");
  BOOST_TEST(allocations_of(backward) == 0, "backward allocated");

  // The host owner, reused at the same shape, does not allocate either.
  typename decltype(layer)::result_type res;
  auto forward_owned = [&] { layer.forward(host, L.xv(), rp, w, yv, res, fws, ap); };
  forward_owned();
  BOOST_TEST(allocations_of(forward_owned) == 0, "forward into a reused moe_result allocated");
  // Without a workspace the backend allocates one (so the counter does see allocations).
  BOOST_TEST(allocations_of([&] { layer.forward(host, L.xv(), rp, w, yv, state, {}, ap); }) > 0);
}

template <class R, class D>
struct combo {
  using router = R;
  using dispatch_type = D;
};
using combos = boost::mp11::mp_product<
    combo,
    boost::mp11::mp_list<routers::TopK, routers::TopP, routers::AdaptiveGating, routers::DynMoE,
                         routers::DAMoE<routing::importance::precomputed>>,
    boost::mp11::mp_list<dispatch::sorted_grouped, dispatch::padded_capacity, dispatch::dense>>;

}  // namespace

BOOST_AUTO_TEST_CASE_TEMPLATE(forward_and_backward_with_a_workspace_do_not_allocate, C, combos) {
  using R = typename C::router;
  using D = typename C::dispatch_type;
  const std::uint64_t seed = test::base_seed() + 12001;
  D dispatch{};
  if constexpr (std::is_same_v<D, dispatch::padded_capacity>) dispatch.capacity_factor = 1.0f;  // drops
  check_case<R, D, no_addon, float>(seed, dispatch);
  check_case<R, D, no_addon, switchyard::bfloat16>(seed + 1, dispatch);
}

BOOST_AUTO_TEST_CASE(hypermoe_addon_with_a_workspace_does_not_allocate) {
  check_case<routers::TopK, dispatch::sorted_grouped, layer::hypermoe_addon, float>(
      test::base_seed() + 12101, {});
}

// ---- issue #12: shared experts (gated) and identity experts -------------------------------
namespace {

template <class D, ElementType T>
void check_shared_identity(std::uint64_t seed, const D& dispatch) {
  constexpr index_t tokens = 40, d = 16, f = 12, fs = 10, experts = 5, identity = 2, shared = 2;
  std::mt19937_64 g(seed);
  test::layer_data<T> L(g, tokens, d, f, experts, true, true);
  auto fill = [&](std::vector<T>& v, index_t n) {
    for (float x : test::normal(g, static_cast<std::size_t>(n), 0.3f)) v.push_back(from_float<T>(x));
  };
  std::vector<T> sw1, sb1, sw2, sb2, gate;
  fill(sw1, shared * 2 * fs * d);
  fill(sb1, shared * 2 * fs);
  fill(sw2, shared * d * fs);
  fill(sb2, shared * d);
  fill(gate, d);
  auto w = L.weights();
  w.shared = {make_view<const T>(sw1.data(), shared, 2 * fs, d),
              make_view<const T>(sb1.data(), shared, 2 * fs),
              make_view<const T>(sw2.data(), shared, d, fs), make_view<const T>(sb2.data(), shared, d),
              make_view<const T>(gate.data(), 1, d)};
  test::router_setup<routers::TopK> rs(g, {.k = 3}, tokens, d, experts + identity);
  const MoELayer<routers::TopK, activation::swiglu, D> layer{
      .router = rs.router, .dispatch = dispatch, .identity_experts = identity};
  const host_context host{};
  const auto rp = rs.params(d);
  std::vector<T> y(static_cast<std::size_t>(tokens * d)), dy(y.size(), from_float<T>(0.5f));
  std::vector<float> dx(y.size()), dw1(L.w1.size()), db1(L.b1.size()), dw2(L.w2.size()),
      db2(L.b2.size()), dsw1(sw1.size()), dsb1(sb1.size()), dsw2(sw2.size()), dsb2(sb2.size()),
      dgate(gate.size()), drw(rs.w.size());
  expert_grads eg{make_view(dw1.data(), experts, L.p, d), make_view(db1.data(), experts, L.p),
                  make_view(dw2.data(), experts, d, f), make_view(db2.data(), experts, d)};
  eg.shared = {make_view(dsw1.data(), shared, 2 * fs, d), make_view(dsb1.data(), shared, 2 * fs),
               make_view(dsw2.data(), shared, d, fs), make_view(dsb2.data(), shared, d),
               make_view(dgate.data(), 1, d)};
  typename decltype(layer)::result_type res;
  std::vector<std::byte> fws(layer.workspace_size(host, tokens, rp, w)),
      bws(layer.backward_workspace_size(host, tokens, rp, w));
  const auto xv = L.xv();
  auto forward = [&] { layer.forward(host, xv, rp, w, make_view(y.data(), tokens, d), res, fws); };
  auto backward = [&] {
    layer.backward(host, xv, rp, w, res, make_view<const T>(dy.data(), tokens, d),
                   routers::TopK::losses_type{}, make_view(dx.data(), tokens, d), eg,
                   {make_view(drw.data(), experts + identity, d)}, bws);
  };
  forward();  // warm up
  backward();
  BOOST_TEST(allocations_of(forward) == 0, "forward with shared and identity experts allocated");
  BOOST_TEST(allocations_of(backward) == 0, "backward with shared and identity experts allocated");
}

}  // namespace

BOOST_AUTO_TEST_CASE(shared_and_identity_experts_with_a_workspace_do_not_allocate) {
  const std::uint64_t seed = test::base_seed() + 12401;
  check_shared_identity<dispatch::sorted_grouped, float>(seed, {});
  check_shared_identity<dispatch::dense, float>(seed + 1, {});
  check_shared_identity<dispatch::padded_capacity, switchyard::bfloat16>(
      seed + 2, {.capacity_factor = 1.0f});
}

// ---- routers::ScoredTopK (issue #12): DeepSeek-V3-like (groups, selection bias, sequence
// balance) and gpt-oss-like (router bias, softmax after top-k) and DeepSeek-V4 hash routing,
// forward and backward with every loss coefficient non-zero.
namespace {

void check_scored_case(const routers::ScoredTopK& router, bool router_bias, bool hash,
                       std::uint64_t seed) {
  constexpr index_t tokens = 48, d = 32, f = 24, experts = 8, vocab = 5;
  std::mt19937_64 g(seed);
  test::layer_data<float> L(g, tokens, d, f, experts, true, true);
  const auto w = test::normal(g, static_cast<std::size_t>(experts * d), 0.3f);
  const auto b = test::normal(g, static_cast<std::size_t>(experts), 0.3f);
  const auto sel = test::normal(g, static_cast<std::size_t>(experts), 0.1f);
  std::vector<std::int32_t> table, ids;
  for (index_t v = 0; v < vocab; ++v)
    for (int j = 0; j < router.k; ++j) table.push_back(static_cast<std::int32_t>((v + 3 * j) % experts));
  for (index_t t = 0; t < tokens; ++t) ids.push_back(static_cast<std::int32_t>(t % vocab));
  routing::scored_router_params rp{make_view<const float>(w.data(), experts, d), {}, {}, {}, {}};
  if (router_bias) rp.b = make_view<const float>(b.data(), experts);
  rp.selection_bias = make_view<const float>(sel.data(), experts);
  if (hash) {
    rp.hash_table = make_view<const std::int32_t>(table.data(), vocab, router.k);
    rp.token_ids = make_view<const std::int32_t>(ids.data(), tokens);
  }
  using Layer = MoELayer<routers::ScoredTopK, activation::swiglu>;
  const Layer layer{.router = router};
  const host_context host{};
  const auto wv = L.weights();
  std::vector<float> y(static_cast<std::size_t>(tokens * d)), dy(y.size(), 0.5f), dx(y.size()),
      dw1(L.w1.size()), db1(L.b1.size()), dw2(L.w2.size()), db2(L.b2.size()), gw(w.size()),
      gb(b.size());
  const expert_grads eg{make_view(dw1.data(), experts, L.p, d), make_view(db1.data(), experts, L.p),
                        make_view(dw2.data(), experts, d, f), make_view(db2.data(), experts, d)};
  routing::scored_router_grads rg{make_view(gw.data(), experts, d), {}};
  if (router_bias) rg.b = make_view(gb.data(), experts);
  const index_t width = layer.router.width(rp);
  const auto n = routing::plan_ref::required(tokens, width, experts);
  std::vector<std::int32_t> pids(n.slots), counts(n.tokens);
  std::vector<float> weights(n.slots), logits(n.scores), probs(n.scores);
  std::vector<index_t> dropped(experts);
  routing::scored_router_losses losses{};
  const Layer::state_type state{
      {tokens, width, experts, {pids.data(), pids.size()}, {weights.data(), weights.size()},
       {counts.data(), counts.size()}, {logits.data(), logits.size()}, {probs.data(), probs.size()}},
      &losses,
      {dropped.data(), dropped.size()}};
  std::vector<std::byte> fws(layer.workspace_size(host, tokens, rp, wv)),
      bws(layer.backward_workspace_size(host, tokens, rp, wv));
  const routing::scored_router_losses coeffs{.lb = 0.01f, .sequence_balance = 0.01f, .z = 0.01f};
  auto forward = [&] { layer.forward(host, L.xv(), rp, wv, make_view(y.data(), tokens, d), state, fws); };
  auto backward = [&] {
    layer.backward(host, L.xv(), rp, wv, state, make_view<const float>(dy.data(), tokens, d), coeffs,
                   make_view(dx.data(), tokens, d), eg, rg, bws);
  };
  forward();
  backward();
  BOOST_TEST(state.plan.total_assignments() == tokens * router.k);
  BOOST_TEST(allocations_of(forward) == 0, "ScoredTopK forward allocated");
  BOOST_TEST(allocations_of(backward) == 0, "ScoredTopK backward allocated");
}

}  // namespace

BOOST_AUTO_TEST_CASE(scored_topk_with_a_workspace_does_not_allocate) {
  const std::uint64_t seed = test::base_seed() + 12201;
  check_scored_case(routers::ScoredTopK{.k = 2, .scoring = routing::score_function::sigmoid,
                                        .groups = {.n_group = 4, .topk_group = 2},
                                        .normalize = {.kind = routing::normalization::sum,
                                                      .eps = routing::epsilon_kind::add,
                                                      .eps_value = 1e-20f},
                                        .scaling = 2.5f, .sequence_length = 16},
                    false, false, seed);
  check_scored_case(routers::ScoredTopK{.k = 2, .softmax_after_topk = true}, true, false, seed + 1);
  check_scored_case(routers::ScoredTopK{.k = 2, .scoring = routing::score_function::sqrt_softplus,
                                        .selection = routing::selection_kind::hash,
                                        .normalize = {.kind = routing::normalization::pnorm}},
                    false, true, seed + 2);
}

// ---- issue #13: expert kinds (identity, zero, constant) beside FFN and shared experts -----
namespace {

template <class D, ElementType T>
void check_expert_kinds(std::uint64_t seed, const D& dispatch) {
  constexpr index_t tokens = 40, d = 16, f = 12, fs = 10, experts = 5;
  constexpr index_t identity = 1, zero = 2, constant = 2, all = experts + identity + zero + constant;
  std::mt19937_64 g(seed);
  test::layer_data<T> L(g, tokens, d, f, experts, true, true);
  auto fill = [&](std::vector<T>& v, index_t n) {
    for (float x : test::normal(g, static_cast<std::size_t>(n), 0.3f)) v.push_back(from_float<T>(x));
  };
  std::vector<T> sw1, sw2, cv, cg;
  fill(sw1, 2 * fs * d);
  fill(sw2, d * fs);
  fill(cv, constant * d);
  fill(cg, constant * 2 * d);
  auto w = L.weights();
  w.shared.w1 = make_view<const T>(sw1.data(), 1, 2 * fs, d);
  w.shared.w2 = make_view<const T>(sw2.data(), 1, d, fs);
  w.constant = {make_view<const T>(cv.data(), constant, d),
                make_view<const T>(cg.data(), constant, 2, d)};
  test::router_setup<routers::TopK> rs(g, {.k = 3}, tokens, d, all);
  const MoELayer<routers::TopK, activation::swiglu, D> layer{
      .router = rs.router, .dispatch = dispatch, .identity_experts = identity,
      .zero_experts = zero, .constant_experts = constant};
  const host_context host{};
  const auto rp = rs.params(d);
  std::vector<T> y(static_cast<std::size_t>(tokens * d)), dy(y.size(), from_float<T>(0.5f));
  std::vector<float> dx(y.size()), dw1(L.w1.size()), db1(L.b1.size()), dw2(L.w2.size()),
      db2(L.b2.size()), dsw1(sw1.size()), dsw2(sw2.size()), dcv(cv.size()), dcg(cg.size()),
      drw(rs.w.size());
  expert_grads eg{make_view(dw1.data(), experts, L.p, d), make_view(db1.data(), experts, L.p),
                  make_view(dw2.data(), experts, d, f), make_view(db2.data(), experts, d)};
  eg.shared.w1 = make_view(dsw1.data(), 1, 2 * fs, d);
  eg.shared.w2 = make_view(dsw2.data(), 1, d, fs);
  eg.constant = {make_view(dcv.data(), constant, d), make_view(dcg.data(), constant, 2, d)};
  typename decltype(layer)::result_type res;
  std::vector<std::byte> fws(layer.workspace_size(host, tokens, rp, w)),
      bws(layer.backward_workspace_size(host, tokens, rp, w));
  const auto xv = L.xv();
  auto forward = [&] { layer.forward(host, xv, rp, w, make_view(y.data(), tokens, d), res, fws); };
  auto backward = [&] {
    layer.backward(host, xv, rp, w, res, make_view<const T>(dy.data(), tokens, d),
                   routers::TopK::losses_type{}, make_view(dx.data(), tokens, d), eg,
                   {make_view(drw.data(), all, d)}, bws);
  };
  forward();  // warm up
  backward();
  BOOST_TEST(allocations_of(forward) == 0, "forward with expert kinds allocated");
  BOOST_TEST(allocations_of(backward) == 0, "backward with expert kinds allocated");
  // The plan entry points with their queried workspaces.
  const auto plan = res.state().plan.const_view();
  std::vector<index_t> dropped(static_cast<std::size_t>(experts));
  std::vector<float> d_weights(static_cast<std::size_t>(tokens * plan.width()));
  std::vector<std::byte> efws(layer.experts_workspace_size(host, tokens, plan.width(), w)),
      ebws(layer.experts_backward_workspace_size(host, tokens, plan.width(), w));
  auto forward_experts = [&] {
    layer.forward_experts(host, xv, plan, w, make_view(y.data(), tokens, d),
                          span<index_t>{dropped.data(), dropped.size()}, efws);
  };
  auto backward_experts = [&] {
    layer.backward_experts(host, xv, plan, w, make_view<const T>(dy.data(), tokens, d),
                           make_view(dx.data(), tokens, d), eg,
                           span<float>{d_weights.data(), d_weights.size()}, ebws);
  };
  forward_experts();
  backward_experts();
  BOOST_TEST(allocations_of(forward_experts) == 0, "forward_experts with expert kinds allocated");
  BOOST_TEST(allocations_of(backward_experts) == 0, "backward_experts with expert kinds allocated");
}

}  // namespace

BOOST_AUTO_TEST_CASE(expert_kinds_with_a_workspace_do_not_allocate) {
  const std::uint64_t seed = test::base_seed() + 13801;
  check_expert_kinds<dispatch::sorted_grouped, float>(seed, {});
  check_expert_kinds<dispatch::dense, float>(seed + 1, {});
  check_expert_kinds<dispatch::padded_capacity, switchyard::bfloat16>(seed + 2,
                                                                       {.capacity_factor = 1.0f});
}
