// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file addon.hpp
//! The hook for a module the layer applies after routing (HyperMoE is one: it is conditioned
//! on the experts a token did not select, so it needs the plan). `MoELayer`'s fourth
//! template parameter names it; the default, `no_addon`, contributes nothing and costs
//! nothing.
//!
//! An add-on declares `using policy_kind = switchyard::addon_tag;`, names `params_type` and
//! `grads_type`, and has, for each element type T of x:
//! - `forward(x [T, d] of T, plan, params, out [T, d] float, workspace_arena& ws)`: overwrites
//!   `out` with its term; the layer adds it to Σ_j w_tj · FFN_{e_tj}(x_t) before rounding y;
//! - `backward(x, plan, params, dy [T, d] float, dx [T, d] float (+=), grads (+=),
//!   d_weights [T·width] float (+=), workspace_arena& ws)`: its gradients, including its share
//!   of the combine weights' cotangent when its term depends on them (HyperMoE's does not);
//! - optionally `std::size_t workspace_size(index_t tokens, index_t d, index_t width, index_t
//!   experts, const params_type&) const`: the bytes its forward and backward take from `ws`
//!   (each takes at most that much; the layer's size queries take the add-on params for it);
//!   without it the layer gives it an empty arena. With that workspace neither
//!   may allocate (the layer's no-allocation promise, docs/layer.md).
//!
//! `layer/hypermoe_addon.hpp` adapts `layer::hypermoe_module` to this hook.

#include <concepts>
#include <cstdint>

#include "switchyard/core/element_type.hpp"
#include "switchyard/core/policy.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/core/workspace.hpp"
#include "switchyard/routing/plan.hpp"

namespace switchyard {

//! The add-on that adds nothing (the default fourth parameter of MoELayer).
struct no_addon {
  using policy_kind = addon_tag;
  //! No parameters.
  struct params_type {};
  //! No gradients.
  struct grads_type {};
};

namespace detail {
template <class A>
concept addon_ops = requires(const A& a, matrix_view<const float> x,
                             routing::plan_view<const std::int32_t, const float> plan,
                             const typename A::params_type& p, matrix_view<float> out,
                             matrix_view<const float> dy, const typename A::grads_type& g,
                             float* d_weights, workspace_arena& ws) {
  a.forward(x, plan, p, out, ws);
  a.backward(x, plan, p, dy, out, g, d_weights, ws);
};
}  // namespace detail

//! A module applied after routing: `no_addon`, or a type declaring `policy_kind = addon_tag`
//! with `params_type`, `grads_type`, `forward` and `backward` as in the file comment.
template <class A>
concept AddOnModule = std::same_as<A, no_addon> ||
                (requires { typename A::policy_kind; } &&
                 std::same_as<typename A::policy_kind, addon_tag> &&
                 requires { typename A::params_type; typename A::grads_type; } &&
                 detail::addon_ops<A>);

}  // namespace switchyard
