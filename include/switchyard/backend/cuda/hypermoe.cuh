// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file hypermoe.cuh
//! The HyperMoE add-on on the device (`device_addon<layer::hypermoe_addon>`, contract in
//! addon.cuh): the grouping and the group programs of layer/hypermoe/device_rows.hpp, which
//! the host tests run on the host against `layer::hypermoe_module` bit for bit.
//!
//! - Grouping by selection set with **no host synchronisation**: per-token keys (the set's bit
//!   mask for E <= 64, else a hash, runs split on a set mismatch), a stable
//!   `cub::DeviceRadixSort::SortPairs`, two `cub::DeviceScan::ExclusiveSum` (first-use group
//!   numbers, run numbers) and small per-index functors; the group count stays on the device.
//! - Forward: one kernel of S = min(group_slots, T) blocks; block b runs groups b, b + S, ...
//!   (the count read on the device), each with one generated adapter in the workspace: the
//!   hypernetwork of its set, then its tokens `hyper_tokens_per_pass` at a time.
//! - Backward: one kernel of **one block** walking the groups in first-use order, as the host
//!   does: the shared generator's gradients accumulate in float once per group, so this order
//!   is what makes the result the host's (and reproducible). It is the slow part of the
//!   add-on (one SM).
//! - Every element is computed by one thread with the host's expressions; accumulations over
//!   tokens and groups are owned by one thread each and run in order: no atomics, the same
//!   bits run to run. nvcc's FMA contraction can move the last bits against the host.
//! - Checks before any launch: the parameter shapes (the module's `validate`), the plan's
//!   expert count, out / dy / dx / gradient shapes, T < 2^31, and that every array is device
//!   memory of the stream's device. The plan's entries are read memory-safely (invalid ones
//!   are the dispatch's to report through the status word).

#include <cuda_runtime_api.h>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>

#include "switchyard/backend/cuda/addon.cuh"
#include "switchyard/backend/cuda/context.hpp"
#include "switchyard/backend/cuda/error.hpp"
#include "switchyard/backend/cuda/launch.cuh"
#include "switchyard/backend/cuda/memory.hpp"
#include "switchyard/backend/cuda/router.cuh"
#include "switchyard/core/element_type.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/core/workspace.hpp"
#include "switchyard/layer/hypermoe/device_rows.hpp"
#include "switchyard/layer/hypermoe_addon.hpp"
#include "switchyard/routing/plan.hpp"

namespace switchyard::cuda {

//! Threads per block of the HyperMoE group kernels.
inline constexpr int hypermoe_block = 256;

}  // namespace switchyard::cuda

// No using-directive for switchyard::cuda here (layer.cuh says why): names are qualified,
// helpers prefixed cuda_.
namespace switchyard::detail {

//! The phases of the group programs on a block: f(i) for i in [0, n) over the block's
//! threads, then a barrier (a plain loop when compiled for the host).
struct cuda_block_phases {
  template <class F>
  SWITCHYARD_HD void operator()(index_t n, const F& f) const {
#if defined(__CUDA_ARCH__)
    for (index_t i = threadIdx.x; i < n; i += blockDim.x) f(i);
    __syncthreads();
#else
    for (index_t i = 0; i < n; ++i) f(i);
#endif
  }
};

//! The grouping backend on the device: cuda::for_each and CUB, all on `stream`.
struct cuda_hyper_backend {
  cudaStream_t stream;

  template <class F>
  void run(index_t n, const F& f, const char* name) const {
    cuda::for_each(stream, n, f, name);
  }
  void sort_pairs(const std::uint64_t* keys_in, std::uint64_t* keys_out,
                  const std::int32_t* vals_in, std::int32_t* vals_out, index_t n, int end_bit,
                  std::byte* temp, std::size_t temp_bytes) const {
    std::size_t bytes = temp_bytes;
    cuda::check(cub::DeviceRadixSort::SortPairs(temp, bytes, keys_in, keys_out, vals_in, vals_out,
                                                static_cast<int>(n), 0, end_bit, stream),
                "cub::DeviceRadixSort::SortPairs (HyperMoE groups)");
  }
  void exclusive_sum(const std::int32_t* in, std::int32_t* out, index_t n, std::byte* temp,
                     std::size_t temp_bytes) const {
    std::size_t bytes = temp_bytes;
    cuda::check(cub::DeviceScan::ExclusiveSum(temp, bytes, in, out, static_cast<int>(n), stream),
                "cub::DeviceScan::ExclusiveSum (HyperMoE groups)");
  }
  //! CUB scratch bytes for n tokens (host arithmetic only: CUB's size query launches nothing).
  static std::size_t temp_bytes(index_t n, int end_bit) {
    if (n <= 0) return 0;
    std::size_t sort = 0, scan = 0;
    cuda::check(cub::DeviceRadixSort::SortPairs(
                    nullptr, sort, static_cast<const std::uint64_t*>(nullptr),
                    static_cast<std::uint64_t*>(nullptr), static_cast<const std::int32_t*>(nullptr),
                    static_cast<std::int32_t*>(nullptr), static_cast<int>(n), 0, end_bit),
                "cub::DeviceRadixSort::SortPairs (size query)");
    cuda::check(
        cub::DeviceScan::ExclusiveSum(nullptr, scan, static_cast<const std::int32_t*>(nullptr),
                                      static_cast<std::int32_t*>(nullptr), static_cast<int>(n)),
        "cub::DeviceScan::ExclusiveSum (size query)");
    return std::max(sort, scan);
  }
};

//! Every parameter array is device memory of `device`.
inline void cuda_hyper_require_params(const layer::hypermoe_params& p, int device) {
  const auto lin = [&](const char* w, const char* b, const layer::hyper_linear_params& l) {
    cuda::require_device_memory(w, l.w.data_handle(), device, alignof(float));
    cuda::require_device_memory(b, l.b.data_handle(), device, alignof(float));
  };
  cuda::require_device_memory("params.expert_emb", p.expert_emb.data_handle(), device,
                              alignof(float));
  lin("params.process1.w", "params.process1.b", p.process1);
  lin("params.process2.w", "params.process2.b", p.process2);
  cuda::require_device_memory("params.generator.layer_embed", p.generator.layer_embed.data_handle(),
                              device, alignof(float));
  lin("params.generator.linear1.w", "params.generator.linear1.b", p.generator.linear1);
  lin("params.generator.weight_up.w", "params.generator.weight_up.b", p.generator.weight_up);
  lin("params.generator.weight_down.w", "params.generator.weight_down.b", p.generator.weight_down);
  lin("params.generator.bias_up.w", "params.generator.bias_up.b", p.generator.bias_up);
  lin("params.generator.bias_down.w", "params.generator.bias_down.b", p.generator.bias_down);
}

//! Gradient shapes (as the module checks them) and memory kinds (present views only).
inline void cuda_hyper_require_grads(const layer::hypermoe_grads& g, const layer::hypermoe_dims& s,
                                     int device) {
  if (present(g.expert_emb))
    check_view("grads.expert_emb", g.expert_emb, {s.experts, s.emb_dim}, "[E, d_emb]");
  check_linear_grads("grads.process1", g.process1, s.process_dim, s.emb_dim);
  check_linear_grads("grads.process2", g.process2, s.hyper_in, s.process_dim);
  if (present(g.generator.layer_embed))
    check_view("grads.generator.layer_embed", g.generator.layer_embed, {s.layers, s.layer_emb},
               "[L, d_le]");
  check_linear_grads("grads.generator.linear1", g.generator.linear1, s.bottleneck,
                     s.hyper_in + s.layer_emb);
  check_linear_grads("grads.generator.weight_up", g.generator.weight_up, s.adapter * s.model,
                     s.bottleneck);
  check_linear_grads("grads.generator.weight_down", g.generator.weight_down, s.model * s.adapter,
                     s.bottleneck);
  check_linear_grads("grads.generator.bias_up", g.generator.bias_up, s.model, s.bottleneck);
  check_linear_grads("grads.generator.bias_down", g.generator.bias_down, s.adapter, s.bottleneck);
  const auto lin = [&](const char* w, const char* b, const layer::hyper_linear_grads& l) {
    cuda::require_device_memory(w, l.w.data_handle(), device, alignof(float));
    cuda::require_device_memory(b, l.b.data_handle(), device, alignof(float));
  };
  cuda::require_device_memory("grads.expert_emb", g.expert_emb.data_handle(), device,
                              alignof(float));
  lin("grads.process1.w", "grads.process1.b", g.process1);
  lin("grads.process2.w", "grads.process2.b", g.process2);
  cuda::require_device_memory("grads.generator.layer_embed", g.generator.layer_embed.data_handle(),
                              device, alignof(float));
  lin("grads.generator.linear1.w", "grads.generator.linear1.b", g.generator.linear1);
  lin("grads.generator.weight_up.w", "grads.generator.weight_up.b", g.generator.weight_up);
  lin("grads.generator.weight_down.w", "grads.generator.weight_down.b", g.generator.weight_down);
  lin("grads.generator.bias_up.w", "grads.generator.bias_up.b", g.generator.bias_up);
  lin("grads.generator.bias_down.w", "grads.generator.bias_down.b", g.generator.bias_down);
}

//! The plan's extents for T tokens and the params' E (the module's check_inputs, shapes
//! only: the entries live on the device).
template <class Id, class W>
void cuda_hyper_require_plan(const routing::plan_view<Id, W>& plan, index_t tokens,
                             index_t experts) {
  if (plan.num_experts != experts) {
    throw shape_error("plan", concat("plan: num_experts must equal params.expert_emb.extent(0) = ",
                                     experts, ", got ", plan.num_experts));
  }
  check_view("plan.expert_ids", plan.expert_ids, {tokens, -1});
  check_view("plan.weights", plan.weights, {tokens, plan.width()});
  check_view("plan.counts", plan.counts, {tokens});
  if (tokens > std::numeric_limits<std::int32_t>::max()) {
    throw shape_error("x", concat("x: the CUDA HyperMoE add-on groups at most 2^31 - 1 tokens, "
                                  "got ",
                                  tokens));
  }
}

}  // namespace switchyard::detail

namespace switchyard::cuda {

namespace kernels {

//! Forward of the groups block b owns (ops::hyper_forward_block).
template <ElementType T>
__global__ void __launch_bounds__(hypermoe_block)
    hypermoe_forward(ops::hyper_program<T> pr, double* slots, matrix_view<float> out) {
  ops::hyper_forward_block(detail::cuda_block_phases{}, pr, static_cast<index_t>(blockIdx.x),
                           static_cast<index_t>(gridDim.x), slots, out);
}

//! The whole backward on one block (ops::hyper_backward_block).
template <ElementType T>
__global__ void __launch_bounds__(hypermoe_block)
    hypermoe_backward(ops::hyper_program<T> pr, matrix_view<const float> dy, matrix_view<float> dx,
                      layer::hypermoe_grads grads, ops::hyper_device_backward_scratch w) {
  ops::hyper_backward_block(detail::cuda_block_phases{}, pr, dy, dx, grads, w);
}

}  // namespace kernels

//! HyperMoE on the device (see the file comment).
template <>
struct device_addon<layer::hypermoe_addon> {
  using addon = layer::hypermoe_addon;
  using params_type = addon::params_type;
  using grads_type = addon::grads_type;

  //! Device bytes forward and backward each take at most.
  static std::size_t workspace_size(const addon& a, index_t tokens, index_t d, index_t width,
                                    index_t experts, const params_type& p) {
    (void)experts;
    const layer::hypermoe_dims s = a.hyper.validate(p, d);
    const std::size_t temp =
        detail::cuda_hyper_backend::temp_bytes(tokens, ops::hyper_key_bits(s.experts));
    workspace_arena fwd, bwd;
    (void)detail::hyper_device_scratch::take(fwd, s, tokens, width, temp, forward_blocks(a, tokens),
                                             false);
    (void)detail::hyper_device_scratch::take(bwd, s, tokens, width, temp, 0, true);
    return std::max(fwd.required(), bwd.required());
  }

  //! out [T, d] = hyper(x) (overwritten); x, plan, params, out device memory.
  template <ElementType T>
  static void forward(const context& ctx, const addon& a, const matrix_view<const T>& x,
                      const routing::plan_view<const std::int32_t, const float>& plan,
                      const params_type& p, const matrix_view<float>& out, workspace_arena& ws) {
    check_view("x", x, {-1, -1}, "[T, d]");
    const index_t tokens = x.extent(0);
    const layer::hypermoe_dims s = a.hyper.validate(p, x.extent(1));
    detail::cuda_hyper_require_plan(plan, tokens, s.experts);
    check_view("out", out, {tokens, s.model}, "[T, d]");
    const int dev = stream_device(ctx.stream);
    require_device_memory("x", x.data_handle(), dev, alignof(T));
    require_device_memory("out", out.data_handle(), dev, alignof(float));
    detail::cuda_hyper_require_params(p, dev);
    const index_t blocks = forward_blocks(a, tokens);
    const std::size_t temp =
        detail::cuda_hyper_backend::temp_bytes(tokens, ops::hyper_key_bits(s.experts));
    const auto w =
        detail::hyper_device_scratch::take(ws, s, tokens, plan.width(), temp, blocks, false);
    if (!ws.carving() || tokens == 0) return;
    const ops::hyper_program<T> pr = prepare(ctx, a, x, plan, p, s, w);
    kernels::hypermoe_forward<T>
        <<<static_cast<unsigned>(blocks), hypermoe_block, 0, ctx.stream>>>(pr, w.slots, out);
    check_launch("switchyard::cuda::kernels::hypermoe_forward");
  }

  //! dx += ∂hyper/∂x · dy (dx may be empty), grads += ∂hyper/∂params · dy (empty views
  //! skipped); d_weights untouched (HyperMoE's term does not depend on the combine weights).
  template <ElementType T>
  static void backward(const context& ctx, const addon& a, const matrix_view<const T>& x,
                       const routing::plan_view<const std::int32_t, const float>& plan,
                       const params_type& p, const matrix_view<const float>& dy,
                       const matrix_view<float>& dx, const grads_type& g, float* d_weights,
                       workspace_arena& ws) {
    (void)d_weights;
    check_view("x", x, {-1, -1}, "[T, d]");
    const index_t tokens = x.extent(0);
    const layer::hypermoe_dims s = a.hyper.validate(p, x.extent(1));
    detail::cuda_hyper_require_plan(plan, tokens, s.experts);
    check_view("dy", dy, {tokens, s.model}, "[T, d]");
    if (detail::present(dx)) check_view("dx", dx, {tokens, s.model}, "[T, d]");
    const int dev = stream_device(ctx.stream);
    require_device_memory("x", x.data_handle(), dev, alignof(T));
    require_device_memory("dy", dy.data_handle(), dev, alignof(float));
    require_device_memory("dx", dx.data_handle(), dev, alignof(float));
    detail::cuda_hyper_require_params(p, dev);
    detail::cuda_hyper_require_grads(g, s, dev);
    const std::size_t temp =
        detail::cuda_hyper_backend::temp_bytes(tokens, ops::hyper_key_bits(s.experts));
    const auto w = detail::hyper_device_scratch::take(ws, s, tokens, plan.width(), temp, 0, true);
    if (!ws.carving() || tokens == 0) return;
    const ops::hyper_program<T> pr = prepare(ctx, a, x, plan, p, s, w);
    kernels::hypermoe_backward<T><<<1, hypermoe_block, 0, ctx.stream>>>(pr, dy, dx, g, w.bwd);
    check_launch("switchyard::cuda::kernels::hypermoe_backward");
  }

 private:
  //! Blocks of the forward kernel (one adapter slot each): min(group_slots, T), at least 1.
  static index_t forward_blocks(const addon& a, index_t tokens) {
    const index_t slots = a.hyper.group_slots < 1 ? 1 : a.hyper.group_slots;
    return std::max<index_t>(1, std::min<index_t>(slots, tokens));
  }

  //! The grouping and Σ_e emb[e] on the stream; the program both kernels read.
  template <ElementType T>
  static ops::hyper_program<T> prepare(
      const context& ctx, const addon& a, const matrix_view<const T>& x,
      const routing::plan_view<const std::int32_t, const float>& plan, const params_type& p,
      const layer::hypermoe_dims& s, const detail::hyper_device_scratch& w) {
    detail::hyper_group_pipeline(detail::cuda_hyper_backend{ctx.stream}, plan, s.experts, w);
    for_each(ctx.stream, s.emb_dim, ops::hyper_embedding_total{p.expert_emb, w.all},
             "switchyard::ops::hyper_embedding_total");
    ops::hyper_program<T> pr;
    pr.x = x;
    pr.p = p;
    pr.s = s;
    pr.layer = a.hyper.layer_idx;
    pr.groups = w.groups;
    pr.all = w.all;
    return pr;
  }
};

}  // namespace switchyard::cuda
