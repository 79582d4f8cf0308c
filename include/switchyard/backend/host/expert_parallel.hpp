// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file expert_parallel.hpp
//! Host execution of `parallel::ExpertParallel` (docs/expert-parallel.md): overloads of
//! `host::experts_forward` / `host::experts_backward` / `host::plan_groups` for the policy,
//! which the host executor (backend/host/layer.hpp) reaches like any dispatch's. They receive
//! the plan the executor would run anyway (its FFN slots only when the layer has identity,
//! zero or constant experts, whose terms stay on the rank) with ids over the global E.
//!
//! Forward on each rank: group the used (token, slot) pairs by global expert id (stable, in
//! pair order, so expert-major and therefore rank-major: experts are sharded contiguously),
//! apply the capacity policy, exchange the per-(destination rank, local expert) row counts
//! (`all_to_all`), send the token rows in the element type T (`all_to_all_v`; static_bound:
//! fixed blocks with `all_to_all`), run the local dispatch's expert phase over the received
//! rows, send the float output rows back the same way and combine them in (token, slot) order
//! with the single-process combine. The received rows arrive source-major; as a plan of one
//! slot per row (weight 1, id the local expert) the local sorted_grouped dispatch groups them
//! per expert as [rows from rank 0 | rows from rank 1 | ...], each source's in its token order:
//! exactly the rows, in the order, the single-process layer gives that expert for the
//! concatenation of the ranks' batches, so its GEMMs make the same calls on the same rows.
//! Weight 1 keeps every output bit (1·v = v; 0 + v differs from v only in the sign of a zero,
//! which the combine's sum from +0 erases anyway).
//!
//! Backward sends the token rows, the dy rows (T) and each pair's combine weight (float), runs
//! the local dispatch's backward (the dY rows w·dy, d_weights ⟨dy, Y⟩ and the weight gradients
//! as the single-process layer forms them, accumulated on the owner rank), and sends the dX
//! rows and d_weights back; the sender writes d_weights and adds dx in slot order with the
//! single-process combine's backward. Which pair a returned row belongs to is known to the
//! sender alone (the order is preserved), so no (token, slot) metadata travels.
//!
//! Allocation: the exchange's buffers and the local phase's workspace are allocated per call
//! (std::vector; eager sizes them from the exchanged counts, static_bound from the bound). The
//! layer's workspace query counts none of them.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "switchyard/backend/host/dispatch_plan.hpp"
#include "switchyard/backend/host/expert_backward.hpp"
#include "switchyard/backend/host/expert_forward.hpp"
#include "switchyard/backend/host/expert_phase.hpp"
#include "switchyard/backend/host/run_ops.hpp"
#include "switchyard/core/element_type.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/core/workspace.hpp"
#include "switchyard/dispatch/groups.hpp"
#include "switchyard/layer/expert_weights.hpp"
#include "switchyard/ops/combine.hpp"
#include "switchyard/ops/exchange_plan.hpp"
#include "switchyard/parallel/comm.hpp"
#include "switchyard/parallel/expert_parallel.hpp"
#include "switchyard/routing/plan.hpp"

namespace switchyard::detail {

//! One exchange as the sender and the receiver see it (every count in rows).
struct ep_exchange {
  index_t ranks = 1;          //!< N
  index_t local_experts = 0;  //!< E/N
  index_t peer_rows = -1;     //!< static_bound's block, -1 for eager
  std::vector<index_t> pair_row;    //!< [T·width] send row of each pair, or unused / dropped
  std::vector<index_t> send_count;  //!< [N·E/N] rows this rank sends rank p for local expert l
  std::vector<index_t> recv_count;  //!< [N·E/N] rows rank s sends this rank for local expert l
  std::vector<index_t> send_row0;   //!< [N] first send row of destination p
  std::vector<index_t> recv_row0;   //!< [N] first receive row of source s
  index_t send_rows = 0;            //!< rows of the send buffer (static: N·peer_rows)
  index_t recv_rows = 0;            //!< rows of the receive buffer (static: N·peer_rows)

  [[nodiscard]] index_t sent_to(index_t p) const { return sum(send_count, p); }
  [[nodiscard]] index_t received_from(index_t s) const { return sum(recv_count, s); }

 private:
  [[nodiscard]] index_t sum(const std::vector<index_t>& c, index_t r) const {
    index_t n = 0;
    for (index_t l = 0; l < local_experts; ++l) n += c[static_cast<std::size_t>(r * local_experts + l)];
    return n;
  }
};

//! memory_space_error unless the communicator exchanges host memory (every rank has the same
//! engine type, so every rank throws it, before any exchange).
template <parallel::Comm C>
void require_host_comm() {
  if (C::space != parallel::memory_space::host) {
    throw memory_space_error(
        "dispatch.comm",
        "dispatch.comm: the host backend exchanges host buffers, but this communicator's "
        "memory space is device (use a host engine: parallel::thread_comm, parallel::mpi_comm)");
  }
}

//! Plans the exchange of `plan` (ids in [0, E), E = N·local_experts): groups the used pairs by
//! expert, applies the capacity (static_bound: per destination, pairs claim its peer_rows
//! rows in pair order; the rest are dropped and counted in `dropped[e]` when given), and
//! exchanges the per-(rank, local expert) counts with the peers (`all_to_all`).
template <parallel::Comm C, class Capacity, class Local, class Id, class W>
ep_exchange plan_exchange(const parallel::ExpertParallel<C, Capacity, Local>& ep,
                          const routing::plan_view<Id, W>& plan, index_t experts,
                          index_t local_experts, span<index_t> dropped) {
  const C& comm = *ep.comm;
  ep_exchange ex;
  ex.ranks = static_cast<index_t>(comm.size());
  ex.local_experts = local_experts;
  if (experts != ex.ranks * local_experts) {  // the layer's agreed check makes this hold
    throw shape_error("weights.w1", concat("weights.w1: ExpertParallel expects E / N = ", experts,
                                           " / ", ex.ranks, " experts per rank, got ",
                                           local_experts));
  }
  if constexpr (std::is_same_v<Capacity, parallel::static_bound>) ex.peer_rows = ep.capacity.peer_rows;
  const index_t tokens = plan.num_tokens(), width = plan.width(), n = ex.ranks;
  const std::size_t pairs = static_cast<std::size_t>(tokens * width);
  ex.pair_row.assign(pairs, dispatch::unused_pair);
  std::vector<index_t> kept(static_cast<std::size_t>(experts), 0);
  std::vector<index_t> claimed(static_cast<std::size_t>(n), 0);
  for (std::size_t e = 0; e < dropped.size() && e < static_cast<std::size_t>(experts); ++e)
    dropped[e] = 0;
  // Capacity, in pair order: a kept pair is marked 0, a dropped one dropped_pair.
  for (index_t t = 0; t < tokens; ++t) {
    const index_t c = plan.counts(t);
    for (index_t j = 0; j < c; ++j) {
      const index_t e = plan.expert_ids(t, j), p = e / local_experts;
      const std::size_t pr = static_cast<std::size_t>(dispatch::pair_index(t, j, width));
      if (ex.peer_rows >= 0 && claimed[static_cast<std::size_t>(p)] >= ex.peer_rows) {
        ex.pair_row[pr] = dispatch::dropped_pair;
        if (static_cast<std::size_t>(e) < dropped.size()) ++dropped[static_cast<std::size_t>(e)];
        continue;
      }
      ++claimed[static_cast<std::size_t>(p)];
      ++kept[static_cast<std::size_t>(e)];
      ex.pair_row[pr] = 0;
    }
  }
  // Rows per destination: expert-major (rank-major), each expert's pairs in pair order.
  ex.send_count = kept;  // [N·E/N] = [E]: global expert e = p·E/N + l
  ex.send_row0.assign(static_cast<std::size_t>(n), 0);
  std::vector<index_t> next(static_cast<std::size_t>(experts), 0);
  index_t row = 0;
  for (index_t p = 0; p < n; ++p) {
    ex.send_row0[static_cast<std::size_t>(p)] = ex.peer_rows >= 0 ? p * ex.peer_rows : row;
    index_t r = ex.send_row0[static_cast<std::size_t>(p)];
    for (index_t l = 0; l < local_experts; ++l) {
      next[static_cast<std::size_t>(p * local_experts + l)] = r;
      r += kept[static_cast<std::size_t>(p * local_experts + l)];
    }
    row = r;
  }
  ex.send_rows = ex.peer_rows >= 0 ? n * ex.peer_rows : row;
  for (index_t t = 0; t < tokens; ++t) {
    const index_t c = plan.counts(t);
    for (index_t j = 0; j < c; ++j) {
      const std::size_t pr = static_cast<std::size_t>(dispatch::pair_index(t, j, width));
      if (ex.pair_row[pr] != 0) continue;  // dropped
      ex.pair_row[pr] = next[static_cast<std::size_t>(plan.expert_ids(t, j))]++;
    }
  }
  // The counts: block p of E/N counts goes to rank p.
  ex.recv_count.assign(static_cast<std::size_t>(experts), 0);
  comm.all_to_all(ex.send_count.data(), ex.recv_count.data(),
                  local_experts * static_cast<index_t>(sizeof(index_t)), nullptr);
  ex.recv_row0.assign(static_cast<std::size_t>(n), 0);
  row = 0;
  for (index_t s = 0; s < n; ++s) {
    const index_t got = ex.received_from(s);
    if (ex.peer_rows >= 0 && got > ex.peer_rows) {
      throw comm_error(0, concat("switchyard: ExpertParallel: rank ", s, " announced ", got,
                                 " rows, over static_bound::peer_rows = ", ex.peer_rows,
                                 " (the ranks disagree on the capacity policy)"));
    }
    ex.recv_row0[static_cast<std::size_t>(s)] = ex.peer_rows >= 0 ? s * ex.peer_rows : row;
    row += got;
  }
  ex.recv_rows = ex.peer_rows >= 0 ? n * ex.peer_rows : row;
  return ex;
}

//! Sends rows of `elems` U each: `to_owner` from the send layout to the receive layout (token
//! rows to the experts' ranks), else back. static_bound: fixed blocks of peer_rows rows
//! (`all_to_all`); eager: the exact rows (`all_to_all_v`).
template <parallel::Comm C, class U>
void exchange_rows(const C& comm, const ep_exchange& ex, bool to_owner, const U* send, U* recv,
                   index_t elems) {
  const index_t row_bytes = elems * static_cast<index_t>(sizeof(U));
  if (ex.peer_rows >= 0) {
    comm.all_to_all(send, recv, ex.peer_rows * row_bytes, nullptr);
    return;
  }
  const std::size_t n = static_cast<std::size_t>(ex.ranks);
  std::vector<index_t> sb(n), sd(n), rb(n), rd(n);
  for (std::size_t r = 0; r < n; ++r) {
    const index_t out = to_owner ? ex.sent_to(static_cast<index_t>(r))
                                 : ex.received_from(static_cast<index_t>(r));
    const index_t in = to_owner ? ex.received_from(static_cast<index_t>(r))
                                : ex.sent_to(static_cast<index_t>(r));
    sb[r] = out * row_bytes;
    sd[r] = (to_owner ? ex.send_row0[r] : ex.recv_row0[r]) * row_bytes;
    rb[r] = in * row_bytes;
    rd[r] = (to_owner ? ex.recv_row0[r] : ex.send_row0[r]) * row_bytes;
  }
  comm.all_to_all_v(send, sb.data(), sd.data(), recv, rb.data(), rd.data(), nullptr);
}

//! The receiver's plan: one slot per received row (id = its local expert, count 0 for the
//! unused rows of static blocks), weights given per row (or 1).
struct ep_receiver_plan {
  std::vector<std::int32_t> ids, counts;
  std::vector<float> weights;

  ep_receiver_plan(const ep_exchange& ex, const float* row_weights) {
    const std::size_t r = static_cast<std::size_t>(ex.recv_rows);
    ids.assign(r, 0);
    counts.assign(r, 0);
    weights.assign(r, 0.0f);
    for (index_t s = 0; s < ex.ranks; ++s) {
      index_t row = ex.recv_row0[static_cast<std::size_t>(s)];
      for (index_t l = 0; l < ex.local_experts; ++l) {
        const index_t n = ex.recv_count[static_cast<std::size_t>(s * ex.local_experts + l)];
        for (index_t i = 0; i < n; ++i, ++row) {
          const std::size_t k = static_cast<std::size_t>(row);
          ids[k] = static_cast<std::int32_t>(l);
          counts[k] = 1;
          weights[k] = row_weights != nullptr ? row_weights[k] : 1.0f;
        }
      }
    }
  }

  [[nodiscard]] routing::plan_view<const std::int32_t, const float> view(index_t experts) const {
    const index_t r = static_cast<index_t>(counts.size());
    return {make_view<const std::int32_t>(ids.data(), r, index_t{1}),
            make_view<const float>(weights.data(), r, index_t{1}),
            make_view<const std::int32_t>(counts.data(), r), experts};
  }
};

//! The local phase's sizes: R received rows, one slot each, the rank's E/N experts.
inline host::expert_dims receiver_dims(const host::expert_dims& dm, index_t rows,
                                       index_t local_experts, index_t max_rows) {
  host::expert_dims dl = dm;
  dl.tokens = rows;
  dl.width = 1;
  dl.experts = local_experts;
  dl.max_rows = max_rows;
  dl.weight_on_input = false;
  return dl;
}

//! Copies each kept pair's token row (type U, `elems` per row) to its send row.
template <class Id, class W, class Src>
void pack_pair_rows(const routing::plan_view<Id, W>& plan, const ep_exchange& ex, index_t elems,
                    const Src& row_of, std::vector<typename Src::value_type>& out) {
  const index_t tokens = plan.num_tokens(), width = plan.width();
  for (index_t t = 0; t < tokens; ++t) {
    const index_t c = plan.counts(t);
    for (index_t j = 0; j < c; ++j) {
      const index_t row = ex.pair_row[static_cast<std::size_t>(dispatch::pair_index(t, j, width))];
      if (row < 0) continue;
      row_of(t, j, out.data() + row * elems);
    }
  }
}

//! A row source for pack_pair_rows: row t of a [T, d] matrix.
template <ElementType T>
struct token_rows {
  using value_type = T;
  matrix_view<const T> m;
  void operator()(index_t t, index_t, T* out) const {
    for (index_t i = 0; i < m.extent(1); ++i) out[i] = m(t, i);
  }
};

//! A row source for pack_pair_rows: the pair's combine weight (one float).
template <class W>
struct pair_weights {
  using value_type = float;
  matrix_view<W> weights;
  void operator()(index_t t, index_t j, float* out) const { *out = weights(t, j); }
};

//! A local dispatch that can drop received rows (`padded_capacity`): the verdict on every row
//! a rank receives is its receiver plan's pair_row (>= 0 kept, dropped_pair dropped, unused_pair
//! for an unclaimed row of a block). `verdict_rows` returns them to the senders (fixed blocks,
//! the reverse of the token rows), and `mark_local_drops` marks each sender's dropped pairs and
//! counts them on the token's rank (`ops::ep_local_drops`, the CUDA backend's functor).
template <class Local>
inline constexpr bool ep_local_drops_rows = std::is_same_v<Local, dispatch::padded_capacity>;

//! The local dispatch the receiver runs: `padded_capacity` with drop = zero (the token's rank
//! applies `local.drop` to the pairs it learns were dropped); others as given.
template <class Local>
Local ep_receiver_policy(const Local& local) {
  Local p = local;
  if constexpr (ep_local_drops_rows<Local>) p.drop = dispatch::dropped_output::zero;
  return p;
}

//! The receiver's verdict on each of its `rows` received rows (see ep_local_drops_rows).
template <class Local, class Id, class W>
std::vector<index_t> ep_row_verdicts(const Local& local, const routing::plan_view<Id, W>& rplan,
                                     index_t rows, index_t local_experts) {
  const std::size_t e = static_cast<std::size_t>(local_experts);
  std::vector<index_t> begin(e), count(e), dropped(e), verdict(static_cast<std::size_t>(rows));
  std::vector<index_t> row_pair(static_cast<std::size_t>(local.max_rows(rows, 1, local_experts)));
  dispatch::expert_groups g;
  g.row_begin = {begin.data(), e};
  g.row_count = {count.data(), e};
  g.dropped = {dropped.data(), e};
  g.pair_row = {verdict.data(), verdict.size()};
  g.row_pair = {row_pair.data(), row_pair.size()};
  g.num_rows = static_cast<index_t>(row_pair.size());
  host::plan_groups(local, rplan, g);
  return verdict;
}

//! After the verdicts came back: marks this rank's pairs its peers dropped (pair_row) and counts
//! them in `dropped` [E] when it holds E entries.
template <class Id, class W>
void mark_local_drops(const routing::plan_view<Id, W>& plan, const std::vector<index_t>& verdict,
                      std::vector<index_t>& pair_row, span<index_t> dropped, index_t experts) {
  const ops::ep_local_drops<Id> f{
      plan.expert_ids, plan.width() > 0 ? plan.width() : 1, verdict.data(), pair_row.data(),
      static_cast<index_t>(dropped.size()) >= experts ? dropped.data() : nullptr};
  for (std::size_t p = 0; p < pair_row.size(); ++p) f(static_cast<index_t>(p));
}

}  // namespace switchyard::detail

namespace switchyard::host {

//! `ExpertParallel`: plans its groups over the rank's plan with the local dispatch (what an
//! `expert_rows_probe` records: the pairs this rank routes, grouped by global expert).
template <parallel::Comm C, class Capacity, class Local, class Id, class W>
void plan_groups(const parallel::ExpertParallel<C, Capacity, Local>& policy,
                 const routing::plan_view<Id, W>& plan, dispatch::expert_groups& g) {
  host::plan_groups(policy.local, plan, g);
}

//! `experts_forward` under expert parallelism (file comment): y [T, d] = Σ_j w_tj ·
//! FFN_{e_tj}(x_t) (+ extra), the FFNs run on the ranks that own them. `dm.experts` is the
//! global E, `w` this rank's E/N experts; `dropped` [E] receives this rank's pairs dropped by
//! static_bound. Collective: every rank calls it. A measuring arena takes nothing.
template <parallel::Comm C, class Capacity, class Local, class Act, ElementType T, class Id,
          class W, ElementType Out>
void experts_forward(const parallel::ExpertParallel<C, Capacity, Local>& ep, const Act& act,
                     const expert_dims& dm, const matrix_view<const T>& x,
                     const routing::plan_view<Id, W>& plan, const expert_weights<T>& w,
                     const float* extra, const matrix_view<Out>& y, span<index_t> dropped,
                     workspace_arena& ws) {
  if (!ws.carving()) return;
  detail::require_host_comm<C>();
  const C& comm = *ep.comm;
  const index_t d = dm.d, local = w.num_experts();
  const detail::ep_exchange ex = detail::plan_exchange(ep, plan, dm.experts, local, dropped);

  std::vector<T> send(static_cast<std::size_t>(ex.send_rows * d));
  std::vector<T> recv(static_cast<std::size_t>(ex.recv_rows * d));
  detail::pack_pair_rows(plan, ex, d, detail::token_rows<T>{x}, send);
  detail::exchange_rows(comm, ex, true, send.data(), recv.data(), d);

  // The local phase over the received rows (output float rows, weight 1: every bit kept).
  const Local lp = detail::ep_receiver_policy(ep.local);
  std::vector<index_t> verdict;  // padded_capacity: what the local dispatch made of each row
  std::vector<float> out(static_cast<std::size_t>(ex.recv_rows * d), 0.0f);
  if (ex.recv_rows > 0) {
    const detail::ep_receiver_plan rp(ex, nullptr);
    const auto rplan = rp.view(local);
    const expert_dims dl = detail::receiver_dims(dm, ex.recv_rows, local,
                                                 lp.max_rows(ex.recv_rows, 1, local));
    const matrix_view<const T> xr = make_view<const T>(recv.data(), ex.recv_rows, d);
    const matrix_view<float> yr = make_view<float>(out.data(), ex.recv_rows, d);
    std::vector<index_t> local_dropped(static_cast<std::size_t>(local), 0);
    workspace_arena measure;
    experts_forward(lp, act, dl, xr, rplan, w, nullptr, yr, span<index_t>{}, measure);
    std::vector<std::byte> scratch(measure.required());
    workspace_arena arena({scratch.data(), scratch.size()});
    experts_forward(lp, act, dl, xr, rplan, w, nullptr, yr,
                    span<index_t>(local_dropped.data(), local_dropped.size()), arena);
    if constexpr (detail::ep_local_drops_rows<Local>)
      verdict = detail::ep_row_verdicts(lp, rplan, ex.recv_rows, local);
  }

  std::vector<float> back(static_cast<std::size_t>(ex.send_rows * d), 0.0f);
  detail::exchange_rows(comm, ex, false, out.data(), back.data(), d);

  std::vector<index_t> pair_row = ex.pair_row;
  dispatch::expert_groups g;
  g.drop = dispatch::dropped_output::zero;
  if constexpr (detail::ep_local_drops_rows<Local>) {
    verdict.resize(static_cast<std::size_t>(ex.recv_rows), dispatch::unused_pair);
    std::vector<index_t> returned(static_cast<std::size_t>(ex.send_rows));
    detail::exchange_rows(comm, ex, false, verdict.data(), returned.data(), index_t{1});
    detail::mark_local_drops(plan, returned, pair_row, dropped, dm.experts);
    g.drop = ep.local.drop;
  }
  g.pair_row = {pair_row.data(), pair_row.size()};
  detail::combine(plan, g, back.data(), x, extra, y, false);
}

//! `experts_backward` under expert parallelism (file comment): dx [T, d] += ∂/∂x (slot order),
//! d_weights [T·width] = ⟨dy_t, FFN_e(x_t)⟩ per kept pair (0 for unused and dropped pairs),
//! this rank's E/N experts' gradients += the sum over every rank's rows routed to them.
//! Collective. A measuring arena takes nothing.
template <parallel::Comm C, class Capacity, class Local, class Act, ElementType T, class Id,
          class W>
void experts_backward(const parallel::ExpertParallel<C, Capacity, Local>& ep, const Act& act,
                      const expert_dims& dm, const matrix_view<const T>& x,
                      const routing::plan_view<Id, W>& plan, const expert_weights<T>& w,
                      const matrix_view<const T>& dy, const matrix_view<float>& dx,
                      const expert_grads& grads, float* d_weights, workspace_arena& ws) {
  if (!ws.carving()) return;
  detail::require_host_comm<C>();
  const C& comm = *ep.comm;
  const index_t d = dm.d, local = w.num_experts();
  const detail::ep_exchange ex = detail::plan_exchange(ep, plan, dm.experts, local, {});

  const std::size_t send_rows = static_cast<std::size_t>(ex.send_rows);
  const std::size_t recv_rows = static_cast<std::size_t>(ex.recv_rows);
  std::vector<T> send(send_rows * static_cast<std::size_t>(d));
  std::vector<T> xr(recv_rows * static_cast<std::size_t>(d));
  std::vector<T> dyr(recv_rows * static_cast<std::size_t>(d));
  std::vector<float> wsend(send_rows, 0.0f), wr(recv_rows, 0.0f);
  detail::pack_pair_rows(plan, ex, d, detail::token_rows<T>{x}, send);
  detail::exchange_rows(comm, ex, true, send.data(), xr.data(), d);
  detail::pack_pair_rows(plan, ex, d, detail::token_rows<T>{dy}, send);
  detail::exchange_rows(comm, ex, true, send.data(), dyr.data(), d);
  detail::pack_pair_rows(plan, ex, 1, detail::pair_weights<W>{plan.weights}, wsend);
  detail::exchange_rows(comm, ex, true, wsend.data(), wr.data(), index_t{1});

  // The local backward: dX rows into a zeroed float [R, d] (one slot per row: dX itself),
  // d_weights per row, the weight gradients accumulated into this rank's views.
  const Local lp = detail::ep_receiver_policy(ep.local);
  std::vector<index_t> verdict;  // padded_capacity: what the local dispatch made of each row
  std::vector<float> dxr(recv_rows * static_cast<std::size_t>(d), 0.0f), dwr(recv_rows, 0.0f);
  if (ex.recv_rows > 0) {
    const detail::ep_receiver_plan rp(ex, wr.data());
    const auto rplan = rp.view(local);
    const expert_dims dl = detail::receiver_dims(dm, ex.recv_rows, local,
                                                 lp.max_rows(ex.recv_rows, 1, local));
    const matrix_view<const T> xv = make_view<const T>(xr.data(), ex.recv_rows, d);
    const matrix_view<const T> dyv = make_view<const T>(dyr.data(), ex.recv_rows, d);
    const matrix_view<float> dxv = make_view<float>(dxr.data(), ex.recv_rows, d);
    workspace_arena measure;
    experts_backward(lp, act, dl, xv, rplan, w, dyv, dxv, grads, nullptr, measure);
    std::vector<std::byte> scratch(measure.required());
    workspace_arena arena({scratch.data(), scratch.size()});
    experts_backward(lp, act, dl, xv, rplan, w, dyv, dxv, grads, dwr.data(), arena);
    if constexpr (detail::ep_local_drops_rows<Local>)
      verdict = detail::ep_row_verdicts(lp, rplan, ex.recv_rows, local);
  }

  std::vector<float> back(send_rows * static_cast<std::size_t>(d), 0.0f), dwb(send_rows, 0.0f);
  detail::exchange_rows(comm, ex, false, dxr.data(), back.data(), d);
  detail::exchange_rows(comm, ex, false, dwr.data(), dwb.data(), index_t{1});

  std::vector<index_t> pair_row = ex.pair_row;
  bool pass_through = false;
  if constexpr (detail::ep_local_drops_rows<Local>) {
    verdict.resize(recv_rows, dispatch::unused_pair);
    std::vector<index_t> returned(send_rows);
    detail::exchange_rows(comm, ex, false, verdict.data(), returned.data(), index_t{1});
    detail::mark_local_drops(plan, returned, pair_row, span<index_t>{}, dm.experts);
    pass_through = ep.local.drop == dispatch::dropped_output::scaled_input;
  }
  const index_t tokens = plan.num_tokens(), width = plan.width();
  for (std::size_t p = 0; p < pair_row.size(); ++p) {
    const index_t row = pair_row[p];
    d_weights[p] = row >= 0 ? dwb[static_cast<std::size_t>(row)] : 0.0f;
  }
  const ops::combine_backward_slots<T, Id, W> combine{
      plan.weights, plan.counts, pair_row.data(), width, d, back.data(), x, dy, pass_through,
      d_weights, dx, detail::present(dx), false};
  detail::run_static(tokens, tokens * width * d > (1 << 15), combine);
}

}  // namespace switchyard::host
