// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file expert_parallel.cuh
//! CUDA execution of `parallel::ExpertParallel` (docs/expert-parallel.md, "On the GPU"):
//! overloads of `cuda::plan_groups` / `cuda::experts_forward` / `cuda::experts_backward` for
//! the policy, which the CUDA executor (layer.cuh) reaches like any dispatch's (experts.cuh
//! includes this file at its end, so the overloads are visible where layer.cuh calls them).
//! The protocol is the host's (backend/host/expert_parallel.hpp, whose planning code runs here
//! unchanged): the pairs grouped by global expert (rank-major), the capacity policy, the
//! per-(destination, local expert) counts exchanged (`all_to_all`), the token rows in T sent
//! (`all_to_all_v`; static_bound: fixed blocks with `all_to_all`), the receiver's one-slot plan
//! run through the CUDA sorted_grouped expert phase (`experts_forward_phase` with a float
//! output, so each expert sees [rows from rank 0 | rank 1 | ...]: the single-process layer's
//! rows on the concatenated batch, hence its GEMM calls), the float rows sent back and the
//! single-process combine (`ops::combine_slot_elements`) in (token, slot) order. Backward:
//! token rows, dy rows and the pair weights out, dX rows and d_weights back, the
//! single-process combine backward (`ops::combine_backward_elements`).
//!
//! The communicator must exchange device memory (`C::space == memory_space::device`:
//! `parallel::nccl_comm`, `parallel::cuda_thread_comm`); otherwise every rank throws
//! memory_space_error before any exchange (the type is the same on every rank). Data moves on
//! `ctx.stream`.
//!
//! Synchronisation and planning: the plan (ids, counts, weights: T·width entries) is copied to
//! the host and the exchange planned there (`detail::plan_exchange`, the host code); the
//! counts go through the device communicator staged in small device buffers. Eager and
//! static_bound both wait for the plan and for the exchanged counts (static_bound's data
//! buffers are fixed blocks of `peer_rows` rows, but its counts are not yet kept on the device:
//! not CUDA-graph capturable yet), and the receiver's sorted_grouped phase waits for its
//! per-expert counts like the single-process layer. A malformed plan (an id outside [0, E),
//! a count outside [0, width]) is agreed (`all_agree`) and throws range_error on every rank.
//! A non-finite token in the forward's x is agreed the same way (non_finite_error on every
//! rank, before any row moves; one more small wait).
//!
//! Allocation: the exchange's buffers and the local phase's workspace are stream-ordered
//! device allocations per call (`cuda::device_array`); the layer's workspace query counts
//! none of them (as on the host).

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "switchyard/backend/cuda/context.hpp"
#include "switchyard/backend/cuda/dispatch.cuh"
#include "switchyard/backend/cuda/ep_flags.hpp"
#include "switchyard/backend/cuda/error.hpp"
#include "switchyard/backend/cuda/expert_gemm.cuh"
#include "switchyard/backend/cuda/expert_phase.hpp"
#include "switchyard/backend/cuda/experts.cuh"
#include "switchyard/backend/cuda/launch.cuh"
#include "switchyard/backend/cuda/memory.hpp"
#include "switchyard/backend/host/expert_parallel.hpp"
#include "switchyard/core/element_type.hpp"
#include "switchyard/core/checked.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/core/workspace.hpp"
#include "switchyard/layer/expert_weights.hpp"
#include "switchyard/ops/combine.hpp"
#include "switchyard/ops/exchange_plan.hpp"
#include "switchyard/ops/finite.hpp"
#include "switchyard/parallel/comm.hpp"
#include "switchyard/parallel/expert_parallel.hpp"
#include "switchyard/routing/plan.hpp"

namespace switchyard::detail {

//! A host-memory face of a device communicator for the exchange's planning (the count
//! `all_to_all` of `plan_exchange`): each call stages the host buffers through device buffers
//! on `stream` and waits for it. Not a general engine (all_to_all_v is not needed here).
template <parallel::Comm C>
struct cuda_ep_staged_comm {
  static constexpr parallel::memory_space space = parallel::memory_space::host;
  const C* comm = nullptr;
  cudaStream_t stream = nullptr;

  [[nodiscard]] int rank() const { return comm->rank(); }
  [[nodiscard]] int size() const { return comm->size(); }
  void all_gather(index_t v, span<index_t> out) const { comm->all_gather(v, out); }
  [[nodiscard]] bool all_agree(bool ok) const { return comm->all_agree(ok); }
  void all_to_all(const void* send, void* recv, index_t bytes, void* /*stream*/) const {
    const std::size_t total = static_cast<std::size_t>(bytes) * static_cast<std::size_t>(size());
    cuda::device_array<std::byte> ds(total, stream), dr(total, stream);
    if (total > 0) {
      cuda::check(cudaMemcpyAsync(ds.data(), send, total, cudaMemcpyHostToDevice, stream),
                  "cudaMemcpyAsync (expert-parallel counts to the device)");
    }
    comm->all_to_all(ds.data(), dr.data(), bytes, static_cast<void*>(stream));
    if (total > 0) {
      cuda::check(cudaMemcpyAsync(recv, dr.data(), total, cudaMemcpyDeviceToHost, stream),
                  "cudaMemcpyAsync (expert-parallel counts to the host)");
    }
    cuda::check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  }
  void all_to_all_v(const void*, const index_t*, const index_t*, void*, const index_t*,
                    const index_t*, void*) const {
    throw unsupported_error("switchyard: cuda_ep_staged_comm stages all_to_all only");
  }
};

//! memory_space_error unless the communicator exchanges device memory (every rank has the
//! same engine type, so every rank throws it, before any exchange).
template <parallel::Comm C>
void require_device_comm() {
  if (C::space != parallel::memory_space::device) {
    throw memory_space_error(
        "dispatch.comm",
        "dispatch.comm: the CUDA backend exchanges device buffers, but this communicator's "
        "memory space is host (use a device engine: parallel::nccl_comm, "
        "parallel::cuda_thread_comm)");
  }
}

//! The rank's plan on the host: ids, weights, counts (T·width, T·width, T entries, copied from
//! the device view whatever its strides; waits for ctx.stream).
template <class Id, class W>
struct cuda_ep_host_plan {
  using id_type = std::remove_const_t<Id>;
  using weight_type = std::remove_const_t<W>;
  std::vector<id_type> ids, counts;
  std::vector<weight_type> weights;
  index_t tokens = 0, width = 0, experts = 0;

  cuda_ep_host_plan(const cuda::context& ctx, const routing::plan_view<Id, W>& plan,
                    index_t global_experts)
      : tokens(plan.num_tokens()), width(plan.width()), experts(global_experts) {
    ids.assign(static_cast<std::size_t>(tokens * width), id_type{});
    weights.assign(static_cast<std::size_t>(tokens * width), weight_type{});
    counts.assign(static_cast<std::size_t>(tokens), id_type{});
    if (tokens > 0 && width > 0) {
      copy2d(ids.data(), plan.expert_ids.data_handle(), tokens, plan.expert_ids.stride(0),
             plan.expert_ids.stride(1), width, ctx.stream, "plan.expert_ids");
      copy2d(weights.data(), plan.weights.data_handle(), tokens, plan.weights.stride(0),
             plan.weights.stride(1), width, ctx.stream, "plan.weights");
    }
    if (tokens > 0) {
      copy2d(counts.data(), plan.counts.data_handle(), tokens, plan.counts.stride(0), index_t{1},
             index_t{1}, ctx.stream, "plan.counts");
    }
    cuda::check(cudaStreamSynchronize(ctx.stream), "cudaStreamSynchronize");
  }

  //! A host view of the copy.
  [[nodiscard]] routing::plan_view<const id_type, const weight_type> view() const {
    return {make_view<const id_type>(ids.data(), tokens, width),
            make_view<const weight_type>(weights.data(), tokens, width),
            make_view<const id_type>(counts.data(), tokens), experts};
  }

  //! True when every count lies in [0, width] and every used id in [0, E).
  [[nodiscard]] bool valid() const {
    for (index_t t = 0; t < tokens; ++t) {
      const index_t c = counts[static_cast<std::size_t>(t)];
      if (c < 0 || c > width) return false;
      for (index_t j = 0; j < c; ++j) {
        const index_t e = ids[static_cast<std::size_t>(t * width + j)];
        if (e < 0 || e >= experts) return false;
      }
    }
    return true;
  }

 private:
  template <class U, class V>
  static void copy2d(U* dst, const V* src, index_t rows, index_t row_stride, index_t col_stride,
                     index_t cols, cudaStream_t stream, const char* what) {
    if (col_stride != 1 && cols > 1) {
      throw shape_error(what, concat(what,
                                     ": ExpertParallel on the CUDA backend needs unit "
                                     "stride in the last extent, got ",
                                     col_stride));
    }
    const std::size_t row = sizeof(U) * static_cast<std::size_t>(cols);
    const std::size_t pitch = sizeof(U) * static_cast<std::size_t>(rows > 1 ? row_stride : cols);
    cuda::check(cudaMemcpy2DAsync(dst, row, src, pitch, row, static_cast<std::size_t>(rows),
                                  cudaMemcpyDeviceToHost, stream),
                "cudaMemcpy2DAsync (plan to the host)");
  }
};

//! Row r of `out` [rows, d] = row row_token[r] of `src`, or zeros for -1 (a static block's
//! unused row).
template <ElementType T>
struct cuda_ep_gather_rows {
  matrix_view<const T> src;
  const index_t* row_token;
  index_t d;
  T* out;
  SWITCHYARD_HD void operator()(index_t i) const {
    const index_t r = i / d, c = i % d, t = row_token[r];
    out[i] = t >= 0 ? src(t, c) : from_float<T>(0.0f);
  }
};

//! Lowers `*first` to the index of a non-finite element of x (atomicMin on an integer: the
//! smallest index wins whatever the thread order).
template <ElementType T>
struct cuda_ep_find_non_finite {
  ops::non_finite_element<T> test;
  unsigned long long* first;
  SWITCHYARD_HD void operator()(index_t i) const {
#ifdef __CUDA_ARCH__
    if (test(i)) atomicMin(first, static_cast<unsigned long long>(i));
#else
    if (test(i) && static_cast<unsigned long long>(i) < *first)
      *first = static_cast<unsigned long long>(i);
#endif
  }
};

//! Throws non_finite_error on every rank when some rank's x holds a NaN or an infinity (the
//! rank that holds it names the first element, its peers name the rank), before any row moves.
//! One small copy and a wait on ctx.stream, then one all_gather.
template <parallel::Comm C, ElementType T>
void cuda_ep_agree_finite(const cuda::context& ctx, const C& comm, const matrix_view<const T>& x) {
  const index_t n = x.extent(0) * x.extent(1);
  unsigned long long first = ~0ULL;
  if (n > 0) {
    cuda::device_array<unsigned long long> d(1, ctx.stream);
    cuda::check(cudaMemcpyAsync(d.data(), &first, sizeof first, cudaMemcpyHostToDevice, ctx.stream),
                "cudaMemcpyAsync");
    cuda::for_each(ctx.stream, n, cuda_ep_find_non_finite<T>{{x}, d.data()},
                   "switchyard::detail::cuda_ep_find_non_finite");
    cuda::check(cudaMemcpyAsync(&first, d.data(), sizeof first, cudaMemcpyDeviceToHost, ctx.stream),
                "cudaMemcpyAsync");
    cuda::check(cudaStreamSynchronize(ctx.stream), "cudaStreamSynchronize");
  }
  const bool bad = first != ~0ULL;
  std::vector<index_t> all(static_cast<std::size_t>(comm.size()));
  comm.all_gather(bad ? 1 : 0, span<index_t>(all.data(), all.size()));
  if (bad) {
    const index_t i = static_cast<index_t>(first), d = x.extent(1);
    T v{};
    cuda::check(cudaMemcpy(&v, &x(i / d, i % d), sizeof v, cudaMemcpyDeviceToHost), "cudaMemcpy");
    throw non_finite_error("x", concat("x: every element must be finite, got ", to_float(v),
                                       " at x[", i / d, ", ", i % d,
                                       "] (ExpertParallel: every rank throws before any "
                                       "exchange)"));
  }
  for (std::size_t r = 0; r < all.size(); ++r) {
    if (all[r] != 0) {
      throw non_finite_error(concat("rank ", r),
                             concat("switchyard: ExpertParallel: rank ", r,
                                    " holds a non-finite token (its own exception names it); "
                                    "every rank throws non_finite_error and none exchanges"));
    }
  }
}

//! d_weights[p] = the returned value of pair p's send row, 0 for an unused or dropped pair.
struct cuda_ep_scatter_weights {
  const index_t* pair_row;
  const float* back;
  float* d_weights;
  SWITCHYARD_HD void operator()(index_t p) const {
    const index_t r = pair_row[p];
    d_weights[p] = r >= 0 ? back[r] : 0.0f;
  }
};

//! The send rows' source token (-1: unused row of a static block), from the pair rows.
inline std::vector<index_t> cuda_ep_row_tokens(const ep_exchange& ex, index_t width) {
  std::vector<index_t> tok(static_cast<std::size_t>(ex.send_rows), -1);
  for (std::size_t p = 0; p < ex.pair_row.size(); ++p) {
    const index_t r = ex.pair_row[p];
    if (r >= 0) tok[static_cast<std::size_t>(r)] = static_cast<index_t>(p) / width;
  }
  return tok;
}

//! exchange_rows of backend/host/expert_parallel.hpp on `stream` (device buffers).
template <parallel::Comm C, class U>
void cuda_ep_exchange_rows(const C& comm, const ep_exchange& ex, bool to_owner, const U* send,
                           U* recv, index_t elems, cudaStream_t stream) {
  const index_t row_bytes = elems * static_cast<index_t>(sizeof(U));
  void* s = static_cast<void*>(stream);
  if (ex.peer_rows >= 0) {
    comm.all_to_all(send, recv, ex.peer_rows * row_bytes, s);
    return;
  }
  const std::size_t n = static_cast<std::size_t>(ex.ranks);
  std::vector<index_t> sb(n), sd(n), rb(n), rd(n);
  for (std::size_t r = 0; r < n; ++r) {
    const index_t out =
        to_owner ? ex.sent_to(static_cast<index_t>(r)) : ex.received_from(static_cast<index_t>(r));
    const index_t in =
        to_owner ? ex.received_from(static_cast<index_t>(r)) : ex.sent_to(static_cast<index_t>(r));
    sb[r] = out * row_bytes;
    sd[r] = (to_owner ? ex.send_row0[r] : ex.recv_row0[r]) * row_bytes;
    rb[r] = in * row_bytes;
    rd[r] = (to_owner ? ex.recv_row0[r] : ex.send_row0[r]) * row_bytes;
  }
  comm.all_to_all_v(send, sb.data(), sd.data(), recv, rb.data(), rd.data(), s);
}

//! The rank's side of an exchange: the host plan, the agreed validity check, the planned
//! exchange (counts exchanged) and the device copies the kernels read.
template <parallel::Comm C, class Capacity, class Local, class Id, class W>
struct cuda_ep_setup {
  cuda_ep_host_plan<Id, W> host;
  ep_exchange ex;
  std::vector<index_t> dropped;  //!< [E] this rank's pairs dropped by static_bound
  cuda::device_array<index_t> pair_row, row_token;

  cuda_ep_setup(const cuda::context& ctx, const parallel::ExpertParallel<C, Capacity, Local>& ep,
                const routing::plan_view<Id, W>& plan, index_t experts, index_t local)
      : host(make_host(ctx, plan, experts)) {
    const C& comm = *ep.comm;
    if (!comm.all_agree(host.valid())) {
      throw range_error("plan", concat("plan: a rank's plan has a count outside [0, width] or an "
                                       "expert id outside [0, E = ",
                                       experts,
                                       ") (ExpertParallel checks every rank's plan before any "
                                       "exchange)"));
    }
    const cuda_ep_staged_comm<C> staged{&comm, ctx.stream};
    const parallel::ExpertParallel<cuda_ep_staged_comm<C>, Capacity, Local> sep{
        &staged, ep.capacity, ep.local};
    dropped.assign(static_cast<std::size_t>(experts), 0);
    ex = plan_exchange(sep, host.view(), experts, local,
                       span<index_t>(dropped.data(), dropped.size()));
    pair_row = cuda::device_array<index_t>(ex.pair_row, ctx.stream);
    row_token = cuda::device_array<index_t>(cuda_ep_row_tokens(ex, host.width), ctx.stream);
  }

 private:
  static cuda_ep_host_plan<Id, W> make_host(const cuda::context& ctx,
                                            const routing::plan_view<Id, W>& plan,
                                            index_t experts) {
    return cuda_ep_host_plan<Id, W>(ctx, plan, experts);
  }
};

//! The receiver's one-slot plan on the device (ids = local expert, counts 1 for real rows, 0
//! for a static block's unused rows; weights given per row, or 1).
struct cuda_ep_receiver_plan {
  cuda::device_array<std::int32_t> ids, counts;
  cuda::device_array<float> weights;
  index_t rows = 0;

  cuda_ep_receiver_plan(const ep_exchange& ex, const float* row_weights, cudaStream_t stream)
      : rows(ex.recv_rows) {
    const ep_receiver_plan rp(ex, row_weights);
    ids = cuda::device_array<std::int32_t>(rp.ids, stream);
    counts = cuda::device_array<std::int32_t>(rp.counts, stream);
    weights = cuda::device_array<float>(rp.weights, stream);
    // The host vectors die here: wait for the copies (pageable sources).
    cuda::check(cudaStreamSynchronize(stream), "cudaStreamSynchronize");
  }

  [[nodiscard]] routing::plan_view<const std::int32_t, const float> view(index_t experts) const {
    return {make_view<const std::int32_t>(ids.data(), rows, index_t{1}),
            make_view<const float>(weights.data(), rows, index_t{1}),
            make_view<const std::int32_t>(counts.data(), rows), experts};
  }
};

//! The local phase's sizes: R received rows, one slot each, the rank's E/N experts.
inline cuda::expert_dims cuda_ep_receiver_dims(const cuda::expert_dims& dm, index_t rows,
                                               index_t local) {
  cuda::expert_dims dl = dm;
  dl.tokens = rows;
  dl.width = 1;
  dl.experts = local;
  return dl;
}

//! Runs `phase(g, ws, host_ws)` of the local sorted_grouped dispatch over the receiver's plan:
//! measures, allocates, plans the groups, waits for the per-expert counts, runs.
template <class F>
void cuda_ep_local_phase(const cuda::context& ctx,
                         const routing::plan_view<const std::int32_t, const float>& rplan,
                         index_t rows, index_t local, const F& phase) {
  const dispatch::sorted_grouped sg{};
  workspace_arena mws, mhws;
  (void)cuda::plan_groups(ctx, sg, rplan, rows, index_t{1}, local, nullptr, mws, mhws);
  phase(cuda::device_groups{}, mws, mhws);
  cuda::device_array<std::byte> dev(mws.required(), ctx.stream);
  std::vector<std::byte> hbytes(mhws.required());
  workspace_arena ws(dev.bytes()), hws({hbytes.data(), hbytes.size()});
  const cuda::device_groups g =
      cuda::plan_groups(ctx, sg, rplan, rows, index_t{1}, local, nullptr, ws, hws);
  cuda::check(cudaStreamSynchronize(ctx.stream), "cudaStreamSynchronize");  // host counts
  phase(g, ws, hws);
  // hbytes holds the grouped GEMMs' host arguments: wait before it is freed.
  cuda::check(cudaStreamSynchronize(ctx.stream), "cudaStreamSynchronize");
}

// ---- static_bound: the exchange planned on the device ------------------------------------

//! Records a faulty plan token (`ops::ep_destination_keys`' report): the smallest wins; with a
//! status word, also the fault itself (as the single-process planning records it).
struct cuda_ep_record_fault {
  unsigned long long* first_bad_token;
  index_t width;
  cuda::device_status* status = nullptr;
  SWITCHYARD_HD void operator()(ops::plan_fault kind, index_t index) const {
    cuda::record_plan_fault{status}(kind, index);
    const index_t t = kind == ops::plan_fault::counts ? index : index / (width > 0 ? width : 1);
#ifdef __CUDA_ARCH__
    atomicMin(first_bad_token, static_cast<unsigned long long>(t));
#else
    if (static_cast<unsigned long long>(t) < *first_bad_token)
      *first_bad_token = static_cast<unsigned long long>(t);
#endif
  }
};

//! Fills n index_t with -1 on `stream`.
inline void cuda_ep_fill_minus_one(index_t* p, index_t n, cudaStream_t stream) {
  if (n > 0) {
    cuda::check(cudaMemsetAsync(p, 0xff, sizeof(index_t) * static_cast<std::size_t>(n), stream),
                "cudaMemsetAsync");
  }
}

//! static_bound's exchange planned on the device (ops/exchange_plan.hpp), every array carved
//! from the layer's workspace (sizes fixed by T, width, E, N and peer_rows; the measuring pass
//! takes the same): pair_row [P], per send row its pair, token and local expert [N·R], the
//! received local experts [N·R], the receiver's one-slot plan [N·R] and the drops [E] when
//! the caller has no array for them. Nothing goes to the host.
struct cuda_ep_static_plan {
  index_t ranks = 1, local = 0, experts = 0, peer_rows = 0, rows = 0, tokens = 0, width = 0;
  cuda_key_sort by_rank, by_expert;
  cuda_ep_flags* flags = nullptr;       //!< device
  cuda_ep_flags* host_flags = nullptr;  //!< host workspace
  index_t* pair_row = nullptr;
  index_t* row_pair = nullptr;
  index_t* row_token = nullptr;
  index_t* row_local = nullptr;
  index_t* recv_local = nullptr;
  std::int32_t* recv_ids = nullptr;
  std::int32_t* recv_counts = nullptr;
  float* recv_weights = nullptr;
  float* row_weight = nullptr;          //!< [N·R] (backward: the pairs' combine weights)
  float* recv_row_weight = nullptr;     //!< [N·R] (backward)
  index_t* dropped = nullptr;           //!< [E]
  // A local dispatch that drops (padded_capacity): no wait; the findings go to `status`.
  cuda::device_status* status = nullptr;  //!< the layer's status word (device), or null
  index_t* verdict = nullptr;           //!< [N·R] the receivers' verdicts on the send rows
  cuda_ep_flags* flags_send = nullptr;  //!< [N] this rank's flags, once per peer
  cuda_ep_flags* flags_all = nullptr;   //!< [N] every rank's flags

  //! Carves (or measures) the arrays; `with_weights`: the backward's weight rows; `padded`:
  //! the arrays of a local dispatch that drops (findings recorded in `status_`, no wait).
  cuda_ep_static_plan(const cuda::context& ctx, index_t ranks_, index_t local_, index_t peer_rows_,
                      index_t tokens_, index_t width_, bool with_weights, index_t* given_dropped,
                      workspace_arena& ws, workspace_arena& hws, bool padded = false,
                      cuda::device_status* status_ = nullptr)
      : ranks(ranks_), local(local_), experts(ranks_ * local_), peer_rows(peer_rows_),
        rows(checked_mul("dispatch.capacity.peer_rows", ranks_, peer_rows_)), tokens(tokens_),
        width(width_), status(status_) {
    const index_t pairs = tokens * width;
    flags = ws.take<cuda_ep_flags>(1);
    host_flags = hws.take<cuda_ep_flags>(1);
    by_rank = cuda_take_key_sort(ctx, pairs, ranks, ws);
    by_expert = cuda_take_key_sort(ctx, pairs, experts, ws);
    pair_row = ws.take<index_t>(pairs);
    row_pair = ws.take<index_t>(rows);
    row_token = ws.take<index_t>(rows);
    row_local = ws.take<index_t>(rows);
    recv_local = ws.take<index_t>(rows);
    recv_ids = ws.take<std::int32_t>(rows);
    recv_counts = ws.take<std::int32_t>(rows);
    recv_weights = ws.take<float>(rows);
    if (with_weights) {
      row_weight = ws.take<float>(rows);
      recv_row_weight = ws.take<float>(rows);
    }
    dropped = given_dropped != nullptr ? given_dropped : ws.take<index_t>(experts);
    if (padded) {
      verdict = ws.take<index_t>(rows);
      flags_send = ws.take<cuda_ep_flags>(ranks);
      flags_all = ws.take<cuda_ep_flags>(ranks);
    }
  }

  //! Enqueues the planning on ctx.stream (carving arenas only): flags reset, x scanned for
  //! non-finite elements (when `x_scan` has elements), the two sorts and the placement.
  template <ElementType T, class Id, class W>
  void plan(const cuda::context& ctx, const routing::plan_view<Id, W>& plan,
            const matrix_view<const T>& x_scan) const {
    const cudaStream_t st = ctx.stream;
    const index_t pairs = tokens * width;
    cuda::for_each(st, 1, cuda_ep_reset_flags{flags}, "switchyard::detail::cuda_ep_reset_flags");
    const index_t nx = x_scan.extent(0) * x_scan.extent(1);
    if (nx > 0) {
      cuda::for_each(st, nx,
                     cuda_ep_find_non_finite<T>{{x_scan}, &flags->first_non_finite},
                     "switchyard::detail::cuda_ep_find_non_finite");
    }
    if (experts > 0) {
      cuda::check(cudaMemsetAsync(dropped, 0, sizeof(index_t) * static_cast<std::size_t>(experts),
                                  st),
                  "cudaMemsetAsync");
    }
    cuda_ep_fill_minus_one(row_pair, rows, st);
    cuda_ep_fill_minus_one(row_local, rows, st);
    if (row_weight != nullptr && rows > 0) {
      cuda::check(cudaMemsetAsync(row_weight, 0, sizeof(float) * static_cast<std::size_t>(rows),
                                  st),
                  "cudaMemsetAsync");
    }
    if (pairs > 0) {
      cuda::for_each<cuda::tuning::tokens_block>(
          st, tokens,
          ops::ep_destination_keys<Id, cuda_ep_record_fault>{
              plan.expert_ids, plan.counts, width, experts, local > 0 ? local : 1, ranks,
              by_rank.keys, by_rank.pairs, pair_row,
              cuda_ep_record_fault{&flags->first_bad_token, width, status}},
          "switchyard::ops::ep_destination_keys");
      cuda_run_key_sort(ctx, by_rank);
      cuda::for_each(st, pairs,
                     ops::ep_claim<Id>{by_rank.sorted_keys, by_rank.sorted_pairs, pairs,
                                       plan.expert_ids, width, experts, ranks, peer_rows,
                                       by_expert.keys, by_expert.pairs, pair_row, dropped},
                     "switchyard::ops::ep_claim");
      cuda_run_key_sort(ctx, by_expert);
      cuda::for_each(st, pairs,
                     ops::ep_place<W>{by_expert.sorted_keys, by_expert.sorted_pairs, pairs, experts,
                                      local > 0 ? local : 1, peer_rows, pair_row, row_pair,
                                      row_local, plan.weights, width, row_weight},
                     "switchyard::ops::ep_place");
    }
    cuda::for_each(st, rows, ops::ep_row_tokens{row_pair, width > 0 ? width : 1, row_token},
                   "switchyard::ops::ep_row_tokens");
  }

  //! After the row_local (and weight) blocks arrived: the receiver's one-slot plan.
  void receive(const cuda::context& ctx) const {
    cuda::for_each(ctx.stream, rows,
                   ops::ep_receiver_rows{recv_local, recv_row_weight, recv_ids, recv_counts,
                                         recv_weights},
                   "switchyard::ops::ep_receiver_rows");
  }

  [[nodiscard]] routing::plan_view<const std::int32_t, const float> receiver_view() const {
    return {make_view<const std::int32_t>(recv_ids, rows, index_t{1}),
            make_view<const float>(recv_weights, rows, index_t{1}),
            make_view<const std::int32_t>(recv_counts, rows), local};
  }

  //! Without a wait (padded): every rank's flags gathered on the device (one all_to_all of
  //! fixed size) and folded into this rank's status word (`cuda_ep_fold_flags`).
  template <parallel::Comm C>
  void fold(const cuda::context& ctx, const C& comm) const {
    cuda::for_each(ctx.stream, ranks, cuda_ep_spread_flags{flags, flags_send},
                   "switchyard::detail::cuda_ep_spread_flags");
    comm.all_to_all(flags_send, flags_all, static_cast<index_t>(sizeof(cuda_ep_flags)),
                    static_cast<void*>(ctx.stream));
    if (status != nullptr) {
      cuda::for_each(ctx.stream, ranks,
                     cuda_ep_fold_flags{flags_all, static_cast<index_t>(comm.rank()), status},
                     "switchyard::detail::cuda_ep_fold_flags");
    }
  }

  //! Enqueues the copy of the flags to the host (read after the caller's wait).
  void copy_flags(const cuda::context& ctx) const {
    cuda::check(cudaMemcpyAsync(host_flags, flags, sizeof(cuda_ep_flags), cudaMemcpyDeviceToHost,
                                ctx.stream),
                "cudaMemcpyAsync (expert-parallel flags)");
  }

  //! After the wait: every rank learns whether any rank's plan or x was bad and throws the
  //! same error type (range_error naming plan, non_finite_error naming x), before any expert
  //! runs and before y, dx or any gradient is written. One all_gather.
  template <parallel::Comm C, ElementType T>
  void agree(const C& comm, const matrix_view<const T>& x) const {
    const bool bad_plan = host_flags->first_bad_token != ~0ULL;
    const bool bad_x = host_flags->first_non_finite != ~0ULL;
    std::vector<index_t> all(static_cast<std::size_t>(comm.size()));
    comm.all_gather(bad_plan ? 1 : (bad_x ? 2 : 0), span<index_t>(all.data(), all.size()));
    if (bad_plan) {
      throw range_error("plan", concat("plan: token ", host_flags->first_bad_token,
                                       " has a count outside [0, width = ", width,
                                       "], an expert id outside [0, E = ", experts,
                                       "), a repeated id or an unused slot not -1 "
                                       "(ExpertParallel: every rank throws before any expert "
                                       "runs)"));
    }
    if (bad_x) {
      const index_t i = static_cast<index_t>(host_flags->first_non_finite), d = x.extent(1);
      T v{};
      cuda::check(cudaMemcpy(&v, &x(i / d, i % d), sizeof v, cudaMemcpyDeviceToHost),
                  "cudaMemcpy");
      throw non_finite_error("x", concat("x: every element must be finite, got ", to_float(v),
                                         " at x[", i / d, ", ", i % d,
                                         "] (ExpertParallel: every rank throws before any "
                                         "expert runs)"));
    }
    for (std::size_t r = 0; r < all.size(); ++r) {
      if (all[r] == 1) {
        throw range_error(concat("rank ", r),
                          concat("switchyard: ExpertParallel: rank ", r,
                                 " holds a malformed plan (its own exception names the token); "
                                 "every rank throws range_error and no expert runs"));
      }
      if (all[r] == 2) {
        throw non_finite_error(concat("rank ", r),
                               concat("switchyard: ExpertParallel: rank ", r,
                                      " holds a non-finite token (its own exception names it); "
                                      "every rank throws non_finite_error and no expert runs"));
      }
    }
  }
};

//! static_bound's exchange of fixed blocks: `elems` U per row, R rows per peer.
template <parallel::Comm C, class U>
void cuda_ep_static_exchange(const C& comm, index_t peer_rows, const U* send, U* recv,
                             index_t elems, cudaStream_t stream) {
  comm.all_to_all(send, recv, peer_rows * elems * static_cast<index_t>(sizeof(U)),
                  static_cast<void*>(stream));
}

//! The local phase over the received rows, in the layer's arenas (measuring arenas: only
//! takes). With no received rows (R = 0) it plans and agrees all the same.
//! - sorted_grouped: plans the groups (enqueuing the per-expert counts' copy), copies the
//!   flags, waits once (the wait the single-process sorted_grouped has), agrees on the flags
//!   (every rank throws before any expert runs), then runs `phase(lp, g)`.
//! - padded_capacity: plans the groups on the device (the receiver policy: drop zero, token
//!   order; width 1 makes the priorities equal), gathers and folds the flags into the status
//!   word on the device, runs `phase(lp, g)`, and returns the groups: their pair_row [N·R] is
//!   the verdict on each received row. Nothing waits.
template <class Local, parallel::Comm C, ElementType T, class F>
cuda::device_groups cuda_ep_static_local(const cuda::context& ctx, const C& comm,
                                         const Local& local, const cuda_ep_static_plan& sp,
                                         const matrix_view<const T>& x, workspace_arena& ws,
                                         workspace_arena& hws, const F& phase) {
  const auto rplan = sp.receiver_view();
  if constexpr (std::is_same_v<Local, dispatch::padded_capacity>) {
    dispatch::padded_capacity lp = local;
    lp.drop = dispatch::dropped_output::zero;
    lp.priority = dispatch::capacity_priority::token_major;
    const cuda::device_groups g =
        sp.rows > 0 ? cuda::plan_groups(ctx, lp, rplan, sp.rows, index_t{1}, sp.local, nullptr,
                                        ws, hws)
                    : cuda::device_groups{};
    if (ws.carving()) sp.fold(ctx, comm);
    if (sp.rows > 0) phase(lp, g);
    return g;
  } else {
    (void)local;
    const dispatch::sorted_grouped sg{};
    const cuda::device_groups g =
        sp.rows > 0
            ? cuda::plan_groups(ctx, sg, rplan, sp.rows, index_t{1}, sp.local, nullptr, ws, hws)
            : cuda::device_groups{};
    if (ws.carving()) {
      sp.copy_flags(ctx);
      cuda::check(cudaStreamSynchronize(ctx.stream), "cudaStreamSynchronize");
      sp.agree(comm, x);
    }
    if (sp.rows > 0) phase(sg, g);
    return g;
  }
}

//! padded_capacity: the receivers' verdicts back to the senders (fixed blocks), then the pairs
//! they dropped marked in `sp.pair_row` and counted in `dropped` when given
//! (`ops::ep_local_drops`). Nothing for sorted_grouped.
template <class Local, parallel::Comm C, class Id, class W>
void cuda_ep_return_verdicts(const cuda::context& ctx, const C& comm, const cuda_ep_static_plan& sp,
                             const cuda::device_groups& g, const routing::plan_view<Id, W>& plan,
                             index_t* dropped) {
  if constexpr (std::is_same_v<Local, dispatch::padded_capacity>) {
    if (sp.rows > 0) {
      cuda_ep_static_exchange(comm, sp.peer_rows, static_cast<const index_t*>(g.pair_row),
                              sp.verdict, index_t{1}, ctx.stream);
    }
    const index_t pairs = plan.num_tokens() * plan.width();
    if (pairs > 0) {
      cuda::for_each(ctx.stream, pairs,
                     ops::ep_local_drops<Id>{plan.expert_ids, plan.width(), sp.verdict,
                                             sp.pair_row, dropped},
                     "switchyard::ops::ep_local_drops");
    }
  } else {
    (void)ctx, (void)comm, (void)sp, (void)g, (void)plan, (void)dropped;
  }
}

//! Whether dropped pairs contribute w_tj · x_t (the local padded_capacity's scaled_input).
template <class Local>
bool cuda_ep_pass_through(const Local& local) {
  if constexpr (std::is_same_v<Local, dispatch::padded_capacity>) {
    return local.drop == dispatch::dropped_output::scaled_input;
  } else {
    (void)local;
    return false;
  }
}

//! `experts_forward` under static_bound (see the overload below).
template <parallel::Comm C, class Local, class Act, ElementType T, class Id, class W>
void cuda_ep_static_forward(const cuda::context& ctx,
                            const parallel::ExpertParallel<C, parallel::static_bound, Local>& ep,
                            const Act& act, const cuda::expert_dims& dm,
                            const matrix_view<const T>& x, const routing::plan_view<Id, W>& plan,
                            const expert_weights<T>& w, const matrix_view<T>& y,
                            index_t* dropped, cuda::device_status* status, workspace_arena& ws,
                            workspace_arena& hws) {
  const C& comm = *ep.comm;
  const index_t d = dm.d, local = w.num_experts(), r = ep.capacity.peer_rows;
  constexpr bool padded = std::is_same_v<Local, dispatch::padded_capacity>;
  const cuda_ep_static_plan sp(ctx, ep.ranks(), local, r, dm.tokens, dm.width, false, dropped, ws,
                               hws, padded, status);
  const index_t n = checked_mul("rows", sp.rows, d);
  T* send = ws.take<T>(n);
  T* recv = ws.take<T>(n);
  float* out = ws.take<float>(n);
  float* back = ws.take<float>(n);
  const matrix_view<const T> xr = make_view<const T>(recv, sp.rows, d);
  const matrix_view<float> yr = make_view<float>(out, sp.rows, d);
  const cuda::expert_dims dl = cuda_ep_receiver_dims(dm, sp.rows, local);
  const auto rplan = sp.receiver_view();
  if (ws.carving()) {
    sp.plan(ctx, plan, x);
    cuda::for_each(ctx.stream, n, cuda_ep_gather_rows<T>{x, sp.row_token, d, send},
                   "switchyard::detail::cuda_ep_gather_rows");
    cuda_ep_static_exchange(comm, r, sp.row_local, sp.recv_local, index_t{1}, ctx.stream);
    cuda_ep_static_exchange(comm, r, send, recv, d, ctx.stream);
    sp.receive(ctx);
  }
  const cuda::device_groups lg = cuda_ep_static_local(
      ctx, comm, ep.local, sp, x, ws, hws, [&](const auto& lp, const cuda::device_groups& g) {
        cuda::experts_forward_phase(cuda::expert_exec(ctx, ws), lp, act, dl, xr, rplan, w,
                                    cuda::groups_ref(g), nullptr, yr, nullptr, ws, hws);
      });
  if (!ws.carving()) return;
  cuda_ep_static_exchange(comm, r, out, back, d, ctx.stream);
  cuda_ep_return_verdicts<Local>(ctx, comm, sp, lg, plan, sp.dropped);
  const index_t tokens = plan.num_tokens(), width = plan.width();
  cuda::for_each(ctx.stream, tokens * d,
                 ops::combine_slot_elements<T, Id, W>{{plan.weights, plan.counts, sp.pair_row,
                                                       width, d, back, x,
                                                       cuda_ep_pass_through(ep.local), nullptr,
                                                       y}},
                 "switchyard::ops::combine_slot_elements");
}

//! `experts_backward` under static_bound (see the overload below).
template <parallel::Comm C, class Local, class Act, ElementType T, class Id, class W>
void cuda_ep_static_backward(const cuda::context& ctx,
                             const parallel::ExpertParallel<C, parallel::static_bound, Local>& ep,
                             const Act& act, const cuda::expert_dims& dm,
                             const matrix_view<const T>& x, const routing::plan_view<Id, W>& plan,
                             const expert_weights<T>& w, const matrix_view<const T>& dy,
                             const matrix_view<float>& dx, const expert_grads& grads,
                             float* d_weights, cuda::device_status* status, workspace_arena& ws,
                             workspace_arena& hws) {
  const C& comm = *ep.comm;
  const index_t d = dm.d, local = w.num_experts(), r = ep.capacity.peer_rows;
  constexpr bool padded = std::is_same_v<Local, dispatch::padded_capacity>;
  const cuda_ep_static_plan sp(ctx, ep.ranks(), local, r, dm.tokens, dm.width, true, nullptr, ws,
                               hws, padded, status);
  const index_t n = checked_mul("rows", sp.rows, d);
  T* send = ws.take<T>(n);
  T* xr = ws.take<T>(n);
  T* dyr = ws.take<T>(n);
  float* dxr = ws.take<float>(n);
  float* back = ws.take<float>(n);
  float* dwr = ws.take<float>(sp.rows);
  float* dwb = ws.take<float>(sp.rows);
  const matrix_view<const T> xv = make_view<const T>(xr, sp.rows, d);
  const matrix_view<const T> dyv = make_view<const T>(dyr, sp.rows, d);
  const matrix_view<float> dxv = make_view<float>(dxr, sp.rows, d);
  const cuda::expert_dims dl = cuda_ep_receiver_dims(dm, sp.rows, local);
  const auto rplan = sp.receiver_view();
  if (ws.carving()) {
    sp.plan(ctx, plan, matrix_view<const T>{});
    cuda::for_each(ctx.stream, n, cuda_ep_gather_rows<T>{x, sp.row_token, d, send},
                   "switchyard::detail::cuda_ep_gather_rows");
    cuda_ep_static_exchange(comm, r, sp.row_local, sp.recv_local, index_t{1}, ctx.stream);
    cuda_ep_static_exchange(comm, r, sp.row_weight, sp.recv_row_weight, index_t{1}, ctx.stream);
    cuda_ep_static_exchange(comm, r, send, xr, d, ctx.stream);
    cuda::for_each(ctx.stream, n, cuda_ep_gather_rows<T>{dy, sp.row_token, d, send},
                   "switchyard::detail::cuda_ep_gather_rows");
    cuda_ep_static_exchange(comm, r, send, dyr, d, ctx.stream);
    sp.receive(ctx);
    if (n > 0) {
      cuda::check(cudaMemsetAsync(dxr, 0, sizeof(float) * static_cast<std::size_t>(n), ctx.stream),
                  "cudaMemsetAsync");
      cuda::check(
          cudaMemsetAsync(dwr, 0, sizeof(float) * static_cast<std::size_t>(sp.rows), ctx.stream),
          "cudaMemsetAsync");
    }
  }
  const cuda::device_groups lg = cuda_ep_static_local(
      ctx, comm, ep.local, sp, x, ws, hws, [&](const auto& lp, const cuda::device_groups& g) {
        cuda::experts_backward_phase(cuda::expert_exec(ctx, ws), lp, act, dl, xv, rplan, w,
                                     cuda::groups_ref(g), dyv, dxv, grads,
                                     ws.carving() ? dwr : nullptr, ws, hws);
      });
  if (!ws.carving()) return;
  cuda_ep_static_exchange(comm, r, dxr, back, d, ctx.stream);
  cuda_ep_static_exchange(comm, r, dwr, dwb, index_t{1}, ctx.stream);
  cuda_ep_return_verdicts<Local>(ctx, comm, sp, lg, plan, nullptr);
  const index_t tokens = plan.num_tokens(), width = plan.width();
  cuda::for_each(ctx.stream, tokens * width, cuda_ep_scatter_weights{sp.pair_row, dwb, d_weights},
                 "switchyard::detail::cuda_ep_scatter_weights");
  const bool has_dx = present(dx);
  const ops::combine_backward_slots<T, Id, W> combine{
      plan.weights, plan.counts, sp.pair_row, width, d, back, x, dy,
      cuda_ep_pass_through(ep.local), d_weights, dx, has_dx};
  if (combine.pass_through) {
    cuda::for_each(ctx.stream, tokens, ops::combine_backward_pass_weights<T, Id, W>{combine},
                   "switchyard::ops::combine_backward_pass_weights");
  }
  if (has_dx) {
    cuda::for_each(ctx.stream, tokens * d, ops::combine_backward_elements<T, Id, W>{combine},
                   "switchyard::ops::combine_backward_elements");
  }
}

}  // namespace switchyard::detail

namespace switchyard::cuda {

//! `ExpertParallel` plans its groups in `experts_forward` / `experts_backward` (the exchange
//! needs the plan on the host): nothing here, no workspace.
template <parallel::Comm C, class Capacity, class Local, class Id, class W>
device_groups plan_groups(const context&, const parallel::ExpertParallel<C, Capacity, Local>&,
                          const routing::plan_view<Id, W>&, index_t, index_t, index_t,
                          device_status* status, workspace_arena&, workspace_arena&) {
  device_groups g;
  g.status = status;  // static_bound with padded_capacity records its findings there
  return g;
}

//! `experts_forward` under expert parallelism (file comment): y [T, d] = Σ_j w_tj ·
//! FFN_{e_tj}(x_t) rounded to T, the FFNs run on the ranks that own them. `dm.experts` is
//! this rank's E/N (`w`'s); `dropped` [E global] receives this rank's pairs dropped by
//! static_bound. Collective. Measuring arenas take nothing.
template <parallel::Comm C, class Capacity, class Local, class Act, ElementType T, class Id,
          class W>
void experts_forward(const context& ctx, const parallel::ExpertParallel<C, Capacity, Local>& ep,
                     const Act& act, const expert_dims& dm, const matrix_view<const T>& x,
                     const routing::plan_view<Id, W>& plan, const expert_weights<T>& w,
                     const device_groups& groups, const float* extra, const matrix_view<T>& y,
                     index_t* dropped, workspace_arena& ws, workspace_arena& hws) {
  detail::require_device_comm<C>();
  if constexpr (std::is_same_v<Capacity, parallel::static_bound>) {
    if (extra != nullptr) {
      throw unsupported_error(
          "switchyard: an add-on term under ExpertParallel on the CUDA backend");
    }
    detail::cuda_ep_static_forward(ctx, ep, act, dm, x, plan, w, y, dropped, groups.status, ws,
                                   hws);
    return;
  }
  if (!ws.carving()) return;
  if (extra != nullptr) {
    throw unsupported_error("switchyard: an add-on term under ExpertParallel on the CUDA backend");
  }
  const C& comm = *ep.comm;
  const index_t d = dm.d, local = w.num_experts(), experts = ep.global_experts(local);
  const index_t tokens = plan.num_tokens(), width = plan.width();
  detail::cuda_ep_agree_finite(ctx, comm, x);
  const detail::cuda_ep_setup<C, Capacity, Local, Id, W> s(ctx, ep, plan, experts, local);
  const detail::ep_exchange& ex = s.ex;
  if (dropped != nullptr && experts > 0) {
    check(cudaMemcpyAsync(dropped, s.dropped.data(), sizeof(index_t) * s.dropped.size(),
                          cudaMemcpyHostToDevice, ctx.stream),
          "cudaMemcpyAsync (dropped)");
  }

  device_array<T> send(static_cast<std::size_t>(ex.send_rows * d), ctx.stream);
  device_array<T> recv(static_cast<std::size_t>(ex.recv_rows * d), ctx.stream);
  if (ex.send_rows * d > 0) {
    for_each(ctx.stream, ex.send_rows * d,
             detail::cuda_ep_gather_rows<T>{x, s.row_token.data(), d, send.data()},
             "switchyard::detail::cuda_ep_gather_rows");
  }
  detail::cuda_ep_exchange_rows(comm, ex, true, send.data(), recv.data(), d, ctx.stream);

  // The local phase over the received rows (float rows, weight 1: every bit kept).
  device_array<float> out(static_cast<std::size_t>(ex.recv_rows * d), ctx.stream);
  if (ex.recv_rows > 0) {
    const detail::cuda_ep_receiver_plan rp(ex, nullptr, ctx.stream);
    const auto rplan = rp.view(local);
    const expert_dims dl = detail::cuda_ep_receiver_dims(dm, ex.recv_rows, local);
    const matrix_view<const T> xr = make_view<const T>(recv.data(), ex.recv_rows, d);
    const matrix_view<float> yr = make_view<float>(out.data(), ex.recv_rows, d);
    detail::cuda_ep_local_phase(
        ctx, rplan, ex.recv_rows, local,
        [&](const device_groups& g, workspace_arena& lws, workspace_arena& lhws) {
          experts_forward_phase(expert_exec(ctx, lws), dispatch::sorted_grouped{}, act, dl, xr,
                                rplan, w, groups_ref(g), nullptr, yr, nullptr, lws, lhws);
        });
  }

  device_array<float> back(static_cast<std::size_t>(ex.send_rows * d), ctx.stream);
  detail::cuda_ep_exchange_rows(comm, ex, false, out.data(), back.data(), d, ctx.stream);

  if (tokens * d > 0) {
    for_each(ctx.stream, tokens * d,
             ops::combine_slot_elements<T, Id, W>{{plan.weights, plan.counts, s.pair_row.data(),
                                                   width, d, back.data(), x, false, nullptr, y}},
             "switchyard::ops::combine_slot_elements");
  }
}

//! `experts_backward` under expert parallelism (file comment): dx [T, d] += ∂/∂x (slot
//! order, when present), d_weights [T·width] = ⟨dy_t, FFN_e(x_t)⟩ per kept pair (0 for unused
//! and dropped pairs), this rank's E/N experts' gradients += the sum over every rank's rows
//! routed to them. Collective. Measuring arenas take nothing.
template <parallel::Comm C, class Capacity, class Local, class Act, ElementType T, class Id,
          class W>
void experts_backward(const context& ctx, const parallel::ExpertParallel<C, Capacity, Local>& ep,
                      const Act& act, const expert_dims& dm, const matrix_view<const T>& x,
                      const routing::plan_view<Id, W>& plan, const expert_weights<T>& w,
                      const device_groups& groups, const matrix_view<const T>& dy,
                      const matrix_view<float>& dx, const expert_grads& grads, float* d_weights,
                      workspace_arena& ws, workspace_arena& hws) {
  detail::require_device_comm<C>();
  if constexpr (std::is_same_v<Capacity, parallel::static_bound>) {
    detail::cuda_ep_static_backward(ctx, ep, act, dm, x, plan, w, dy, dx, grads, d_weights,
                                    groups.status, ws, hws);
    return;
  }
  if (!ws.carving()) return;
  const C& comm = *ep.comm;
  const index_t d = dm.d, local = w.num_experts(), experts = ep.global_experts(local);
  const index_t tokens = plan.num_tokens(), width = plan.width();
  const detail::cuda_ep_setup<C, Capacity, Local, Id, W> s(ctx, ep, plan, experts, local);
  const detail::ep_exchange& ex = s.ex;
  const std::size_t send_rows = static_cast<std::size_t>(ex.send_rows);
  const std::size_t recv_rows = static_cast<std::size_t>(ex.recv_rows);
  const std::size_t ud = static_cast<std::size_t>(d);

  // Token rows, dy rows (T) and each pair's combine weight (float) to the owners.
  device_array<T> send(send_rows * ud, ctx.stream), xr(recv_rows * ud, ctx.stream),
      dyr(recv_rows * ud, ctx.stream);
  std::vector<float> wsend_host(send_rows, 0.0f);
  detail::pack_pair_rows(
      s.host.view(), ex, 1,
      detail::pair_weights<const typename decltype(s.host)::weight_type>{s.host.view().weights},
      wsend_host.data());
  device_array<float> wsend(wsend_host, ctx.stream), wr(recv_rows, ctx.stream);
  const index_t n_send = ex.send_rows * d;
  if (n_send > 0) {
    for_each(ctx.stream, n_send,
             detail::cuda_ep_gather_rows<T>{x, s.row_token.data(), d, send.data()},
             "switchyard::detail::cuda_ep_gather_rows");
  }
  detail::cuda_ep_exchange_rows(comm, ex, true, send.data(), xr.data(), d, ctx.stream);
  if (n_send > 0) {
    for_each(ctx.stream, n_send,
             detail::cuda_ep_gather_rows<T>{dy, s.row_token.data(), d, send.data()},
             "switchyard::detail::cuda_ep_gather_rows");
  }
  detail::cuda_ep_exchange_rows(comm, ex, true, send.data(), dyr.data(), d, ctx.stream);
  detail::cuda_ep_exchange_rows(comm, ex, true, wsend.data(), wr.data(), index_t{1}, ctx.stream);

  // The local backward: dX rows into a zeroed float [R, d] (one slot per row: dX itself),
  // d_weights per row, the weight gradients accumulated into this rank's views.
  device_array<float> dxr(recv_rows * ud, ctx.stream), dwr(recv_rows, ctx.stream);
  if (recv_rows > 0) {
    check(cudaMemsetAsync(dxr.data(), 0, sizeof(float) * recv_rows * ud, ctx.stream),
          "cudaMemsetAsync");
    check(cudaMemsetAsync(dwr.data(), 0, sizeof(float) * recv_rows, ctx.stream), "cudaMemsetAsync");
    const std::vector<float> wr_host = wr.to_host();  // the receiver plan's weights
    const detail::cuda_ep_receiver_plan rp(ex, wr_host.data(), ctx.stream);
    const auto rplan = rp.view(local);
    const expert_dims dl = detail::cuda_ep_receiver_dims(dm, ex.recv_rows, local);
    const matrix_view<const T> xv = make_view<const T>(xr.data(), ex.recv_rows, d);
    const matrix_view<const T> dyv = make_view<const T>(dyr.data(), ex.recv_rows, d);
    const matrix_view<float> dxv = make_view<float>(dxr.data(), ex.recv_rows, d);
    detail::cuda_ep_local_phase(
        ctx, rplan, ex.recv_rows, local,
        [&](const device_groups& g, workspace_arena& lws, workspace_arena& lhws) {
          experts_backward_phase(expert_exec(ctx, lws), dispatch::sorted_grouped{}, act, dl, xv,
                                 rplan, w, groups_ref(g), dyv, dxv, grads,
                                 lws.carving() ? dwr.data() : nullptr, lws, lhws);
        });
  }

  device_array<float> back(send_rows * ud, ctx.stream), dwb(send_rows, ctx.stream);
  detail::cuda_ep_exchange_rows(comm, ex, false, dxr.data(), back.data(), d, ctx.stream);
  detail::cuda_ep_exchange_rows(comm, ex, false, dwr.data(), dwb.data(), index_t{1}, ctx.stream);

  const index_t pairs = tokens * width;
  if (pairs > 0) {
    for_each(ctx.stream, pairs,
             detail::cuda_ep_scatter_weights{s.pair_row.data(), dwb.data(), d_weights},
             "switchyard::detail::cuda_ep_scatter_weights");
  }
  const bool has_dx = detail::present(dx);
  const ops::combine_backward_slots<T, Id, W> combine{
      plan.weights, plan.counts, s.pair_row.data(), width, d,     back.data(), x,
      dy,           false,       d_weights,         dx,    has_dx};
  if (has_dx && tokens * d > 0) {
    for_each(ctx.stream, tokens * d, ops::combine_backward_elements<T, Id, W>{combine},
             "switchyard::ops::combine_backward_elements");
  }
  // wsend_host is a pageable source of an enqueued copy: wait before it is freed.
  check(cudaStreamSynchronize(ctx.stream), "cudaStreamSynchronize");
}

}  // namespace switchyard::cuda
