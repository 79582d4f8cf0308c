// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file expert_forward.hpp
//! Forward of the host expert phase: one GEMM pair per work item with the bias and
//! activation functors (`switchyard/ops/`) between, and `host::experts_forward`, which plans
//! the dispatch, gathers, runs the work items and combines each token's slots in slot order.

#include <algorithm>

#include <cuda/std/span>

#include "switchyard/backend/host/dispatch_plan.hpp"
#include "switchyard/backend/host/expert_phase.hpp"
#include "switchyard/backend/host/gemm_rows.hpp"
#include "switchyard/backend/host/run_ops.hpp"
#include "switchyard/core/element_type.hpp"
#include "switchyard/core/parallel.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/core/workspace.hpp"
#include "switchyard/dispatch/concepts.hpp"
#include "switchyard/dispatch/groups.hpp"
#include "switchyard/layer/expert_weights.hpp"
#include "switchyard/ops/activate.hpp"
#include "switchyard/ops/bias.hpp"
#include "switchyard/ops/combine.hpp"
#include "switchyard/ops/drops.hpp"
#include "switchyard/ops/gather.hpp"
#include "switchyard/routing/plan.hpp"

namespace switchyard::host {

}  // namespace switchyard::host

namespace switchyard::detail {
using namespace ::switchyard::host;  // this block's helpers use switchyard::host's names

//! m[r, c] += bias(e, c) for n rows of width `cols` (leading dimension ld), row by row.
template <ElementType T>
void add_bias(const matrix_view<const T>& bias, index_t e, float* m, index_t n, index_t cols,
              index_t ld) {
  const ops::add_bias_rows<T> f{bias.data_handle() + e * bias.stride(0), bias.stride(1), m, cols, ld};
  run_range(0, n, f);
}

//! One expert's forward over n rows: H = X·W1ᵀ + b1, A = act(H) (in place), Y = A·W2ᵀ + b2.
//! `x` [n, d]; `h` [n, P]; `y` [n, d] (may alias x: x is dead once H exists).
template <ElementType T, class Act>
void expert_forward(const Act& act, const row_panels& rp, const expert_weights<T>& w,
                    const expert_dims& dm, index_t e, index_t n, const float* x, float* h,
                    float* y, float_panel w1, float_panel w2) {
  gemm_rows(rp, op::none, op::transpose, n, dm.p, dm.d, x, dm.d, w1.data, w1.ld, h, dm.p);
  if (w.has_b1()) add_bias(w.b1, e, h, n, dm.p, dm.p);
  run_range(0, n, ops::activate_rows<Act>{act, h, dm.p, h, dm.p, dm.d_ff});
  gemm_rows(rp, op::none, op::transpose, n, dm.d, dm.d_ff, h, dm.p, w2.data, w2.ld, y, dm.d);
  if (w.has_b2()) add_bias(w.b2, e, y, n, dm.d, dm.d);
}

//! y[t] = Σ_j w_tj · rows[pair_row(t, j)] in slot order (weight 1 instead of w_tj when
//! `weight_on_input`) (+ w_tj · x_t for a dropped pair under `scaled_input`) (+ extra[t] when
//! given), rounded to T: `ops::combine_slots` over the tokens on OpenMP threads.
template <ElementType T, class Id, class W, ElementType Out>
void combine(const routing::plan_view<Id, W>& plan, const dispatch::expert_groups& g,
             const float* rows, const matrix_view<const T>& x, const float* extra,
             const matrix_view<Out>& y, bool weight_on_input = false) {
  const index_t tokens = plan.num_tokens(), width = plan.width(), d = y.extent(1);
  const ops::combine_slots<T, Id, W, Out> f{plan.weights, plan.counts, g.pair_row.data(), width, d, rows, x,
                                       g.drop == dispatch::dropped_output::scaled_input, extra, y,
                                       weight_on_input};
  run_static(tokens, tokens * width * d > (1 << 15), f);
}

//! Runs every forward work item over the padded rows of `xs` [R, d], writing the expert
//! outputs to the same rows of `ys` (which may be xs). Float weights BLAS can read: items in
//! parallel. Weights needing a conversion panel (`w1_buf` / `w2_buf`: `slots` panels each,
//! `host::panel_slots`): items of several experts (in expert order, as pad_groups and
//! dense_items make them): the experts in parallel on at most `slots` threads, each converted
//! once into its thread's slot and its items run in order; items of one expert: it is
//! converted once, then its items run in parallel. Either way each item makes the same calls
//! on the same float panel, so the result does not depend on the threads or the slots.
template <class Act, ElementType T>
void run_work_items(const Act& act, const row_panels& rp, const expert_weights<T>& w,
                    const expert_dims& dm, const work_item* items, index_t n_items,
                    const float* xs, float* ys, float* h, float* w1_buf, float* w2_buf,
                    index_t slots = 1) {
  const blas_single_thread_scope single_threaded_blas;
  auto one = [&](index_t i, float_panel w1, float_panel w2) {
    const work_item& it = items[i];
    expert_forward(act, rp, w, dm, it.expert, it.rows,
                   xs + detail::row_offset(it.row, dm.d),
                   h + detail::row_offset(it.row, dm.p),
                   ys + detail::row_offset(it.row, dm.d), w1, w2);
  };
  const bool parallel = detail::openmp_parallel_available();
  const bool panels = w1_buf != nullptr || w2_buf != nullptr;
  if (!panels) {
    detail::parallel_for(n_items, parallel, [&](index_t i) {
      one(i, expert_panel(w.w1, items[i].expert, nullptr),
          expert_panel(w.w2, items[i].expert, nullptr));
    });
    return;
  }
  if (n_items == 0) return;
  const index_t first = items[0].expert, last = items[n_items - 1].expert;
  if (first == last) {
    const float_panel w1 = expert_panel(w.w1, first, w1_buf);
    const float_panel w2 = expert_panel(w.w2, first, w2_buf);
    detail::parallel_for(n_items, parallel, [&](index_t i) { one(i, w1, w2); });
    return;
  }
  // Experts [first, last] in parallel; expert e's items are [lo, hi) (sorted by expert).
  const work_item* end = items + n_items;
  const auto by_expert = [](const work_item& it, index_t e) { return it.expert < e; };
  detail::parallel_for_slots(last - first + 1, slots, parallel, [&](index_t k, index_t slot) {
    const index_t e = first + k;
    const work_item* lo = std::lower_bound(items, end, e, by_expert);
    if (lo == end || lo->expert != e) return;
    const float_panel w1 =
        expert_panel(w.w1, e, w1_buf == nullptr ? nullptr : w1_buf + slot * dm.p * dm.d);
    const float_panel w2 =
        expert_panel(w.w2, e, w2_buf == nullptr ? nullptr : w2_buf + slot * dm.d * dm.d_ff);
    for (const work_item* it = lo; it != end && it->expert == e; ++it) one(it - items, w1, w2);
  });
}

}  // namespace switchyard::detail

namespace switchyard::host {

//! Runs the experts of a plan: y [T, d] = Σ_j w_tj · FFN_{e_tj}(x_t) (+ `extra` [T, d] float
//! when non-null, the add-on module's term). Fills `dropped` [E] per expert. With a
//! measuring arena it only counts the workspace (x, y, plan may then be empty). `y` is of
//! the tokens' type T, or float (an unrounded term another phase adds, e.g. shared experts).
//!
//! `dm.weight_on_input` (Llama-4, `MoELayer::router_weight_on_input`): y_t = Σ_j
//! FFN_{e_tj}(w_tj · x_t). Each expert row is gathered as the float product w_tj · x_t
//! (`ops::gather_scaled_rows`; dense: `ops::load_scaled_rows` per expert, zero rows for the
//! tokens not routed to it) and the outputs are combined with weight 1 in slot order. A
//! dropped `scaled_input` pair still contributes w_tj · x_t. Every row still depends on its
//! token alone, so thread-count and batch invariance hold as without it.
template <class DispatchPolicy, class Act, ElementType T, class Id, class W, ElementType Out = T>
void experts_forward(const DispatchPolicy& dispatch, const Act& act, const expert_dims& dm,
                     const matrix_view<const T>& x, const routing::plan_view<Id, W>& plan,
                     const expert_weights<T>& w, const float* extra, const matrix_view<Out>& y,
                     span<index_t> dropped, workspace_arena& ws) {
  const bool grouped = DispatchPolicy::layout == dispatch::dispatch_layout::grouped_rows;
  const row_panels rp = panels_for(dm);
  detail::phase_layout l = detail::carve_layout(ws, dm, rp, grouped);
  const index_t rows = l.padded_rows;
  float* xs = ws.take<float>(rows * dm.d);  // grouped: [R, d] gathered rows, then Y rows
  float* h = ws.take<float>(rows * dm.p);   // [R, P] pre-activation, then A over [R, d_ff]
  float* y_all = grouped ? nullptr : ws.take<float>(rows * dm.d);  // dense: [T, d]
  float* pair_out = grouped ? nullptr : ws.take<float>(dm.tokens * dm.width * dm.d);
  const index_t slots = panel_slots(dm);  // conversion panels: one per expert run at once
  float* w1_buf = detail::needs_panel(w.w1) ? ws.take<float>(slots * dm.p * dm.d) : nullptr;
  float* w2_buf = detail::needs_panel(w.w2) ? ws.take<float>(slots * dm.d * dm.d_ff) : nullptr;
  if (!ws.carving()) return;
  detail::check_gemm_dims(dm, rows);

  dispatch::expert_groups& g = l.g;
  host::plan_groups(dispatch, plan, g);
  detail::run_range(0, dm.experts, ops::report_drops{g.dropped.data(), dropped.data()});
  if (grouped) {
    const index_t n_items = detail::pad_groups(l, rp, dm.experts);
    detail::gather_phase_rows(x, plan.weights, g, rp, dm, xs);
    detail::run_work_items(act, rp, w, dm, l.items, n_items, xs, xs, h, w1_buf, w2_buf, slots);
    detail::combine(plan, g, xs, x, extra, y, dm.weight_on_input);
    return;
  }
  // Dense: x once as float rows (padding rows zero), then every used expert over all T tokens
  // (weight on the input: each expert's scaled rows are loaded before it runs).
  const bool parallel_load = dm.tokens * dm.d > (1 << 15);
  if (!dm.weight_on_input) detail::run_static(rows, parallel_load, ops::load_rows<T>{x, dm.tokens, dm.d, xs});
  for (index_t e = 0; e < dm.experts; ++e) {
    if (g.row_count[e] == 0) continue;
    if (dm.weight_on_input) {
      detail::run_static(rows, parallel_load,
                         ops::load_scaled_rows<T, Id, W>{x, plan.expert_ids, plan.weights, plan.counts,
                                                         e, dm.tokens, dm.d, xs});
    }
    const index_t n_items = detail::dense_items(rp, dm.tokens, e, l.items);
    detail::run_work_items(act, rp, w, dm, l.items, n_items, xs, y_all, h, w1_buf, w2_buf, slots);
    detail::run_range(0, dm.tokens, ops::keep_dense_slots<Id>{plan.expert_ids, plan.counts, e, dm.width,
                                                               dm.d, y_all, pair_out});
  }
  detail::combine(plan, g, pair_out, x, extra, y, dm.weight_on_input);
}

}  // namespace switchyard::host
