// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file experts.cuh
//! The expert phase on the device: gather, the [gate|up] and down projections as cuBLAS
//! grouped (sorted_grouped) or strided-batched (padded_capacity, dense) GEMMs with the fused
//! bias + activation between, the deterministic gather combine; and its backward, which
//! recomputes the forward as the host does (backend/host/expert_backward.hpp).
//!
//! The pipeline, its row layout and buffers are expert_phase.hpp (host-compilable, so the
//! host tests run it with a naive executor); this file runs it with the device executor of
//! expert_gemm.cuh: per-row functors through `cuda::for_each`, GEMMs on cuBLAS
//! (CUBLAS_COMPUTE_32F, A/B of T, C float). sorted_grouped: float as one
//! cublasGemmGroupedBatchedEx per projection (its pointer arrays from `ws`), half/bfloat16
//! as one cublasGemmEx per expert with rows (the grouped GEMM cannot write float C from 16-bit
//! inputs); the host arguments from `host_ws` (shared by content: under 100 bytes per
//! expert). Everything is ordered on ctx.stream; no floating-point atomics; the handle's
//! pointer mode is set to host (alpha/beta live on the host).
//!
//! Not here (yet): a cuBLASLt grouped path with device-side problem sizes (cuBLAS >= 13.2;
//! the system has 13.1), which would remove sorted_grouped's count synchronisation.

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include "switchyard/backend/cuda/context.hpp"
#include "switchyard/backend/cuda/dispatch.cuh"
#include "switchyard/backend/cuda/error.hpp"
#include "switchyard/backend/cuda/expert_gemm.cuh"
#include "switchyard/backend/cuda/expert_phase.hpp"
#include "switchyard/core/config.hpp"
#include "switchyard/core/element_type.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/core/workspace.hpp"
#include "switchyard/layer/expert_weights.hpp"
#include "switchyard/routing/plan.hpp"

namespace switchyard::cuda {

//! The phase's view of the dispatch's groups.
inline expert_groups_ref groups_ref(const device_groups& g) {
  return {g.row_begin, g.row_count, g.dropped,        g.pair_row, g.row_pair,
          g.rows,      g.capacity,  g.host_row_count, g.drop};
}

//! The device executor of `ctx`, its handle's pointer mode set to host (carving only).
inline device_expert_exec expert_exec(const context& ctx, const workspace_arena& ws) {
  if (ws.carving())
    check(cublasSetPointerMode(ctx.blas, CUBLAS_POINTER_MODE_HOST), "cublasSetPointerMode");
  return {ctx.blas, ctx.stream};
}

//! Forward of the experts: y [T, d] = Σ_j w_tj · FFN_{e_tj}(x_t) (+ extra [T, d] float when
//! non-null) rounded to T, combined by gathering each token's slots in slot order; `dropped`
//! [E] (device) = g.dropped. Arrays from `ws` (device) and `host_ws` (host: grouped GEMM
//! arguments). sorted_grouped needs `g.host_row_count` valid (the caller synchronised).
//! With measuring arenas it only counts bytes.
template <class D, class Act, ElementType T, class Id, class W>
void experts_forward(const context& ctx, const D& policy, const Act& act, const expert_dims& dm,
                     const matrix_view<const T>& x, const routing::plan_view<Id, W>& plan,
                     const expert_weights<T>& w, const device_groups& g, const float* extra,
                     const matrix_view<T>& y, index_t* dropped, workspace_arena& ws,
                     workspace_arena& host_ws) {
  experts_forward_phase(expert_exec(ctx, ws), policy, act, dm, x, plan, w, groups_ref(g), extra, y,
                        dropped, ws, host_ws);
}

//! Backward of the experts (recomputing the forward): dx [T, d] += (when present), expert
//! grads += (present views), d_weights [T·width] = the combine weights' cotangent in slot
//! order. No floating-point atomics. Same arenas as experts_forward.
template <class D, class Act, ElementType T, class Id, class W>
void experts_backward(const context& ctx, const D& policy, const Act& act, const expert_dims& dm,
                      const matrix_view<const T>& x, const routing::plan_view<Id, W>& plan,
                      const expert_weights<T>& w, const device_groups& g,
                      const matrix_view<const T>& dy, const matrix_view<float>& dx,
                      const expert_grads& grads, float* d_weights, workspace_arena& ws,
                      workspace_arena& host_ws) {
  experts_backward_phase(expert_exec(ctx, ws), policy, act, dm, x, plan, w, groups_ref(g), dy, dx,
                         grads, d_weights, ws, host_ws);
}

}  // namespace switchyard::cuda

// Expert parallelism (parallel::ExpertParallel): overloads of plan_groups / experts_forward /
// experts_backward, included last so that layer.cuh sees them with the generic ones.
#include "switchyard/backend/cuda/expert_parallel.cuh"
