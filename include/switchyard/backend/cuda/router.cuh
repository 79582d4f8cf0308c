// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file router.cuh
//! How the CUDA backend runs a router: a composed router with linear-softmax scoring (TopK,
//! TopP, Adaptive Gating, DA-MoE) through the generic device route (routers::ScoredTopK is
//! refused at compile time: host backend only for now); any other router
//! through `device_router<R>`, which a backend file specialises (DynMoE:
//! backend/cuda/dynmoe.cuh) and a user may specialise for their own router.
//!
//! The generic device route (the host's backend/host/route.hpp, step by step):
//! - checks, before any launch, what the host checks without reading data: shapes, the
//!   router's options, the plan's sizes, and that the params are device memory of the
//!   stream's device;
//! - logits [T, E] = x · Wᵀ: cuBLAS (`cublasGemmEx`, CUBLAS_COMPUTE_32F; the GEMMs are
//!   row-major intents in backend/cuda/route_gemm.hpp) on x when it is float and row-major,
//!   else on exact float copies of x (`ops::rows_as_float`, `tuning::router_float_rows` tokens
//!   at a time in the route's workspace: a half/bfloat16 model's router GEMM is no longer a
//!   loop, 4.45 ms at T = 4096, d = 2048, E = 128 on an H200); only when W is not row-major
//!   `ops::router_logits` (float accumulation in index order, the host's loop; run as
//!   `cuda::router_logits_pipelined`, the same sums with their loads ahead:
//!   backend/cuda/ordered_rows.hpp);
//! - then the steps of ops/route_steps.hpp on kernels: the per-token rules (DA-MoE's
//!   importance pass on the device), softmax and the router's own `__host__ __device__`
//!   selection rule per token (a token with a non-finite logit is recorded in the status word
//!   and routes to no expert), each loss term by fixed-order reductions into its field of the
//!   device losses struct;
//! - backward: the fused per-token d_logits, then dx += d_logits · W and grads.w +=
//!   d_logitsᵀ · x (cuBLAS with beta = 1 where the operands allow it, else per-element
//!   kernels summing in index order; grads.w's from the float copies of x chunk by chunk,
//!   else as `cuda::linear_dw_pipelined`). No atomics
//!   on floats anywhere: run to run bitwise.
//!
//! Stream-ordered on ctx.stream, no synchronisation, no allocation (scratch from the arena).

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <concepts>
#include <cstddef>
#include <type_traits>

#include "switchyard/backend/cuda/context.hpp"
#include "switchyard/backend/cuda/error.hpp"
#include "switchyard/backend/cuda/gemm.hpp"
#include "switchyard/backend/cuda/launch.cuh"
#include "switchyard/backend/cuda/memory.hpp"
#include "switchyard/backend/cuda/ordered_rows.hpp"
#include "switchyard/backend/cuda/route_reductions.cuh"
#include "switchyard/backend/cuda/status.hpp"
#include "switchyard/backend/cuda/tuning.hpp"
#include "switchyard/core/config.hpp"
#include "switchyard/core/element_type.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/core/workspace.hpp"
#include "switchyard/backend/cuda/route_gemm.hpp"
#include "switchyard/ops/route_rows.hpp"
#include "switchyard/ops/route_steps.hpp"
#include "switchyard/routing/composition.hpp"
#include "switchyard/routing/plan.hpp"

namespace switchyard::cuda {

template <class R>
inline constexpr bool no_device_route_for = false;

//! A composed router the generic device route runs: its scoring is routing::linear_softmax
//! (routers::ScoredTopK's scored_linear runs on the host backend only for now).
template <class R>
concept device_composed_router = routing::ComposedRouter<R> && requires(const R& r) {
  { r.scoring() } -> std::same_as<routing::linear_softmax>;
};

template <class R>
inline constexpr bool host_only_router = false;

//! The one compile-time refusal of a composition the device route does not run.
template <class R>
consteval void refuse_host_only_router() {
  static_assert(host_only_router<R>,
                "switchyard: routers::ScoredTopK (a composition whose scoring is not "
                "routing::linear_softmax) runs on the host backend only for now");
}

//! The device route of a router that is not a composition. Specialisations have
//! `static std::size_t workspace_size(const R&, index_t T, const params&)`,
//! `static void forward(const context&, const R&, x, params, const routing::plan_ref&,
//! losses_type* (device), device_status*, workspace_arena&)` and
//! `static void backward(const context&, const R&, x, params, const routing::plan_ref&,
//! const float* d_weights (device), const losses_type& coeffs (host), const matrix_view<float>&
//! dx, const grads_type&, workspace_arena&)`.
template <class R>
struct device_router {
  static_assert(no_device_route_for<R>,
                "switchyard: the CUDA backend has no device route for this router: a composed "
                "router (scoring/rule/loss_terms) runs through the generic route; any other "
                "router needs a specialisation of switchyard::cuda::device_router<R> "
                "(docs/cuda.md, custom routers)");
};

//! The launcher of the route's steps (ops/route_steps.hpp): `cuda::route_step` on a stream
//! (`cuda::for_each`, except the long fixed-order reductions, which run on block kernels with
//! the same bits: backend/cuda/route_reductions.cuh), per-token work in blocks of
//! tuning::tokens_block, per-element work of tuning::rows_block.
struct kernel_launcher {
  cudaStream_t stream = nullptr;

  template <class F>
  void tokens(index_t n, const F& f, const char* name) const {
    route_step<tuning::tokens_block>(stream, n, f, name);
  }
  template <class F>
  void elements(index_t n, const F& f, const char* name) const {
    route_step<tuning::rows_block>(stream, n, f, name);
  }
};

//! The route's faults sink (ops/route_steps.hpp) over the status word (nothing when null):
//! a non-finite logit's flat index t·E + e is recorded. DA-MoE's bad attention or importance
//! has no status kind yet (the tokens route to no expert, nothing is thrown): see the
//! bad_attention / bad_importance members.
struct status_faults {
  device_status* status = nullptr;
  SWITCHYARD_HD void non_finite_logit(index_t flat) const {
    if (status != nullptr) status->record(status_kind::non_finite_logits, flat);
  }
  //! params.attention[h, i, j] (flat h·T·T + i·T + j) is not finite, negative, or ends a row
  //! that does not sum to 1.
  SWITCHYARD_HD void bad_attention(index_t flat) const {
    if (status != nullptr) status->record(status_kind::bad_attention, flat);
  }
  //! params.importance[j] (or the computed importance of token j) is not finite or negative.
  SWITCHYARD_HD void bad_importance(index_t token) const {
    if (status != nullptr) status->record(status_kind::bad_importance, token);
  }
};

}  // namespace switchyard::cuda

// No using-directive for switchyard::cuda here (layer.cuh says why): names are qualified,
// helpers prefixed cuda_.
namespace switchyard::detail {

//! Binds the context's cuBLAS handle for the router's GEMMs: its stream, host scalars, no
//! atomics (throws null_pointer_error without a handle).
inline void cuda_bind_router_blas(const cuda::context& ctx) {
  if (ctx.blas == nullptr) {
    throw null_pointer_error("ctx.blas",
                             "ctx.blas: the CUDA router runs its float GEMMs with cuBLAS and "
                             "needs a handle, got null");
  }
  cuda::check(cublasSetStream(ctx.blas, ctx.stream), "cublasSetStream");
  cuda::check(cublasSetPointerMode(ctx.blas, CUBLAS_POINTER_MODE_HOST), "cublasSetPointerMode");
  cuda::check(cublasSetAtomicsMode(ctx.blas, CUBLAS_ATOMICS_NOT_ALLOWED), "cublasSetAtomicsMode");
}

//! Runs a row-major GEMM intent (float operands, float compute) through its one mapping to
//! cuBLAS's column-major call (`cuda::to_column_major`, gemm.hpp).
inline void cuda_router_gemm(const cuda::context& ctx, const cuda::gemm_desc& g, const float* a,
                             const float* b, float* c, const char* what) {
  const cuda::blas_gemm m = cuda::to_column_major(g, what);
  const auto operands = cuda::column_major_operands(a, b);
  const auto op = [](cuda::gemm_op o) {
    return o == cuda::gemm_op::transpose ? CUBLAS_OP_T : CUBLAS_OP_N;
  };
  cuda::check(cublasGemmEx(ctx.blas, op(m.trans_a), op(m.trans_b), m.m, m.n, m.k, &m.alpha,
                           operands.a, CUDA_R_32F, m.lda, operands.b, CUDA_R_32F, m.ldb, &m.beta, c,
                           CUDA_R_32F, m.ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
              what);
}

//! Floats of the route's scratch for x as float rows (`router_float_rows` tokens at a time).
inline index_t cuda_router_float_scratch(index_t tokens, index_t d) {
  return std::min(tokens, cuda::tuning::router_float_rows) * d;
}

//! logits [T, E] = x · wᵀ on the stream: cuBLAS on x when it is float and row-major, else
//! cuBLAS on float copies of `router_float_rows` tokens at a time in `scratch` (exact
//! conversions), else (w not row-major, sizes cuBLAS cannot take) the fixed-order loop.
template <ElementType T>
void cuda_router_logits(const cuda::context& ctx, const matrix_view<const T>& x,
                        const matrix_view<const float>& w, float* logits, float* scratch) {
  const index_t tokens = x.extent(0), d = x.extent(1), experts = w.extent(0);
  if (tokens == 0 || experts == 0) return;
  const index_t ld_w = ops::row_major_ld(w);
  if constexpr (std::is_same_v<T, float>) {
    const index_t ld_x = ops::row_major_ld(x);
    const cuda::gemm_desc g = ops::router_logits_gemm(tokens, d, experts, ld_x, ld_w);
    if (ld_x > 0 && ld_w > 0 && ops::blas_compatible(g)) {
      cuda_bind_router_blas(ctx);
      cuda_router_gemm(ctx, g, x.data_handle(), w.data_handle(), logits, "router logits GEMM");
      return;
    }
  }
  if (scratch != nullptr && ld_w > 0 &&
             ops::blas_compatible(ops::router_logits_gemm(
                 std::min(tokens, cuda::tuning::router_float_rows), d, experts, d, ld_w))) {
    cuda_bind_router_blas(ctx);
    for (index_t t0 = 0; t0 < tokens; t0 += cuda::tuning::router_float_rows) {
      const index_t n = std::min(cuda::tuning::router_float_rows, tokens - t0);
      cuda::for_each<cuda::tuning::rows_block>(ctx.stream, n * d,
                                               ops::rows_as_float<T>{x, t0, scratch},
                                               "switchyard::ops::rows_as_float");
      cuda_router_gemm(ctx, ops::router_logits_gemm(n, d, experts, d, ld_w), scratch,
                       w.data_handle(), logits + t0 * experts, "router logits GEMM");
    }
    return;
  }
  cuda::for_each<cuda::tuning::rows_block>(
      ctx.stream, tokens * experts, cuda::router_logits_pipelined<T>{{x, w, logits}},
      "switchyard::cuda::router_logits_pipelined");
}

//! dx += d_logits · w and grad_w += d_logitsᵀ · x on the stream (either may be absent).
template <ElementType T>
void cuda_router_linear_backward(const cuda::context& ctx, const matrix_view<const T>& x,
                                 const matrix_view<const float>& w, const float* d_logits,
                                 const matrix_view<float>& dx, const matrix_view<float>& grad_w,
                                 float* scratch) {
  const index_t tokens = x.extent(0), d = x.extent(1), experts = w.extent(0);
  if (present(dx) && tokens * d > 0) {
    const index_t ld_w = ops::row_major_ld(w), ld_dx = ops::row_major_ld(dx);
    const cuda::gemm_desc g = ops::router_dx_gemm(tokens, d, experts, ld_w, ld_dx);
    if (ld_w > 0 && ld_dx > 0 && ops::blas_compatible(g)) {
      cuda_bind_router_blas(ctx);
      cuda_router_gemm(ctx, g, d_logits, w.data_handle(), dx.data_handle(), "router dx GEMM");
    } else {
      cuda::for_each<cuda::tuning::rows_block>(ctx.stream, tokens * d,
                                               ops::linear_dx_elements{d_logits, w, dx},
                                               "switchyard::ops::linear_dx_elements");
    }
  }
  if (present(grad_w) && experts * d > 0) {
    const index_t ld_g = ops::row_major_ld(grad_w);
    if constexpr (std::is_same_v<T, float>) {
      const index_t ld_x = ops::row_major_ld(x);
      const cuda::gemm_desc g = ops::router_grad_w_gemm(tokens, d, experts, ld_x, ld_g);
      if (ld_x > 0 && ld_g > 0 && ops::blas_compatible(g)) {
        cuda_bind_router_blas(ctx);
        cuda_router_gemm(ctx, g, d_logits, x.data_handle(), grad_w.data_handle(),
                         "router grads.w GEMM");
        return;
      }
    }
    if (scratch != nullptr && ld_g > 0 &&
               ops::blas_compatible(ops::router_grad_w_gemm(
                   std::min(tokens, cuda::tuning::router_float_rows), d, experts, d, ld_g))) {
      // grads.w += Σ over chunks of d_logits[chunk]ᵀ · x[chunk], chunks in token order.
      cuda_bind_router_blas(ctx);
      for (index_t t0 = 0; t0 < tokens; t0 += cuda::tuning::router_float_rows) {
        const index_t n = std::min(cuda::tuning::router_float_rows, tokens - t0);
        cuda::for_each<cuda::tuning::rows_block>(ctx.stream, n * d,
                                                 ops::rows_as_float<T>{x, t0, scratch},
                                                 "switchyard::ops::rows_as_float");
        cuda_router_gemm(ctx, ops::router_grad_w_gemm(n, d, experts, d, ld_g),
                         d_logits + t0 * experts, scratch, grad_w.data_handle(),
                         "router grads.w GEMM");
      }
      return;
    }
    cuda::for_each<cuda::tuning::rows_block>(
        ctx.stream, experts * d, cuda::linear_dw_pipelined<T>{{d_logits, x, grad_w}},
        "switchyard::cuda::linear_dw_pipelined");
  }
}

//! The plan's sizes against T, width and E (the host's `require_plan` without its reset: the
//! route writes every slot).
inline void cuda_require_router_plan(const routing::plan_ref& plan, index_t t, index_t width,
                                     index_t e) {
  if (plan.num_tokens != t || plan.width != width || plan.num_experts != e) {
    throw shape_error("plan", concat("plan: expected T = ", t, ", width = ", width, ", E = ", e,
                                     " (from x and the router's params), got T = ", plan.num_tokens,
                                     ", width = ", plan.width, ", E = ", plan.num_experts));
  }
  plan.check("plan");
}

//! The composed router's params that the device route reads must be device memory.
template <class R>
void cuda_require_router_params(const R& r, const typename R::params_type& p, int dev) {
  cuda::require_device_memory("params.w", r.scoring().params(p).w.data_handle(), dev,
                              alignof(float));
  using rules = ops::device_token_rules<R>;
  if constexpr (requires { rules::reads_attention; }) {
    if constexpr (rules::reads_attention)
      cuda::require_device_memory("params.attention", p.attention.data_handle(), dev,
                                  alignof(float));
    if constexpr (rules::reads_importance)
      cuda::require_device_memory("params.importance", p.importance.data_handle(), dev,
                                  alignof(float));
  }
}

template <class R>
void cuda_require_linear_scoring(const R& r) {
  static_assert(std::is_same_v<std::remove_cvref_t<decltype(r.scoring())>, routing::linear_softmax>,
                "switchyard: the CUDA backend's generic route runs the linear-softmax scoring; a "
                "composed router with another scoring needs a device_router<R> specialisation");
}

//! Device bytes of the generic route: the most of forward's and backward's carving.
template <routing::ComposedRouter R>
std::size_t cuda_composed_workspace_size(const R& r, index_t tokens,
                                         const typename R::params_type& p) {
  const index_t experts = r.num_experts(p);
  const index_t d = r.scoring().params(p).w.extent(1);
  workspace_arena fwd;
  const ops::forward_route<R> forward_steps(tokens, experts, fwd);
  (void)fwd.take<float>(cuda_router_float_scratch(tokens, d));  // x as float rows
  workspace_arena bwd;
  (void)bwd.take<float>(tokens * experts);  // d_logits
  const ops::backward_route<R> backward_steps(tokens, experts, bwd);
  (void)bwd.take<float>(cuda_router_float_scratch(tokens, d));  // x as float rows
  return std::max(fwd.required(), bwd.required());
}

template <routing::ComposedRouter R, ElementType T>
void cuda_composed_forward(const cuda::context& ctx, const R& r, const matrix_view<const T>& x,
                           const typename R::params_type& p, const routing::plan_ref& plan,
                           typename R::losses_type* losses, cuda::device_status* status,
                           workspace_arena& ws) {
  cuda_require_linear_scoring(r);
  const index_t tokens = x.extent(0), experts = r.num_experts(p);
  const ops::forward_route<R> steps(tokens, experts, ws);
  float* x_float = ws.take<float>(cuda_router_float_scratch(tokens, x.extent(1)));
  if (!ws.carving()) return;
  const auto scoring = r.scoring();
  const auto sp = scoring.params(p);
  scoring.check(x, sp);
  r.validate(scoring.num_experts(sp));
  ops::device_token_rules<R>::check(r, p, tokens);
  cuda_require_router_plan(plan, tokens, r.width(p), experts);
  const int dev = cuda::stream_device(ctx.stream);
  cuda_require_router_params(r, p, dev);
  if (losses == nullptr) {
    throw null_pointer_error("losses",
                             "losses: the router's forward writes its losses to device "
                             "memory, got null");
  }
  cuda::require_device_memory("losses", losses, dev, alignof(float));
  cuda_router_logits(ctx, x, sp.w, plan.logits.data(), x_float);
  steps.run(cuda::kernel_launcher{ctx.stream}, r, p, plan, losses, cuda::status_faults{status});
}

template <routing::ComposedRouter R, ElementType T>
void cuda_composed_backward(const cuda::context& ctx, const R& r, const matrix_view<const T>& x,
                            const typename R::params_type& p, const routing::plan_ref& plan,
                            const float* d_weights, const typename R::losses_type& coeff,
                            const matrix_view<float>& dx, const typename R::grads_type& grads,
                            workspace_arena& ws) {
  cuda_require_linear_scoring(r);
  const index_t tokens = plan.num_tokens, experts = plan.num_experts;
  float* d_logits = ws.take<float>(tokens * experts);  // [T, E]
  const ops::backward_route<R> steps(tokens, experts, ws);
  float* x_float = ws.take<float>(cuda_router_float_scratch(tokens, x.extent(1)));
  if (!ws.carving()) return;
  const auto scoring = r.scoring();
  const auto sp = scoring.params(p);
  scoring.check(x, sp);
  cuda_require_router_plan(plan, x.extent(0), r.width(p), r.num_experts(p));
  const index_t d = x.extent(1);
  const int dev = cuda::stream_device(ctx.stream);
  cuda::require_device_memory("params.w", sp.w.data_handle(), dev, alignof(float));
  if (present(dx)) {
    check_view("dx", dx, {tokens, d}, "[T, d]");
    cuda::require_device_memory("dx", dx.data_handle(), dev, alignof(float));
  }
  if (present(grads.w)) {
    check_view("grads.w", grads.w, {experts, d}, "[E, d]");
    cuda::require_device_memory("grads.w", grads.w.data_handle(), dev, alignof(float));
  }
  if (d_weights == nullptr && tokens * plan.width > 0) {
    throw null_pointer_error("d_weights", "d_weights: expected T·width device floats, got null");
  }
  steps.run(cuda::kernel_launcher{ctx.stream}, r, plan, d_weights, coeff, d_logits);
  cuda_router_linear_backward(ctx, x, sp.w, d_logits, dx, grads.w, x_float);
}

}  // namespace switchyard::detail

namespace switchyard::cuda {

//! Device bytes router `r` takes from its workspace for T tokens (the most of forward's and
//! backward's carving, measured by the same carving code).
template <class R>
std::size_t router_workspace_size(const R& r, index_t tokens, const typename R::params_type& p) {
  if constexpr (device_composed_router<R>) {
    return detail::cuda_composed_workspace_size(r, tokens, p);
  } else if constexpr (routing::ComposedRouter<R>) {
    refuse_host_only_router<R>();
    return 0;
  } else {
    return device_router<R>::workspace_size(r, tokens, p);
  }
}

//! Forward of router `r` over x [T, d] (device): overwrites `plan` (device arrays sized T ×
//! r.width(p) × E) and `*losses` (device), recording non-finite logits in `status`; scratch
//! from `ws` (device). Stream-ordered on ctx.stream, no synchronisation.
template <class R, ElementType T>
void router_forward(const context& ctx, const R& r, const matrix_view<const T>& x,
                    const typename R::params_type& p, const routing::plan_ref& plan,
                    typename R::losses_type* losses, device_status* status, workspace_arena& ws) {
  if constexpr (device_composed_router<R>) {
    detail::cuda_composed_forward(ctx, r, x, p, plan, losses, status, ws);
  } else if constexpr (routing::ComposedRouter<R>) {
    refuse_host_only_router<R>();
  } else {
    device_router<R>::forward(ctx, r, x, p, plan, losses, status, ws);
  }
}

//! Backward of router `r`: dx += ∂/∂x (when present) and grads += ∂/∂params of Σ d_weights ⊙
//! weights + Σ coeff · loss (d_weights [T·width] device, coeff on the host), scratch from `ws`.
template <class R, ElementType T>
void router_backward(const context& ctx, const R& r, const matrix_view<const T>& x,
                     const typename R::params_type& p, const routing::plan_ref& plan,
                     const float* d_weights, const typename R::losses_type& coeff,
                     const matrix_view<float>& dx, const typename R::grads_type& grads,
                     workspace_arena& ws) {
  if constexpr (device_composed_router<R>) {
    detail::cuda_composed_backward(ctx, r, x, p, plan, d_weights, coeff, dx, grads, ws);
  } else if constexpr (routing::ComposedRouter<R>) {
    refuse_host_only_router<R>();
  } else {
    device_router<R>::backward(ctx, r, x, p, plan, d_weights, coeff, dx, grads, ws);
  }
}

}  // namespace switchyard::cuda
