// SPDX-License-Identifier: Apache-2.0
// Expert parallelism on the CUDA backend (backend/cuda/expert_parallel.cuh): N = 1, 2, 3, 4
// ranks as threads of one process on device 0 (parallel::cuda_thread_comm, each rank its own
// stream and cuBLAS handle) and N = 1 on a real NCCL communicator (nccl_local_group({0})),
// TopK / TopP / AdaptiveGating x float / bfloat16, compared with the single-process CUDA layer
// (dispatch::sorted_grouped) holding all E experts:
//
// (a) "plan" cases, BITWISE: the reference runs forward_experts / backward_experts on the
//     concatenation x_0 ++ x_1 ++ ... with the concatenated plan (the router's, on the
//     concatenation); rank r runs them on x_r with its rows of that plan and its E/N experts.
//     Each expert then computes exactly the same rows in the same order ([rank 0 | rank 1 |
//     ...]) with the same cuBLAS calls (same m, n, k per expert; float: one grouped GEMM per
//     projection, bfloat16: one cublasGemmEx per expert), and the combines are the same
//     functors, so y, dx, d_weights and the owned experts' weight gradients must match bit for
//     bit. What could break it on a GPU: cuBLAS choosing another kernel for the same sizes
//     because the row blocks start at other addresses (alignment heuristics). The failure
//     message says "NOT BITWISE" and gives the first differing index, both values and whether
//     the tensor is within the dtype tolerance; if only that happens, switch `bitwise` below
//     to false (the tolerance check stays).
// (b) "full" cases, TOLERANCE: forward + backward with the router on each rank's own batch,
//     against the single-process layer on x_r alone (the same router output; the experts'
//     GEMMs see other row sets there, so only the dtype tolerance is promised): y, dx, router
//     gradients.
// Plus: static_bound (its exchange planned on the device, in the caller's workspace of the
// queried size) with a bound no rank reaches (bitwise equal to eager's reference) and
// with peer_rows = 1 (the drops counted exactly as the host planning rule says; tokens that
// kept every pair within the tolerance), a plan that sends every pair to rank 0's experts (the
// other ranks receive nothing), and a host communicator (thread_comm) rejected with
// memory_space_error on every rank, and a NaN in one rank's x (non_finite_error) or a
// malformed plan on one rank (range_error) rejected on every rank, under eager and
// static_bound. Every output is poisoned before a run. Comparisons run on the
// main thread after the ranks joined. Skipped without a device (cuda_test_main.cu).
#include <boost/test/unit_test.hpp>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <switchyard/backend/cuda.cuh>
#include <switchyard/parallel/cuda_thread_comm.cuh>
#include <switchyard/parallel/expert_parallel.hpp>
#include <switchyard/parallel/thread_comm.hpp>
#include <switchyard/switchyard.hpp>
#ifdef SWITCHYARD_TEST_HAS_NCCL
#include <switchyard/parallel/nccl_comm.hpp>
#endif

#include "support/compare.cuh"
#include "support/device_mirror.cuh"
#include "support/random.hpp"

namespace sy = switchyard;
using sy::index_t;
namespace gpu = sy::test::gpu;

namespace {

//! Assert (a) bitwise; false: the dtype tolerance only (see the file comment).
constexpr bool bitwise = true;

using swiglu = sy::activation::swiglu;

struct problem {
  int ranks = 1;
  index_t experts_per_rank = 2;
  index_t d = 32, d_ff = 16;
  std::uint64_t seed = 1;
  [[nodiscard]] index_t experts() const { return experts_per_rank * ranks; }
  [[nodiscard]] index_t p() const { return 2 * d_ff; }
  [[nodiscard]] index_t tokens(int r) const { return 3 + (r * 5 + 3) % 7; }  // uneven, [3, 9]
  [[nodiscard]] index_t offset(int r) const {
    index_t o = 0;
    for (int s = 0; s < r; ++s) o += tokens(s);
    return o;
  }
  [[nodiscard]] index_t total() const { return offset(ranks); }
};

template <sy::ElementType T>
std::vector<T> as(const std::vector<float>& v) {
  std::vector<T> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = sy::from_float<T>(v[i]);
  return out;
}

template <class U>
std::vector<U> slice(const std::vector<U>& v, index_t begin, index_t n) {
  return {v.begin() + begin, v.begin() + begin + n};
}

//! Everything of one problem on the host, the same on every rank (a function of the seed).
template <class Router, sy::ElementType T>
struct host_data {
  problem pb;
  std::vector<T> x, dy, w1, b1, w2, b2;
  std::vector<float> rw, dx0, g0w1, g0b1, g0w2, g0b2, rg0;

  explicit host_data(const problem& pb_) : pb(pb_) {
    std::mt19937_64 g(sy::test::base_seed() + pb.seed * 7919);
    const index_t n = pb.total(), d = pb.d, e = pb.experts(), p = pb.p(), f = pb.d_ff;
    x = as<T>(sy::test::normal(g, static_cast<std::size_t>(n * d)));
    dy = as<T>(sy::test::normal(g, static_cast<std::size_t>(n * d)));
    w1 = as<T>(sy::test::normal(g, static_cast<std::size_t>(e * p * d), 0.3f));
    b1 = as<T>(sy::test::normal(g, static_cast<std::size_t>(e * p), 0.1f));
    w2 = as<T>(sy::test::normal(g, static_cast<std::size_t>(e * d * f), 0.3f));
    b2 = as<T>(sy::test::normal(g, static_cast<std::size_t>(e * d), 0.1f));
    rw = sy::test::normal(g, static_cast<std::size_t>(e * d), 0.8f);
    dx0 = sy::test::normal(g, static_cast<std::size_t>(n * d));
    g0w1 = sy::test::normal(g, static_cast<std::size_t>(e * p * d));
    g0b1 = sy::test::normal(g, static_cast<std::size_t>(e * p));
    g0w2 = sy::test::normal(g, static_cast<std::size_t>(e * d * f));
    g0b2 = sy::test::normal(g, static_cast<std::size_t>(e * d));
    rg0 = sy::test::normal(g, static_cast<std::size_t>(e * d));
  }

  //! Device weights of experts [first, first + n).
  sy::expert_weights<T> weights(const gpu::device_mirror& m, index_t first, index_t n) const {
    const index_t p = pb.p(), d = pb.d, f = pb.d_ff;
    sy::expert_weights<T> w;
    w.w1 = sy::make_view<const T>(
        m.copy(w1.data() + first * p * d, static_cast<std::size_t>(n * p * d)), n, p, d);
    w.b1 = sy::make_view<const T>(m.copy(b1.data() + first * p, static_cast<std::size_t>(n * p)), n,
                                  p);
    w.w2 = sy::make_view<const T>(
        m.copy(w2.data() + first * d * f, static_cast<std::size_t>(n * d * f)), n, d, f);
    w.b2 = sy::make_view<const T>(m.copy(b2.data() + first * d, static_cast<std::size_t>(n * d)), n,
                                  d);
    return w;
  }
};

template <class Router>
Router make_router() {
  if constexpr (std::is_same_v<Router, sy::routers::TopK>)
    return Router{.k = 2};
  else if constexpr (std::is_same_v<Router, sy::routers::TopP>)
    return Router{.p = 0.5f};
  else
    return Router{.threshold = 0.2f};
}

//! Expert grads on the device set to the base values of experts [first, first + n).
template <class Router, sy::ElementType T>
gpu::device_expert_grads make_grads(const host_data<Router, T>& h, index_t first, index_t n,
                                    cudaStream_t s) {
  const problem& pb = h.pb;
  const index_t p = pb.p(), d = pb.d, f = pb.d_ff;
  gpu::device_expert_grads g(n, p, d, f, s);
  g.w1.set(slice(h.g0w1, first * p * d, n * p * d));
  g.b1.set(slice(h.g0b1, first * p, n * p));
  g.w2.set(slice(h.g0w2, first * d * f, n * d * f));
  g.b2.set(slice(h.g0b2, first * d, n * d));
  return g;
}

//! What one rank (or the reference) produced, on the host.
struct outputs {
  std::vector<float> y;  //!< as float (T converted exactly)
  std::vector<float> dx, dw, gw1, gb1, gw2, gb2, rg;
  std::vector<index_t> dropped;
  std::string error;  //!< an exception's type and text, if one was thrown
};

template <sy::ElementType T>
std::vector<float> to_float(const std::vector<T>& v) {
  std::vector<float> out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = sy::to_float(v[i]);
  return out;
}

//! A plan given on the host, rows [begin, begin + n) of it.
sy::routing::routing_plan plan_rows(const sy::routing::routing_plan& p, index_t begin, index_t n) {
  sy::routing::routing_plan r;
  r.num_tokens = n;
  r.width = p.width;
  r.num_experts = p.num_experts;
  r.expert_ids = slice(p.expert_ids, begin * p.width, n * p.width);
  r.weights = slice(p.weights, begin * p.width, n * p.width);
  r.counts = slice(p.counts, begin, n);
  return r;
}

//! forward_experts + backward_experts of `layer` with experts [first, first + n) on rows
//! [begin, begin + tokens) of x, dy, dx0 and `plan` (its rows already).
template <class Layer, class Router, sy::ElementType T>
outputs run_plan(const Layer& layer, const sy::cuda::context& ctx, const host_data<Router, T>& h,
                 const sy::routing::routing_plan& plan, index_t begin, index_t tokens,
                 index_t first, index_t n, bool with_workspace = false) {
  const cudaStream_t s = ctx.stream;
  const index_t d = h.pb.d, width = plan.width;
  gpu::device_mirror m(s);
  const sy::expert_weights<T> w = h.weights(m, first, n);
  const auto x = sy::make_view<const T>(
      m.copy(h.x.data() + begin * d, static_cast<std::size_t>(tokens * d)), tokens, d);
  const auto dy = sy::make_view<const T>(
      m.copy(h.dy.data() + begin * d, static_cast<std::size_t>(tokens * d)), tokens, d);
  const gpu::device_plan dp(plan, s);
  gpu::device_output<T> y(static_cast<std::size_t>(tokens * d), s);
  gpu::device_output<index_t> dropped(static_cast<std::size_t>(plan.num_experts), s);
  gpu::device_output<float> dx(static_cast<std::size_t>(tokens * d), s),
      dw(static_cast<std::size_t>(tokens * width), s);
  dx.set(slice(h.dx0, begin * d, tokens * d));
  gpu::device_expert_grads g = make_grads(h, first, n, s);
  outputs o;
  // with_workspace: the caller's workspaces of the queried sizes (static_bound then carves
  // every exchange buffer from them and allocates nothing), poisoned first.
  sy::cuda::device_array<std::byte> fws, bws;
  if (with_workspace) {
    fws = sy::cuda::device_array<std::byte>(layer.experts_workspace_size(ctx, tokens, width, w), s);
    bws = sy::cuda::device_array<std::byte>(
        layer.experts_backward_workspace_size(ctx, tokens, width, w), s);
    for (auto* a : {&fws, &bws}) {
      if (a->size() > 0)
        sy::cuda::check(cudaMemsetAsync(a->data(), 0x7f, a->size(), s), "cudaMemsetAsync");
    }
  }
  layer.forward_experts(ctx, x, dp.view(), w, y.view(tokens, d), dropped.span(), fws.bytes());
  layer.backward_experts(ctx, x, dp.view(), w, dy, dx.view(tokens, d), g.view(), dw.span(),
                         bws.bytes());
  o.y = to_float(y.download());
  o.dropped = dropped.download();
  o.dx = dx.download();
  o.dw = dw.download();
  o.gw1 = g.w1.download();
  o.gb1 = g.b1.download();
  o.gw2 = g.w2.download();
  o.gb2 = g.b2.download();
  return o;
}

//! forward + backward with the router, rows [begin, begin + tokens), experts [first, first + n).
template <class Layer, class Router, sy::ElementType T>
outputs run_full(const Layer& layer, const sy::cuda::context& ctx, const host_data<Router, T>& h,
                 index_t begin, index_t tokens, index_t first, index_t n) {
  const cudaStream_t s = ctx.stream;
  const index_t d = h.pb.d, e = h.pb.experts();
  gpu::device_mirror m(s);
  const sy::expert_weights<T> w = h.weights(m, first, n);
  const auto x = sy::make_view<const T>(
      m.copy(h.x.data() + begin * d, static_cast<std::size_t>(tokens * d)), tokens, d);
  const auto dy = sy::make_view<const T>(
      m.copy(h.dy.data() + begin * d, static_cast<std::size_t>(tokens * d)), tokens, d);
  const typename Layer::router_params rp{
      sy::make_view<const float>(m.copy(h.rw.data(), h.rw.size()), e, d)};
  const index_t width = layer.router.width(rp);
  gpu::device_state<typename Layer::losses_type> st(tokens, width, e, s);
  gpu::device_output<T> y(static_cast<std::size_t>(tokens * d), s);
  gpu::device_output<float> dx(static_cast<std::size_t>(tokens * d), s), rg(h.rg0.size(), s);
  dx.set(slice(h.dx0, begin * d, tokens * d));
  rg.set(h.rg0);
  gpu::device_expert_grads g = make_grads(h, first, n, s);
  const typename Layer::router_grads rgv{rg.view(e, d)};
  layer.forward(ctx, x, rp, w, y.view(tokens, d), st.view());
  layer.backward(ctx, x, rp, w, st.view(), dy, typename Layer::losses_type{}, dx.view(tokens, d),
                 g.view(), rgv);
  outputs o;
  o.y = to_float(y.download());
  o.dx = dx.download();
  o.rg = rg.download();
  return o;
}

//! "tensor (rank r): first differing index i: got a, want b" or "" when bitwise equal.
std::string first_difference(const std::vector<float>& got, const std::vector<float>& want) {
  if (got.size() != want.size()) {
    return sy::detail::concat("sizes differ: ", got.size(), " vs ", want.size());
  }
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (std::memcmp(&got[i], &want[i], sizeof(float)) != 0) {
      std::ostringstream s;
      s.precision(9);
      s << "first differing index " << i << ": got " << got[i] << ", want " << want[i];
      return s.str();
    }
  }
  return {};
}

//! Within the tolerance |g - w| <= rel·|w| + abs·rms(w)?
bool within(const std::vector<float>& got, const std::vector<float>& want, gpu::tolerance tol) {
  if (got.size() != want.size()) return false;
  double ss = 0.0;
  for (float v : want) ss += static_cast<double>(v) * v;
  const double rms = want.empty() ? 0.0 : std::sqrt(ss / static_cast<double>(want.size()));
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double err = std::abs(static_cast<double>(got[i]) - want[i]);
    if (!(err <= tol.rel * std::abs(static_cast<double>(want[i])) + tol.abs * rms)) return false;
  }
  return true;
}

//! The bitwise check of (a), with a message precise enough to act on from a log.
void expect_bitwise(const std::string& what, const std::vector<float>& got,
                    const std::vector<float>& want, gpu::tolerance tol) {
  const std::string diff = first_difference(got, want);
  if (diff.empty()) return;
  const bool close = within(got, want, tol);
  if (bitwise) {
    BOOST_ERROR(what << " NOT BITWISE equal to the single-process layer: " << diff
                     << (close ? " (but within the dtype tolerance: cuBLAS kernel choice?)"
                               : " (and OUT of the dtype tolerance)"));
  } else if (!close) {
    BOOST_ERROR(what << " out of the dtype tolerance: " << diff);
  }
}

//! Experts [first, first + n) of a [E, ...] gradient array with `per` elements per expert.
std::vector<float> experts_of(const std::vector<float>& v, index_t first, index_t n, index_t per) {
  return slice(v, first * per, n * per);
}

//! Rank r's outputs against its rows of the reference's (`width` plan slots): y, dx,
//! d_weights and its experts' weight gradients, bitwise (see expect_bitwise).
void expect_rank_bitwise(const std::string& who, const outputs& o, const outputs& want,
                         const problem& pb, int r, index_t width, gpu::tolerance ft,
                         gpu::tolerance bt) {
  const index_t off = pb.offset(r), tk = pb.tokens(r), epr = pb.experts_per_rank, d = pb.d,
                p = pb.p(), f = pb.d_ff;
  expect_bitwise(who + "y", o.y, slice(want.y, off * d, tk * d), ft);
  expect_bitwise(who + "dx", o.dx, slice(want.dx, off * d, tk * d), bt);
  expect_bitwise(who + "d_weights", o.dw, slice(want.dw, off * width, tk * width), bt);
  expect_bitwise(who + "grads.w1", o.gw1, experts_of(want.gw1, r * epr, epr, p * d), bt);
  expect_bitwise(who + "grads.b1", o.gb1, experts_of(want.gb1, r * epr, epr, p), bt);
  expect_bitwise(who + "grads.w2", o.gw2, experts_of(want.gw2, r * epr, epr, d * f), bt);
  expect_bitwise(who + "grads.b2", o.gb2, experts_of(want.gb2, r * epr, epr, d), bt);
}

template <class Router>
using ref_layer = sy::MoELayer<Router, swiglu, sy::dispatch::sorted_grouped>;
template <class Router, class Comm, class Capacity = sy::parallel::eager>
using ep_layer = sy::MoELayer<Router, swiglu, sy::parallel::ExpertParallel<Comm, Capacity>>;

//! The concatenated reference plan (the router's on the concatenation) and, for `edge`, a
//! plan sending every pair to rank 0's experts instead.
template <class Router, sy::ElementType T>
sy::routing::routing_plan reference_plan(const sy::cuda::context& ctx,
                                         const host_data<Router, T>& h, bool edge) {
  const problem& pb = h.pb;
  const index_t n = pb.total(), d = pb.d, e = pb.experts();
  const ref_layer<Router> layer{.router = make_router<Router>()};
  gpu::device_mirror m(ctx.stream);
  const sy::expert_weights<T> w = h.weights(m, 0, e);
  const auto x = sy::make_view<const T>(m.copy(h.x.data(), h.x.size()), n, d);
  const typename ref_layer<Router>::router_params rp{
      sy::make_view<const float>(m.copy(h.rw.data(), h.rw.size()), e, d)};
  const index_t width = layer.router.width(rp);
  gpu::device_state<typename ref_layer<Router>::losses_type> st(n, width, e, ctx.stream);
  gpu::device_output<T> y(static_cast<std::size_t>(n * d), ctx.stream);
  layer.forward(ctx, x, rp, w, y.view(n, d), st.view());
  sy::routing::routing_plan plan = st.download().plan;
  if (edge) {  // every token: min(width, E/N) slots over rank 0's experts
    const index_t c = std::min(width, pb.experts_per_rank);
    for (index_t t = 0; t < n; ++t) {
      plan.counts[static_cast<std::size_t>(t)] = static_cast<std::int32_t>(c);
      for (index_t j = 0; j < width; ++j) {
        const std::size_t k = static_cast<std::size_t>(t * width + j);
        plan.expert_ids[k] = j < c ? static_cast<std::int32_t>((t + j) % pb.experts_per_rank) : -1;
        plan.weights[k] = j < c ? 0.25f + 0.5f * static_cast<float>((t + j) % 3) / 3.0f : 0.0f;
      }
    }
  }
  return plan;
}

//! The host planning rule of static_bound for rank r's plan rows: dropped pairs per expert.
std::vector<index_t> expected_drops(const sy::routing::routing_plan& p, index_t experts,
                                    index_t per_rank, int ranks, index_t peer_rows) {
  std::vector<index_t> dropped(static_cast<std::size_t>(experts), 0),
      claimed(static_cast<std::size_t>(ranks), 0);
  for (index_t t = 0; t < p.num_tokens; ++t) {
    for (index_t j = 0; j < p.counts[static_cast<std::size_t>(t)]; ++j) {
      const index_t e = p.expert_ids[static_cast<std::size_t>(t * p.width + j)];
      const std::size_t dst = static_cast<std::size_t>(e / per_rank);
      if (claimed[dst] >= peer_rows)
        ++dropped[static_cast<std::size_t>(e)];
      else
        ++claimed[dst];
    }
  }
  return dropped;
}

//! Which tokens of `p` lost a pair under the rule above.
std::vector<char> tokens_with_drops(const sy::routing::routing_plan& p, index_t per_rank, int ranks,
                                    index_t peer_rows) {
  std::vector<char> out(static_cast<std::size_t>(p.num_tokens), 0);
  std::vector<index_t> claimed(static_cast<std::size_t>(ranks), 0);
  for (index_t t = 0; t < p.num_tokens; ++t) {
    for (index_t j = 0; j < p.counts[static_cast<std::size_t>(t)]; ++j) {
      const std::size_t dst = static_cast<std::size_t>(
          p.expert_ids[static_cast<std::size_t>(t * p.width + j)] / per_rank);
      if (claimed[dst] >= peer_rows)
        out[static_cast<std::size_t>(t)] = 1;
      else
        ++claimed[dst];
    }
  }
  return out;
}

enum class capacity_kind { eager, static_loose, static_tight };

//! Runs the (a) cases for N ranks on cuda_thread_comm and checks them.
template <class Router, sy::ElementType T>
void plan_cases(int ranks, bool edge, capacity_kind cap, std::uint64_t seed) {
  const problem pb{.ranks = ranks, .seed = seed};
  const host_data<Router, T> h(pb);
  const index_t e = pb.experts(), epr = pb.experts_per_rank, d = pb.d, p = pb.p();
  const sy::cuda::stream_context main_ctx(4096, 0);
  const sy::routing::routing_plan plan = reference_plan(main_ctx.get(), h, edge);
  const ref_layer<Router> ref{.router = make_router<Router>()};
  const outputs want = run_plan(ref, main_ctx.get(), h, plan, 0, pb.total(), 0, e);
  const index_t peer_rows = cap == capacity_kind::static_loose   ? pb.total() * plan.width
                            : cap == capacity_kind::static_tight ? 1
                                                                 : -1;

  std::vector<outputs> got(static_cast<std::size_t>(ranks));
  sy::parallel::cuda_thread_group group(ranks, 0);
  sy::parallel::run_cuda_ranks(group, [&](const sy::parallel::cuda_thread_comm& comm) {
    const int r = comm.rank();
    const sy::cuda::stream_context ctx(4096, 0);
    const sy::routing::routing_plan mine = plan_rows(plan, pb.offset(r), pb.tokens(r));
    outputs& o = got[static_cast<std::size_t>(r)];
    if (peer_rows < 0) {
      const ep_layer<Router, sy::parallel::cuda_thread_comm> layer{.router = make_router<Router>(),
                                                                   .dispatch = {.comm = &comm}};
      o = run_plan(layer, ctx.get(), h, mine, pb.offset(r), pb.tokens(r), r * epr, epr);
    } else {
      const ep_layer<Router, sy::parallel::cuda_thread_comm, sy::parallel::static_bound> layer{
          .router = make_router<Router>(),
          .dispatch = {.comm = &comm, .capacity = {.peer_rows = peer_rows}}};
      o = run_plan(layer, ctx.get(), h, mine, pb.offset(r), pb.tokens(r), r * epr, epr,
                   /*with_workspace=*/true);
    }
  });

  const gpu::tolerance ft = gpu::forward_tolerance<T>(), bt = gpu::backward_tolerance<T>();
  for (int r = 0; r < ranks; ++r) {
    const outputs& o = got[static_cast<std::size_t>(r)];
    const index_t off = pb.offset(r), tk = pb.tokens(r), w = plan.width;
    const std::string who = sy::detail::concat(
        sy::detail::concat("N = ", ranks, ", rank ", r,
                           ", T = ", sizeof(T) == 4 ? "float" : "bfloat16", ", ",
                           edge ? "edge plan (all to rank 0)" : "router plan", ", "),
        cap == capacity_kind::eager          ? "eager"
        : cap == capacity_kind::static_loose ? "static_bound (loose)"
                                             : "static_bound (peer_rows 1)",
        ": ");
    if (cap == capacity_kind::static_tight) {
      const sy::routing::routing_plan mine = plan_rows(plan, off, tk);
      const std::vector<index_t> drops = expected_drops(mine, e, epr, ranks, 1);
      BOOST_CHECK_MESSAGE(o.dropped == drops,
                          who << "dropped counts differ from the planning rule");
      const std::vector<char> lost = tokens_with_drops(mine, epr, ranks, 1);
      for (index_t t = 0; t < tk; ++t) {
        // Tokens that kept every pair: within the tolerance of the reference (not bitwise:
        // the experts computed fewer rows than the reference's, so other GEMM shapes).
        if (lost[static_cast<std::size_t>(t)]) continue;
        gpu::expect_close(who + sy::detail::concat("y row ", t), slice(o.y, t * d, d),
                          slice(want.y, (off + t) * d, d), ft);
      }
      continue;
    }
    expect_rank_bitwise(who, o, want, pb, r, w, ft, bt);
    BOOST_CHECK_MESSAGE(
        std::all_of(o.dropped.begin(), o.dropped.end(), [](index_t v) { return v == 0; }),
        who << "dropped must be all 0 (nothing over the bound)");
  }
}

//! (b): forward + backward with the router on each rank's batch, against the single-process
//! layer on that batch alone (tolerance).
template <class Router, sy::ElementType T>
void full_cases(int ranks, std::uint64_t seed) {
  const problem pb{.ranks = ranks, .seed = seed};
  const host_data<Router, T> h(pb);
  const index_t e = pb.experts(), epr = pb.experts_per_rank, d = pb.d;
  const ref_layer<Router> ref{.router = make_router<Router>()};
  std::vector<outputs> want(static_cast<std::size_t>(ranks)), got(static_cast<std::size_t>(ranks));
  {
    const sy::cuda::stream_context main_ctx(4096, 0);
    for (int r = 0; r < ranks; ++r)
      want[static_cast<std::size_t>(r)] =
          run_full(ref, main_ctx.get(), h, pb.offset(r), pb.tokens(r), 0, e);
  }
  sy::parallel::cuda_thread_group group(ranks, 0);
  sy::parallel::run_cuda_ranks(group, [&](const sy::parallel::cuda_thread_comm& comm) {
    const int r = comm.rank();
    const sy::cuda::stream_context ctx(4096, 0);
    const ep_layer<Router, sy::parallel::cuda_thread_comm> layer{.router = make_router<Router>(),
                                                                 .dispatch = {.comm = &comm}};
    got[static_cast<std::size_t>(r)] =
        run_full(layer, ctx.get(), h, pb.offset(r), pb.tokens(r), r * epr, epr);
  });
  for (int r = 0; r < ranks; ++r) {
    const std::string who =
        sy::detail::concat("full forward + backward, N = ", ranks, ", rank ", r,
                           ", T = ", sizeof(T) == 4 ? "float" : "bfloat16", ": ");
    const outputs& o = got[static_cast<std::size_t>(r)];
    const outputs& w = want[static_cast<std::size_t>(r)];
    (void)d;
    gpu::expect_close(who + "y", o.y, w.y, gpu::forward_tolerance<T>());
    gpu::expect_close(who + "dx", o.dx, w.dx, gpu::backward_tolerance<T>());
    gpu::expect_close(who + "router grads", o.rg, w.rg, gpu::backward_tolerance<T>());
  }
}

// ---- static_bound with a local padded_capacity (the capturable combination) -----------------

template <class Router>
using padded_ref_layer = sy::MoELayer<Router, swiglu, sy::dispatch::padded_capacity>;
template <class Router, class Comm>
using padded_ep_layer =
    sy::MoELayer<Router, swiglu,
                 sy::parallel::ExpertParallel<Comm, sy::parallel::static_bound,
                                              sy::dispatch::padded_capacity>>;

//! padded_capacity's rule on the concatenated plan with an absolute capacity `cap`: per global
//! expert the first `cap` pairs in token order are kept. The drops of rows [begin, begin + n),
//! per expert (what the rank holding those rows reports).
std::vector<index_t> padded_drops(const sy::routing::routing_plan& p, index_t begin, index_t n,
                                  index_t cap) {
  std::vector<index_t> seen(static_cast<std::size_t>(p.num_experts), 0),
      dropped(static_cast<std::size_t>(p.num_experts), 0);
  for (index_t t = 0; t < begin + n; ++t) {
    for (index_t j = 0; j < p.counts[static_cast<std::size_t>(t)]; ++j) {
      const std::size_t e =
          static_cast<std::size_t>(p.expert_ids[static_cast<std::size_t>(t * p.width + j)]);
      if (seen[e]++ >= cap && t >= begin) ++dropped[e];
    }
  }
  return dropped;
}

//! ExpertParallel<cuda_thread_comm, static_bound (loose), padded_capacity{expert_capacity =
//! cap, drop}> on N ranks against the single-process padded_capacity layer on the
//! concatenation (bitwise, see the file comment), and the drops each rank reports.
template <sy::ElementType T>
void padded_cases(int ranks, index_t cap, sy::dispatch::dropped_output drop, std::uint64_t seed) {
  using Router = sy::routers::TopK;
  const problem pb{.ranks = ranks, .seed = seed};
  const host_data<Router, T> h(pb);
  const index_t e = pb.experts(), epr = pb.experts_per_rank, p = pb.p();
  const sy::dispatch::padded_capacity pc{.drop = drop, .expert_capacity = cap};
  const sy::cuda::stream_context main_ctx(4096, 0);
  const sy::routing::routing_plan plan = reference_plan(main_ctx.get(), h, false);
  const padded_ref_layer<Router> ref{.router = make_router<Router>(), .dispatch = pc};
  const outputs want = run_plan(ref, main_ctx.get(), h, plan, 0, pb.total(), 0, e, true);
  const index_t peer_rows = pb.total() * plan.width;  // nobody reaches it

  std::vector<outputs> got(static_cast<std::size_t>(ranks));
  sy::parallel::cuda_thread_group group(ranks, 0);
  sy::parallel::run_cuda_ranks(group, [&](const sy::parallel::cuda_thread_comm& comm) {
    const int r = comm.rank();
    const sy::cuda::stream_context ctx(4096, 0);
    const sy::routing::routing_plan mine = plan_rows(plan, pb.offset(r), pb.tokens(r));
    const padded_ep_layer<Router, sy::parallel::cuda_thread_comm> layer{
        .router = make_router<Router>(),
        .dispatch = {.comm = &comm, .capacity = {.peer_rows = peer_rows}, .local = pc}};
    got[static_cast<std::size_t>(r)] =
        run_plan(layer, ctx.get(), h, mine, pb.offset(r), pb.tokens(r), r * epr, epr, true);
  });

  const gpu::tolerance ft = gpu::forward_tolerance<T>(), bt = gpu::backward_tolerance<T>();
  index_t total_drops = 0;
  for (int r = 0; r < ranks; ++r) {
    const outputs& o = got[static_cast<std::size_t>(r)];
    const index_t off = pb.offset(r), tk = pb.tokens(r), w = plan.width;
    const std::string who = sy::detail::concat(
        "static_bound + padded_capacity (C = ", cap,
        drop == sy::dispatch::dropped_output::zero ? ", drop zero" : ", scaled_input",
        "), N = ", ranks, ", rank ", r, ", T = ", sizeof(T) == 4 ? "float" : "bfloat16", ": ");
    const std::vector<index_t> drops = padded_drops(plan, off, tk, cap);
    for (index_t v : drops) total_drops += v;
    BOOST_CHECK_MESSAGE(o.dropped == drops,
                        who << "dropped differs from padded_capacity's rule on the concatenation");
    expect_rank_bitwise(who, o, want, pb, r, w, ft, bt);
  }
  // The reference's own count (its dropped output) is the sum of the ranks'.
  index_t want_total = 0;
  for (index_t v : want.dropped) want_total += v;
  BOOST_CHECK_MESSAGE(total_drops == want_total, "padded_capacity C = " << cap << ", N = " << ranks
                                                   << ": the ranks' drops sum to " << total_drops
                                                   << ", the reference dropped " << want_total);
  if (cap <= 2) BOOST_CHECK_MESSAGE(want_total > 0, "C = " << cap << " must drop something");
}

}  // namespace

BOOST_AUTO_TEST_SUITE(cuda_expert_parallel)

// The communicator alone first (a failure here explains any below): N = 3 ranks,
// all_to_all of 5-byte blocks and all_to_all_v with rank-dependent sizes (zero included) and
// gaps, received bytes compared with what the host expects (receive buffers poisoned first);
// all_gather and all_agree.
BOOST_AUTO_TEST_CASE(cuda_thread_comm_collectives) {
  constexpr int n = 3;
  constexpr index_t block = 5;
  const auto byte_of = [](int src, int dst, index_t i) {
    return static_cast<unsigned char>(1 + (src * 31 + dst * 7 + i * 3) % 200);
  };
  // all_to_all_v: src sends dst (src + dst) % 3 · 4 bytes; received at dst's offset src · 16.
  const auto v_bytes = [](int src, int dst) { return static_cast<index_t>((src + dst) % 3 * 4); };
  std::vector<std::string> errors(n);
  sy::parallel::cuda_thread_group group(n, 0);
  sy::parallel::run_cuda_ranks(group, [&](const sy::parallel::cuda_thread_comm& comm) {
    const int r = comm.rank();
    const sy::cuda::stream_context ctx(16, 0);
    std::string& err = errors[static_cast<std::size_t>(r)];
    std::vector<unsigned char> send(n * block), vsend(n * 16, 0);
    std::vector<index_t> sb(n), sd(n), rb(n), rd(n);
    for (int p = 0; p < n; ++p) {
      for (index_t i = 0; i < block; ++i)
        send[static_cast<std::size_t>(p * block + i)] = byte_of(r, p, i);
      sb[static_cast<std::size_t>(p)] = v_bytes(r, p);
      sd[static_cast<std::size_t>(p)] = p * 16;
      rb[static_cast<std::size_t>(p)] = v_bytes(p, r);
      rd[static_cast<std::size_t>(p)] = p * 16 + 2;  // a gap of 2 bytes before each block
      for (index_t i = 0; i < v_bytes(r, p); ++i)
        vsend[static_cast<std::size_t>(p * 16 + i)] = byte_of(r, p, i + 50);
    }
    gpu::device_output<unsigned char> ds(send.size(), ctx.stream()), dr(send.size(), ctx.stream()),
        vs(vsend.size(), ctx.stream()), vr(vsend.size() + 2, ctx.stream());
    ds.set(send);
    vs.set(vsend);
    comm.all_to_all(ds.a.data(), dr.a.data(), block, ctx.stream());
    comm.all_to_all_v(vs.a.data(), sb.data(), sd.data(), vr.a.data(), rb.data(), rd.data(),
                      ctx.stream());
    const std::vector<unsigned char> got = dr.download(), vgot = vr.download();
    for (int p = 0; p < n && err.empty(); ++p) {
      for (index_t i = 0; i < block; ++i) {
        if (got[static_cast<std::size_t>(p * block + i)] != byte_of(p, r, i)) {
          err = sy::detail::concat("all_to_all: rank ", r, " block from rank ", p, " byte ", i,
                                   ": got ", int{got[static_cast<std::size_t>(p * block + i)]},
                                   ", want ", int{byte_of(p, r, i)});
          break;
        }
      }
      for (index_t i = 0; i < v_bytes(p, r) && err.empty(); ++i) {
        const unsigned char g = vgot[static_cast<std::size_t>(p * 16 + 2 + i)];
        if (g != byte_of(p, r, i + 50)) {
          err = sy::detail::concat("all_to_all_v: rank ", r, " from rank ", p, " byte ", i,
                                   ": got ", int{g}, ", want ", int{byte_of(p, r, i + 50)});
        }
      }
      if (err.empty() && vgot[static_cast<std::size_t>(p * 16)] != 0xFF) {
        err = sy::detail::concat("all_to_all_v: rank ", r, " wrote into the gap before rank ", p,
                                 "'s block");
      }
    }
    std::vector<index_t> all(n);
    comm.all_gather(10 + r, sy::span<index_t>(all.data(), all.size()));
    for (int p = 0; p < n; ++p) {
      if (all[static_cast<std::size_t>(p)] != 10 + p && err.empty()) {
        err = sy::detail::concat("all_gather: rank ", r, " got ", all[static_cast<std::size_t>(p)],
                                 " for rank ", p);
      }
    }
    if (!comm.all_agree(true) || comm.all_agree(r != 1)) {
      if (err.empty()) err = sy::detail::concat("all_agree: rank ", r, " got a wrong vote");
    }
  });
  for (int r = 0; r < n; ++r)
    BOOST_CHECK_MESSAGE(errors[static_cast<std::size_t>(r)].empty(),
                        errors[static_cast<std::size_t>(r)]);
}

using routers_and_types =
    std::tuple<std::pair<sy::routers::TopK, float>, std::pair<sy::routers::TopK, sy::bfloat16>,
               std::pair<sy::routers::TopP, float>, std::pair<sy::routers::TopP, sy::bfloat16>,
               std::pair<sy::routers::AdaptiveGating, float>>;

BOOST_AUTO_TEST_CASE_TEMPLATE(plan_bitwise_eager_n1_to_4, RT, routers_and_types) {
  using Router = typename RT::first_type;
  using T = typename RT::second_type;
  for (int n = 1; n <= 4; ++n)
    plan_cases<Router, T>(n, false, capacity_kind::eager, 10 + static_cast<std::uint64_t>(n));
}

BOOST_AUTO_TEST_CASE_TEMPLATE(full_tolerance_n1_to_4, RT, routers_and_types) {
  using Router = typename RT::first_type;
  using T = typename RT::second_type;
  for (int n = 1; n <= 4; ++n) full_cases<Router, T>(n, 20 + static_cast<std::uint64_t>(n));
}

BOOST_AUTO_TEST_CASE(static_bound_loose_is_eager_and_tight_counts_drops) {
  for (int n : {2, 3}) {
    plan_cases<sy::routers::TopK, float>(n, false, capacity_kind::static_loose,
                                         30 + static_cast<std::uint64_t>(n));
    plan_cases<sy::routers::TopK, sy::bfloat16>(n, false, capacity_kind::static_loose,
                                                40 + static_cast<std::uint64_t>(n));
    plan_cases<sy::routers::TopK, float>(n, false, capacity_kind::static_tight,
                                         50 + static_cast<std::uint64_t>(n));
  }
}

BOOST_AUTO_TEST_CASE(ranks_receiving_nothing) {
  plan_cases<sy::routers::TopK, float>(3, true, capacity_kind::eager, 61);
  plan_cases<sy::routers::TopK, sy::bfloat16>(4, true, capacity_kind::eager, 62);
  plan_cases<sy::routers::TopK, float>(2, true, capacity_kind::static_loose, 63);
}

BOOST_AUTO_TEST_CASE(host_communicator_rejected_on_every_rank) {
  const problem pb{.ranks = 2, .seed = 71};
  const host_data<sy::routers::TopK, float> h(pb);
  std::vector<std::string> errors(2);
  sy::parallel::thread_group group(2);
  sy::parallel::run_ranks(group, [&](const sy::parallel::thread_comm& comm) {
    const int r = comm.rank();
    const sy::cuda::stream_context ctx(4096, 0);
    const sy::routing::routing_plan plan = [&] {
      sy::routing::routing_plan p;
      p.num_tokens = pb.tokens(r);
      p.width = 1;
      p.num_experts = pb.experts();
      p.expert_ids.assign(static_cast<std::size_t>(p.num_tokens), r);
      p.weights.assign(static_cast<std::size_t>(p.num_tokens), 1.0f);
      p.counts.assign(static_cast<std::size_t>(p.num_tokens), 1);
      return p;
    }();
    const ep_layer<sy::routers::TopK, sy::parallel::thread_comm> layer{
        .router = make_router<sy::routers::TopK>(), .dispatch = {.comm = &comm}};
    try {
      (void)run_plan(layer, ctx.get(), h, plan, pb.offset(r), pb.tokens(r), r * 2, 2);
      errors[static_cast<std::size_t>(r)] = "no exception";
    } catch (const sy::memory_space_error& e) {
      errors[static_cast<std::size_t>(r)] = "";
    } catch (const std::exception& e) {
      errors[static_cast<std::size_t>(r)] = std::string("another exception: ") + e.what();
    }
  });
  for (int r = 0; r < 2; ++r) {
    BOOST_CHECK_MESSAGE(errors[static_cast<std::size_t>(r)].empty(),
                        "rank " << r << ": expected memory_space_error, got "
                                << errors[static_cast<std::size_t>(r)]);
  }
}

// Bad data on rank 1 only (forward_experts, 3 ranks), under eager (agreed before any row
// moves) and static_bound (planned on the device: agreed at the one wait, before any expert
// runs): every rank throws the same type, no rank hangs (the test would time out instead).
// `nan`: a NaN in rank 1's x -> non_finite_error, rank 1 naming x[1, 2]; else an expert id
// out of range in rank 1's plan -> range_error (static_bound: rank 1 naming token 1).
//! Rank r's plan of one slot per token, every token to expert 2·((r + 1) mod N) (rank r + 1's
//! first); `bad`: token 1's id out of range.
sy::routing::routing_plan one_slot_plan(const problem& pb, int r, bool bad) {
  sy::routing::routing_plan plan;
  plan.num_tokens = pb.tokens(r);
  plan.width = 1;
  plan.num_experts = pb.experts();
  plan.expert_ids.assign(static_cast<std::size_t>(plan.num_tokens), (r + 1) % pb.ranks * 2);
  plan.weights.assign(static_cast<std::size_t>(plan.num_tokens), 1.0f);
  plan.counts.assign(static_cast<std::size_t>(plan.num_tokens), 1);
  if (bad) plan.expert_ids[1] = static_cast<std::int32_t>(pb.experts() + 3);
  return plan;
}

template <class Capacity>
void bad_data_on_one_rank(bool nan, Capacity capacity) {
  constexpr int n = 3;
  const problem pb{.ranks = n, .seed = 91};
  host_data<sy::routers::TopK, float> h(pb);
  if (nan) h.x[static_cast<std::size_t>((pb.offset(1) + 1) * pb.d + 2)] = std::nanf("");
  std::vector<std::string> errors(n);
  sy::parallel::cuda_thread_group group(n, 0);
  sy::parallel::run_cuda_ranks(group, [&](const sy::parallel::cuda_thread_comm& comm) {
    const int r = comm.rank();
    const sy::cuda::stream_context ctx(4096, 0);
    const sy::routing::routing_plan plan = one_slot_plan(pb, r, !nan && r == 1);
    const ep_layer<sy::routers::TopK, sy::parallel::cuda_thread_comm, Capacity> layer{
        .router = make_router<sy::routers::TopK>(),
        .dispatch = {.comm = &comm, .capacity = capacity}};
    std::string& err = errors[static_cast<std::size_t>(r)];
    const char* mine = nan ? "x[1, 2]" : "token 1";
    try {
      (void)run_plan(layer, ctx.get(), h, plan, pb.offset(r), pb.tokens(r), r * 2, 2);
      err = "no exception";
    } catch (const sy::non_finite_error& e) {
      const std::string what = e.what();
      if (!nan) err = "non_finite_error where range_error was expected: " + what;
      if (nan && r == 1 && what.find(mine) == std::string::npos)
        err = std::string("rank 1's message does not name ") + mine + ": " + what;
    } catch (const sy::range_error& e) {
      const std::string what = e.what();
      if (nan) err = "range_error where non_finite_error was expected: " + what;
      if (!nan && r == 1 && !std::is_same_v<Capacity, sy::parallel::eager> &&
          what.find(mine) == std::string::npos)
        err = std::string("rank 1's message does not name ") + mine + ": " + what;
    } catch (const std::exception& e) {
      err = std::string("another exception: ") + e.what();
    }
  });
  for (int r = 0; r < n; ++r) {
    BOOST_CHECK_MESSAGE(errors[static_cast<std::size_t>(r)].empty(),
                        (nan ? "NaN in x" : "bad plan")
                            << (std::is_same_v<Capacity, sy::parallel::eager> ? ", eager"
                                                                              : ", static_bound")
                            << ", rank " << r << ": " << errors[static_cast<std::size_t>(r)]);
  }
}

BOOST_AUTO_TEST_CASE(non_finite_token_rejected_on_every_rank) {
  bad_data_on_one_rank(true, sy::parallel::eager{});
  bad_data_on_one_rank(true, sy::parallel::static_bound{.peer_rows = 64});
}

BOOST_AUTO_TEST_CASE(malformed_plan_rejected_on_every_rank) {
  bad_data_on_one_rank(false, sy::parallel::eager{});
  bad_data_on_one_rank(false, sy::parallel::static_bound{.peer_rows = 64});
}

#ifdef SWITCHYARD_TEST_HAS_NCCL
BOOST_AUTO_TEST_CASE(nccl_one_rank_bitwise_and_full) {
  const problem pb{.ranks = 1, .seed = 81};
  for (int kind = 0; kind < 2; ++kind) {
    const host_data<sy::routers::TopP, float> h(pb);
    const sy::cuda::stream_context ctx(4096, 0);
    const sy::routing::routing_plan plan = reference_plan(ctx.get(), h, false);
    const ref_layer<sy::routers::TopP> ref{.router = make_router<sy::routers::TopP>()};
    const sy::parallel::nccl_local_group nccl({0});
    const sy::parallel::nccl_comm comm = nccl.comm(0);
    const ep_layer<sy::routers::TopP, sy::parallel::nccl_comm> layer{
        .router = make_router<sy::routers::TopP>(), .dispatch = {.comm = &comm}};
    const index_t e = pb.experts(), t = pb.total();
    if (kind == 0) {
      const outputs want = run_plan(ref, ctx.get(), h, plan, 0, t, 0, e);
      const outputs got = run_plan(layer, ctx.get(), h, plan, 0, t, 0, e);
      const gpu::tolerance bt = gpu::backward_tolerance<float>();
      expect_bitwise("nccl N = 1: y", got.y, want.y, gpu::forward_tolerance<float>());
      expect_bitwise("nccl N = 1: dx", got.dx, want.dx, bt);
      expect_bitwise("nccl N = 1: d_weights", got.dw, want.dw, bt);
      expect_bitwise("nccl N = 1: grads.w1", got.gw1, want.gw1, bt);
      expect_bitwise("nccl N = 1: grads.w2", got.gw2, want.gw2, bt);
    } else {
      const outputs want = run_full(ref, ctx.get(), h, 0, t, 0, e);
      const outputs got = run_full(layer, ctx.get(), h, 0, t, 0, e);
      gpu::expect_close("nccl N = 1 full: y", got.y, want.y, gpu::forward_tolerance<float>());
      gpu::expect_close("nccl N = 1 full: dx", got.dx, want.dx, gpu::backward_tolerance<float>());
      gpu::expect_close("nccl N = 1 full: router grads", got.rg, want.rg,
                        gpu::backward_tolerance<float>());
    }
  }
}
#endif

BOOST_AUTO_TEST_CASE(static_bound_with_padded_capacity_equals_the_concatenation) {
  using sy::dispatch::dropped_output;
  for (int n : {1, 2, 3}) {
    padded_cases<float>(n, 2, dropped_output::zero, 100 + static_cast<std::uint64_t>(n));
    padded_cases<float>(n, 1, dropped_output::scaled_input, 110 + static_cast<std::uint64_t>(n));
    padded_cases<sy::bfloat16>(n, 2, dropped_output::scaled_input,
                               120 + static_cast<std::uint64_t>(n));
  }
  padded_cases<float>(4, 64, dropped_output::zero, 130);  // nothing dropped
}

// A bad plan on one rank under static_bound + padded_capacity: nothing waits, so the layer
// (no caller workspace: it waits at its end to free its allocation) reports it through the
// status word, on every rank: range_error, rank 1 naming its plan, the others rank 1.
BOOST_AUTO_TEST_CASE(padded_local_reports_a_peer_fault_on_every_rank) {
  constexpr int n = 3;
  const problem pb{.ranks = n, .seed = 140};
  const host_data<sy::routers::TopK, float> h(pb);
  std::vector<std::string> errors(n);
  sy::parallel::cuda_thread_group group(n, 0);
  sy::parallel::run_cuda_ranks(group, [&](const sy::parallel::cuda_thread_comm& comm) {
    const int r = comm.rank();
    const sy::cuda::stream_context ctx(4096, 0);
    const sy::routing::routing_plan plan = one_slot_plan(pb, r, r == 1);
    const padded_ep_layer<sy::routers::TopK, sy::parallel::cuda_thread_comm> layer{
        .router = make_router<sy::routers::TopK>(),
        .dispatch = {.comm = &comm,
                     .capacity = {.peer_rows = 16},
                     .local = {.expert_capacity = 4}}};
    std::string& err = errors[static_cast<std::size_t>(r)];
    try {
      (void)run_plan(layer, ctx.get(), h, plan, pb.offset(r), pb.tokens(r), r * 2, 2);
      err = "no exception";
    } catch (const sy::range_error& e) {
      const std::string what = e.what();
      const std::string mine = r == 1 ? "plan.expert_ids[1, 0]" : "rank 1";
      if (what.find(mine) == std::string::npos)
        err = "the message does not name " + mine + ": " + what;
    } catch (const std::exception& e) {
      err = std::string("another exception: ") + e.what();
    }
  });
  for (int r = 0; r < n; ++r) {
    BOOST_CHECK_MESSAGE(errors[static_cast<std::size_t>(r)].empty(),
                        "rank " << r << ": " << errors[static_cast<std::size_t>(r)]);
  }
}

#ifdef SWITCHYARD_TEST_HAS_NCCL
// static_bound + padded_capacity never waits: with the caller's workspaces a whole
// forward_experts + backward_experts on a real nccl_comm is captured into one CUDA graph and
// replayed (new outputs each replay, dx and the gradients reset first: they accumulate); the
// replays equal the eager run bit for bit.
BOOST_AUTO_TEST_CASE(nccl_padded_forward_and_backward_replay_from_a_cuda_graph) {
  using Router = sy::routers::TopK;
  const problem pb{.ranks = 1, .seed = 150};
  const host_data<Router, float> h(pb);
  const sy::cuda::stream_context sc(4096, 0);
  const sy::cuda::context ctx = sc.get();
  const cudaStream_t s = ctx.stream;
  const sy::routing::routing_plan plan = reference_plan(ctx, h, false);
  const sy::parallel::nccl_local_group nccl({0});
  const sy::parallel::nccl_comm comm = nccl.comm(0);
  const index_t e = pb.experts(), t = pb.total(), d = pb.d, width = plan.width;
  const padded_ep_layer<Router, sy::parallel::nccl_comm> layer{
      .router = make_router<Router>(),
      .dispatch = {.comm = &comm,
                   .capacity = {.peer_rows = t * width},
                   .local = {.drop = sy::dispatch::dropped_output::scaled_input,
                             .expert_capacity = 2}}};
  gpu::device_mirror m(s);
  const sy::expert_weights<float> w = h.weights(m, 0, e);
  const auto x = sy::make_view<const float>(m.copy(h.x.data(), h.x.size()), t, d);
  const auto dy = sy::make_view<const float>(m.copy(h.dy.data(), h.dy.size()), t, d);
  const gpu::device_plan dp(plan, s);
  gpu::device_output<std::byte> fws(layer.experts_workspace_size(ctx, t, width, w), s),
      bws(layer.experts_backward_workspace_size(ctx, t, width, w), s);
  gpu::device_output<float> y(static_cast<std::size_t>(t * d), s),
      dx(static_cast<std::size_t>(t * d), s), dw(static_cast<std::size_t>(t * width), s);
  gpu::device_output<index_t> dropped(static_cast<std::size_t>(e), s);
  gpu::device_expert_grads g = make_grads(h, 0, e, s);
  const auto reset = [&] {
    y.poison();
    dw.poison();
    dropped.poison();
    dx.set(h.dx0);  // in place: the graph holds these addresses
    g.w1.set(h.g0w1);
    g.b1.set(h.g0b1);
    g.w2.set(h.g0w2);
    g.b2.set(h.g0b2);
  };
  const auto run = [&] {
    layer.forward_experts(ctx, x, dp.view(), w, y.view(t, d), dropped.span(), fws.span());
    layer.backward_experts(ctx, x, dp.view(), w, dy, dx.view(t, d), g.view(), dw.span(),
                           bws.span());
  };
  reset();
  run();  // eager (also NCCL's first exchange, which connects and allocates)
  sy::cuda::check(cudaStreamSynchronize(s), "cudaStreamSynchronize");
  BOOST_CHECK_NO_THROW(sy::cuda::check_status(ctx, fws.span()));
  const std::vector<float> y0 = y.download(), dx0 = dx.download(), dw0 = dw.download(),
                           gw10 = g.w1.download();
  const std::vector<index_t> dropped0 = dropped.download();
  BOOST_TEST(std::any_of(dropped0.begin(), dropped0.end(), [](index_t v) { return v > 0; }),
             "C = 2 must drop pairs (the replays then test the verdicts too)");

  reset();
  cudaGraph_t graph = nullptr;
  sy::cuda::check(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal),
                  "cudaStreamBeginCapture");
  try {
    run();
  } catch (...) {
    cudaGraph_t broken = nullptr;
    (void)cudaStreamEndCapture(s, &broken);  // leave the stream usable
    if (broken != nullptr) (void)cudaGraphDestroy(broken);
    throw;
  }
  sy::cuda::check(cudaStreamEndCapture(s, &graph), "cudaStreamEndCapture");
  cudaGraphExec_t exec = nullptr;
  sy::cuda::check(cudaGraphInstantiate(&exec, graph, 0), "cudaGraphInstantiate");
  for (int replay = 0; replay < 2; ++replay) {
    BOOST_TEST_CONTEXT("replay " << replay) {
      reset();
      sy::cuda::check(cudaStreamSynchronize(s), "cudaStreamSynchronize");
      sy::cuda::check(cudaGraphLaunch(exec, s), "cudaGraphLaunch");
      sy::cuda::check(cudaStreamSynchronize(s), "cudaStreamSynchronize");
      BOOST_TEST(gpu::same_bits(y.download(), y0), "y");
      BOOST_TEST(gpu::same_bits(dropped.download(), dropped0), "dropped");
      BOOST_TEST(gpu::same_bits(dx.download(), dx0), "dx");
      BOOST_TEST(gpu::same_bits(dw.download(), dw0), "d_weights");
      BOOST_TEST(gpu::same_bits(g.w1.download(), gw10), "grads.w1");
      BOOST_CHECK_NO_THROW(sy::cuda::check_status(ctx, fws.span()));
      BOOST_CHECK_NO_THROW(sy::cuda::check_status(ctx, bws.span()));
    }
  }
  (void)cudaGraphExecDestroy(exec);
  (void)cudaGraphDestroy(graph);
}
#endif

BOOST_AUTO_TEST_SUITE_END()
