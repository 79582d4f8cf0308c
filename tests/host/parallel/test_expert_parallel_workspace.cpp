// SPDX-License-Identifier: Apache-2.0
// ExpertParallel<thread_comm, static_bound, Local> on the host takes its row buffers from the
// layer's workspace (backend/host/expert_parallel.hpp, ep_storage): the workspace queries
// count them (they grow with peer_rows), a caller's workspace of the queried size, poisoned
// first, gives the same bits as the layer's own, and what a forward + backward still allocates
// (the planning arrays: O(T·width + E + N) integers, the agreement) does not grow with
// peer_rows. sorted_grouped and padded_capacity locals, N = 1 and 3 thread ranks.
#include <boost/test/unit_test.hpp>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#include "host/parallel/ep_cases.hpp"

namespace {
std::atomic<bool> g_counting{false};
std::atomic<long long> g_bytes{0};
thread_local bool t_paused = false;  // a rank's own setup (its workspace) is not counted
void* counted(std::size_t n) {
  if (g_counting.load(std::memory_order_relaxed) && !t_paused)
    g_bytes += static_cast<long long>(n);
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

namespace sy = switchyard;
namespace ep = sy::test::ep;
using sy::index_t;
using sy::parallel::thread_comm;

namespace {

//! What one rank's forward_experts + backward_experts produced.
struct rank_out {
  std::vector<float> y, dx, dw, g;
  std::vector<index_t> dropped;
  std::size_t forward_bytes = 0, backward_bytes = 0;
};

//! Runs rank r's forward_experts + backward_experts under static_bound{peer_rows} with `local`,
//! with the caller's workspaces of the queried sizes (0xFF bytes first) when `caller_ws`.
template <class Local>
rank_out run_rank(const thread_comm& comm, const ep::problem& pb, index_t peer_rows,
                  const Local& local, bool caller_ws) {
  using T = float;
  using Layer = ep::ep_layer<sy::routers::TopK, T, thread_comm, sy::parallel::static_bound, Local>;
  const int r = comm.rank();
  const index_t d = pb.d, el = pb.experts_per_rank, tr = pb.tokens(r);
  t_paused = true;
  Layer layer = ep::configure(Layer{}, pb, sy::routers::TopK{.k = 2});
  layer.dispatch = {.comm = &comm, .capacity = {.peer_rows = peer_rows}, .local = local};
  const ep::weights<T> wt(pb);
  const ep::plan_store plan = ep::edge_plan(pb, r, ep::edge::mixed);
  const auto x = ep::tokens_of<T>(pb, r, 1), dy = ep::tokens_of<T>(pb, r, 2);
  const auto w = wt.view(r * el, el);
  rank_out o;
  o.forward_bytes = layer.experts_workspace_size(sy::host_context{}, tr, plan.width, w);
  o.backward_bytes = layer.experts_backward_workspace_size(sy::host_context{}, tr, plan.width, w);
  std::vector<std::byte> fws, bws;
  if (caller_ws) {
    fws.assign(o.forward_bytes, std::byte{0xFF});
    bws.assign(o.backward_bytes, std::byte{0xFF});
  }
  o.y.assign(static_cast<std::size_t>(tr * d), -5.0f);
  o.dropped.assign(static_cast<std::size_t>(pb.experts()), -1);
  o.dx.assign(static_cast<std::size_t>(tr * d), 0.25f);
  o.dw.assign(static_cast<std::size_t>(tr * plan.width), -7.0f);
  ep::grads g(el, pb, pb.seed + 3);
  t_paused = false;
  layer.forward_experts(sy::host_context{}, sy::make_view<const T>(x.data(), tr, d), plan.view(),
                        w, sy::make_view<T>(o.y.data(), tr, d),
                        {o.dropped.data(), o.dropped.size()}, {fws.data(), fws.size()});
  layer.backward_experts(sy::host_context{}, sy::make_view<const T>(x.data(), tr, d),
                         plan.view(), w, sy::make_view<const T>(dy.data(), tr, d),
                         sy::make_view<float>(o.dx.data(), tr, d), g.view(pb, 0, el),
                         {o.dw.data(), o.dw.size()}, {bws.data(), bws.size()});
  t_paused = true;
  o.g = g.w1;
  o.g.insert(o.g.end(), g.w2.begin(), g.w2.end());
  t_paused = false;
  return o;
}

//! Every rank's outputs for N ranks.
template <class Local>
std::vector<rank_out> run_all(int n, index_t peer_rows, const Local& local, bool caller_ws,
                              long long* bytes = nullptr) {
  ep::problem pb;
  pb.ranks = n;
  pb.seed = sy::test::base_seed() + 9100 + static_cast<std::uint64_t>(n);
  std::vector<rank_out> out(static_cast<std::size_t>(n));
  sy::parallel::thread_group group(n);
  if (bytes != nullptr) {
    g_bytes = 0;
    g_counting = true;
  }
  sy::parallel::run_ranks(group, [&](const thread_comm& comm) {
    out[static_cast<std::size_t>(comm.rank())] = run_rank(comm, pb, peer_rows, local, caller_ws);
  });
  if (bytes != nullptr) {
    g_counting = false;
    *bytes = g_bytes.load();
  }
  return out;
}

template <class U>
bool same(const std::vector<U>& a, const std::vector<U>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(U)) == 0;
}

template <class Local>
void check_local(const Local& local, const char* name) {
  for (int n : {1, 3}) {
    BOOST_TEST_CONTEXT(name << ", N = " << n) {
      // The queries count the row buffers: N·peer_rows rows of d elements, several times.
      const auto small = run_all(n, 16, local, true);
      const auto large = run_all(n, 2048, local, true);
      const std::size_t grown = static_cast<std::size_t>(n) * (2048 - 16) * 8 * sizeof(float);
      for (std::size_t r = 0; r < small.size(); ++r) {
        BOOST_TEST(large[r].forward_bytes >= small[r].forward_bytes + 4 * grown);
        BOOST_TEST(large[r].backward_bytes >= small[r].backward_bytes + 4 * grown);
      }
      // A poisoned caller workspace gives the bits of the layer's own.
      const auto own = run_all(n, 2048, local, false);
      for (std::size_t r = 0; r < own.size(); ++r) {
        BOOST_TEST(same(large[r].y, own[r].y), "y, rank " << r);
        BOOST_TEST(same(large[r].dx, own[r].dx), "dx, rank " << r);
        BOOST_TEST(same(large[r].dw, own[r].dw), "d_weights, rank " << r);
        BOOST_TEST(same(large[r].g, own[r].g), "expert grads, rank " << r);
        BOOST_TEST(same(large[r].dropped, own[r].dropped), "dropped, rank " << r);
      }
      // With the caller's workspace, what is still allocated does not grow with peer_rows
      // (each size once to warm up first).
      long long b_small = 0, b_large = 0;
      (void)run_all(n, 16, local, true, &b_small);
      (void)run_all(n, 2048, local, true, &b_large);
      (void)run_all(n, 16, local, true, &b_small);
      (void)run_all(n, 2048, local, true, &b_large);
      BOOST_TEST(b_large < b_small + static_cast<long long>(grown) / 8,
                 "bytes allocated: " << b_small << " at peer_rows 16, " << b_large
                                     << " at 2048");
    }
  }
}

}  // namespace

BOOST_AUTO_TEST_CASE(static_bound_row_buffers_come_from_the_workspace) {
  check_local(sy::dispatch::sorted_grouped{}, "sorted_grouped");
  sy::dispatch::padded_capacity pc;
  pc.expert_capacity = 2;
  check_local(pc, "padded_capacity (C = 2)");
}
