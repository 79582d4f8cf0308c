// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file params.hpp
//! HyperMoE's parameter and gradient views (`hypermoe_params`, `hypermoe_grads`), the sizes
//! they imply (`hypermoe_dims`) and the upstream init bound of the generator heads. The math
//! is in layer/hypermoe.hpp's file comment; the module in hypermoe/module.hpp.

#include <cmath>

#include "switchyard/core/view.hpp"

namespace switchyard::layer {

//! An `nn.Linear` of the hypernetwork: `w [out, in]`, `b [out]` (y = w·x + b).
struct hyper_linear_params {
  matrix_view<const float> w;  //!< [out, in]
  vector_view<const float> b;  //!< [out]
};

//! Gradients of one `nn.Linear`, accumulated (+=); an empty view skips that gradient.
struct hyper_linear_grads {
  matrix_view<float> w;  //!< [out, in]
  vector_view<float> b;  //!< [out]
};

//! The ParameterGenerator shared by every layer of a stack (`HM-sw: adapter_generators.py`).
//! `b` = hypernetwork_bottleneck, `h_in` = hypernet_input, `d_le` = layer_emb_dim,
//! `a` = adapter_dim, `d` = model width.
struct hypernet_generator_params {
  matrix_view<const float> layer_embed;  //!< [L, d_le]
  hyper_linear_params linear1;           //!< [b, h_in + d_le] — input is [z ; layer_embed[ℓ]]
  hyper_linear_params weight_up;         //!< [a·d, b] — generates W_up [a, d], row-major
  hyper_linear_params weight_down;       //!< [d·a, b] — generates W_down [d, a], row-major
  hyper_linear_params bias_up;           //!< [d, b]   — generates b_up [d]
  hyper_linear_params bias_down;         //!< [a, b]   — generates b_down [a]
};

//! Gradients of the shared generator (accumulated; empty views skipped).
struct hypernet_generator_grads {
  matrix_view<float> layer_embed;  //!< [L, d_le]; only row ℓ = layer_idx receives gradient
  hyper_linear_grads linear1;      //!< [b, h_in + d_le]
  hyper_linear_grads weight_up;    //!< [a·d, b]
  hyper_linear_grads weight_down;  //!< [d·a, b]
  hyper_linear_grads bias_up;      //!< [d, b]
  hyper_linear_grads bias_down;    //!< [a, b]
};

//! Everything `hypermoe_module` reads: the layer's expert embeddings and
//! `embedding_process`, and a view of the stack's shared generator.
struct hypermoe_params {
  matrix_view<const float> expert_emb;  //!< [E, d_emb] (`n_experts_embedding`)
  hyper_linear_params process1;         //!< [p, d_emb] — embedding_process Linear 1 (then ReLU)
  hyper_linear_params process2;         //!< [h_in, p]  — embedding_process Linear 2
  hypernet_generator_params generator;  //!< shared by all layers
};

//! Gradients mirroring `hypermoe_params` (accumulated with +=; an empty view skips it).
struct hypermoe_grads {
  matrix_view<float> expert_emb;       //!< [E, d_emb]
  hyper_linear_grads process1;         //!< [p, d_emb]
  hyper_linear_grads process2;         //!< [h_in, p]
  hypernet_generator_grads generator;  //!< shared: several layers accumulate into it
};

//! The sizes `hypermoe_params` imply (filled by `hypermoe_module::validate`).
struct hypermoe_dims {
  index_t experts = 0;     //!< E
  index_t emb_dim = 0;     //!< d_emb (experts_embedding_dim)
  index_t process_dim = 0; //!< p
  index_t hyper_in = 0;    //!< h_in (hypernet_input)
  index_t layers = 0;      //!< L (rows of layer_embed)
  index_t layer_emb = 0;   //!< d_le (layer_emb_dim)
  index_t bottleneck = 0;  //!< b (hypernetwork_bottleneck)
  index_t model = 0;       //!< d
  index_t adapter = 0;     //!< a (adapter_dim)
};

//! Bound of the upstream "hyperfanin" uniform init of a generator head:
//! `1e-3·sqrt(3/(hypernet_in·mainnet_in))` (weight_up: mainnet_in = a, weight_down:
//! mainnet_in = d; bias heads: mainnet_in = 1). Biases start at 0, so the generated adapter,
//! and with it `hyper(x)`, starts ≈ 0: HyperMoE starts as the plain MoE.
inline double hyperfanin_bound(index_t hypernet_in, index_t mainnet_in) {
  return 1e-3 * std::sqrt(3.0 / (static_cast<double>(hypernet_in) * static_cast<double>(mainnet_in)));
}

}  // namespace switchyard::layer
