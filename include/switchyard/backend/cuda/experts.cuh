#pragma once
//! \file experts.cuh
//! The expert phase on the device: gather, the [gate|up] and down projections as cuBLAS
//! grouped (sorted_grouped) or strided-batched (padded_capacity, dense) GEMMs with the fused
//! bias + activation between, the deterministic gather combine; and its backward.
//!
//! PLACEHOLDER (contract only): the bodies are written by the experts work of issue #11.

#include <cuda_runtime_api.h>

#include <cstddef>

#include "switchyard/backend/cuda/context.hpp"
#include "switchyard/backend/cuda/dispatch.cuh"
#include "switchyard/core/config.hpp"
#include "switchyard/core/element_type.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/core/workspace.hpp"
#include "switchyard/layer/expert_weights.hpp"
#include "switchyard/routing/plan.hpp"

namespace switchyard::cuda {

//! Sizes of one expert phase on the device.
struct expert_dims {
  index_t tokens = 0;   //!< T
  index_t width = 0;    //!< plan slots per token
  index_t experts = 0;  //!< E
  index_t d = 0;        //!< model width
  index_t d_ff = 0;     //!< expert hidden width
  index_t p = 0;        //!< first-projection width: d_ff or 2·d_ff (gated)
};

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
  (void)ctx; (void)policy; (void)act; (void)dm; (void)x; (void)plan; (void)w; (void)g;
  (void)extra; (void)y; (void)dropped; (void)ws; (void)host_ws;
  if (!ws.carving()) return;
  throw unsupported_error("switchyard::cuda::experts_forward: not implemented yet (issue #11)");
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
  (void)ctx; (void)policy; (void)act; (void)dm; (void)x; (void)plan; (void)w; (void)g; (void)dy;
  (void)dx; (void)grads; (void)d_weights; (void)ws; (void)host_ws;
  if (!ws.carving()) return;
  throw unsupported_error("switchyard::cuda::experts_backward: not implemented yet (issue #11)");
}

}  // namespace switchyard::cuda
