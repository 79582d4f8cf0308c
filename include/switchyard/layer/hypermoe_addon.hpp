// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file hypermoe_addon.hpp
//! Composes HyperMoE (`layer::hypermoe_module`, layer/hypermoe.hpp) into `MoELayer` through
//! the add-on hook: `MoELayer<Router, Activation, Dispatch, layer::hypermoe_addon>` computes
//! `y = Σ_j w_j·Expert_j(x) + hyper(x)`. HyperMoE's term depends on the plan's selection
//! (not differentiable) but not on the combine weights, so it adds nothing to d_weights.
//!
//! Workspace: the module's arrays are sized by its hypernetwork too (d_emb, p, h_in, b, d_le
//! come from the params), so `workspace_size` takes the params after the hook's four sizes.
//! Forward and backward take `workspace_size(..., params)` bytes from their arena (the layer
//! sizes it with the params its size queries take) and then do not allocate; a carving arena
//! that is too small throws shape_error("workspace"); a measuring arena (a direct call without
//! a workspace) makes them allocate their own.

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
    workspace_arena own = module_arena(ws, hyper.workspace_size(x.extent(0), x.extent(1),
                                                                plan.width(), p));
    if (own.carving()) {
      hyper.forward(x, plan, p, out, own);
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
    workspace_arena own = module_arena(ws, hyper.workspace_size(x.extent(0), x.extent(1),
                                                                plan.width(), p));
    if (own.carving()) {
      hyper.backward(x, plan, p, dy, dx, g, own);
    } else {
      hyper.backward(x, plan, p, dy, dx, g);
    }
  }

 private:
  //! `need` bytes of `ws` as an arena; a measuring `ws` (an add-on called outside a layer
  //! without a workspace) gives a measuring arena, and the module then allocates its own. A
  //! carving `ws` too small for `need` throws shape_error("workspace") (see workspace_size).
  static workspace_arena module_arena(workspace_arena& ws, std::size_t need) {
    if (!ws.carving()) return {};
    std::byte* bytes = ws.take<std::byte>(static_cast<index_t>(need));
    return workspace_arena({bytes, need});
  }
};

static_assert(AddOnModule<hypermoe_addon>);

}  // namespace switchyard::layer
