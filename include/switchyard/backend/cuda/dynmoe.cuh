// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file dynmoe.cuh
//! The device route of `routers::DynMoE` (`device_router<routers::DynMoE>`, contract in
//! router.cuh): the functors of backend/cuda/dynmoe_rows.hpp launched with `cuda::for_each`
//! in the order of `detail::dynmoe_forward_pipeline` / `dynmoe_backward_pipeline`, which the
//! host tests run on the host against `routers::DynMoE` bit for bit.
//!
//! - Forward: cosine scores per (token, expert), the top-any rule per token, then the four
//!   losses: every reduction over tokens runs in token order (deterministic, no atomics on
//!   floating-point values; the experts' usage on a staged block kernel, see
//!   `cuda_dynmoe_runner`); a token with a non-finite logit is recorded in the status word
//!   (`status_kind::non_finite_logits`) and routed to no expert. Writes the plan's ids,
//!   weights, counts, logits (s·cos) and probs (the masked scores) and `*losses`.
//! - Backward: the straight-through rows per token, then dθ (one thread per expert), dx (one
//!   thread per element after a per-token dot) and dW (one thread per element looping over
//!   the tokens in order), with the L_sim / L_simple terms as the host adds them; dθ runs on
//!   a staged block kernel like the usage (same bits).
//! - Checks before any launch: shapes, pointer kinds (device memory of the stream's device),
//!   a finite log-temperature (a host value). The values of the device-resident parameters
//!   are not checked on the host (that would need a copy and a wait): non-finite gate weights
//!   show up as non-finite logits (recorded); a non-finite threshold or a mask entry other
//!   than 0/1 is not reported (the kernels stay memory safe: such an expert is never on).
//! - No synchronisation, no allocation: scratch from the router's workspace arena.
//! - Routing records for the adaptive expert update: `cuda::dynmoe_record` (the host forward
//!   writes none; `training::dynmoe_recorder::record` is the host's separate call).
//!
//! Device arithmetic is the host's expressions in the host's order; nvcc's default FMA
//! contraction and CUDA's expf/logf (within 2 ulp) can still move the last bits, so device
//! results match the host's within a tolerance, and run to run bit for bit.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include <cuda/std/cmath>

#include "switchyard/backend/cuda/addon.cuh"
#include "switchyard/backend/cuda/context.hpp"
#include "switchyard/backend/cuda/launch.cuh"
#include "switchyard/backend/cuda/memory.hpp"
#include "switchyard/backend/cuda/ordered_rows.hpp"
#include "switchyard/backend/cuda/route_reductions.cuh"
#include "switchyard/backend/cuda/router.cuh"
#include "switchyard/backend/cuda/status.hpp"
#include "switchyard/core/element_type.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/core/workspace.hpp"
#include "switchyard/backend/cuda/dynmoe_rows.hpp"
#include "switchyard/routing/plan.hpp"
#include "switchyard/routing/routers/dynmoe.hpp"

// No using-directive for switchyard::cuda here (layer.cuh says why): names are qualified,
// helpers prefixed cuda_.
namespace switchyard::cuda::kernels {

//! ops::dynmoe_usage_column, one block of Block threads per expert e (grid-stride over the n
//! experts): the threads stage a chunk's slots and hits and count (integers), then thread 0
//! adds 1/k per hit in token order (cuda::staged_usage_column).
template <int Block>
__global__ void __launch_bounds__(Block)
    staged_dynmoe_usage_column(staged_usage_column s, index_t n) {
  __shared__ std::int32_t hits[staged_chunk];
  __shared__ std::int32_t slots[staged_chunk];
  __shared__ unsigned long long counters[3];  // hits, T', Σ k (two's complement)
  const index_t tokens = s.f.tokens;
  const index_t tid = threadIdx.x, threads = blockDim.x;
  for (index_t e = blockIdx.x; e < n; e += gridDim.x) {
    if (tid < 3) counters[tid] = 0;
    __syncthreads();
    index_t my_hits = 0, my_routed = 0, my_total = 0;
    double m = 0.0;
    for (index_t t0 = 0; t0 < tokens; t0 += staged_chunk) {
      const index_t c = tokens - t0 < staged_chunk ? tokens - t0 : staged_chunk;
      for (index_t k = tid; k < c; k += threads) {
        const std::int32_t sk = s.slots(t0 + k), h = s.hits(e, t0 + k);
        slots[k] = sk;
        hits[k] = h;
        my_hits += h;
        my_routed += sk != 0 ? 1 : 0;
        my_total += sk;
      }
      __syncthreads();
      if (tid == 0) m = staged_usage_column::add(m, hits, slots, c);
      __syncthreads();
    }
    atomicAdd(&counters[0], static_cast<unsigned long long>(my_hits));
    atomicAdd(&counters[1], static_cast<unsigned long long>(my_routed));
    atomicAdd(&counters[2], static_cast<unsigned long long>(my_total));
    __syncthreads();
    if (tid == 0) {
      s.finish(e, m, static_cast<index_t>(counters[0]), static_cast<index_t>(counters[1]),
               static_cast<index_t>(counters[2]));
    }
    __syncthreads();  // the counters are reset for the next expert
  }
}

//! ops::dynmoe_threshold_grad, one block of Block threads per expert e (grid-stride): the
//! threads stage a chunk of g[·, e], then thread 0 subtracts it in token order
//! (cuda::staged_threshold_grad).
template <int Block>
__global__ void __launch_bounds__(Block)
    staged_dynmoe_threshold_grad(staged_threshold_grad s, index_t n) {
  __shared__ double staged[staged_chunk];
  const index_t tokens = s.f.tokens;
  const index_t tid = threadIdx.x, threads = blockDim.x;
  for (index_t e = blockIdx.x; e < n; e += gridDim.x) {
    double dtheta = 0.0;
    for (index_t t0 = 0; t0 < tokens; t0 += staged_chunk) {
      const index_t c = tokens - t0 < staged_chunk ? tokens - t0 : staged_chunk;
      for (index_t k = tid; k < c; k += threads) staged[k] = s.term(e, t0 + k);
      __syncthreads();
      if (tid == 0) dtheta = staged_threshold_grad::sub(dtheta, staged, c);
      __syncthreads();
    }
    if (tid == 0) s.finish(e, dtheta);
  }
}

}  // namespace switchyard::cuda::kernels

namespace switchyard::detail {

//! The launcher the DynMoE pipelines take: cuda::for_each on `stream`, except the two
//! reductions of one thread per expert over the tokens (ops::dynmoe_usage_column,
//! ops::dynmoe_threshold_grad), which run on staged block kernels with the same additions in
//! the same order (backend/cuda/ordered_rows.hpp: as plain loops they are the pattern that
//! took 1 ms at T = 4096 in the route's expert_column_sums on an H200).
struct cuda_dynmoe_runner {
  cudaStream_t stream;
  template <class F>
  void operator()(index_t n, const F& f, const char* name) const {
    if (n <= 0) return;
    const auto grid = static_cast<unsigned>(std::min<index_t>(n, cuda::tuning::max_grid));
    if constexpr (std::is_same_v<F, ops::dynmoe_usage_column>) {
      cuda::kernels::staged_dynmoe_usage_column<cuda::staged_block>
          <<<grid, cuda::staged_block, 0, stream>>>(cuda::staged_usage_column{f}, n);
      cuda::check_launch(name);
    } else if constexpr (std::is_same_v<F, ops::dynmoe_threshold_grad>) {
      cuda::kernels::staged_dynmoe_threshold_grad<cuda::staged_block>
          <<<grid, cuda::staged_block, 0, stream>>>(cuda::staged_threshold_grad{f}, n);
      cuda::check_launch(name);
    } else {
      cuda::for_each<cuda::tuning::tokens_block>(stream, n, f, name);
    }
  }
};

//! The shape and value checks the device route runs on the host before any launch.
inline void cuda_dynmoe_check_params(const routing::dynmoe_params& p, int device) {
  check_view("params.w_gate", p.w_gate, {-1, -1}, "[d, E_max]");
  const index_t d = p.w_gate.extent(0), e_max = p.w_gate.extent(1);
  if (e_max < 1) {
    throw shape_error(
        "params.w_gate",
        concat("params.w_gate: expected [d, E_max] with E_max >= 1, got [", d, ", ", e_max, "]"));
  }
  check_view("params.thresholds", p.thresholds, {e_max},
             "[E_max] with E_max = params.w_gate.extent(1)");
  check_view("params.experts_mask", p.experts_mask, {e_max},
             "[E_max] with E_max = params.w_gate.extent(1)");
  if (!std::isfinite(p.log_temperature)) {
    throw non_finite_error(
        "params.log_temperature",
        concat("params.log_temperature must be finite, got ", p.log_temperature));
  }
  cuda::require_device_memory("params.w_gate", p.w_gate.data_handle(), device, alignof(float));
  cuda::require_device_memory("params.thresholds", p.thresholds.data_handle(), device,
                              alignof(float));
  cuda::require_device_memory("params.experts_mask", p.experts_mask.data_handle(), device,
                              alignof(std::int32_t));
}

}  // namespace switchyard::detail

namespace switchyard::cuda {

//! DynMoE on the device (see the file comment).
//! The host route's value checks of DynMoE's params, per expert e: a non-finite threshold or a
//! mask entry other than 0 or 1 is recorded as status_kind::bad_router_params at e (the host
//! throws for them; the device keeps routing memory-safely and the executor throws at its
//! check point).
struct dynmoe_check_param_values {
  vector_view<const float> thresholds;          //!< [E_max]
  vector_view<const std::int32_t> experts_mask;  //!< [E_max]
  device_status* status;

  SWITCHYARD_HD void operator()(index_t e) const {
    const std::int32_t m = experts_mask(e);
    if (!::cuda::std::isfinite(thresholds(e)) || (m != 0 && m != 1))
      status->record(status_kind::bad_router_params, e);
  }
};

template <>
struct device_router<routers::DynMoE> {
  using router = routers::DynMoE;

  //! Device bytes forward or backward take for T tokens (the most of the two).
  static std::size_t workspace_size(const router& r, index_t tokens, const router::params_type& p) {
    (void)r;
    return detail::dynmoe_device_workspace_size(tokens, p.w_gate.extent(0), p.w_gate.extent(1));
  }

  //! Scores x [T, d] (device), selects top-any, writes `plan` (device arrays) and `*losses`
  //! (device); a non-finite logit is recorded in `status` and its token routed to no expert.
  template <ElementType T>
  static void forward(const context& ctx, const router& r, const matrix_view<const T>& x,
                      const router::params_type& p, const routing::plan_ref& plan,
                      router::losses_type* losses, device_status* status, workspace_arena& ws) {
    const int dev = stream_device(ctx.stream);
    detail::cuda_dynmoe_check_params(p, dev);
    const index_t d = p.w_gate.extent(0), e_max = p.w_gate.extent(1);
    check_view("x", x, {-1, d}, "[T, d] with d = params.w_gate.extent(0)");
    const index_t tokens = x.extent(0);
    if (plan.num_tokens != tokens || plan.width != e_max || plan.num_experts != e_max) {
      throw shape_error(
          "plan",
          detail::concat("plan: expected T = ", tokens, ", width = ", e_max, ", E = ", e_max,
                         " (from x and the router's params), got T = ", plan.num_tokens,
                         ", width = ", plan.width, ", E = ", plan.num_experts));
    }
    plan.check("plan");
    if (losses == nullptr) throw null_pointer_error("losses", "losses: pointer is null");
    require_device_memory("x", x.data_handle(), dev, alignof(T));
    require_device_memory("losses", losses, dev, alignof(float));
    const auto sc = detail::dynmoe_device_scratch::take(ws, tokens, d, e_max, false);
    if (!ws.carving()) return;
    for_each(ctx.stream, e_max, dynmoe_check_param_values{p.thresholds, p.experts_mask, status},
             "switchyard::cuda::dynmoe_check_param_values");
    detail::dynmoe_forward_pipeline(detail::cuda_dynmoe_runner{ctx.stream}, x, p, r.training, plan,
                                    losses, status, sc);
  }

  //! Backward of Σ d_weights ⊙ weights + Σ coeff · loss (straight-through; d_weights [T·E_max]
  //! device, coeff on the host): dx += ∂/∂x, grads += ∂/∂params (empty views skipped).
  template <ElementType T>
  static void backward(const context& ctx, const router& r, const matrix_view<const T>& x,
                       const router::params_type& p, const routing::plan_ref& plan,
                       const float* d_weights, const router::losses_type& coeff,
                       const matrix_view<float>& dx, const router::grads_type& grads,
                       workspace_arena& ws) {
    (void)r;
    const int dev = stream_device(ctx.stream);
    detail::cuda_dynmoe_check_params(p, dev);
    const index_t d = p.w_gate.extent(0), e_max = p.w_gate.extent(1);
    check_view("x", x, {-1, d}, "[T, d] with d = params.w_gate.extent(0)");
    const index_t tokens = x.extent(0);
    if (plan.num_tokens != tokens || plan.num_experts != e_max || plan.width != e_max) {
      throw shape_error(
          "plan", detail::concat("plan: expected ", tokens, " tokens and width = E = ", e_max,
                                 " (the forward of this x and params), got T = ", plan.num_tokens,
                                 ", width ", plan.width, ", E ", plan.num_experts));
    }
    plan.check("plan");
    if (detail::present(dx)) check_view("dx", dx, {tokens, d}, "[T, d]");
    if (detail::present(grads.w_gate))
      check_view("grads.w_gate", grads.w_gate, {d, e_max}, "[d, E_max]");
    if (detail::present(grads.thresholds))
      check_view("grads.thresholds", grads.thresholds, {e_max}, "[E_max]");
    if (tokens > 0 && d_weights == nullptr) {
      throw null_pointer_error(
          "d_weights", detail::concat("d_weights: null, expected [T, E_max] = [", tokens, ", ",
                                      e_max, "] cotangents"));
    }
    require_device_memory("x", x.data_handle(), dev, alignof(T));
    require_device_memory("d_weights", d_weights, dev, alignof(float));
    require_device_memory("dx", dx.data_handle(), dev, alignof(float));
    require_device_memory("grads.w_gate", grads.w_gate.data_handle(), dev, alignof(float));
    require_device_memory("grads.thresholds", grads.thresholds.data_handle(), dev, alignof(float));
    const auto sc = detail::dynmoe_device_scratch::take(ws, tokens, d, e_max, true);
    if (!ws.carving()) return;
    detail::dynmoe_backward_pipeline(detail::cuda_dynmoe_runner{ctx.stream}, x, p, plan, d_weights,
                                     coeff, dx, grads, sc);
  }
};

//! Adds one forward's routing records on the device, as `training::dynmoe_recorder::record`
//! does on the host (same order, same float bits): routing_records [E_max] += tokens using
//! each expert, sample_records [d] += Σ x_t over the tokens routed to no expert. All arrays
//! device memory; the forward and token counters stay the caller's (on the host). Copy the
//! records into a dynmoe_recorder to run `training::adaptive_update`. No synchronisation.
template <ElementType T>
void dynmoe_record(const context& ctx, const routing::plan_ref& plan, const matrix_view<const T>& x,
                   span<float> routing_records, span<float> sample_records) {
  plan.check("plan");
  check_view("x", x, {plan.num_tokens, -1}, "[T, d] with T = plan.num_tokens");
  if (static_cast<index_t>(routing_records.size()) != plan.num_experts) {
    throw shape_error("routing_records",
                      detail::concat("routing_records: expected E_max = ", plan.num_experts,
                                     " elements, got ", routing_records.size()));
  }
  if (static_cast<index_t>(sample_records.size()) != x.extent(1)) {
    throw shape_error("sample_records", detail::concat("sample_records: expected d = ", x.extent(1),
                                                       " elements, got ", sample_records.size()));
  }
  const int dev = stream_device(ctx.stream);
  require_device_memory("plan.expert_ids", plan.expert_ids.data(), dev, alignof(std::int32_t));
  require_device_memory("plan.counts", plan.counts.data(), dev, alignof(std::int32_t));
  require_device_memory("x", x.data_handle(), dev, alignof(T));
  require_device_memory("routing_records", routing_records.data(), dev, alignof(float));
  require_device_memory("sample_records", sample_records.data(), dev, alignof(float));
  for_each<tuning::tokens_block>(
      ctx.stream, plan.num_experts,
      ops::dynmoe_record_experts{plan.num_tokens, plan.width, plan.expert_ids.data(),
                                 plan.counts.data(), routing_records.data()},
      "switchyard::ops::dynmoe_record_experts");
  for_each<tuning::tokens_block>(
      ctx.stream, x.extent(1),
      ops::dynmoe_record_samples<T>{x, plan.counts.data(), sample_records.data()},
      "switchyard::ops::dynmoe_record_samples");
}

}  // namespace switchyard::cuda
