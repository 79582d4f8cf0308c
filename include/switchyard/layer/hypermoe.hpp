// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file hypermoe.hpp
//! HyperMoE (Zhao et al., ACL 2024; spec `routing-algorithms.md` §4): a module the layer
//! applies *after* routing. From the plan's unselected experts it builds a selection
//! embedding, feeds it through a hypernetwork shared by all layers, and applies the
//! generated per-token bottleneck adapter to the token:
//!
//!     u      = Σ_{e ∉ S(t)} emb[e]            = Σ_all emb − Σ_{e ∈ S(t)} emb   (O(k·d_emb))
//!     z      = W₂·ReLU(W₁·u + b₁) + b₂                                 (embedding_process)
//!     h      = ReLU(G₁·[z ; layer_embed[ℓ]] + g₁)                       (ParameterGenerator)
//!     W_down = reshape(H_d·h + c_d, [d, a])   (row-major, input-dim major)
//!     W_up   = reshape(H_u·h + c_u, [a, d]),  b_down = B_d·h + c_bd,  b_up = B_u·h + c_bu
//!     hyper(x) = ReLU(x·W_down + b_down)·W_up + b_up
//!
//! The layer output is `Σ_j w_j·Expert_j(x) + hyper(x)`; this header computes `hyper(x)`
//! and its backward. It also carries the pieces of the two upstream variants that are not
//! plain top-k routing: Switch capacity in token order with HF's load-balance quirk, and
//! the GPT-2 variant's cv² loss (see docs/routers/hypermoe.md).
//!
//! Host implementation: float32 storage, float64 accumulation. Tokens that selected the same
//! expert set share u, z, h and the generated adapter, so the hypernetwork runs once per
//! distinct selection set (at most E sets for top-1), not once per token. Given a workspace
//! of `hypermoe_module::workspace_size` bytes, forward and backward do not allocate.
//!
//! Files: hypermoe/params.hpp (parameter and gradient views, sizes), hypermoe/kernels.hpp
//! (affine maps, grouping by selection set, scratch layouts), hypermoe/module.hpp
//! (`hypermoe_module`), hypermoe/switch_variant.hpp and hypermoe/gpt2_variant.hpp (the
//! upstream variants' pieces). `layer/hypermoe_addon.hpp` composes the module into MoELayer.

#include "switchyard/layer/hypermoe/gpt2_variant.hpp"
#include "switchyard/layer/hypermoe/module.hpp"
#include "switchyard/layer/hypermoe/params.hpp"
#include "switchyard/layer/hypermoe/switch_variant.hpp"
