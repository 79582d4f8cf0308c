// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file expert_backward.hpp
//! Backward of the host expert phase (`host::experts_backward`): recomputes each expert's
//! activations from x, then dA, dH (activation functor), dX and the weight and bias
//! gradients per expert, and the combine's backward per token (`switchyard/ops/`).

#include <algorithm>
#include <utility>

#include "switchyard/backend/host/dispatch_plan.hpp"
#include "switchyard/backend/host/expert_forward.hpp"
#include "switchyard/backend/host/expert_phase.hpp"
#include "switchyard/backend/host/gemm_rows.hpp"
#include "switchyard/backend/host/run_ops.hpp"
#include "switchyard/core/element_type.hpp"
#include "switchyard/core/parallel.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/core/workspace.hpp"
#include "switchyard/dispatch/groups.hpp"
#include "switchyard/layer/expert_weights.hpp"
#include "switchyard/ops/activate.hpp"
#include "switchyard/ops/bias.hpp"
#include "switchyard/ops/combine.hpp"
#include "switchyard/ops/gather.hpp"
#include "switchyard/routing/plan.hpp"

namespace switchyard::host {

}  // namespace switchyard::host

namespace switchyard::detail {
using namespace ::switchyard::host;  // this block's helpers use switchyard::host's names

//! db(e, c) += Σ_{r < n} m[r, c] for c < cols (rows of leading dimension ld), column by
//! column; nothing when db is absent.
inline void add_bias_grad(const matrix_view<float>& db, index_t e, const float* m, index_t n,
                          index_t ld, index_t cols) {
  if (!detail::present(db)) return;
  run_range(0, cols,
            ops::bias_grad_columns{m, n, ld, db.data_handle() + e * db.stride(0), db.stride(1)});
}

}  // namespace switchyard::detail

namespace switchyard::host {

//! Backward of `experts_forward` (recomputing the hidden activations):
//! dx [T, d] += ∂/∂x, grads += ∂/∂weights (present views only), d_weights [T·width] =
//! ∂/∂(combine weights) = ⟨dy_t, FFN_e(x_t)⟩ per used slot (⟨dy_t, x_t⟩ for a dropped
//! `scaled_input` pair, 0 otherwise). Measuring arena: only counts the workspace.
//!
//! Two parallel passes, each over a partition fixed by the data alone (never by the thread
//! count), each output element written by one call:
//! 1. Token rows: every work item (a block of at most row_panels::block rows of one expert,
//!    as the forward's) recomputes H, A, Y, forms its dY rows and d_weights, then dA, dH and
//!    dX, all row-wise. Float weights BLAS can read: all items in parallel (so one hot expert,
//!    or E below the thread count, still uses every thread); weights needing a conversion
//!    panel: the experts in parallel on at most `host::panel_slots` threads, each converted
//!    into its thread's slot, its items in order. Dense dispatch: expert after expert, each
//!    one's items in parallel.
//! 2. Weight gradients: per expert, tasks of 256 rows of dW2 or dW1 (each one single call
//!    summing the expert's real rows in row order) and one for both bias gradients; tasks
//!    write disjoint parts, in parallel when the gradient views are BLAS-writable, else in
//!    order through one shared buffer. No partial sums are reduced across threads.
//!
//! `dm.weight_on_input` (y_t = Σ_j FFN_{e_tj}(u_tj), u_tj = w_tj · x_t): the activations are
//! recomputed from the scaled rows u, the dY rows are dy_t unweighted, the weight gradients
//! sum over the scaled rows, and the combine's backward turns each kept row's dU into
//! dx_t += w_tj · dU (slot order) and d_weights[t, j] = ⟨x_t, dU⟩ (float, column order). A
//! dropped `scaled_input` pair gives w_tj · dy_t and ⟨dy_t, x_t⟩ as without the flag.
template <class DispatchPolicy, class Act, ElementType T, class Id, class W>
void experts_backward(const DispatchPolicy& dispatch, const Act& act, const expert_dims& dm,
                      const matrix_view<const T>& x, const routing::plan_view<Id, W>& plan,
                      const expert_weights<T>& w, const matrix_view<const T>& dy,
                      const matrix_view<float>& dx, const expert_grads& grads,
                      float* d_weights, workspace_arena& ws) {
  const bool grouped = DispatchPolicy::layout == dispatch::dispatch_layout::grouped_rows;
  const row_panels rp = panels_for(dm);
  detail::phase_layout l = detail::carve_layout(ws, dm, rp, grouped);
  const index_t rows = l.padded_rows;
  float* xs = ws.take<float>(rows * dm.d);     // [R, d] gathered x rows
  float* h = ws.take<float>(rows * dm.p);      // [R, P] pre-activation, then dH
  float* a = ws.take<float>(rows * dm.d_ff);   // [R, d_ff] activation
  float* ys = ws.take<float>(rows * dm.d);     // [R, d] expert outputs (for d_weights), then dX
  float* dys = ws.take<float>(rows * dm.d);    // [R, d] dY rows
  float* da = ws.take<float>(rows * dm.d_ff);  // [R, d_ff]
  float* pair_dx = grouped ? nullptr : ws.take<float>(dm.tokens * dm.width * dm.d);
  const index_t slots = panel_slots(dm);  // conversion panels: one per expert run at once
  float* w1_buf = detail::needs_panel(w.w1) ? ws.take<float>(slots * dm.p * dm.d) : nullptr;
  float* w2_buf = detail::needs_panel(w.w2) ? ws.take<float>(slots * dm.d * dm.d_ff) : nullptr;
  const bool gw1_direct = !detail::present(grads.w1) || detail::blas_layout(grads.w1);
  const bool gw2_direct = !detail::present(grads.w2) || detail::blas_layout(grads.w2);
  // One expert's dW1 [P, d] / dW2 [d, d_ff] for gradient views BLAS cannot write (always
  // reserved: the size query does not see the gradient views).
  float* gw1 = ws.take<float>(dm.p * dm.d);
  float* gw2 = ws.take<float>(dm.d * dm.d_ff);
  if (!ws.carving()) return;
  detail::check_gemm_dims(dm, rows);

  const index_t tokens = dm.tokens, width = dm.width, d = dm.d, f = dm.d_ff, p = dm.p;
  dispatch::expert_groups& g = l.g;
  host::plan_groups(dispatch, plan, g);
  std::fill(d_weights, d_weights + tokens * width, 0.0f);

  // Token-row part of one work item (rows [r, r + m) of expert e, a multiple of the panel
  // rule's granule): recompute H, A, Y; the dY rows (and d_weights) by `dy_rows`; dA = dY·W2;
  // dH through the activation (in place over H); dX = dH·W1 into the Y rows (Y is dead once
  // d_weights exists). Rows depend on their own token alone.
  auto rows_backward = [&](index_t e, index_t r, index_t m, const auto& dy_rows,
                           detail::float_panel w1, detail::float_panel w2) {
    const float* xe = xs + r * d;
    float* he = h + r * p;
    float* ae = a + r * f;
    float* ye = ys + r * d;
    float* dye = dys + r * d;
    float* dae = da + r * f;
    detail::gemm_rows(rp, op::none, op::transpose, m, p, d, xe, d, w1.data, w1.ld, he, p);
    if (w.has_b1()) detail::add_bias(w.b1, e, he, m, p, p);
    detail::run_range(0, m, ops::activate_rows<Act>{act, he, p, ae, f, f});
    detail::gemm_rows(rp, op::none, op::transpose, m, d, f, ae, f, w2.data, w2.ld, ye, d);
    if (w.has_b2()) detail::add_bias(w.b2, e, ye, m, d, d);
    detail::run_range(r, r + m, dy_rows);
    detail::gemm_rows(rp, op::none, op::none, m, f, d, dye, d, w2.data, w2.ld, dae, f);
    detail::run_range(0, m, ops::activate_backward_rows<Act>{act, he, p, dae, f, f});
    detail::gemm_rows(rp, op::none, op::none, m, d, p, he, p, w1.data, w1.ld, ye, d);
  };

  // Weight-gradient part of expert e over its n real rows from row r0: task `task` of
  // `grad_tasks` (fixed by the shapes): dW2 rows [c, c + grad_chunk) += dY[:, c..]ᵀ · A,
  // dW1 rows [c, c + grad_chunk) += dH[:, c..]ᵀ · X (one call over the n rows each, straight
  // into the gradient view when BLAS can write it, else through one shared buffer), or the
  // bias gradients (column sums in row order). Tasks write disjoint parts of the gradients.
  constexpr index_t grad_chunk = 256;
  const index_t w2_tasks = (d + grad_chunk - 1) / grad_chunk;
  const index_t w1_tasks = (p + grad_chunk - 1) / grad_chunk;
  const index_t grad_tasks = w2_tasks + w1_tasks + 1;
  auto weight_grads = [&](index_t e, index_t n, index_t r0, index_t task) {
    const bool is_w2 = task < w2_tasks, is_w1 = !is_w2 && task < w2_tasks + w1_tasks;
    if (!is_w2 && !is_w1) {
      detail::add_bias_grad(grads.b2, e, dys + r0 * d, n, d, d);
      detail::add_bias_grad(grads.b1, e, h + r0 * p, n, p, p);
      return;
    }
    const tensor_view<float, 3>& grad = is_w2 ? grads.w2 : grads.w1;
    if (!detail::present(grad)) return;
    const index_t c0 = (is_w2 ? task : task - w2_tasks) * grad_chunk;
    const index_t rows_all = is_w2 ? d : p, cols = is_w2 ? f : d;
    const index_t rows = std::min(grad_chunk, rows_all - c0);
    const float* lhs = is_w2 ? dys + r0 * d + c0 : h + r0 * p + c0;
    const index_t ldl = is_w2 ? d : p;
    const float* rhs = is_w2 ? a + r0 * f : xs + r0 * d;
    const index_t ldr = is_w2 ? f : d;
    if (is_w2 ? gw2_direct : gw1_direct) {
      detail::gemm_rows(rp, op::transpose, op::none, rows, cols, n, lhs, ldl, rhs, ldr,
                        &grad(e, c0, 0), grad.stride(1), true);
      return;
    }
    float* tmp = is_w2 ? gw2 : gw1;
    detail::gemm_rows(rp, op::transpose, op::none, rows, cols, n, lhs, ldl, rhs, ldr, tmp, cols);
    for (index_t i = 0; i < rows; ++i)
      for (index_t c = 0; c < cols; ++c) grad(e, c0 + i, c) += tmp[i * cols + c];
  };

  const blas_single_thread_scope single_threaded_blas;
  const bool panels = w1_buf != nullptr || w2_buf != nullptr;
  const bool parallel = detail::openmp_parallel_available();
  // Weight-gradient tasks write the gradient views directly in parallel; through the shared
  // buffers (views BLAS cannot write) they run in order.
  const bool parallel_grads = gw1_direct && gw2_direct && parallel;
  auto slot_panels = [&](index_t e, index_t slot) {
    return std::pair{
        detail::expert_panel(w.w1, e, w1_buf == nullptr ? nullptr : w1_buf + slot * p * d),
        detail::expert_panel(w.w2, e, w2_buf == nullptr ? nullptr : w2_buf + slot * d * f)};
  };
  if (grouped) {
    const index_t n_items = detail::pad_groups(l, rp, dm.experts);
    detail::gather_phase_rows(x, plan.weights, g, rp, dm, xs);
    const ops::grouped_dy_rows<T, W> dy_rows{plan.weights, g.row_pair.data(), width, d, dy, ys, dys,
                                             d_weights, dm.weight_on_input};
    if (!panels) {
      // Every row block of every expert in parallel.
      detail::parallel_for(n_items, parallel, [&](index_t i) {
        const detail::work_item& it = l.items[i];
        const auto wp = slot_panels(it.expert, 0);
        rows_backward(it.expert, it.row, it.rows, dy_rows, wp.first, wp.second);
      });
    } else {
      // Each expert converted into its thread's panel slot, its row blocks in order.
      detail::parallel_for_slots(dm.experts, slots, parallel, [&](index_t e, index_t slot) {
        const index_t r0 = g.row_begin[e], m = rp.padded(g.row_count[e]);
        if (m == 0) return;
        const auto wp = slot_panels(e, slot);
        for (index_t r = 0; r < m; r += row_panels::block)
          rows_backward(e, r0 + r, std::min(row_panels::block, m - r), dy_rows, wp.first,
                        wp.second);
      });
    }
    detail::parallel_for(dm.experts * grad_tasks, parallel_grads, [&](index_t i) {
      const index_t e = i / grad_tasks, n = g.row_count[e];
      if (n > 0) weight_grads(e, n, g.row_begin[e], i % grad_tasks);
    });
  } else {
    // Dense: every used expert over all T rows (padded), one after another (shared buffers),
    // its row blocks and then its weight-gradient tasks in parallel. Weight on the input: each
    // expert's scaled rows are loaded before it runs.
    const index_t m = rp.padded(tokens);
    const bool parallel_load = tokens * d > (1 << 15);
    if (!dm.weight_on_input) detail::run_static(m, parallel_load, ops::load_rows<T>{x, tokens, d, xs});
    for (index_t e = 0; e < dm.experts; ++e) {
      if (g.row_count[e] == 0) continue;
      if (dm.weight_on_input) {
        detail::run_static(m, parallel_load,
                           ops::load_scaled_rows<T, Id, W>{x, plan.expert_ids, plan.weights, plan.counts,
                                                           e, tokens, d, xs});
      }
      const auto wp = slot_panels(e, 0);
      // Masked dY: Σ of the slots naming e (padding rows zero), and those slots' d_weights.
      const ops::dense_dy_rows<T, Id, W> dy_rows{plan.expert_ids, plan.weights, plan.counts, e,
                                                 tokens, width, d, dy, ys, dys, d_weights,
                                                 dm.weight_on_input};
      const index_t n_items = detail::dense_items(rp, tokens, e, l.items);
      detail::parallel_for(n_items, parallel, [&](index_t i) {
        rows_backward(e, l.items[i].row, l.items[i].rows, dy_rows, wp.first, wp.second);
      });
      detail::parallel_for(grad_tasks, parallel_grads,
                           [&](index_t task) { weight_grads(e, tokens, 0, task); });
      detail::run_range(0, tokens, ops::keep_dense_slots<Id>{plan.expert_ids, plan.counts, e, width, d,
                                                              ys, pair_dx});
    }
  }

  // dx_t += Σ_j dX rows of its slots (times w_tj under weight_on_input, which also gives the
  // kept slots' d_weights), in slot order; dropped scaled_input pairs: w_tj · dy_t.
  const ops::combine_backward_slots<T, Id, W> combine{
      plan.weights, plan.counts, g.pair_row.data(), width, d, grouped ? ys : pair_dx, x, dy,
      g.drop == dispatch::dropped_output::scaled_input, d_weights, dx,
      detail::present(dx), dm.weight_on_input};
  detail::run_static(tokens, tokens * width * d > (1 << 15), combine);
}

}  // namespace switchyard::host
