#pragma once
//! \file dispatch.cuh
//! The dispatch policies on the device: a routing plan (device memory) to `device_groups`,
//! the device twin of `dispatch::expert_groups` with the same meaning of every array as the
//! host's `host::plan_groups` (backend/host/dispatch_plan.hpp).
//!
//! PLACEHOLDER (contract only): the bodies are written by the dispatch work of issue #11.

#include <cuda_runtime_api.h>

#include <cstddef>

#include "switchyard/backend/cuda/context.hpp"
#include "switchyard/backend/cuda/status.hpp"
#include "switchyard/core/config.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/workspace.hpp"
#include "switchyard/dispatch/dense.hpp"
#include "switchyard/dispatch/groups.hpp"
#include "switchyard/dispatch/padded_capacity.hpp"
#include "switchyard/dispatch/sorted_grouped.hpp"
#include "switchyard/routing/plan.hpp"

namespace switchyard::cuda {

//! A dispatch's result on the device (arrays in the device workspace), with the meaning of
//! `dispatch::expert_groups`: row_begin/row_count/dropped [E], pair_row [T·width], row_pair
//! [rows]. Grouped layouts: expert e's rows are [row_begin[e], row_begin[e] + row_count[e]).
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
};

//! Whether policy D needs the per-expert counts on the host (the one synchronisation).
template <class D>
inline constexpr bool needs_host_counts = false;
template <>
inline constexpr bool needs_host_counts<dispatch::sorted_grouped> = true;

//! Plans the dispatch of `plan` (device memory, T tokens, `width` slots, E experts) into
//! arrays carved from `ws` (device) and, for sorted_grouped, `host_ws` (host; the counts
//! copy is enqueued, not waited for). Validates the plan on the device: a bad count or id is
//! recorded in `status` and its pair treated as unused (memory safe on any data). With
//! measuring arenas it only counts bytes (plan may then be empty; T, width, E given).
template <class D, class Id, class W>
device_groups plan_groups(const context& ctx, const D& policy,
                          const routing::plan_view<Id, W>& plan, index_t tokens, index_t width,
                          index_t experts, device_status* status, workspace_arena& ws,
                          workspace_arena& host_ws) {
  (void)ctx; (void)policy; (void)plan; (void)tokens; (void)width; (void)experts; (void)status;
  (void)ws; (void)host_ws;
  throw unsupported_error("switchyard::cuda::plan_groups: not implemented yet (issue #11)");
}

}  // namespace switchyard::cuda
