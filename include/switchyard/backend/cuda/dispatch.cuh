// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file dispatch.cuh
//! The dispatch policies on the device: a routing plan (device memory) to `device_groups`,
//! the device twin of `dispatch::expert_groups` with the same meaning of every array as the
//! host's `host::plan_groups` (backend/host/dispatch_plan.hpp).
//!
//! The permutation (N = T·width pairs; the per-element logic is `ops/permute.hpp`'s functors,
//! which the host tests run against `host::plan_groups`):
//! 1. `ops::plan_sort_keys` per token: validates the plan (a fault is recorded in the status
//!    word and the token treated as routing nowhere) and writes key = expert id, or the
//!    sentinel E for an unused slot.
//! 2. A stable radix sort of (key, pair) over the low bit_width(E) bits only: one block
//!    (`cub::BlockRadixSort`) for N <= tuning::block_sort_max_pairs (decode), else
//!    `cub::DeviceRadixSort::SortPairs` (prefill). Stable: each expert's pairs stay in token
//!    then slot order, as the host's counting sort leaves them.
//! 3. Per-expert counts from the sorted keys (each expert's run by binary search: the
//!    histogram and its exclusive scan in one step, no atomics), then the placement per sorted
//!    position. `sorted_grouped` enqueues the copy of the counts to the host right after the
//!    counts; `padded_capacity` computes the capacity C on the device and never copies;
//!    `dense` needs no sort (a `cub::DeviceHistogram` of the keys).
//!
//! Differences from the host's arrays, by design (the rows are a bound known on the host):
//! - sorted_grouped: rows past the Σ row_count real rows hold row_pair = unused_pair (the host
//!   stores the unused pairs' indices there); every other array is identical.
//! - padded_capacity: expert e's block starts at e · C_max (C_max = the capacity of a plan
//!   using every slot) where the host's starts at e · C; rows of a block past row_count[e]
//!   hold unused_pair. Ranks, counts and drops are identical (equal arrays when C == C_max).
//! - dense: rows = T (each expert runs over every token); pair_row/row_pair as the host.

#include <cuda_runtime_api.h>

#include <bit>
#include <climits>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include <cub/block/block_radix_sort.cuh>
#include <cub/device/device_histogram.cuh>
#include <cub/device/device_radix_sort.cuh>

#include "switchyard/backend/cuda/context.hpp"
#include "switchyard/backend/cuda/error.hpp"
#include "switchyard/backend/cuda/launch.cuh"
#include "switchyard/backend/cuda/status.hpp"
#include "switchyard/backend/cuda/tuning.hpp"
#include "switchyard/core/config.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/workspace.hpp"
#include "switchyard/dispatch/dense.hpp"
#include "switchyard/dispatch/groups.hpp"
#include "switchyard/dispatch/padded_capacity.hpp"
#include "switchyard/dispatch/sorted_grouped.hpp"
#include "switchyard/ops/permute.hpp"
#include "switchyard/routing/plan.hpp"

namespace switchyard::cuda {

//! A dispatch's result on the device (arrays in the device workspace), with the meaning of
//! `dispatch::expert_groups`: row_begin/row_count/dropped [E], pair_row [T·width], row_pair
//! [rows]. Grouped layouts: expert e's rows are [row_begin[e], row_begin[e] + row_count[e]).
//! Rows past an expert's row_count (padding) hold row_pair < 0 (`dispatch::unused_pair`):
//! gathered as zero rows, never combined. dense: row_pair holds T·width entries (the identity
//! over the pair buffer, as the host plans it).
struct device_groups {
  index_t* row_begin = nullptr;  //!< [E] first row of expert e
  index_t* row_count = nullptr;  //!< [E] rows expert e computes
  index_t* dropped = nullptr;    //!< [E] pairs routed to e but dropped (capacity)
  index_t* pair_row = nullptr;   //!< [T·width] row of pair p, unused_pair or dropped_pair
  index_t* row_pair = nullptr;   //!< [rows] pair held by each row, negative for padding
  //! Rows of the expert buffers, known on the host without a synchronisation:
  //! sorted_grouped T·width, padded_capacity E·capacity, dense T.
  index_t rows = 0;
  //! padded_capacity: rows per expert block (the largest capacity a plan of this size can
  //! give; the strided GEMM's m). dense: T. sorted_grouped: 0.
  index_t capacity = 0;
  //! sorted_grouped: host copy of row_count [E] (and row_begin follows as its exclusive
  //! scan); valid once the stream has synchronised. Null for the other policies.
  const index_t* host_row_count = nullptr;
  //! What a dropped pair contributes to y.
  dispatch::dropped_output drop = dispatch::dropped_output::zero;
  //! The status word the planning records into (expert parallelism reads it back in its
  //! expert phase, which records the exchange's findings there); may be null.
  device_status* status = nullptr;
};

//! Whether policy D needs the per-expert counts on the host (the one synchronisation).
template <class D>
inline constexpr bool needs_host_counts = false;
template <>
inline constexpr bool needs_host_counts<dispatch::sorted_grouped> = true;

//! Threads of the single-block sort (decode); each holds block_sort_items pairs.
inline constexpr int block_sort_threads = 256;
//! Pairs per thread of the single-block sort.
inline constexpr int block_sort_items =
    static_cast<int>(tuning::block_sort_max_pairs / block_sort_threads);
static_assert(static_cast<index_t>(block_sort_threads) * block_sort_items ==
                  tuning::block_sort_max_pairs,
              "tuning::block_sort_max_pairs must be a multiple of block_sort_threads");

//! Records `ops::plan_sort_keys`' faults in the status word (invalid_counts at t,
//! invalid_ids at t·width + j).
struct record_plan_fault {
  device_status* status = nullptr;
  SWITCHYARD_HD void operator()(ops::plan_fault fault, index_t index) const {
    if (status == nullptr) return;
    status->record(
        fault == ops::plan_fault::counts ? status_kind::invalid_counts : status_kind::invalid_ids,
        index);
  }
};

namespace kernels {

//! Stable sort of n <= Threads·Items keys in one block, over bits [0, end_bit): writes the
//! sorted keys and each one's position before the sort. Positions past n get the key `pad`
//! (the sentinel, the largest key) and sort after every real one (stability).
template <int Threads, int Items>
__global__ void __launch_bounds__(Threads)
    block_sort_pairs(const ops::sort_key* keys, ops::sort_key* sorted_keys, index_t* sorted_pairs,
                     index_t n, int end_bit, ops::sort_key pad) {
  using block_sort = cub::BlockRadixSort<ops::sort_key, Threads, Items, int>;
  __shared__ typename block_sort::TempStorage temp;
  ops::sort_key k[Items];
  int v[Items];
  for (int i = 0; i < Items; ++i) {  // blocked arrangement: item order = position order
    const int at = static_cast<int>(threadIdx.x) * Items + i;
    k[i] = at < n ? keys[at] : pad;
    v[i] = at;
  }
  block_sort(temp).SortBlockedToStriped(k, v, 0, end_bit);
  for (int i = 0; i < Items; ++i) {  // striped: coalesced stores
    const int at = i * Threads + static_cast<int>(threadIdx.x);
    if (at < n) {
      sorted_keys[at] = k[i];
      sorted_pairs[at] = v[i];
    }
  }
}

}  // namespace kernels

}  // namespace switchyard::cuda

// No using-directive for switchyard::cuda here (layer.cuh says why): its names are qualified.
namespace switchyard::detail {

//! The pairs sorted by key (device arrays of N entries).
struct cuda_sorted_pairs {
  const ops::sort_key* keys = nullptr;  //!< [N] ascending
  const index_t* pairs = nullptr;       //!< [N] pair index at each sorted position
};

//! Host checks before any launch: sizes in range and, when carving, a plan of T tokens and
//! `width` slots.
template <class Id, class W>
void cuda_check_dispatch_args(const routing::plan_view<Id, W>& plan, index_t tokens, index_t width,
                              index_t experts, bool carving) {
  if (tokens < 0 || width < 0) {
    throw shape_error(
        "plan", concat("plan: T and width must be >= 0, got T = ", tokens, ", width = ", width));
  }
  if (experts < 0 || experts >= INT32_MAX) {
    throw range_error("experts", concat("experts: the CUDA dispatch needs E in [0, 2^31 - 1) "
                                        "(32-bit sort keys), got ",
                                        experts));
  }
  if (carving && (plan.num_tokens() != tokens || plan.width() != width)) {
    throw shape_error("plan", concat("plan: expected T = ", tokens, ", width = ", width,
                                     ", got T = ", plan.num_tokens(), ", width = ", plan.width()));
  }
}

//! Validates the plan and writes its sort keys (`ops::plan_sort_keys`, one thread per token)
//! into `keys` [N]; `pairs` [N] gets 0..N-1 when non-null.
template <class Id, class W>
void cuda_sort_keys(const cuda::context& ctx, const routing::plan_view<Id, W>& plan, index_t tokens,
                    index_t width, index_t experts, cuda::device_status* status,
                    ops::sort_key* keys, index_t* pairs) {
  const ops::plan_sort_keys<Id, cuda::record_plan_fault> f{
      plan.expert_ids, plan.counts, width, experts, keys, pairs, cuda::record_plan_fault{status}};
  cuda::for_each<cuda::tuning::tokens_block>(ctx.stream, tokens, f,
                                             "switchyard::ops::plan_sort_keys");
}

//! A stable sort of n 32-bit keys over their low `end_bit` bits (one block for n <=
//! tuning::block_sort_max_pairs, else `cub::DeviceRadixSort::SortPairs`), its arrays carved by
//! `cuda_take_key_sort` and run by `cuda_run_key_sort` once the caller has written `keys` (and
//! `pairs` = 0..n-1 when non-null: the device-wide sort's values).
struct cuda_key_sort {
  ops::sort_key* keys = nullptr;         //!< [n] input
  ops::sort_key* sorted_keys = nullptr;  //!< [n] output, ascending
  index_t* sorted_pairs = nullptr;       //!< [n] output: each sorted key's position before
  index_t* pairs = nullptr;              //!< [n] 0..n-1 (device-wide sort only, else null)
  std::byte* temp = nullptr;             //!< CUB's temporary storage
  std::size_t temp_bytes = 0;
  index_t n = 0;
  int end_bit = 0;
  ops::sort_key pad = 0;  //!< the largest key (the sentinel): the one-block sort's padding

  //! Whether there is anything to sort (end_bit 0: every key is 0).
  [[nodiscard]] bool sorts() const { return n > 0 && end_bit > 0; }
  [[nodiscard]] bool one_block() const { return n <= cuda::tuning::block_sort_max_pairs; }
};

//! Carves a sort of n keys in [0, max_key] (CUB's temporary storage sized by its null-pointer
//! query, which launches nothing and depends on n and max_key only). Measuring: only takes.
inline cuda_key_sort cuda_take_key_sort(const cuda::context& ctx, index_t n, index_t max_key,
                                        workspace_arena& ws) {
  cuda_key_sort s;
  s.n = n;
  s.end_bit = static_cast<int>(std::bit_width(static_cast<std::uint64_t>(max_key)));
  s.pad = static_cast<ops::sort_key>(max_key);
  s.keys = ws.take<ops::sort_key>(n);
  s.sorted_keys = ws.take<ops::sort_key>(n);
  s.sorted_pairs = ws.take<index_t>(n);
  if (s.sorts() && !s.one_block()) {
    s.pairs = ws.take<index_t>(n);
    cuda::check(cub::DeviceRadixSort::SortPairs(nullptr, s.temp_bytes, s.keys, s.sorted_keys,
                                                s.pairs, s.sorted_pairs, n, 0, s.end_bit,
                                                ctx.stream),
                "cub::DeviceRadixSort::SortPairs (temporary storage size)");
    s.temp = ws.take<std::byte>(static_cast<index_t>(s.temp_bytes));
  }
  return s;
}

//! Runs the sort carved by `cuda_take_key_sort` on ctx.stream (keys, and pairs when non-null,
//! written by the caller). Stable: equal keys keep their order.
inline void cuda_run_key_sort(const cuda::context& ctx, const cuda_key_sort& s) {
  if (s.n == 0) return;
  if (!s.sorts()) {
    cuda::for_each(ctx.stream, s.n, ops::unsorted_pairs{s.keys, s.sorted_keys, s.sorted_pairs},
                   "switchyard::ops::unsorted_pairs");
  } else if (s.one_block()) {
    cuda::kernels::block_sort_pairs<cuda::block_sort_threads, cuda::block_sort_items>
        <<<1, cuda::block_sort_threads, 0, ctx.stream>>>(s.keys, s.sorted_keys, s.sorted_pairs,
                                                         s.n, s.end_bit, s.pad);
    cuda::check_launch("switchyard::cuda::kernels::block_sort_pairs");
  } else {
    std::size_t temp_bytes = s.temp_bytes;
    cuda::check(cub::DeviceRadixSort::SortPairs(s.temp, temp_bytes, s.keys, s.sorted_keys,
                                                s.pairs, s.sorted_pairs, s.n, 0, s.end_bit,
                                                ctx.stream),
                "cub::DeviceRadixSort::SortPairs");
  }
}

//! Steps 1 and 2 of the permutation: keys, then the stable sort by key over bit_width(E)
//! bits. Carves keys and sorted keys [N], sorted pairs [N] and, for the device-wide sort, the
//! pair indices [N] and CUB's temporary storage (`cuda_take_key_sort`). Measuring: only takes.
template <class Id, class W>
cuda_sorted_pairs cuda_sort_plan_pairs(const cuda::context& ctx,
                                       const routing::plan_view<Id, W>& plan, index_t tokens,
                                       index_t width, index_t experts, cuda::device_status* status,
                                       workspace_arena& ws) {
  const cuda_key_sort s = cuda_take_key_sort(ctx, tokens * width, experts, ws);
  const cuda_sorted_pairs out{s.sorted_keys, s.sorted_pairs};
  if (!ws.carving() || s.n == 0) return out;
  cuda_sort_keys(ctx, plan, tokens, width, experts, status, s.keys, s.pairs);
  cuda_run_key_sort(ctx, s);
  return out;
}

//! The arrays every policy returns: row_begin, row_count, dropped [E], pair_row [N],
//! row_pair [row_pairs].
inline cuda::device_groups cuda_take_groups(workspace_arena& ws, index_t experts, index_t pairs,
                                            index_t row_pairs) {
  cuda::device_groups g;
  g.row_begin = ws.take<index_t>(experts);
  g.row_count = ws.take<index_t>(experts);
  g.dropped = ws.take<index_t>(experts);
  g.pair_row = ws.take<index_t>(pairs);
  g.row_pair = ws.take<index_t>(row_pairs);
  return g;
}

//! sorted_grouped: rows = N; the counts are copied to `host_ws` right after they exist.
template <class Id, class W>
cuda::device_groups cuda_plan_sorted_grouped(const cuda::context& ctx,
                                             const routing::plan_view<Id, W>& plan, index_t tokens,
                                             index_t width, index_t experts,
                                             cuda::device_status* status, workspace_arena& ws,
                                             workspace_arena& host_ws) {
  const index_t n = tokens * width;
  cuda::device_groups g = cuda_take_groups(ws, experts, n, n);
  g.rows = n;
  g.capacity = 0;
  g.drop = dispatch::dropped_output::zero;
  index_t* host_counts = host_ws.take<index_t>(experts);
  g.host_row_count = host_counts;
  const cuda_sorted_pairs s = cuda_sort_plan_pairs(ctx, plan, tokens, width, experts, status, ws);
  if (!ws.carving()) return g;
  cuda::for_each(ctx.stream, experts,
                 ops::grouped_counts{s.keys, n, g.row_begin, g.row_count, g.dropped},
                 "switchyard::ops::grouped_counts");
  if (experts > 0) {
    cuda::check(cudaMemcpyAsync(host_counts, g.row_count,
                                sizeof(index_t) * static_cast<std::size_t>(experts),
                                cudaMemcpyDeviceToHost, ctx.stream),
                "cudaMemcpyAsync (per-expert counts to the host)");
  }
  cuda::for_each(ctx.stream, n,
                 ops::grouped_placement{s.keys, s.pairs, experts, g.pair_row, g.row_pair},
                 "switchyard::ops::grouped_placement");
  return g;
}

//! padded_capacity: blocks of C_max rows, C on the device, no copy to the host.
template <class Id, class W>
cuda::device_groups cuda_plan_padded_capacity(const cuda::context& ctx,
                                              const dispatch::padded_capacity& policy,
                                              const routing::plan_view<Id, W>& plan, index_t tokens,
                                              index_t width, index_t experts,
                                              cuda::device_status* status, workspace_arena& ws) {
  const index_t n = tokens * width;
  const index_t block = experts > 0 ? policy.capacity(tokens, n, experts) : 0;
  cuda::device_groups g = cuda_take_groups(ws, experts, n, experts * block);
  g.rows = experts * block;
  g.capacity = block;
  g.drop = policy.drop;
  auto* sorted_begin = ws.take<index_t>(experts + 1);
  const cuda_sorted_pairs s = cuda_sort_plan_pairs(ctx, plan, tokens, width, experts, status, ws);
  if (!ws.carving()) return g;
  cuda::for_each(ctx.stream, experts + 1,
                 ops::capacity_counts{policy, s.keys, n, tokens, experts, block, sorted_begin,
                                      g.row_begin, g.row_count, g.dropped},
                 "switchyard::ops::capacity_counts");
  cuda::for_each(ctx.stream, n,
                 ops::capacity_placement{policy, s.keys, s.pairs, sorted_begin, tokens, experts,
                                         block, g.pair_row},
                 "switchyard::ops::capacity_placement");
  cuda::for_each(ctx.stream, g.rows,
                 ops::capacity_rows{s.pairs, sorted_begin, g.row_count, block, g.row_pair},
                 "switchyard::ops::capacity_rows");
  return g;
}

//! dense: no sort; the counts by a histogram of the keys over [0, E) (the sentinel E falls
//! outside and is not counted).
template <class Id, class W>
cuda::device_groups cuda_plan_dense(const cuda::context& ctx, const routing::plan_view<Id, W>& plan,
                                    index_t tokens, index_t width, index_t experts,
                                    cuda::device_status* status, workspace_arena& ws) {
  using counter = unsigned long long;  // CUB's shared-memory atomics take it; 64-bit counts
  const index_t n = tokens * width;
  cuda::device_groups g = cuda_take_groups(ws, experts, n, n);
  g.rows = tokens;
  g.capacity = tokens;
  g.drop = dispatch::dropped_output::zero;
  auto* keys = ws.take<ops::sort_key>(n);
  const bool counts = n > 0 && experts > 0;
  counter* histogram = nullptr;
  std::byte* temp = nullptr;
  std::size_t temp_bytes = 0;
  const int levels = static_cast<int>(experts) + 1;
  if (counts) {
    histogram = ws.take<counter>(experts);
    cuda::check(cub::DeviceHistogram::HistogramEven(nullptr, temp_bytes, keys, histogram, levels, 0,
                                                    static_cast<int>(experts), n, ctx.stream),
                "cub::DeviceHistogram::HistogramEven (temporary storage size)");
    temp = ws.take<std::byte>(static_cast<index_t>(temp_bytes));
  }
  if (!ws.carving()) return g;
  cuda_sort_keys(ctx, plan, tokens, width, experts, status, keys, nullptr);
  if (counts) {
    cuda::check(cub::DeviceHistogram::HistogramEven(temp, temp_bytes, keys, histogram, levels, 0,
                                                    static_cast<int>(experts), n, ctx.stream),
                "cub::DeviceHistogram::HistogramEven");
  }
  cuda::for_each(
      ctx.stream, experts,
      ops::dense_counts<counter>{counts ? histogram : nullptr, g.row_begin, g.row_count, g.dropped},
      "switchyard::ops::dense_counts");
  cuda::for_each(ctx.stream, n, ops::dense_placement{keys, experts, g.pair_row, g.row_pair},
                 "switchyard::ops::dense_placement");
  return g;
}

}  // namespace switchyard::detail

namespace switchyard::cuda {

//! Plans the dispatch of `plan` (device memory, T tokens, `width` slots, E experts) into
//! arrays carved from `ws` (device) and, for sorted_grouped, `host_ws` (host; the counts
//! copy is enqueued, not waited for). Validates the plan on the device: a bad count or id is
//! recorded in `status` and its token treated as routing nowhere (memory safe on any data).
//! With measuring arenas it only counts bytes (plan may then be empty; T, width, E given).
//! Everything is enqueued on ctx.stream; nothing waits.
template <class D, class Id, class W>
device_groups plan_groups(const context& ctx, const D& policy,
                          const routing::plan_view<Id, W>& plan, index_t tokens, index_t width,
                          index_t experts, device_status* status, workspace_arena& ws,
                          workspace_arena& host_ws) {
  detail::cuda_check_dispatch_args(plan, tokens, width, experts, ws.carving());
  if constexpr (std::is_same_v<D, dispatch::sorted_grouped>) {
    (void)policy;
    return detail::cuda_plan_sorted_grouped(ctx, plan, tokens, width, experts, status, ws, host_ws);
  } else if constexpr (std::is_same_v<D, dispatch::padded_capacity>) {
    (void)host_ws;
    return detail::cuda_plan_padded_capacity(ctx, policy, plan, tokens, width, experts, status, ws);
  } else if constexpr (std::is_same_v<D, dispatch::dense>) {
    (void)policy;
    (void)host_ws;
    return detail::cuda_plan_dense(ctx, plan, tokens, width, experts, status, ws);
  } else {
    (void)ctx, (void)policy, (void)status, (void)host_ws;
    throw unsupported_error(
        "switchyard::cuda::plan_groups: a user-defined dispatch policy has no device planning; "
        "use sorted_grouped, padded_capacity or dense with the CUDA backend");
  }
}

}  // namespace switchyard::cuda
