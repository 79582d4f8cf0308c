#pragma once
//! \file hypermoe_addon.hpp
//! Composes HyperMoE (`layer::hypermoe_module`, layer/hypermoe.hpp) into `MoELayer` through
//! the add-on hook: `MoELayer<Router, Activation, Dispatch, layer::hypermoe_addon>` computes
//! `y = Σ_j w_j·Expert_j(x) + hyper(x)`. HyperMoE's term depends on the plan's selection
//! (not differentiable) but not on the combine weights, so it adds nothing to d_weights.

#include <cstdint>

#include "switchyard/layer/addon.hpp"
#include "switchyard/layer/hypermoe.hpp"

namespace switchyard::layer {

//! The add-on adapter of the HyperMoE module.
struct hypermoe_addon {
  using policy_kind = addon_tag;
  using params_type = hypermoe_params;  //!< expert embeddings, embedding_process, generator
  using grads_type = hypermoe_grads;    //!< their gradients (+=)

  hypermoe_module module{};  //!< layer index and adapter width

  //! out [T, d] = hyper(x).
  template <ElementType T, class Id, class W>
  void forward(const matrix_view<const T>& x, const routing::plan_view<Id, W>& plan,
               const params_type& p, const matrix_view<float>& out) const {
    module.forward(x, plan, p, out);
  }

  //! dx += ∂hyper/∂x · dy, grads += ∂hyper/∂params · dy; d_weights untouched.
  template <ElementType T, class Id, class W>
  void backward(const matrix_view<const T>& x, const routing::plan_view<Id, W>& plan,
                const params_type& p, const matrix_view<const float>& dy,
                const matrix_view<float>& dx, const grads_type& g, float* /*d_weights*/) const {
    module.backward(x, plan, p, dy, dx, g);
  }
};

static_assert(AddOnModule<hypermoe_addon>);

}  // namespace switchyard::layer
