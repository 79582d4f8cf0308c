#pragma once
//! \file route.hpp
//! How the host backend runs a router: its forward into a caller's plan_ref with scratch from
//! a workspace arena, its backward, and the bytes both take. Plus two conveniences for direct
//! use of a router on the host (tests, tools, a plan made outside a layer): `host::route` and
//! `host::route_backward`, which size an owning `routing_plan` and allocate the scratch.

#include <algorithm>
#include <cstddef>
#include <concepts>
#include <vector>

#include "switchyard/core/element_type.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/core/workspace.hpp"
#include "switchyard/routing/concepts.hpp"
#include "switchyard/routing/plan.hpp"

namespace switchyard::host {

//! Bytes router `r` takes from its workspace in forward or backward for T tokens (the most
//! of the two); 0 for a router that declares no `workspace_size`.
template <class R>
std::size_t router_workspace_size(const R& r, index_t tokens, const typename R::params_type& p) {
  if constexpr (requires {
                  { r.workspace_size(tokens, p) } -> std::convertible_to<std::size_t>;
                }) {
    return r.workspace_size(tokens, p);
  } else {
    return 0;
  }
}

//! Forward of router `r` over x [T, d]: overwrites `plan` (sized T × r.width(p) × E) and
//! `losses`, with scratch from `ws` (at least router_workspace_size bytes).
template <class R, ElementType T>
void router_forward(const R& r, const matrix_view<const T>& x, const typename R::params_type& p,
                    const routing::plan_ref& plan, typename R::losses_type& losses,
                    workspace_arena& ws) {
  static_assert(requires { r.forward(x, p, plan, losses, ws); },
                "switchyard: the host backend needs the router's `template <ElementType T> void "
                "forward(const matrix_view<const T>& x, const params_type&, const "
                "routing::plan_ref& plan, losses_type&, workspace_arena&) const` (docs/design.md, "
                "router contract)");
  r.forward(x, p, plan, losses, ws);
}

//! Backward of router `r`: dx += ∂/∂x and grads += ∂/∂params of Σ d_weights ⊙ weights +
//! Σ coeff · loss, with scratch from `ws`.
template <class R, ElementType T>
void router_backward(const R& r, const matrix_view<const T>& x, const typename R::params_type& p,
                     const routing::plan_ref& plan, const float* d_weights,
                     const typename R::losses_type& coeff, const matrix_view<float>& dx,
                     const typename R::grads_type& grads, workspace_arena& ws) {
  static_assert(requires { r.backward(x, p, plan, d_weights, coeff, dx, grads, ws); },
                "switchyard: the host backend needs the router's `template <ElementType T> void "
                "backward(x, params, const routing::plan_ref& plan, const float* d_weights, const "
                "losses_type& coeffs, const matrix_view<float>& dx, const grads_type&, "
                "workspace_arena&) const` (docs/design.md, router contract)");
  r.backward(x, p, plan, d_weights, coeff, dx, grads, ws);
}

//! Convenience: routes x with `r` into an owning plan (sized here) and `losses`; allocates
//! the scratch. The layer uses router_forward with caller memory instead.
template <class R, ElementType T>
void route(const R& r, const matrix_view<const T>& x, const typename R::params_type& p,
           routing::routing_plan& plan, typename R::losses_type& losses) {
  const auto clamp = [](index_t v) { return v < 0 ? index_t{0} : v; };
  plan.resize(x.extent(0), clamp(r.width(p)), clamp(r.num_experts(p)));
  // At least one byte: the arena then carves (a router that takes more than it declared
  // gets a shape_error naming the workspace, never a null array).
  std::vector<std::byte> scratch(std::max<std::size_t>(1, router_workspace_size(r, x.extent(0), p)));
  workspace_arena ws({scratch.data(), scratch.size()});
  router_forward(r, x, p, plan.ref(), losses, ws);
}

//! Convenience: the backward of `route` (allocates the scratch).
template <class R, ElementType T>
void route_backward(const R& r, const matrix_view<const T>& x, const typename R::params_type& p,
                    const routing::routing_plan& plan, const float* d_weights,
                    const typename R::losses_type& coeff, const matrix_view<float>& dx,
                    const typename R::grads_type& grads) {
  // At least one byte: the arena then carves (a router that takes more than it declared
  // gets a shape_error naming the workspace, never a null array).
  std::vector<std::byte> scratch(std::max<std::size_t>(1, router_workspace_size(r, x.extent(0), p)));
  workspace_arena ws({scratch.data(), scratch.size()});
  router_backward(r, x, p, plan.ref(), d_weights, coeff, dx, grads, ws);
}

}  // namespace switchyard::host
