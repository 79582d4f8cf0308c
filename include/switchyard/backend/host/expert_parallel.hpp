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
//! Allocation (`ep_storage`): under static_bound every row buffer (token, dy and output rows,
//! the receiver's plan, the verdicts) and the local phase's workspace come from the layer's
//! workspace: their sizes depend on N·peer_rows, d, T·width and E/N alone, so the measuring
//! pass takes the same and the workspace queries count them (with the communicator set). What
//! is still allocated per call does not grow with the bound: the planning arrays
//! (`ep_exchange`: O(T·width + E + N) integers) and the agreement's N values. eager sizes its
//! buffers from the exchanged counts and allocates them per call (std::vector), uncounted.

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
#include "switchyard/core/checked.hpp"
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

//! Writes the receiver's plan into ids / counts / weights [recv_rows] (zeroed by the caller):
//! one slot per received row (id = its local expert, count 0 for the unused rows of static
//! blocks), weights given per row (or 1).
inline void fill_receiver_plan(const ep_exchange& ex, const float* row_weights,
                               std::int32_t* ids, std::int32_t* counts, float* weights) {
  for (index_t s = 0; s < ex.ranks; ++s) {
    index_t row = ex.recv_row0[static_cast<std::size_t>(s)];
    for (index_t l = 0; l < ex.local_experts; ++l) {
      const index_t n = ex.recv_count[static_cast<std::size_t>(s * ex.local_experts + l)];
      for (index_t i = 0; i < n; ++i, ++row) {
        ids[row] = static_cast<std::int32_t>(l);
        counts[row] = 1;
        weights[row] = row_weights != nullptr ? row_weights[row] : 1.0f;
      }
    }
  }
}

//! The receiver's plan over given arrays [rows] (`fill_receiver_plan`).
inline routing::plan_view<const std::int32_t, const float> receiver_view(
    const std::int32_t* ids, const std::int32_t* counts, const float* weights, index_t rows,
    index_t experts) {
  return {make_view<const std::int32_t>(ids, rows, index_t{1}),
          make_view<const float>(weights, rows, index_t{1}),
          make_view<const std::int32_t>(counts, rows), experts};
}

//! The receiver's plan in owned vectors (the CUDA backend's eager planning).
struct ep_receiver_plan {
  std::vector<std::int32_t> ids, counts;
  std::vector<float> weights;

  ep_receiver_plan(const ep_exchange& ex, const float* row_weights) {
    const std::size_t r = static_cast<std::size_t>(ex.recv_rows);
    ids.assign(r, 0);
    counts.assign(r, 0);
    weights.assign(r, 0.0f);
    fill_receiver_plan(ex, row_weights, ids.data(), counts.data(), weights.data());
  }

  [[nodiscard]] routing::plan_view<const std::int32_t, const float> view(index_t experts) const {
    return receiver_view(ids.data(), counts.data(), weights.data(),
                         static_cast<index_t>(counts.size()), experts);
  }
};

//! Where one call's row buffers live (file comment, "Allocation"): carved from the layer's
//! workspace under static_bound (their sizes depend on N·peer_rows, d, T·width and E/N alone,
//! so the measuring pass takes the same and the workspace queries count them), else owned
//! (eager: sized from the exchanged counts). Every buffer starts zeroed (measuring: null).
class ep_storage {
 public:
  //! From `ws` (static_bound), or owned when null (eager).
  explicit ep_storage(workspace_arena* ws) : ws_(ws) {}

  template <class U>
  U* take(index_t n) {
    const std::size_t count = static_cast<std::size_t>(n);
    U* p = nullptr;
    if (ws_ != nullptr) {
      p = ws_->take<U>(n);
      if (!ws_->carving()) return p;
    } else {
      owned_.emplace_back(count * sizeof(U));  // operator new: aligned for U
      p = reinterpret_cast<U*>(owned_.back().data());
    }
    std::fill_n(p, count, U{});
    return p;
  }

 private:
  workspace_arena* ws_;
  std::vector<std::vector<std::byte>> owned_;
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
                    const Src& row_of, typename Src::value_type* out) {
  const index_t tokens = plan.num_tokens(), width = plan.width();
  for (index_t t = 0; t < tokens; ++t) {
    const index_t c = plan.counts(t);
    for (index_t j = 0; j < c; ++j) {
      const index_t row = ex.pair_row[static_cast<std::size_t>(dispatch::pair_index(t, j, width))];
      if (row < 0) continue;
      row_of(t, j, out + row * elems);
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

//! What a pair dropped anywhere contributes, applied on the token's rank: the local
//! padded_capacity's `drop`; zero otherwise (static_bound's drops under sorted_grouped).
template <class Local>
dispatch::dropped_output ep_sender_drop(const Local& local) {
  if constexpr (ep_local_drops_rows<Local>) {
    return local.drop;
  } else {
    (void)local;
    return dispatch::dropped_output::zero;
  }
}

//! The verdicts' arrays of one call (ep_local_drops_rows): the receiver's verdict on each of its
//! rows [recv rows], what came back for each send row [send rows], and the local dispatch's
//! groups (E/N counts and its row map). Nothing for a local dispatch that keeps every row.
struct ep_verdicts {
  index_t* verdict = nullptr;
  index_t* returned = nullptr;
  dispatch::expert_groups g;

  template <class Local>
  ep_verdicts(const Local& lp, ep_storage& st, index_t send_rows, index_t recv_rows,
              index_t local_experts) {
    if constexpr (ep_local_drops_rows<Local>) {
      const std::size_t e = static_cast<std::size_t>(local_experts);
      const index_t rows = lp.max_rows(recv_rows, 1, local_experts);
      verdict = st.take<index_t>(recv_rows);
      returned = st.take<index_t>(send_rows);
      g.row_begin = {st.take<index_t>(local_experts), e};
      g.row_count = {st.take<index_t>(local_experts), e};
      g.dropped = {st.take<index_t>(local_experts), e};
      g.pair_row = {verdict, static_cast<std::size_t>(recv_rows)};
      g.row_pair = {st.take<index_t>(rows), static_cast<std::size_t>(rows)};
      g.num_rows = rows;
    } else {
      (void)lp, (void)st, (void)send_rows, (void)recv_rows, (void)local_experts;
    }
  }

  //! The receiver's verdicts: its local dispatch's pair_row over the receiver plan (unclaimed
  //! rows stay unused_pair: verdict starts as such when there are no rows to plan).
  template <class Local, class Id, class W>
  void decide(const Local& lp, const routing::plan_view<Id, W>& rplan, index_t recv_rows) {
    if constexpr (ep_local_drops_rows<Local>) {
      if (recv_rows > 0) host::plan_groups(lp, rplan, g);
    } else {
      (void)lp, (void)rplan, (void)recv_rows;
    }
  }

  //! Returns the verdicts to the senders, then marks this rank's pairs its peers dropped
  //! (pair_row, `ops::ep_local_drops`) and counts them in `dropped` [E] when it holds E.
  template <class Local, parallel::Comm C, class Id, class W>
  void apply(const C& comm, const ep_exchange& ex, const routing::plan_view<Id, W>& plan,
             index_t* pair_row, index_t pairs, span<index_t> dropped, index_t experts) const {
    if constexpr (ep_local_drops_rows<Local>) {
      exchange_rows(comm, ex, false, verdict, returned, index_t{1});
      const ops::ep_local_drops<Id> f{
          plan.expert_ids, plan.width() > 0 ? plan.width() : 1, returned, pair_row,
          static_cast<index_t>(dropped.size()) >= experts ? dropped.data() : nullptr};
      for (index_t p = 0; p < pairs; ++p) f(p);
    } else {
      (void)comm, (void)ex, (void)plan, (void)pair_row, (void)pairs, (void)dropped,
          (void)experts;
    }
  }
};

//! Rows a rank sends and receives under static_bound (N·peer_rows each), known before any
//! exchange; -1 under eager (known after the count exchange).
template <parallel::Comm C, class Capacity, class Local>
index_t ep_fixed_rows(const parallel::ExpertParallel<C, Capacity, Local>& ep) {
  if constexpr (std::is_same_v<Capacity, parallel::static_bound>) {
    ep.capacity.validate();  // a workspace query may come before the layer's checks
    return checked_mul("dispatch.capacity.peer_rows", static_cast<index_t>(ep.comm->size()),
                       ep.capacity.peer_rows);
  } else {
    (void)ep;
    return -1;
  }
}

//! One call's exchange: planned (`plan_exchange`, collective) when carving; when measuring
//! (static_bound only), just its fixed row counts.
template <parallel::Comm C, class Capacity, class Local, class Id, class W>
ep_exchange ep_call_exchange(const parallel::ExpertParallel<C, Capacity, Local>& ep,
                             const routing::plan_view<Id, W>& plan, index_t experts,
                             index_t local_experts, span<index_t> dropped, bool carving) {
  if (carving) {
    require_host_comm<C>();
    return plan_exchange(ep, plan, experts, local_experts, dropped);
  }
  ep_exchange ex;
  ex.send_rows = ex.recv_rows = ep_fixed_rows(ep);
  return ex;
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

//! Bytes the local phase's forward (`backward`: its backward) takes over `rows` received rows:
//! measured from the sizes alone, as the layer's own queries are.
template <bool Backward, class Local, class Act, ElementType T>
std::size_t ep_local_bytes(const Local& lp, const Act& act, const expert_dims& dl,
                           const expert_weights<T>& w) {
  if (dl.tokens <= 0) return 0;
  workspace_arena measure;
  if constexpr (Backward) {
    experts_backward(lp, act, dl, matrix_view<const T>{},
                     routing::plan_view<const std::int32_t, const float>{}, w,
                     matrix_view<const T>{}, matrix_view<float>{}, expert_grads{}, nullptr,
                     measure);
  } else {
    experts_forward(lp, act, dl, matrix_view<const T>{},
                    routing::plan_view<const std::int32_t, const float>{}, w, nullptr,
                    matrix_view<float>{}, span<index_t>{}, measure);
  }
  return measure.required();
}

//! `experts_forward` under expert parallelism (file comment): y [T, d] = Σ_j w_tj ·
//! FFN_{e_tj}(x_t) (+ extra), the FFNs run on the ranks that own them. `dm.experts` is the
//! global E, `w` this rank's E/N experts; `dropped` [E] receives this rank's pairs dropped by
//! static_bound (and by a local padded_capacity). Collective: every rank calls it.
//! static_bound: every row buffer comes from `ws` (a measuring arena takes the same sizes, with
//! a communicator set); eager: owned, sized from the counts (a measuring arena takes nothing).
template <parallel::Comm C, class Capacity, class Local, class Act, ElementType T, class Id,
          class W, ElementType Out>
void experts_forward(const parallel::ExpertParallel<C, Capacity, Local>& ep, const Act& act,
                     const expert_dims& dm, const matrix_view<const T>& x,
                     const routing::plan_view<Id, W>& plan, const expert_weights<T>& w,
                     const float* extra, const matrix_view<Out>& y, span<index_t> dropped,
                     workspace_arena& ws) {
  constexpr bool fixed = std::is_same_v<Capacity, parallel::static_bound>;
  if (!ws.carving() && (!fixed || ep.comm == nullptr)) return;
  const index_t d = dm.d, local = w.num_experts(), pairs = dm.tokens * dm.width;
  const Local lp = detail::ep_receiver_policy(ep.local);
  const detail::ep_exchange ex = detail::ep_call_exchange(ep, plan, dm.experts, local, dropped,
                                                         ws.carving());
  // The buffers, in one order for both passes (static_bound: sizes from N·peer_rows alone).
  detail::ep_storage st(fixed ? &ws : nullptr);
  const index_t sr = ex.send_rows, rr = ex.recv_rows;
  const expert_dims dl = detail::receiver_dims(dm, rr, local, lp.max_rows(rr, 1, local));
  T* send = st.take<T>(detail::checked_mul("rows", sr, d));
  T* recv = st.take<T>(detail::checked_mul("rows", rr, d));
  float* out = st.take<float>(rr * d);
  float* back = st.take<float>(sr * d);
  std::int32_t* rids = st.take<std::int32_t>(rr);
  std::int32_t* rcounts = st.take<std::int32_t>(rr);
  float* rweights = st.take<float>(rr);
  index_t* local_dropped = st.take<index_t>(local);
  index_t* pair_row = st.take<index_t>(pairs);
  const std::size_t scratch_bytes = ep_local_bytes<false>(lp, act, dl, w);
  std::byte* scratch = st.take<std::byte>(static_cast<index_t>(scratch_bytes));
  detail::ep_verdicts verdicts(lp, st, sr, rr, local);
  if (!ws.carving()) return;

  const C& comm = *ep.comm;
  detail::pack_pair_rows(plan, ex, d, detail::token_rows<T>{x}, send);
  detail::exchange_rows(comm, ex, true, send, recv, d);

  // The local phase over the received rows (output float rows, weight 1: every bit kept).
  if (rr > 0) {
    detail::fill_receiver_plan(ex, nullptr, rids, rcounts, rweights);
    const auto rplan = detail::receiver_view(rids, rcounts, rweights, rr, local);
    const matrix_view<const T> xr = make_view<const T>(recv, rr, d);
    const matrix_view<float> yr = make_view<float>(out, rr, d);
    workspace_arena arena({scratch, scratch_bytes});
    experts_forward(lp, act, dl, xr, rplan, w, nullptr, yr,
                    span<index_t>(local_dropped, static_cast<std::size_t>(local)), arena);
    verdicts.decide(lp, rplan, rr);
  }
  detail::exchange_rows(comm, ex, false, out, back, d);

  std::copy(ex.pair_row.begin(), ex.pair_row.end(), pair_row);
  verdicts.apply<Local>(comm, ex, plan, pair_row, pairs, dropped, dm.experts);
  dispatch::expert_groups g;
  g.drop = detail::ep_sender_drop(ep.local);
  g.pair_row = {pair_row, static_cast<std::size_t>(pairs)};
  detail::combine(plan, g, back, x, extra, y, false);
}

//! `experts_backward` under expert parallelism (file comment): dx [T, d] += ∂/∂x (slot order),
//! d_weights [T·width] = ⟨dy_t, FFN_e(x_t)⟩ per kept pair (0 for unused and dropped pairs),
//! this rank's E/N experts' gradients += the sum over every rank's rows routed to them.
//! Collective. Buffers as in the forward.
template <parallel::Comm C, class Capacity, class Local, class Act, ElementType T, class Id,
          class W>
void experts_backward(const parallel::ExpertParallel<C, Capacity, Local>& ep, const Act& act,
                      const expert_dims& dm, const matrix_view<const T>& x,
                      const routing::plan_view<Id, W>& plan, const expert_weights<T>& w,
                      const matrix_view<const T>& dy, const matrix_view<float>& dx,
                      const expert_grads& grads, float* d_weights, workspace_arena& ws) {
  constexpr bool fixed = std::is_same_v<Capacity, parallel::static_bound>;
  if (!ws.carving() && (!fixed || ep.comm == nullptr)) return;
  const index_t d = dm.d, local = w.num_experts(), pairs = dm.tokens * dm.width;
  const Local lp = detail::ep_receiver_policy(ep.local);
  const detail::ep_exchange ex =
      detail::ep_call_exchange(ep, plan, dm.experts, local, {}, ws.carving());
  detail::ep_storage st(fixed ? &ws : nullptr);
  const index_t sr = ex.send_rows, rr = ex.recv_rows;
  const expert_dims dl = detail::receiver_dims(dm, rr, local, lp.max_rows(rr, 1, local));
  T* send = st.take<T>(detail::checked_mul("rows", sr, d));
  T* xr = st.take<T>(detail::checked_mul("rows", rr, d));
  T* dyr = st.take<T>(rr * d);
  float* wsend = st.take<float>(sr);
  float* wr = st.take<float>(rr);
  float* dxr = st.take<float>(rr * d);
  float* dwr = st.take<float>(rr);
  float* back = st.take<float>(sr * d);
  float* dwb = st.take<float>(sr);
  std::int32_t* rids = st.take<std::int32_t>(rr);
  std::int32_t* rcounts = st.take<std::int32_t>(rr);
  float* rweights = st.take<float>(rr);
  index_t* pair_row = st.take<index_t>(pairs);
  const std::size_t scratch_bytes = ep_local_bytes<true>(lp, act, dl, w);
  std::byte* scratch = st.take<std::byte>(static_cast<index_t>(scratch_bytes));
  detail::ep_verdicts verdicts(lp, st, sr, rr, local);
  if (!ws.carving()) return;

  // Token rows, dy rows (T) and each pair's combine weight (float) to the owners.
  const C& comm = *ep.comm;
  detail::pack_pair_rows(plan, ex, d, detail::token_rows<T>{x}, send);
  detail::exchange_rows(comm, ex, true, send, xr, d);
  detail::pack_pair_rows(plan, ex, d, detail::token_rows<T>{dy}, send);
  detail::exchange_rows(comm, ex, true, send, dyr, d);
  detail::pack_pair_rows(plan, ex, 1, detail::pair_weights<W>{plan.weights}, wsend);
  detail::exchange_rows(comm, ex, true, wsend, wr, index_t{1});

  // The local backward: dX rows into a zeroed float [R, d] (one slot per row: dX itself),
  // d_weights per row, the weight gradients accumulated into this rank's views.
  if (rr > 0) {
    detail::fill_receiver_plan(ex, wr, rids, rcounts, rweights);
    const auto rplan = detail::receiver_view(rids, rcounts, rweights, rr, local);
    const matrix_view<const T> xv = make_view<const T>(xr, rr, d);
    const matrix_view<const T> dyv = make_view<const T>(dyr, rr, d);
    const matrix_view<float> dxv = make_view<float>(dxr, rr, d);
    workspace_arena arena({scratch, scratch_bytes});
    experts_backward(lp, act, dl, xv, rplan, w, dyv, dxv, grads, dwr, arena);
    verdicts.decide(lp, rplan, rr);
  }
  detail::exchange_rows(comm, ex, false, dxr, back, d);
  detail::exchange_rows(comm, ex, false, dwr, dwb, index_t{1});

  std::copy(ex.pair_row.begin(), ex.pair_row.end(), pair_row);
  verdicts.apply<Local>(comm, ex, plan, pair_row, pairs, span<index_t>{}, dm.experts);
  const bool pass_through =
      detail::ep_sender_drop(ep.local) == dispatch::dropped_output::scaled_input;
  const index_t tokens = plan.num_tokens(), width = plan.width();
  for (index_t p = 0; p < pairs; ++p) d_weights[p] = pair_row[p] >= 0 ? dwb[pair_row[p]] : 0.0f;
  const ops::combine_backward_slots<T, Id, W> combine{
      plan.weights, plan.counts, pair_row, width, d, back, x, dy, pass_through,
      d_weights, dx, detail::present(dx), false};
  detail::run_static(tokens, tokens * width * d > (1 << 15), combine);
}

}  // namespace switchyard::host
