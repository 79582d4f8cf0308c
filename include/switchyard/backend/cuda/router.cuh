#pragma once
//! \file router.cuh
//! How the CUDA backend runs a router: a composed router (TopK, TopP, Adaptive Gating,
//! DA-MoE: routing::ComposedRouter) through the generic device route (logits, the router's
//! own `__host__ __device__` selection rule per token, loss terms by fixed-order reductions);
//! any other router through `device_router<R>`, which a backend file specialises (DynMoE:
//! backend/cuda/dynmoe.cuh) and a user may specialise for their own router.
//!
//! PLACEHOLDER (contract only): the bodies are written by the routing work of issue #11.

#include <cuda_runtime_api.h>

#include <cstddef>

#include "switchyard/backend/cuda/context.hpp"
#include "switchyard/backend/cuda/status.hpp"
#include "switchyard/core/config.hpp"
#include "switchyard/core/element_type.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/core/workspace.hpp"
#include "switchyard/routing/composition.hpp"
#include "switchyard/routing/plan.hpp"

namespace switchyard::cuda {

template <class R>
inline constexpr bool no_device_route_for = false;

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

//! Device bytes router `r` takes from its workspace for T tokens (the most of forward's and
//! backward's carving).
template <class R>
std::size_t router_workspace_size(const R& r, index_t tokens, const typename R::params_type& p) {
  (void)r; (void)tokens; (void)p;
  return 0;
}

//! Forward of router `r` over x [T, d] (device): overwrites `plan` (device arrays sized T ×
//! r.width(p) × E) and `*losses` (device), recording non-finite logits in `status`; scratch
//! from `ws` (device). Stream-ordered on ctx.stream, no synchronisation.
template <class R, ElementType T>
void router_forward(const context& ctx, const R& r, const matrix_view<const T>& x,
                    const typename R::params_type& p, const routing::plan_ref& plan,
                    typename R::losses_type* losses, device_status* status, workspace_arena& ws) {
  (void)ctx; (void)r; (void)x; (void)p; (void)plan; (void)losses; (void)status; (void)ws;
  throw unsupported_error("switchyard::cuda::router_forward: not implemented yet (issue #11)");
}

//! Backward of router `r`: dx += ∂/∂x (when present) and grads += ∂/∂params of Σ d_weights ⊙
//! weights + Σ coeff · loss (d_weights [T·width] device, coeff on the host), scratch from `ws`.
template <class R, ElementType T>
void router_backward(const context& ctx, const R& r, const matrix_view<const T>& x,
                     const typename R::params_type& p, const routing::plan_ref& plan,
                     const float* d_weights, const typename R::losses_type& coeff,
                     const matrix_view<float>& dx, const typename R::grads_type& grads,
                     workspace_arena& ws) {
  (void)ctx; (void)r; (void)x; (void)p; (void)plan; (void)d_weights; (void)coeff; (void)dx;
  (void)grads; (void)ws;
  throw unsupported_error("switchyard::cuda::router_backward: not implemented yet (issue #11)");
}

}  // namespace switchyard::cuda
