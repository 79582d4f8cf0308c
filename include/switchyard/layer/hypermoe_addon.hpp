#pragma once
//! \file hypermoe_addon.hpp
//! Composes HyperMoE (`layer::hypermoe_module`, layer/hypermoe.hpp) into `MoELayer` through
//! the add-on hook: `MoELayer<Router, Activation, Dispatch, layer::hypermoe_addon>` computes
//! `y = Σ_j w_j·Expert_j(x) + hyper(x)`. HyperMoE's term depends on the plan's selection
//! (not differentiable) but not on the combine weights, so it adds nothing to d_weights.
//!
//! Workspace: the module's arrays are sized by its hypernetwork too (d_emb, p, h_in, b, d_le
//! come from the params), so `workspace_size` takes the params after the hook's four sizes.
//! Given a carving arena, forward and backward take their arrays from it and do not allocate;
//! given an empty (measuring) arena they allocate their own workspace.

#include <cstddef>
#include <cstdint>
#include <vector>

#include "switchyard/layer/addon.hpp"
#include "switchyard/layer/hypermoe.hpp"

namespace switchyard::layer {

//! The add-on adapter of the HyperMoE module.
struct hypermoe_addon {
  using policy_kind = addon_tag;
  using params_type = hypermoe_params;  //!< expert embeddings, embedding_process, generator
  using grads_type = hypermoe_grads;    //!< their gradients (+=)

  hypermoe_module hyper{};  //!< layer index and adapter width

  //! Bytes forward and backward each take at most from their arena for T tokens of width d,
  //! `width` slots and E experts (E is checked against params.expert_emb by forward).
  [[nodiscard]] std::size_t workspace_size(index_t tokens, index_t d, index_t width,
                                           [[maybe_unused]] index_t experts,
                                           const params_type& p) const {
    return hyper.workspace_size(tokens, d, width, p);
  }

  //! out [T, d] = hyper(x).
  template <ElementType T, class Id, class W>
  void forward(const matrix_view<const T>& x, const routing::plan_view<Id, W>& plan,
               const params_type& p, const matrix_view<float>& out, workspace_arena& ws) const {
    if (ws.carving()) {
      hyper.forward(x, plan, p, out, ws);
    } else {
      hyper.forward(x, plan, p, out);
    }
  }

  //! dx += ∂hyper/∂x · dy, grads += ∂hyper/∂params · dy; d_weights untouched.
  template <ElementType T, class Id, class W>
  void backward(const matrix_view<const T>& x, const routing::plan_view<Id, W>& plan,
                const params_type& p, const matrix_view<const float>& dy,
                const matrix_view<float>& dx, const grads_type& g, float* /*d_weights*/,
                workspace_arena& ws) const {
    if (ws.carving()) {
      hyper.backward(x, plan, p, dy, dx, g, ws);
    } else {
      hyper.backward(x, plan, p, dy, dx, g);
    }
  }
};

static_assert(AddOnModule<hypermoe_addon>);

}  // namespace switchyard::layer
