#pragma once
//! \file expert_backward.hpp
//! Backward of the host expert phase (`host::experts_backward`): recomputes each expert's
//! activations from x, then dA, dH (activation functor), dX and the weight and bias
//! gradients per expert, and the combine's backward per token (`switchyard/ops/`).

#include <algorithm>

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
//! One work item per expert (its weight gradients are one thread's sums over its rows, in row
//! order). Experts run in parallel when their weights need no conversion panel and the
//! weight-gradient views are BLAS-writable (the GEMMs then accumulate into them directly);
//! otherwise in order through one shared panel / gradient buffer. Which of the two is decided
//! by the layouts alone, never by the thread count.
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
  float* ys = ws.take<float>(rows * dm.d);     // [R, d] expert outputs (for d_weights)
  float* dys = ws.take<float>(rows * dm.d);    // [R, d] dY rows, then dX rows
  float* da = ws.take<float>(rows * dm.d_ff);  // [R, d_ff]
  float* pair_dx = grouped ? nullptr : ws.take<float>(dm.tokens * dm.width * dm.d);
  float* w1_buf = detail::needs_panel(w.w1) ? ws.take<float>(dm.p * dm.d) : nullptr;
  float* w2_buf = detail::needs_panel(w.w2) ? ws.take<float>(dm.d * dm.d_ff) : nullptr;
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

  // Forward recompute of one expert over m rows into (he, ae, ye).
  auto recompute = [&](index_t e, index_t m, const float* xe, float* he, float* ae, float* ye,
                       detail::float_panel w1, detail::float_panel w2) {
    detail::gemm_rows(rp, op::none, op::transpose, m, p, d, xe, d, w1.data, w1.ld, he, p);
    if (w.has_b1()) detail::add_bias(w.b1, e, he, m, p, p);
    detail::run_range(0, m, ops::activate_rows<Act>{act, he, p, ae, f, f});
    detail::gemm_rows(rp, op::none, op::transpose, m, d, f, ae, f, w2.data, w2.ld, ye, d);
    if (w.has_b2()) detail::add_bias(w.b2, e, ye, m, d, d);
  };

  // grad[e] += Lᵀ · R over the n real rows (L [n, rows of grad[e]], R [n, its columns]):
  // straight into the gradient view when BLAS can write it, else through `tmp` (either way
  // decided by the view's layout, never by the thread count).
  auto accumulate_weight_grad = [&](const tensor_view<float, 3>& grad, bool direct, float* tmp,
                                    index_t e, index_t n, const float* l, index_t ldl,
                                    const float* r, index_t ldr) {
    if (!detail::present(grad)) return;
    const index_t rows = grad.extent(1), cols = grad.extent(2);
    if (direct) {
      detail::gemm_rows(rp, op::transpose, op::none, rows, cols, n, l, ldl, r, ldr,
                        &grad(e, 0, 0), grad.stride(1), true);
      return;
    }
    detail::gemm_rows(rp, op::transpose, op::none, rows, cols, n, l, ldl, r, ldr, tmp, cols);
    for (index_t i = 0; i < rows; ++i)
      for (index_t c = 0; c < cols; ++c) grad(e, i, c) += tmp[i * cols + c];
  };

  // One expert over m padded rows (the first n real) whose x rows are `xe` and dY rows `dye`
  // (padding rows zero); writes dX rows over dye. Weight gradients sum the n real rows.
  auto run_expert = [&](index_t e, index_t n, index_t m, const float* xe, float* he,
                        const float* ae, float* dye, float* dae, detail::float_panel w1,
                        detail::float_panel w2) {
    // dA = dY · W2 ([m, d] × [d, d_ff]); dW2 += dYᵀ · A; db2 += Σ_rows dY.
    detail::gemm_rows(rp, op::none, op::none, m, f, d, dye, d, w2.data, w2.ld, dae, f);
    accumulate_weight_grad(grads.w2, gw2_direct, gw2, e, n, dye, d, ae, f);
    detail::add_bias_grad(grads.b2, e, dye, n, d, d);
    // dH from dA through the activation, in place over H.
    detail::run_range(0, m, ops::activate_backward_rows<Act>{act, he, p, dae, f, f});
    // dW1 += dHᵀ · X ([P, n] × [n, d]); db1 += Σ_rows dH; dX = dH · W1 ([m, P] × [P, d]).
    accumulate_weight_grad(grads.w1, gw1_direct, gw1, e, n, he, p, xe, d);
    detail::add_bias_grad(grads.b1, e, he, n, p, p);
    detail::gemm_rows(rp, op::none, op::none, m, d, p, he, p, w1.data, w1.ld, dye, d);
  };

  const blas_single_thread_scope single_threaded_blas;
  const bool panels = w1_buf != nullptr || w2_buf != nullptr;
  const bool parallel = !panels && gw1_direct && gw2_direct &&
                        detail::openmp_parallel_available();
  if (grouped) {
    detail::pad_groups(l, rp, dm.experts);
    detail::gather_phase_rows(x, plan.weights, g, rp, dm, xs);
    const ops::grouped_dy_rows<T, W> dy_rows{plan.weights, g.row_pair.data(), width, d, dy, ys, dys,
                                             d_weights, dm.weight_on_input};
    // One expert: recompute, dY rows (w_tj · dy_t; padding rows 0), d_weights, backward.
    auto one = [&](index_t e, detail::float_panel w1, detail::float_panel w2) {
      const index_t n = g.row_count[e], r0 = g.row_begin[e], m = rp.padded(n);
      if (n == 0) return;
      float* xe = xs + r0 * d;
      float* he = h + r0 * p;
      float* ae = a + r0 * f;
      float* ye = ys + r0 * d;
      float* dye = dys + r0 * d;
      recompute(e, m, xe, he, ae, ye, w1, w2);
      detail::run_range(r0, r0 + m, dy_rows);
      run_expert(e, n, m, xe, he, ae, dye, da + r0 * f, w1, w2);
    };
    if (!panels) {
      detail::parallel_for(dm.experts, parallel, [&](index_t e) {
        one(e, detail::expert_panel(w.w1, e, nullptr), detail::expert_panel(w.w2, e, nullptr));
      });
    } else {
      for (index_t e = 0; e < dm.experts; ++e) {
        if (g.row_count[e] == 0) continue;
        one(e, detail::expert_panel(w.w1, e, w1_buf), detail::expert_panel(w.w2, e, w2_buf));
      }
    }
  } else {
    // Dense: every used expert over all T rows (padded), one after another (shared buffers).
    // Weight on the input: each expert's scaled rows are loaded before it runs.
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
      const detail::float_panel w1 = detail::expert_panel(w.w1, e, w1_buf);
      const detail::float_panel w2 = detail::expert_panel(w.w2, e, w2_buf);
      recompute(e, m, xs, h, a, ys, w1, w2);
      // Masked dY: Σ of the slots naming e (padding rows zero), and those slots' d_weights.
      detail::run_range(0, m, ops::dense_dy_rows<T, Id, W>{plan.expert_ids, plan.weights, plan.counts, e,
                                                          tokens, width, d, dy, ys, dys, d_weights,
                                                          dm.weight_on_input});
      run_expert(e, tokens, m, xs, h, a, dys, da, w1, w2);
      detail::run_range(0, tokens, ops::keep_dense_slots<Id>{plan.expert_ids, plan.counts, e, width, d,
                                                              dys, pair_dx});
    }
  }

  // dx_t += Σ_j dX rows of its slots (times w_tj under weight_on_input, which also gives the
  // kept slots' d_weights), in slot order; dropped scaled_input pairs: w_tj · dy_t.
  const ops::combine_backward_slots<T, Id, W> combine{
      plan.weights, plan.counts, g.pair_row.data(), width, d, grouped ? dys : pair_dx, x, dy,
      g.drop == dispatch::dropped_output::scaled_input, d_weights, dx,
      detail::present(dx), dm.weight_on_input};
  detail::run_static(tokens, tokens * width * d > (1 << 15), combine);
}

}  // namespace switchyard::host
