// SPDX-License-Identifier: Apache-2.0
// routers::ReMoE and routers::ExpertChoice in a layer: forward and backward given workspaces of
// the queried sizes perform no heap allocation (float and bfloat16 storage, sorted_grouped and
// dense dispatch). Global operator new/delete are replaced by counting versions, active only
// while a case counts; each case runs once to warm up (OpenMP's pool), then counts.
#include <boost/mp11/algorithm.hpp>
#include <boost/mp11/list.hpp>
#include <boost/test/unit_test.hpp>

#include <atomic>
#include <cstdlib>
#include <new>
#include <vector>

#include <switchyard/switchyard.hpp>

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

template <class F>
long allocations_of(F&& fn) {
  g_allocations = 0;
  g_counting = true;
  fn();
  g_counting = false;
  return g_allocations.load();
}

template <class R, class D, ElementType T>
void check_case(std::uint64_t seed, const R& router, const typename R::losses_type& coeffs) {
  constexpr index_t tokens = 48, d = 32, f = 24, experts = 6;
  std::mt19937_64 g(seed);
  test::layer_data<T> L(g, tokens, d, f, experts, true, true);
  const auto wr = test::normal(g, static_cast<std::size_t>(experts * d), 0.3f);
  const MoELayer<R, activation::swiglu, D> layer{.router = router};
  const host_context host{};
  const routing::linear_router_params rp{make_view<const float>(wr.data(), experts, d)};
  const auto w = L.weights();
  std::vector<T> y(static_cast<std::size_t>(tokens * d)), dy(y.size());
  for (auto& v : dy) v = from_float<T>(0.5f);
  std::vector<float> dx(y.size()), dw1(L.w1.size()), db1(L.b1.size()), dw2(L.w2.size()), db2(L.b2.size()),
      dwr(wr.size());
  const expert_grads eg{make_view(dw1.data(), experts, L.p, d), make_view(db1.data(), experts, L.p),
                        make_view(dw2.data(), experts, d, f), make_view(db2.data(), experts, d)};
  const routing::linear_router_grads rg{make_view(dwr.data(), experts, d)};
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
  std::vector<std::byte> fws(layer.workspace_size(host, tokens, rp, w)),
      bws(layer.backward_workspace_size(host, tokens, rp, w));
  const auto yv = make_view(y.data(), tokens, d);
  const auto dyv = make_view<const T>(dy.data(), tokens, d);
  auto forward = [&] { layer.forward(host, L.xv(), rp, w, yv, state, fws); };
  auto backward = [&] {
    layer.backward(host, L.xv(), rp, w, state, dyv, coeffs, make_view(dx.data(), tokens, d), eg, rg, bws);
  };
  forward();  // warm up
  backward();
  BOOST_TEST(state.plan.total_assignments() > 0);
  BOOST_TEST(allocations_of(forward) == 0, "forward allocated");
  BOOST_TEST(allocations_of(backward) == 0, "backward allocated");
  // without a workspace the backend allocates one (the counter does see allocations)
  BOOST_TEST(allocations_of([&] { layer.forward(host, L.xv(), rp, w, yv, state, {}); }) > 0);
}

using dispatches = boost::mp11::mp_list<dispatch::sorted_grouped, dispatch::dense>;

}  // namespace

BOOST_AUTO_TEST_CASE_TEMPLATE(remoe_does_not_allocate, D, dispatches) {
  const routers::ReMoE r{.max_k = 3};
  const routing::remoe_losses c{.l1 = 0.01f, .l1_balanced = 0.01f};
  check_case<routers::ReMoE, D, float>(test::base_seed() + 13001, r, c);
  check_case<routers::ReMoE, D, switchyard::bfloat16>(test::base_seed() + 13002, r, c);
}

BOOST_AUTO_TEST_CASE_TEMPLATE(expert_choice_does_not_allocate, D, dispatches) {
  const routers::ExpertChoice r{.capacity_factor = 1.5f};
  check_case<routers::ExpertChoice, D, float>(test::base_seed() + 13011, r, {});
  check_case<routers::ExpertChoice, D, switchyard::bfloat16>(test::base_seed() + 13012, r, {});
}
