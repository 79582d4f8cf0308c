// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file layer.cuh
//! The CUDA backend's executor: `backend::executor<cuda::context>`, what `MoELayer`'s entry
//! points call under a `cuda::context` once the shared shape checks have passed. Everything
//! the host can check is checked before the first launch (pointer kinds and devices,
//! alignment, GEMM layouts, the workspace size); what only the data can tell (a non-finite
//! token or logit, a bad plan entry) is recorded on the device in the status word and thrown
//! as the host backend's exception at the synchronisation point (docs/cuda.md).
//!
//! Device workspace layout (each block 64-byte aligned, sizes measured by the same code):
//! forward  = [status][router scratch][groups][add-on term [T, d] + scratch][experts]
//! backward = [status][d_weights [T·width]][router scratch][groups][experts][add-on dy + scratch]
//! Host workspace (`context::host_workspace`, pinned): [status copy][groups][experts].
//!
//! Synchronisation: `sorted_grouped` waits once per forward and once per backward for the
//! per-expert counts (cuBLAS's grouped GEMM takes them as host arrays), and throws what the
//! status word holds right there. `padded_capacity` and `dense` never wait: call
//! `cuda::check_status(ctx, workspace)` when the data may be bad (the convenience path with
//! an empty workspace waits at its end, as it frees the workspace it allocated).

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <optional>
#include <vector>

#include "switchyard/backend/cuda/addon.cuh"
#include "switchyard/backend/cuda/context.hpp"
#include "switchyard/backend/cuda/dispatch.cuh"
#include "switchyard/backend/cuda/error.hpp"
#include "switchyard/backend/cuda/experts.cuh"
#include "switchyard/backend/cuda/launch.cuh"
#include "switchyard/backend/cuda/memory.hpp"
#include "switchyard/backend/cuda/router.cuh"
#include "switchyard/backend/cuda/status.hpp"
#include "switchyard/core/context.hpp"
#include "switchyard/core/element_type.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/core/workspace.hpp"
#include "switchyard/layer/expert_weights.hpp"
#include "switchyard/layer/state.hpp"
#include "switchyard/ops/finite.hpp"
#include "switchyard/ops/gather.hpp"
#include "switchyard/routing/plan.hpp"

namespace switchyard::cuda {

//! Records the first non-finite element of each row of x in the status word.
template <ElementType T>
struct record_non_finite_rows {
  ops::first_non_finite<T> scan;
  device_status* status;
  SWITCHYARD_HD void operator()(index_t t) const {
    const index_t i = scan(t);
    if (i >= 0) status->record(status_kind::non_finite_x, t * scan.x.extent(1) + i);
  }
};

//! Records every non-finite element i = t·d + c of x in the status word, one element per
//! index (the smallest index wins, so the same element as `record_non_finite_rows`; coalesced,
//! where one thread per row over d columns took 142 µs at T = 4096, d = 1024 on an H200).
template <ElementType T>
struct record_non_finite_elements {
  ops::non_finite_element<T> test;
  device_status* status;
  SWITCHYARD_HD void operator()(index_t i) const {
    if (test(i)) status->record(status_kind::non_finite_x, i);
  }
};

//! Resets the status word and records the sizes its messages need (one thread; a kernel
//! rather than a memset so that graph capture records the values).
struct reset_status {
  device_status* status;
  index_t d, experts, width, tokens;
  bool routed;
  SWITCHYARD_HD void operator()(index_t) const { status->reset(d, experts, width, tokens, routed); }
};

//! Waits for `stream` and throws what the status word at the front of a forward or backward
//! workspace recorded (the sync-free paths' explicit check; docs/cuda.md). The messages use
//! the sizes the run recorded; a non-empty `shape` (d > 0) overrides them.
inline void check_status(const context& ctx, span<const std::byte> workspace,
                         const status_shape& shape = {}) {
  if (workspace.size() < sizeof(device_status) + workspace_arena::alignment) {
    throw shape_error("workspace", "workspace: not a forward or backward workspace (too small)");
  }
  workspace_arena ws({const_cast<std::byte*>(workspace.data()), workspace.size()});
  const device_status* s = ws.take<device_status>(1);
  device_status host{};
  check(cudaMemcpyAsync(&host, s, sizeof host, cudaMemcpyDeviceToHost, ctx.stream), "cudaMemcpyAsync");
  check(cudaStreamSynchronize(ctx.stream), "cudaStreamSynchronize");
  throw_status(host, shape.d > 0 ? shape : host.shape());
}

}  // namespace switchyard::cuda

// No using-directive for switchyard::cuda here: the host backend's detail blocks see
// switchyard::host's names, and names both backends define (expert_dims, ...) would clash.
namespace switchyard::detail {

//! A sub-arena of `bytes` bytes carved from `ws` (measuring while `ws` measures).
inline workspace_arena cuda_sub_arena(workspace_arena& ws, std::size_t bytes) {
  std::byte* p = ws.take<std::byte>(static_cast<index_t>(bytes));
  return ws.carving() ? workspace_arena({p, bytes}) : workspace_arena();
}

//! Throws shape_error unless a [E, rows, cols] view can be a cuBLAS operand: unit stride in
//! the last extent, a row stride >= cols (the leading dimension) and 32-bit dimensions.
template <class V>
void require_gemm_layout(std::string_view argument, const V& v) {
  if (!present(v)) return;
  const index_t cols = v.extent(2);
  if (v.stride(2) != 1 || v.stride(1) < cols || v.stride(1) > 0x7fffffff || v.extent(1) > 0x7fffffff ||
      cols > 0x7fffffff) {
    throw shape_error(std::string(argument),
                      concat(argument, ": the CUDA backend needs unit stride in the last extent "
                                       "and a row stride >= its extent (a cuBLAS leading "
                                       "dimension < 2^31), got strides [",
                             v.stride(0), ", ", v.stride(1), ", ", v.stride(2), "] for extents [",
                             v.extent(0), ", ", v.extent(1), ", ", cols, "]"));
  }
}

//! Host scratch: the context's pinned bytes when they suffice, else an owned vector.
struct host_scratch {
  std::vector<std::byte> owned;
  span<std::byte> bytes;
  host_scratch(const cuda::context& ctx, std::size_t need) {
    if (ctx.host_workspace.size() >= need) {
      bytes = ctx.host_workspace;
    } else {
      owned.resize(need);
      bytes = {owned.data(), owned.size()};
    }
  }
};

//! Device workspace: the caller's bytes, or an owned stream-ordered allocation.
struct device_scratch {
  cuda::device_array<std::byte> owned;
  span<std::byte> bytes;
  bool is_owned = false;
  device_scratch(const cuda::context& ctx, span<std::byte> given, std::size_t need) {
    if (given.empty()) {
      owned = cuda::device_array<std::byte>(need, ctx.stream);
      bytes = owned.bytes();
      is_owned = true;
    } else {
      if (given.size() < need) {
        throw shape_error("workspace", concat("workspace: expected at least ", need,
                                              " bytes (see workspace_size), got ", given.size()));
      }
      bytes = given;
    }
  }
};

}  // namespace switchyard::detail

namespace switchyard::backend {

//! The CUDA backend (docs/cuda.md).
template <>
struct executor<cuda::context> {
  static constexpr bool is_backend = true;

  template <class Layer, ElementType T>
  static cuda::expert_dims dims(const Layer&, index_t tokens, index_t width,
                                const expert_weights<T>& w) {
    cuda::expert_dims dm;
    dm.tokens = tokens;
    dm.width = width;
    dm.experts = w.num_experts();
    dm.d = w.d_model();
    dm.d_ff = w.d_ff();
    dm.p = w.projection_width();
    return dm;
  }

  // ---- workspace queries (the measuring pass of the same carving code) -------------------

  template <class Layer, ElementType T>
  static std::size_t experts_workspace_size(const cuda::context& ctx, const Layer& layer,
                                            index_t tokens, index_t width,
                                            const expert_weights<T>& w,
                                            const typename Layer::addon_params& ap) {
    return sizes_forward<T>(ctx, layer, tokens, width, w, nullptr, ap).device;
  }

  template <class Layer, ElementType T>
  static std::size_t experts_backward_workspace_size(const cuda::context& ctx, const Layer& layer,
                                                     index_t tokens, index_t width,
                                                     const expert_weights<T>& w,
                                                     const typename Layer::addon_params& ap) {
    return sizes_backward<T>(ctx, layer, tokens, width, w, nullptr, ap).device;
  }

  template <class Layer, ElementType T>
  static std::size_t forward_workspace_size(const cuda::context& ctx, const Layer& layer,
                                            index_t tokens, const typename Layer::router_params& rp,
                                            const expert_weights<T>& w,
                                            const typename Layer::addon_params& ap) {
    return sizes_forward<T>(ctx, layer, tokens, layer.router.width(rp), w, &rp, ap).device;
  }

  template <class Layer, ElementType T>
  static std::size_t backward_workspace_size(const cuda::context& ctx, const Layer& layer,
                                             index_t tokens,
                                             const typename Layer::router_params& rp,
                                             const expert_weights<T>& w,
                                             const typename Layer::addon_params& ap) {
    return sizes_backward<T>(ctx, layer, tokens, layer.router.width(rp), w, &rp, ap).device;
  }

  // ---- entry points -------------------------------------------------------------------------

  template <class Layer, ElementType T>
  static void forward(const cuda::context& ctx, const Layer& layer, const matrix_view<const T>& x,
                      const typename Layer::router_params& rp, const expert_weights<T>& w,
                      const matrix_view<T>& y, const typename Layer::state_type& state,
                      span<std::byte> workspace, const typename Layer::addon_params& ap) {
    const index_t tokens = x.extent(0), width = state.plan.width;
    require_supported(layer, w);
    const int dev = prepare(ctx);
    require_common(dev, x, w, y);
    require_state(dev, state);
    const sizes need = sizes_forward<T>(ctx, layer, tokens, width, w, &rp, ap);
    detail::device_scratch dws(ctx, workspace, need.device);
    detail::host_scratch hbytes(ctx, need.host);
    cuda::require_device_memory("workspace", dws.bytes.data(), dev, 1);
    workspace_arena ws(dws.bytes), hws(hbytes.bytes);
    run_forward<T>(ctx, layer, x, &rp, w, y, state.plan.const_view(), &state, state.dropped.data(),
                   tokens, width, ws, hws, ap, dws.is_owned);
  }

  template <class Layer, ElementType T>
  static void forward_experts(const cuda::context& ctx, const Layer& layer,
                              const matrix_view<const T>& x,
                              const typename Layer::plan_type& plan, const expert_weights<T>& w,
                              const matrix_view<T>& y, span<index_t> dropped,
                              span<std::byte> workspace, const typename Layer::addon_params& ap) {
    const index_t tokens = x.extent(0), width = plan.width();
    require_supported(layer, w);
    const int dev = prepare(ctx);
    require_common(dev, x, w, y);
    require_plan(dev, plan);
    cuda::require_device_memory("dropped", dropped.data(), dev, alignof(index_t));
    const sizes need = sizes_forward<T>(ctx, layer, tokens, width, w, nullptr, ap);
    detail::device_scratch dws(ctx, workspace, need.device);
    detail::host_scratch hbytes(ctx, need.host);
    cuda::require_device_memory("workspace", dws.bytes.data(), dev, 1);
    workspace_arena ws(dws.bytes), hws(hbytes.bytes);
    run_forward<T>(ctx, layer, x, nullptr, w, y, plan, nullptr, dropped.data(), tokens, width, ws,
                   hws, ap, dws.is_owned);
  }

  template <class Layer, ElementType T>
  static void backward(const cuda::context& ctx, const Layer& layer, const matrix_view<const T>& x,
                       const typename Layer::router_params& rp, const expert_weights<T>& w,
                       const typename Layer::state_type& state, const matrix_view<const T>& dy,
                       const typename Layer::losses_type& coeffs, const matrix_view<float>& dx,
                       const expert_grads& grads, const typename Layer::router_grads& rgrads,
                       span<std::byte> workspace, const typename Layer::addon_params& ap,
                       const typename Layer::addon_grads& ag) {
    const index_t tokens = state.plan.num_tokens, width = state.plan.width;
    require_supported(layer, w);
    const int dev = prepare(ctx);
    require_backward(dev, x, w, dy, dx, grads);
    require_state(dev, state);
    const sizes need = sizes_backward<T>(ctx, layer, tokens, width, w, &rp, ap);
    detail::device_scratch dws(ctx, workspace, need.device);
    detail::host_scratch hbytes(ctx, need.host);
    cuda::require_device_memory("workspace", dws.bytes.data(), dev, 1);
    workspace_arena ws(dws.bytes), hws(hbytes.bytes);
    run_backward<T>(ctx, layer, x, &rp, w, state.plan.const_view(), &state, dy, coeffs, dx, grads,
                    &rgrads, nullptr, tokens, width, ws, hws, ap, ag, dws.is_owned);
  }

  template <class Layer, ElementType T>
  static void backward_experts(const cuda::context& ctx, const Layer& layer,
                               const matrix_view<const T>& x,
                               const typename Layer::plan_type& plan, const expert_weights<T>& w,
                               const matrix_view<const T>& dy, const matrix_view<float>& dx,
                               const expert_grads& grads, span<float> d_weights,
                               span<std::byte> workspace, const typename Layer::addon_params& ap,
                               const typename Layer::addon_grads& ag) {
    const index_t tokens = x.extent(0), width = plan.width();
    require_supported(layer, w);
    const int dev = prepare(ctx);
    require_backward(dev, x, w, dy, dx, grads);
    require_plan(dev, plan);
    cuda::require_device_memory("d_weights", d_weights.data(), dev, alignof(float));
    const sizes need = sizes_backward<T>(ctx, layer, tokens, width, w, nullptr, ap);
    detail::device_scratch dws(ctx, workspace, need.device);
    detail::host_scratch hbytes(ctx, need.host);
    cuda::require_device_memory("workspace", dws.bytes.data(), dev, 1);
    workspace_arena ws(dws.bytes), hws(hbytes.bytes);
    run_backward<T>(ctx, layer, x, nullptr, w, plan, nullptr, dy, typename Layer::losses_type{}, dx,
                    grads, nullptr, d_weights.data(), tokens, width, ws, hws, ap, ag,
                    dws.is_owned);
  }

 private:
  struct sizes {
    std::size_t device = 0;
    std::size_t host = 0;
  };

  //! Throws unsupported_error for the layer features only the host backend runs yet
  //! (issue #12: shared experts, identity experts, weight on input, slot-major capacity;
  //! issue #13: zero and constant experts).
  template <class Layer, ElementType T>
  static void require_supported(const Layer& layer, const expert_weights<T>& w) {
    const auto refuse = [](const char* what) {
      throw unsupported_error(detail::concat(
          "switchyard: ", what, " run on the host backend only for now (docs/cuda.md, "
          "\"What runs on the GPU\")"));
    };
    if (w.shared.present()) refuse("shared experts (weights.shared)");
    if (layer.identity_experts != 0) refuse("identity experts (MoELayer::identity_experts)");
    if (layer.zero_experts != 0) refuse("zero experts (MoELayer::zero_experts)");
    if (layer.constant_experts != 0 || w.constant.present()) {
      refuse("constant experts (MoELayer::constant_experts, weights.constant)");
    }
    if (layer.router_weight_on_input) refuse("MoELayer::router_weight_on_input");
    if constexpr (requires { layer.dispatch.priority; }) {
      if (layer.dispatch.priority != dispatch::capacity_priority::token_major) {
        refuse("padded_capacity with capacity_priority::slot_major");
      }
    }
  }

  //! Binds the handle to the stream (atomics not allowed); returns the stream's device.
  static int prepare(const cuda::context& ctx) {
    if (ctx.blas == nullptr) {
      throw null_pointer_error("ctx.blas", "ctx.blas: the CUDA context needs a cuBLAS handle");
    }
    cuda::check(cublasSetStream(ctx.blas, ctx.stream), "cublasSetStream");
    cuda::check(cublasSetAtomicsMode(ctx.blas, CUBLAS_ATOMICS_NOT_ALLOWED), "cublasSetAtomicsMode");
    return cuda::stream_device(ctx.stream);
  }

  template <ElementType T>
  static void require_weights(int dev, const expert_weights<T>& w) {
    cuda::require_device_memory("weights.w1", w.w1.data_handle(), dev, alignof(T));
    cuda::require_device_memory("weights.w2", w.w2.data_handle(), dev, alignof(T));
    cuda::require_device_memory("weights.b1", w.b1.data_handle(), dev, alignof(T));
    cuda::require_device_memory("weights.b2", w.b2.data_handle(), dev, alignof(T));
    detail::require_gemm_layout("weights.w1", w.w1);
    detail::require_gemm_layout("weights.w2", w.w2);
  }

  template <ElementType T>
  static void require_common(int dev, const matrix_view<const T>& x, const expert_weights<T>& w,
                             const matrix_view<T>& y) {
    cuda::require_device_memory("x", x.data_handle(), dev, alignof(T));
    cuda::require_device_memory("y", y.data_handle(), dev, alignof(T));
    require_weights(dev, w);
  }

  template <ElementType T>
  static void require_backward(int dev, const matrix_view<const T>& x, const expert_weights<T>& w,
                               const matrix_view<const T>& dy, const matrix_view<float>& dx,
                               const expert_grads& g) {
    cuda::require_device_memory("x", x.data_handle(), dev, alignof(T));
    cuda::require_device_memory("dy", dy.data_handle(), dev, alignof(T));
    cuda::require_device_memory("dx", dx.data_handle(), dev, alignof(float));
    require_weights(dev, w);
    cuda::require_device_memory("grads.w1", g.w1.data_handle(), dev, alignof(float));
    cuda::require_device_memory("grads.w2", g.w2.data_handle(), dev, alignof(float));
    cuda::require_device_memory("grads.b1", g.b1.data_handle(), dev, alignof(float));
    cuda::require_device_memory("grads.b2", g.b2.data_handle(), dev, alignof(float));
    detail::require_gemm_layout("grads.w1", g.w1);
    detail::require_gemm_layout("grads.w2", g.w2);
  }

  template <class Id, class W>
  static void require_plan(int dev, const routing::plan_view<Id, W>& plan) {
    cuda::require_device_memory("plan.expert_ids", plan.expert_ids.data_handle(), dev, alignof(Id));
    cuda::require_device_memory("plan.weights", plan.weights.data_handle(), dev, alignof(W));
    cuda::require_device_memory("plan.counts", plan.counts.data_handle(), dev, alignof(Id));
  }

  template <class State>
  static void require_state(int dev, const State& s) {
    cuda::require_device_memory("state.plan.expert_ids", s.plan.expert_ids.data(), dev, 4);
    cuda::require_device_memory("state.plan.weights", s.plan.weights.data(), dev, 4);
    cuda::require_device_memory("state.plan.counts", s.plan.counts.data(), dev, 4);
    cuda::require_device_memory("state.plan.logits", s.plan.logits.data(), dev, 4);
    cuda::require_device_memory("state.plan.probs", s.plan.probs.data(), dev, 4);
    cuda::require_device_memory("state.losses", s.losses, dev, alignof(float));
    cuda::require_device_memory("state.dropped", s.dropped.data(), dev, alignof(index_t));
  }

  //! Device and host bytes of a forward (rp null: forward_experts, no router).
  template <ElementType T, class Layer>
  static sizes sizes_forward(const cuda::context& ctx, const Layer& layer, index_t tokens,
                             index_t width, const expert_weights<T>& w,
                             const typename Layer::router_params* rp,
                             const typename Layer::addon_params& ap) {
    workspace_arena ws, hws;
    run_forward<T>(ctx, layer, matrix_view<const T>{}, rp, w, matrix_view<T>{}, {}, nullptr,
                   nullptr, tokens, width, ws, hws, ap, false, &w);
    return {ws.required(), hws.required()};
  }

  template <ElementType T, class Layer>
  static sizes sizes_backward(const cuda::context& ctx, const Layer& layer, index_t tokens,
                              index_t width, const expert_weights<T>& w,
                              const typename Layer::router_params* rp,
                              const typename Layer::addon_params& ap) {
    workspace_arena ws, hws;
    run_backward<T>(ctx, layer, matrix_view<const T>{}, rp, w, {}, nullptr, matrix_view<const T>{},
                    typename Layer::losses_type{}, matrix_view<float>{}, expert_grads{}, nullptr,
                    nullptr, tokens, width, ws, hws, ap, typename Layer::addon_grads{}, false);
    return {ws.required(), hws.required()};
  }

  //! Copies the status word to the host, waits for the stream and throws what it holds.
  static void sync_and_throw(const cuda::context& ctx, const cuda::device_status* status,
                             cuda::device_status* host_status, const cuda::status_shape& shape) {
    cuda::check(cudaMemcpyAsync(host_status, status, sizeof(cuda::device_status),
                                cudaMemcpyDeviceToHost, ctx.stream),
                "cudaMemcpyAsync");
    cuda::check(cudaStreamSynchronize(ctx.stream), "cudaStreamSynchronize");
    cuda::throw_status(*host_status, shape);
  }

  //! The forward pipeline; with measuring arenas it only counts bytes (`shape_w` then gives
  //! the weights' sizes). `state` null: forward_experts (the plan is the caller's).
  template <ElementType T, class Layer>
  static void run_forward(const cuda::context& ctx, const Layer& layer,
                          const matrix_view<const T>& x, const typename Layer::router_params* rp,
                          const expert_weights<T>& w, const matrix_view<T>& y,
                          typename Layer::plan_type plan, const typename Layer::state_type* state,
                          index_t* dropped, index_t tokens, index_t width, workspace_arena& ws,
                          workspace_arena& hws, const typename Layer::addon_params& ap,
                          bool owned_workspace, const expert_weights<T>* = nullptr) {
    const cuda::expert_dims dm = dims(layer, tokens, width, w);
    auto* status = ws.take<cuda::device_status>(1);
    auto* host_status = hws.take<cuda::device_status>(1);
    workspace_arena rws = detail::cuda_sub_arena(
        ws, rp != nullptr ? cuda::router_workspace_size(layer.router, tokens, *rp) : 0);
    if (ws.carving()) {
      cuda::for_each(ctx.stream, 1,
                     cuda::reset_status{status, dm.d, layer.ffn_experts(w), width, tokens,
                                        state != nullptr},
                     "switchyard::cuda::reset_status");
      if (state != nullptr) {
        cuda::for_each(ctx.stream, tokens * x.extent(1),
                       cuda::record_non_finite_elements<T>{{x}, status},
                       "switchyard::cuda::record_non_finite_elements");
        cuda::router_forward(ctx, layer.router, x, *rp, state->plan, state->losses, status, rws);
      }
    }
    const cuda::device_groups g = cuda::plan_groups(ctx, layer.dispatch, plan, tokens, width,
                                                    dm.experts, status, ws, hws);
    // The router's and the plan's E (global under expert parallelism; dm.experts is w's).
    const cuda::status_shape shape{dm.d, layer.ffn_experts(w), width,
                                   state != nullptr ? "state.plan" : "plan", tokens};
    if constexpr (cuda::needs_host_counts<typename Layer::dispatch_type>) {
      if (ws.carving()) sync_and_throw(ctx, status, host_status, shape);  // the one documented wait
    }
    float* extra = nullptr;
    if constexpr (Layer::has_addon) {
      using device = cuda::device_addon<typename Layer::addon_type>;
      extra = ws.take<float>(tokens * dm.d);
      workspace_arena aws = detail::cuda_sub_arena(
          ws, device::workspace_size(layer.addon, tokens, dm.d, width, dm.experts, ap));
      if (ws.carving())
        device::forward(ctx, layer.addon, x, plan, ap, make_view(extra, tokens, dm.d), aws);
    }
    cuda::experts_forward(ctx, layer.dispatch, layer.activation, dm, x, plan, w, g, extra, y,
                          dropped, ws, hws);
    if (ws.carving() && owned_workspace) sync_and_throw(ctx, status, host_status, shape);
  }

  //! The backward pipeline (same conventions as run_forward). `d_weights_out` non-null:
  //! backward_experts (the caller's d_weights, no router).
  template <ElementType T, class Layer>
  static void run_backward(const cuda::context& ctx, const Layer& layer,
                           const matrix_view<const T>& x, const typename Layer::router_params* rp,
                           const expert_weights<T>& w, typename Layer::plan_type plan,
                           const typename Layer::state_type* state, const matrix_view<const T>& dy,
                           const typename Layer::losses_type& coeffs, const matrix_view<float>& dx,
                           const expert_grads& grads, const typename Layer::router_grads* rgrads,
                           float* d_weights_out, index_t tokens, index_t width,
                           workspace_arena& ws, workspace_arena& hws,
                           const typename Layer::addon_params& ap,
                           const typename Layer::addon_grads& ag, bool owned_workspace) {
    const cuda::expert_dims dm = dims(layer, tokens, width, w);
    auto* status = ws.take<cuda::device_status>(1);
    auto* host_status = hws.take<cuda::device_status>(1);
    float* d_weights = d_weights_out;
    if (d_weights_out == nullptr) d_weights = ws.take<float>(tokens * width);
    workspace_arena rws = detail::cuda_sub_arena(
        ws, rp != nullptr ? cuda::router_workspace_size(layer.router, tokens, *rp) : 0);
    if (ws.carving()) {
      cuda::for_each(ctx.stream, 1,
                     cuda::reset_status{status, dm.d, layer.ffn_experts(w), width, tokens,
                                        state != nullptr},
                     "switchyard::cuda::reset_status");
      if (tokens * width > 0) {
        cuda::check(cudaMemsetAsync(d_weights, 0, sizeof(float) * tokens * width, ctx.stream),
                    "cudaMemsetAsync");
      }
    }
    const cuda::device_groups g = cuda::plan_groups(ctx, layer.dispatch, plan, tokens, width,
                                                    dm.experts, status, ws, hws);
    // The router's and the plan's E (global under expert parallelism; dm.experts is w's).
    const cuda::status_shape shape{dm.d, layer.ffn_experts(w), width,
                                   state != nullptr ? "state.plan" : "plan", tokens};
    if constexpr (cuda::needs_host_counts<typename Layer::dispatch_type>) {
      if (ws.carving()) sync_and_throw(ctx, status, host_status, shape);
    }
    cuda::experts_backward(ctx, layer.dispatch, layer.activation, dm, x, plan, w, g, dy, dx, grads,
                           d_weights, ws, hws);
    if constexpr (Layer::has_addon) {
      using device = cuda::device_addon<typename Layer::addon_type>;
      float* dybuf = ws.take<float>(tokens * dm.d);
      workspace_arena aws = detail::cuda_sub_arena(
          ws, device::workspace_size(layer.addon, tokens, dm.d, width, dm.experts, ap));
      if (ws.carving()) {
        cuda::for_each(ctx.stream, tokens * dm.d,
                       ops::load_row_elements<T>{{dy, tokens, dm.d, dybuf}},
                       "switchyard::ops::load_row_elements");
        device::backward(ctx, layer.addon, x, plan, ap,
                         matrix_view<const float>(make_view<const float>(dybuf, tokens, dm.d)), dx,
                         ag, d_weights, aws);
      }
    }
    if (ws.carving() && state != nullptr) {
      cuda::router_backward(ctx, layer.router, x, *rp, state->plan, d_weights, coeffs, dx, *rgrads,
                            rws);
    }
    if (ws.carving() && owned_workspace) sync_and_throw(ctx, status, host_status, shape);
  }
};

}  // namespace switchyard::backend
