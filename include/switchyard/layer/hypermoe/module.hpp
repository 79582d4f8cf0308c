// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file module.hpp
//! `layer::hypermoe_module`: HyperMoE's forward `hyper(x)` and its backward (the math is in
//! layer/hypermoe.hpp's file comment).
//!
//! Workspace: `workspace_size(tokens, d, width, params)` bytes; with them forward and backward
//! take every array from the caller's `workspace_arena` and do not allocate. The overloads
//! without one allocate that workspace (a `std::vector<std::byte>`) per call. Layout:
//! - both: the grouping by selection set (`detail::selection_groups`: [T, width] int32 sets,
//!   five [T] arrays), Σ_e emb[e] [d_emb] doubles;
//! - forward: `min(group_slots, T)` work slots, each one generated adapter plus a token's
//!   [a] and [d] scratch; slot i computes groups i, i + n, i + 2n, ... (n slots in use), so
//!   neither the sizes nor the results depend on the thread count;
//! - backward (sequential over groups, in order of first use, as the accumulation of the
//!   shared gradients requires): one adapter, its cotangents and the per-expert embedding
//!   cotangent sums [E, d_emb].

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "switchyard/core/element_type.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/parallel.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/core/workspace.hpp"
#include "switchyard/layer/hypermoe/kernels.hpp"
#include "switchyard/layer/hypermoe/params.hpp"
#include "switchyard/routing/plan.hpp"

namespace switchyard::layer {

//! The HyperMoE module of one layer: applies the adapter generated from the plan's
//! unselected experts. Stateless: `backward` recomputes the (cheap, per selection set)
//! hypernetwork activations instead of caching per-token adapters.
struct hypermoe_module {
  int layer_idx = 0;     //!< ℓ: row of the shared `layer_embed`, in [0, L)
  int adapter_dim = 64;  //!< a: bottleneck width of the generated adapter, >= 1
  //! Selection groups forward computes at once, >= 1: each holds one generated adapter
  //! (2·d·a doubles) in the workspace. Bounds forward's parallelism and workspace; the results
  //! do not depend on it.
  int group_slots = 16;

  //! Checks every parameter view against the others and against the model width `d`;
  //! throws shape_error (naming the argument, the expected shape and the one received) or
  //! range_error (`layer_idx` outside [0, L), `adapter_dim` or `group_slots` < 1). Returns
  //! the sizes.
  [[nodiscard]] hypermoe_dims validate(const hypermoe_params& p, index_t d) const {
    if (adapter_dim < 1) {
      throw range_error("adapter_dim", detail::concat(
                                           "adapter_dim must be >= 1, got ", adapter_dim));
    }
    if (group_slots < 1) {
      throw range_error("group_slots", detail::concat(
                                           "group_slots must be >= 1, got ", group_slots));
    }
    hypermoe_dims s;
    check_view("params.expert_emb", p.expert_emb, {-1, -1}, "[E, d_emb]");
    s.experts = p.expert_emb.extent(0);
    s.emb_dim = p.expert_emb.extent(1);
    check_view("params.generator.layer_embed", p.generator.layer_embed, {-1, -1}, "[L, d_le]");
    s.layers = p.generator.layer_embed.extent(0);
    s.layer_emb = p.generator.layer_embed.extent(1);
    if (layer_idx < 0 || layer_idx >= s.layers) {
      throw range_error("layer_idx",
                        detail::concat(
                            "layer_idx must be in [0, L) = [0, ", s.layers,
                            ") (L = params.generator.layer_embed.extent(0)), got ", layer_idx));
    }
    s.model = d;
    s.adapter = adapter_dim;
    detail::check_linear("params.process1", p.process1, -1, s.emb_dim, "[p, d_emb]");
    s.process_dim = p.process1.w.extent(0);
    detail::check_linear("params.process2", p.process2, -1, s.process_dim, "[h_in, p]");
    s.hyper_in = p.process2.w.extent(0);
    detail::check_linear("params.generator.linear1", p.generator.linear1, -1,
                         s.hyper_in + s.layer_emb, "[b, h_in + d_le]");
    s.bottleneck = p.generator.linear1.w.extent(0);
    detail::check_linear("params.generator.weight_up", p.generator.weight_up, s.adapter * s.model,
                         s.bottleneck, "[adapter_dim·d, b]");
    detail::check_linear("params.generator.weight_down", p.generator.weight_down,
                         s.model * s.adapter, s.bottleneck, "[d·adapter_dim, b]");
    detail::check_linear("params.generator.bias_up", p.generator.bias_up, s.model, s.bottleneck,
                         "[d, b]");
    detail::check_linear("params.generator.bias_down", p.generator.bias_down, s.adapter,
                         s.bottleneck, "[adapter_dim, b]");
    return s;
  }

  //! Bytes of workspace `forward`, `backward` and `selection_embedding` each take at most for
  //! T tokens of width d routed with `width` slots (validates `p` against d, as forward does).
  [[nodiscard]] std::size_t workspace_size(index_t tokens, index_t d, index_t width,
                                           const hypermoe_params& p) const {
    const auto s = validate(p, d);
    workspace_arena fwd, bwd;
    take_forward(fwd, s, tokens, width);
    take_backward(bwd, s, tokens, width);
    return std::max(fwd.required(), bwd.required());
  }

  //! Selection embedding of every token, `u [T, d_emb]` = Σ of the embeddings of the experts
  //! the plan did *not* select (computed as Σ_all − Σ_selected; the plan is validated, so a
  //! token's used slots name distinct experts: a repeated id is rejected with range_error).
  //! Takes at most workspace_size(T, ·, width, ·) bytes from `ws`.
  template <class Id, class W>
  void selection_embedding(const routing::plan_view<Id, W>& plan,
                           const matrix_view<const float>& expert_emb,
                           const matrix_view<float>& u, workspace_arena& ws) const {
    check_view("expert_emb", expert_emb, {-1, -1}, "[E, d_emb]");
    routing::validate_plan("plan", plan, plan.num_tokens(), expert_emb.extent(0));
    check_view("u", u, {plan.num_tokens(), expert_emb.extent(1)}, "[T, d_emb]");
    const index_t d_emb = expert_emb.extent(1);
    auto [groups, all, tmp] = take_embedding(ws, plan.num_tokens(), plan.width(), d_emb);
    detail::group_by_selection(plan, groups);
    detail::embedding_total(expert_emb, all);
    for (index_t gi = 0; gi < groups.count; ++gi) {
      detail::unselected_sum(expert_emb, all, groups.set(gi), groups.set_length(gi), tmp);
      const index_t* tok = groups.tokens(gi);
      for (index_t k = 0; k < groups.size(gi); ++k)
        for (index_t i = 0; i < d_emb; ++i) u(tok[k], i) = static_cast<float>(tmp[i]);
    }
  }
  //! \copydoc selection_embedding (allocates its workspace: [T, width] ints, 5·T + 2·d_emb words)
  template <class Id, class W>
  void selection_embedding(const routing::plan_view<Id, W>& plan,
                           const matrix_view<const float>& expert_emb,
                           const matrix_view<float>& u) const {
    workspace_arena measure;
    (void)take_embedding(measure, plan.num_tokens(), plan.width(), expert_emb.extent(1));
    std::vector<std::byte> bytes(measure.required());
    workspace_arena ws({bytes.data(), bytes.size()});
    selection_embedding(plan, expert_emb, u, ws);
  }

  //! hyper_out [T, d] = hyper(x) (overwritten) for x [T, d] routed by `plan` (only its
  //! ids and counts are read; the plan's E must equal params.expert_emb.extent(0)).
  //! Takes at most workspace_size(T, d, width, p) bytes from `ws` and allocates nothing.
  template <ElementType T, class Id, class W>
  void forward(const matrix_view<const T>& x, const routing::plan_view<Id, W>& plan,
               const hypermoe_params& p, const matrix_view<float>& hyper_out,
               workspace_arena& ws) const {
    const auto s = check_inputs(x, plan, p);
    check_view("hyper_out", hyper_out, {x.extent(0), s.model}, "[T, d]");
    const forward_scratch w = take_forward(ws, s, x.extent(0), plan.width());
    detail::selection_groups groups = w.groups;
    detail::group_by_selection(plan, groups);
    detail::embedding_total(p.expert_emb, w.all);
    const index_t items = std::min(w.slots, groups.count);
    const index_t slot_doubles = forward_slot_doubles(s);
    detail::parallel_for(
        items, detail::openmp_parallel_available(), [&](index_t item) {
          double* slot = w.slot_base + item * slot_doubles;
          const auto g = detail::generated_adapter::bind(slot, s);
          double* m = slot + detail::generated_adapter::doubles(s);
          double* y = m + s.adapter;
          for (index_t gi = item; gi < groups.count; gi += items) {
            detail::unselected_sum(p.expert_emb, w.all, groups.set(gi), groups.set_length(gi),
                                   g.u);
            detail::generate_adapter(p, s, layer_idx, g);
            const index_t* tok = groups.tokens(gi);
            for (index_t k = 0; k < groups.size(gi); ++k)
              detail::adapter_token_forward(x, tok[k], g.w_down, g.b_down, g.w_up, g.b_up,
                                            s.model, s.adapter, m, y, hyper_out);
          }
        });
  }
  //! \copydoc forward (this overload allocates its workspace)
  template <ElementType T, class Id, class W>
  void forward(const matrix_view<const T>& x, const routing::plan_view<Id, W>& plan,
               const hypermoe_params& p, const matrix_view<float>& hyper_out) const {
    check_view("x", x, {-1, -1}, "[T, d]");
    std::vector<std::byte> bytes(workspace_size(x.extent(0), x.extent(1), plan.width(), p));
    workspace_arena ws({bytes.data(), bytes.size()});
    forward(x, plan, p, hyper_out, ws);
  }

  //! Backward of `hyper_out = hyper(x)` given its cotangent `dy [T, d]`: dx [T, d] += ∂/∂x
  //! (the adapter path only), and every hypernetwork / embedding gradient in `grads` +=.
  //! Any output may be an empty view (skipped). The selection is not differentiable.
  //! Takes at most workspace_size(T, d, width, p) bytes from `ws` and allocates nothing.
  template <ElementType T, class Id, class W>
  void backward(const matrix_view<const T>& x, const routing::plan_view<Id, W>& plan,
                const hypermoe_params& p, const matrix_view<const float>& dy,
                const matrix_view<float>& dx, const hypermoe_grads& grads,
                workspace_arena& ws) const {
    const auto s = check_inputs(x, plan, p);
    const index_t tokens = x.extent(0);
    check_view("dy", dy, {tokens, s.model}, "[T, d]");
    if (detail::present(dx)) check_view("dx", dx, {tokens, s.model}, "[T, d]");
    check_grads(grads, s);
    const backward_scratch w = take_backward(ws, s, tokens, plan.width());
    detail::selection_groups groups = w.groups;
    detail::group_by_selection(plan, groups);
    detail::embedding_total(p.expert_emb, w.all);
    const auto& b = w.b;
    const auto& g = b.g;
    // Σ over groups of du (for every expert) and, per expert, Σ of du over the groups that
    // selected it: grad emb[e] = du_all − du_sel[e] (O(k·d_emb) per group).
    std::fill(b.du_all, b.du_all + s.emb_dim, 0.0);
    std::fill(b.du_sel, b.du_sel + s.experts * s.emb_dim, 0.0);
    std::fill(b.d_layer_embed, b.d_layer_embed + s.layer_emb, 0.0);

    for (index_t gi = 0; gi < groups.count; ++gi) {
      const std::int32_t* set = groups.set(gi);
      const index_t set_n = groups.set_length(gi);
      detail::unselected_sum(p.expert_emb, w.all, set, set_n, g.u);
      detail::generate_adapter(p, s, layer_idx, g);
      std::fill(b.d_w_down, b.d_w_down + s.model * s.adapter, 0.0);
      std::fill(b.d_w_up, b.d_w_up + s.adapter * s.model, 0.0);
      std::fill(b.d_b_up, b.d_b_up + s.model, 0.0);
      std::fill(b.d_b_down, b.d_b_down + s.adapter, 0.0);
      const index_t* tok = groups.tokens(gi);
      for (index_t k = 0; k < groups.size(gi); ++k) {
        const index_t t = tok[k];
        detail::adapter_down(x, t, g.w_down, g.b_down, s.model, s.adapter, b.m);
        // y = r·W_up + b_up, r = ReLU(m)
        for (index_t o = 0; o < s.model; ++o) b.d_b_up[o] += dy(t, o);
        for (index_t j = 0; j < s.adapter; ++j) {
          const double r = detail::relu(b.m[j]);
          const double* wrow = g.w_up + j * s.model;
          double* dwrow = b.d_w_up + j * s.model;
          double dr = 0.0;
          for (index_t o = 0; o < s.model; ++o) {
            const double dyo = dy(t, o);
            dr += wrow[o] * dyo;
            if (r != 0.0) dwrow[o] += r * dyo;
          }
          b.dm[j] = b.m[j] > 0.0 ? dr : 0.0;
          b.d_b_down[j] += b.dm[j];
        }
        // m = x·W_down + b_down
        for (index_t i = 0; i < s.model; ++i) {
          const double xi = to_float(x(t, i));
          const double* wrow = g.w_down + i * s.adapter;
          double* dwrow = b.d_w_down + i * s.adapter;
          double acc = 0.0;
          for (index_t j = 0; j < s.adapter; ++j) {
            acc += wrow[j] * b.dm[j];
            dwrow[j] += xi * b.dm[j];
          }
          b.dxt[i] = acc;
        }
        if (detail::present(dx))
          for (index_t i = 0; i < s.model; ++i) dx(t, i) += static_cast<float>(b.dxt[i]);
      }
      // Generator heads -> h.
      std::fill(b.dh, b.dh + s.bottleneck, 0.0);
      const auto& gp = p.generator;
      const auto& gg = grads.generator;
      detail::hyper_affine_backward(gp.weight_down, gg.weight_down, g.h, b.d_w_down, b.dh);
      detail::hyper_affine_backward(gp.weight_up, gg.weight_up, g.h, b.d_w_up, b.dh);
      detail::hyper_affine_backward(gp.bias_up, gg.bias_up, g.h, b.d_b_up, b.dh);
      detail::hyper_affine_backward(gp.bias_down, gg.bias_down, g.h, b.d_b_down, b.dh);
      // h = ReLU(linear1(c)), c = [z ; layer_embed[ℓ]].
      for (index_t i = 0; i < s.bottleneck; ++i) b.da2[i] = g.a2[i] > 0.0 ? b.dh[i] : 0.0;
      std::fill(b.dc, b.dc + s.hyper_in + s.layer_emb, 0.0);
      detail::hyper_affine_backward(gp.linear1, gg.linear1, g.c, b.da2, b.dc);
      for (index_t i = 0; i < s.layer_emb; ++i) b.d_layer_embed[i] += b.dc[s.hyper_in + i];
      // z = process2(ReLU(process1(u))).
      std::copy(b.dc, b.dc + s.hyper_in, b.dz);
      std::fill(b.dr1, b.dr1 + s.process_dim, 0.0);
      detail::hyper_affine_backward(p.process2, grads.process2, g.r1, b.dz, b.dr1);
      for (index_t i = 0; i < s.process_dim; ++i) b.da1[i] = g.a1[i] > 0.0 ? b.dr1[i] : 0.0;
      std::fill(b.du, b.du + s.emb_dim, 0.0);
      detail::hyper_affine_backward(p.process1, grads.process1, g.u, b.da1, b.du);
      for (index_t i = 0; i < s.emb_dim; ++i) b.du_all[i] += b.du[i];
      for (index_t k = 0; k < set_n; ++k)
        for (index_t i = 0; i < s.emb_dim; ++i) b.du_sel[set[k] * s.emb_dim + i] += b.du[i];
    }
    if (detail::present(grads.generator.layer_embed)) {
      for (index_t i = 0; i < s.layer_emb; ++i)
        grads.generator.layer_embed(layer_idx, i) += static_cast<float>(b.d_layer_embed[i]);
    }
    if (detail::present(grads.expert_emb)) {
      for (index_t e = 0; e < s.experts; ++e)
        for (index_t i = 0; i < s.emb_dim; ++i)
          grads.expert_emb(e, i) += static_cast<float>(b.du_all[i] - b.du_sel[e * s.emb_dim + i]);
    }
  }
  //! \copydoc backward (this overload allocates its workspace)
  template <ElementType T, class Id, class W>
  void backward(const matrix_view<const T>& x, const routing::plan_view<Id, W>& plan,
                const hypermoe_params& p, const matrix_view<const float>& dy,
                const matrix_view<float>& dx, const hypermoe_grads& grads) const {
    check_view("x", x, {-1, -1}, "[T, d]");
    std::vector<std::byte> bytes(workspace_size(x.extent(0), x.extent(1), plan.width(), p));
    workspace_arena ws({bytes.data(), bytes.size()});
    backward(x, plan, p, dy, dx, grads, ws);
  }

  //! Convenience overloads taking an owning `routing_plan` (they allocate their workspace).
  template <ElementType T>
  void forward(const matrix_view<const T>& x, const routing::routing_plan& plan,
               const hypermoe_params& p, const matrix_view<float>& hyper_out) const {
    forward(x, plan.view(), p, hyper_out);
  }
  //! \copydoc forward
  template <ElementType T>
  void backward(const matrix_view<const T>& x, const routing::routing_plan& plan,
                const hypermoe_params& p, const matrix_view<const float>& dy,
                const matrix_view<float>& dx, const hypermoe_grads& grads) const {
    backward(x, plan.view(), p, dy, dx, grads);
  }

 private:
  struct forward_scratch {
    detail::selection_groups groups;
    double* all = nullptr;        // [d_emb] Σ_e emb[e]
    double* slot_base = nullptr;  // [slots, forward_slot_doubles]
    index_t slots = 0;
  };
  struct backward_scratch {
    detail::selection_groups groups;
    double* all = nullptr;
    detail::hyper_backward_scratch b;
  };

  //! Doubles of one forward work slot: an adapter, then a token's m [a] and y [d].
  static index_t forward_slot_doubles(const hypermoe_dims& s) {
    return detail::generated_adapter::doubles(s) + s.adapter + s.model;
  }

  struct embedding_scratch {
    detail::selection_groups groups;
    double* all = nullptr;  // [d_emb] Σ_e emb[e]
    double* u = nullptr;    // [d_emb] one group's selection embedding
  };

  // The arrays of selection_embedding, forward and backward; the same code measures
  // (workspace_size) and carves.
  static embedding_scratch take_embedding(workspace_arena& ws, index_t tokens, index_t width,
                                          index_t d_emb) {
    embedding_scratch w;
    w.groups = detail::take_selection_groups(ws, tokens, width);
    w.all = ws.take<double>(d_emb);
    w.u = ws.take<double>(d_emb);
    return w;
  }
  forward_scratch take_forward(workspace_arena& ws, const hypermoe_dims& s, index_t tokens,
                               index_t width) const {
    forward_scratch w;
    w.groups = detail::take_selection_groups(ws, tokens, width);
    w.all = ws.take<double>(s.emb_dim);
    w.slots = std::min<index_t>(group_slots, tokens);
    w.slot_base = ws.take<double>(w.slots * forward_slot_doubles(s));
    return w;
  }
  static backward_scratch take_backward(workspace_arena& ws, const hypermoe_dims& s,
                                        index_t tokens, index_t width) {
    backward_scratch w{};
    w.groups = detail::take_selection_groups(ws, tokens, width);
    w.all = ws.take<double>(s.emb_dim);
    w.b = detail::hyper_backward_scratch::take(ws, s);
    return w;
  }

  template <ElementType T, class Id, class W>
  hypermoe_dims check_inputs(const matrix_view<const T>& x, const routing::plan_view<Id, W>& plan,
                             const hypermoe_params& p) const {
    check_view("x", x, {-1, -1}, "[T, d]");
    const auto s = validate(p, x.extent(1));
    if (plan.num_experts != s.experts) {
      throw shape_error("plan", detail::concat(
                                    "plan: num_experts must equal params.expert_emb.extent(0) = ",
                                    s.experts, ", got ", plan.num_experts));
    }
    routing::validate_plan("plan", plan, x.extent(0), s.experts);
    return s;
  }

  static void check_grads(const hypermoe_grads& g, const hypermoe_dims& s) {
    if (detail::present(g.expert_emb))
      check_view("grads.expert_emb", g.expert_emb, {s.experts, s.emb_dim}, "[E, d_emb]");
    detail::check_linear_grads("grads.process1", g.process1, s.process_dim, s.emb_dim);
    detail::check_linear_grads("grads.process2", g.process2, s.hyper_in, s.process_dim);
    if (detail::present(g.generator.layer_embed))
      check_view("grads.generator.layer_embed", g.generator.layer_embed, {s.layers, s.layer_emb},
                 "[L, d_le]");
    detail::check_linear_grads("grads.generator.linear1", g.generator.linear1, s.bottleneck,
                               s.hyper_in + s.layer_emb);
    detail::check_linear_grads("grads.generator.weight_up", g.generator.weight_up,
                               s.adapter * s.model, s.bottleneck);
    detail::check_linear_grads("grads.generator.weight_down", g.generator.weight_down,
                               s.model * s.adapter, s.bottleneck);
    detail::check_linear_grads("grads.generator.bias_up", g.generator.bias_up, s.model,
                               s.bottleneck);
    detail::check_linear_grads("grads.generator.bias_down", g.generator.bias_down, s.adapter,
                               s.bottleneck);
  }
};

}  // namespace switchyard::layer
