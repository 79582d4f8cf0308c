#pragma once
//! \file experts.hpp
//! Host execution of the expert FFNs for a routing plan: dispatch planning (any policy from
//! `switchyard/dispatch/`), gather into float rows laid out in row panels, one GEMM pair per
//! work item with the activation between, and a combine that gathers each token's slots in
//! slot order.
//!
//! Same bits on any machine (docs/design.md): every BLAS call is single-threaded and its row
//! count follows the row-panel rule (`row_panels.hpp`), so a token's output and dx do not
//! depend on the OpenMP/BLAS thread count nor on the other tokens of the batch. Parallelism
//! comes from OpenMP over work items fixed by the data alone: (expert, block of rows) in
//! forward, experts in backward. No loop reduces across threads.
//!
//! Element types: half/bfloat16 tokens and weights are converted to float panels; every
//! product and sum is float; only y is rounded to the storage type. Experts whose weights need
//! a conversion panel (non-float storage or a layout BLAS cannot read) run one after another
//! on the calling thread (one panel buffer); float weights run in parallel.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <vector>

#include <cuda/std/span>

#include "switchyard/activation/concepts.hpp"
#include "switchyard/backend/host/fixed_gemm.hpp"
#include "switchyard/backend/host/gemm.hpp"
#include "switchyard/backend/host/row_panels.hpp"
#include "switchyard/core/element_type.hpp"
#include "switchyard/core/parallel.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/core/workspace.hpp"
#include "switchyard/dispatch/concepts.hpp"
#include "switchyard/dispatch/groups.hpp"
#include "switchyard/layer/expert_weights.hpp"
#include "switchyard/routing/plan.hpp"

namespace switchyard::host {

//! Sizes the expert execution works with.
struct expert_dims {
  index_t tokens = 0;    //!< T
  index_t width = 0;     //!< plan slots per token
  index_t experts = 0;   //!< E
  index_t d = 0;         //!< model width
  index_t d_ff = 0;      //!< expert hidden width
  index_t p = 0;         //!< first-projection width: d_ff or 2·d_ff (gated)
  index_t max_rows = 0;  //!< rows the dispatch's planning may address (dispatch's max_rows)
  bool batch_invariant = false;  //!< token-row GEMMs on the fixed-order kernels
};

//! The row rule of a phase: batch-invariant kernels when asked, else BLAS row panels.
inline row_panels panels_for(const expert_dims& dm) {
  return dm.batch_invariant ? row_panels::batch_invariant() : row_panels::for_shape(dm.d, dm.d_ff);
}

namespace detail {

//! A float matrix in memory the GEMM can read: pointer and leading dimension.
struct float_panel {
  const float* data;
  index_t ld;
};

//! One GEMM call's worth of an expert's rows: rows [row, row + rows) of the padded layout.
struct work_item {
  index_t expert;
  index_t row;
  index_t rows;
};

//! Whether a float [E, R, C] view can be read (or written) by BLAS in place: unit column
//! stride and rows at least C apart.
template <class T>
bool blas_layout(const tensor_view<T, 3>& w) {
  return w.stride(2) == 1 && w.stride(1) >= w.extent(2);
}

//! Whether expert slices of `w` must be converted to a float panel (non-float storage, or a
//! layout BLAS cannot read directly).
template <ElementType T>
bool needs_panel(const tensor_view<const T, 3>& w) {
  if constexpr (!std::is_same_v<T, float>) {
    return true;
  } else {
    return !blas_layout(w);
  }
}

//! Expert e's slice w[e] as a row-major float matrix, converting into `buffer` if needed.
template <ElementType T>
float_panel expert_panel(const tensor_view<const T, 3>& w, index_t e, float* buffer) {
  const index_t rows = w.extent(1), cols = w.extent(2);
  if (!needs_panel(w)) {
    if constexpr (std::is_same_v<T, float>) {
      return {w.data_handle() + ::switchyard::detail::offset3(e, 0, 0, w.stride(0), w.stride(1), w.stride(2)),
              w.stride(1)};
    }
  }
  for (index_t r = 0; r < rows; ++r)
    for (index_t c = 0; c < cols; ++c) buffer[r * cols + c] = to_float(w(e, r, c));
  return {buffer, cols};
}

//! Row-major C[m, n] = op(A)·op(B) (+ C when `accumulate`) on the calling thread: the
//! batch-invariant kernels for token-row products (op(A) = A) under `rp.fixed`, the BLAS when
//! the panel rule allows it, else the blocked loops (whose per-element order is fixed).
inline void gemm_rows(const row_panels& rp, op ta, op tb, index_t m, index_t n, index_t k,
                      const float* a, index_t lda, const float* b, index_t ldb, float* c,
                      index_t ldc, bool accumulate = false) {
  const float beta = accumulate ? 1.0f : 0.0f;
  if (rp.fixed && ta == op::none) {
    if (tb == op::transpose) gemm_nt_fixed(m, n, k, a, lda, b, ldb, c, ldc, accumulate);
    else gemm_nn_fixed(m, n, k, a, lda, b, ldb, c, ldc, accumulate);
  } else if (rp.use_blas) sgemm(ta, tb, m, n, k, 1.0f, a, lda, b, ldb, beta, c, ldc);
  else if (m > 0 && n > 0) detail::sgemm_blocked(ta, tb, m, n, k, 1.0f, a, lda, b, ldb, beta, c, ldc);
}

//! m[r, c] += bias(e, c) for n rows of width `cols` (leading dimension ld).
template <ElementType T>
void add_bias(const matrix_view<const T>& bias, index_t e, float* m, index_t n, index_t cols,
              index_t ld) {
  for (index_t r = 0; r < n; ++r)
    for (index_t c = 0; c < cols; ++c) m[r * ld + c] += to_float(bias(e, c));
}

//! Applies the activation row by row: plain in place over [n, d_ff]; gated writes
//! act(gate) · up over the gate half of each [n, 2·d_ff] row (so A has ld = P).
template <class Act>
void activate(const Act& act, float* h, index_t n, index_t d_ff, index_t ld) {
  for (index_t r = 0; r < n; ++r) {
    float* row = h + r * ld;
    for (index_t c = 0; c < d_ff; ++c) {
      if constexpr (activation_traits<Act>::is_gated) row[c] = act(row[c], row[d_ff + c]);
      else row[c] = act(row[c]);
    }
  }
}

//! One expert's forward over n rows: H = X·W1ᵀ + b1, A = act(H) (in place), Y = A·W2ᵀ + b2.
//! `x` [n, d]; `h` [n, P]; `y` [n, d] (may alias x: x is dead once H exists).
template <ElementType T, class Act>
void expert_forward(const Act& act, const row_panels& rp, const expert_weights<T>& w,
                    const expert_dims& dm, index_t e, index_t n, const float* x, float* h,
                    float* y, float_panel w1, float_panel w2) {
  gemm_rows(rp, op::none, op::transpose, n, dm.p, dm.d, x, dm.d, w1.data, w1.ld, h, dm.p);
  if (w.has_b1()) add_bias(w.b1, e, h, n, dm.p, dm.p);
  activate(act, h, n, dm.d_ff, dm.p);
  gemm_rows(rp, op::none, op::transpose, n, dm.d, dm.d_ff, h, dm.p, w2.data, w2.ld, y, dm.d);
  if (w.has_b2()) add_bias(w.b2, e, y, n, dm.d, dm.d);
}

//! y[t] = Σ_j w_tj · rows[pair_row(t, j)] in slot order (+ w_tj · x_t for a dropped pair
//! under `scaled_input`) (+ extra[t] when given), rounded to T.
template <ElementType T, class Id, class W>
void combine(const routing::plan_view<Id, W>& plan, const dispatch::expert_groups& g,
             const float* rows, const matrix_view<const T>& x, const float* extra,
             const matrix_view<T>& y) {
  const index_t tokens = plan.num_tokens(), width = plan.width(), d = y.extent(1);
  const bool pass_through = g.drop == dispatch::dropped_output::scaled_input;
#pragma omp parallel for schedule(static) if (tokens * width * d > (1 << 15))
  for (index_t t = 0; t < tokens; ++t) {
    const index_t c = plan.counts(t);
    for (index_t i = 0; i < d; ++i) {
      float s = 0.0f;
      for (index_t j = 0; j < c; ++j) {
        const index_t row = g.pair_row[dispatch::pair_index(t, j, width)];
        const float wt = plan.weights(t, j);
        if (row >= 0) s += wt * rows[::switchyard::detail::row_offset(row, d) + i];
        else if (row == dispatch::dropped_pair && pass_through) s += wt * to_float(x(t, i));
      }
      if (extra != nullptr) s += extra[::switchyard::detail::row_offset(t, d) + i];
      y(t, i) = from_float<T>(s);
    }
  }
}

//! Index arrays and work items of one expert phase, carved from the workspace.
struct phase_layout {
  dispatch::expert_groups g;     //!< the dispatch's groups, then re-laid out in panels
  index_t* padded_begin = nullptr;      //!< [E] first row of expert e in the padded layout
  index_t* padded_row_pair = nullptr;   //!< [padded rows] pair of each row, -1 for padding
  work_item* items = nullptr;           //!< forward work items
  index_t max_items = 0;
  index_t padded_rows = 0;              //!< rows of the padded buffers
};

//! Rows of the padded buffers: grouped layouts hold at most min(max_rows, T·width) real rows
//! over at most E experts; the dense layout holds T rows.
inline index_t padded_row_bound(const expert_dims& dm, const row_panels& rp, bool grouped) {
  if (!grouped) return rp.padded(dm.tokens);
  const index_t real = std::min(dm.max_rows, dm.tokens * dm.width);
  return rp.bound(real, dm.experts);
}

//! Carves the index arrays every dispatch fills, and the padded layout's.
inline phase_layout carve_layout(workspace_arena& ws, const expert_dims& dm, const row_panels& rp,
                                 bool grouped) {
  phase_layout l;
  const index_t pairs = dm.tokens * dm.width;
  const index_t plan_rows = std::max(dm.max_rows, pairs);
  l.padded_rows = padded_row_bound(dm, rp, grouped);
  l.max_items = l.padded_rows / row_panels::block + std::max<index_t>(dm.experts, 1);
  index_t* begin = ws.take<index_t>(dm.experts);
  index_t* count = ws.take<index_t>(dm.experts);
  index_t* dropped = ws.take<index_t>(dm.experts);
  index_t* pair_row = ws.take<index_t>(pairs);
  index_t* row_pair = ws.take<index_t>(plan_rows);
  l.padded_begin = ws.take<index_t>(dm.experts);
  l.padded_row_pair = ws.take<index_t>(l.padded_rows);
  l.items = ws.take<work_item>(l.max_items);
  if (ws.carving()) {
    l.g.row_begin = {begin, static_cast<std::size_t>(dm.experts)};
    l.g.row_count = {count, static_cast<std::size_t>(dm.experts)};
    l.g.dropped = {dropped, static_cast<std::size_t>(dm.experts)};
    l.g.pair_row = {pair_row, static_cast<std::size_t>(pairs)};
    l.g.row_pair = {row_pair, static_cast<std::size_t>(plan_rows)};
  }
  return l;
}

//! Re-lays a grouped dispatch's rows out in panels: expert e's n_e rows move to
//! [padded_begin[e], padded_begin[e] + n_e) (same order), followed by padding rows up to
//! padded(n_e); pair_row follows, row_begin/row_pair/num_rows now describe the padded layout.
//! Returns the forward work items (one per block of each non-empty expert) in expert order.
inline index_t pad_groups(phase_layout& l, const row_panels& rp, index_t experts) {
  dispatch::expert_groups& g = l.g;
  index_t next = 0, items = 0;
  for (index_t e = 0; e < experts; ++e) {
    const index_t n = g.row_count[e], old = g.row_begin[e], padded = rp.padded(n);
    l.padded_begin[e] = next;
    for (index_t i = 0; i < n; ++i) {
      const index_t pair = g.row_pair[old + i];
      g.pair_row[pair] = next + i;
      l.padded_row_pair[next + i] = pair;
    }
    for (index_t i = n; i < padded; ++i) l.padded_row_pair[next + i] = dispatch::unused_pair;
    for (index_t r = 0; r < padded; r += row_panels::block)
      l.items[items++] = {e, next + r, std::min(row_panels::block, padded - r)};
    next += padded;
  }
  g.row_begin = {l.padded_begin, static_cast<std::size_t>(experts)};
  g.row_pair = {l.padded_row_pair, static_cast<std::size_t>(next)};
  g.num_rows = next;
  return items;
}

//! Gathers every expert's rows as float (padding rows zero); one OpenMP region over experts.
template <ElementType T>
void gather_groups(const matrix_view<const T>& x, const dispatch::expert_groups& g,
                   const row_panels& rp, index_t experts, index_t width, float* rows) {
  const index_t d = x.extent(1);
#pragma omp parallel for schedule(dynamic) if (g.num_rows * d > (1 << 15))
  for (index_t e = 0; e < experts; ++e) {
    const index_t r0 = g.row_begin[e], n = g.row_count[e];
    for (index_t r = r0; r < r0 + n; ++r) {
      const index_t t = g.row_pair[r] / width;
      float* out = rows + ::switchyard::detail::row_offset(r, d);
      for (index_t i = 0; i < d; ++i) out[i] = to_float(x(t, i));
    }
    std::fill(rows + ::switchyard::detail::row_offset(r0 + n, d),
              rows + ::switchyard::detail::row_offset(r0 + rp.padded(n), d), 0.0f);
  }
}

//! Runs every forward work item over the padded rows of `xs` [R, d], writing the expert
//! outputs to the same rows of `ys` (which may be xs). Float weights BLAS can read: items in parallel. Weights
//! needing a conversion panel: items in order on this thread, each expert converted once.
//! Either way each item makes the same calls, so the result does not depend on the threads.
template <class Act, ElementType T>
void run_work_items(const Act& act, const row_panels& rp, const expert_weights<T>& w,
                    const expert_dims& dm, const work_item* items, index_t n_items,
                    const float* xs, float* ys, float* h, float* w1_buf, float* w2_buf) {
  const blas_single_thread_scope single_threaded_blas;
  auto one = [&](index_t i, float_panel w1, float_panel w2) {
    const work_item& it = items[i];
    expert_forward(act, rp, w, dm, it.expert, it.rows,
                   xs + ::switchyard::detail::row_offset(it.row, dm.d),
                   h + ::switchyard::detail::row_offset(it.row, dm.p),
                   ys + ::switchyard::detail::row_offset(it.row, dm.d), w1, w2);
  };
  const bool panels = w1_buf != nullptr || w2_buf != nullptr;
  if (!panels) {
    ::switchyard::detail::parallel_for(
        n_items, ::switchyard::detail::openmp_parallel_available(), [&](index_t i) {
          one(i, expert_panel(w.w1, items[i].expert, nullptr),
              expert_panel(w.w2, items[i].expert, nullptr));
        });
    return;
  }
  index_t converted = -1;
  float_panel w1{}, w2{};
  for (index_t i = 0; i < n_items; ++i) {
    if (items[i].expert != converted) {
      converted = items[i].expert;
      w1 = expert_panel(w.w1, converted, w1_buf);
      w2 = expert_panel(w.w2, converted, w2_buf);
    }
    one(i, w1, w2);
  }
}

//! The work items of the dense layout for one expert: blocks of the padded T rows.
inline index_t dense_items(const row_panels& rp, index_t tokens, index_t e, work_item* items) {
  const index_t padded = rp.padded(tokens);
  index_t n = 0;
  for (index_t r = 0; r < padded; r += row_panels::block)
    items[n++] = {e, r, std::min(row_panels::block, padded - r)};
  return n;
}

//! Throws range_error unless every GEMM dimension of the phase fits the BLAS's 32-bit ints
//! (checked before any parallel region).
inline void check_gemm_dims(const expert_dims& dm, index_t rows) {
  detail::blas_int("d", dm.d);
  detail::blas_int("projection width", dm.p);
  detail::blas_int("d_ff", dm.d_ff);
  detail::blas_int("expert rows", rows);
}

}  // namespace detail

//! Runs the experts of a plan: y [T, d] = Σ_j w_tj · FFN_{e_tj}(x_t) (+ `extra` [T, d] float
//! when non-null, the add-on module's term). Fills `dropped` [E] per expert. With a
//! measuring arena it only counts the workspace (x, y, plan may then be empty).
template <class Dispatch, class Act, ElementType T, class Id, class W>
void experts_forward(const Dispatch& dispatch, const Act& act, const expert_dims& dm,
                     const matrix_view<const T>& x, const routing::plan_view<Id, W>& plan,
                     const expert_weights<T>& w, const float* extra, const matrix_view<T>& y,
                     ::cuda::std::span<index_t> dropped, workspace_arena& ws) {
  const bool grouped = Dispatch::layout == dispatch::dispatch_layout::grouped_rows;
  const row_panels rp = panels_for(dm);
  detail::phase_layout l = detail::carve_layout(ws, dm, rp, grouped);
  const index_t rows = l.padded_rows;
  float* xs = ws.take<float>(rows * dm.d);  // grouped: [R, d] gathered rows, then Y rows
  float* h = ws.take<float>(rows * dm.p);   // [R, P] pre-activation, then A over [R, d_ff]
  float* y_all = grouped ? nullptr : ws.take<float>(rows * dm.d);  // dense: [T, d]
  float* pair_out = grouped ? nullptr : ws.take<float>(dm.tokens * dm.width * dm.d);
  float* w1_buf = detail::needs_panel(w.w1) ? ws.take<float>(dm.p * dm.d) : nullptr;
  float* w2_buf = detail::needs_panel(w.w2) ? ws.take<float>(dm.d * dm.d_ff) : nullptr;
  if (!ws.carving()) return;
  detail::check_gemm_dims(dm, rows);

  dispatch::expert_groups& g = l.g;
  dispatch.plan_groups(plan, g);
  std::copy(g.dropped.begin(), g.dropped.end(), dropped.begin());
  if (grouped) {
    const index_t n_items = detail::pad_groups(l, rp, dm.experts);
    detail::gather_groups(x, g, rp, dm.experts, dm.width, xs);
    detail::run_work_items(act, rp, w, dm, l.items, n_items, xs, xs, h, w1_buf, w2_buf);
    detail::combine(plan, g, xs, x, extra, y);
    return;
  }
  // Dense: x once as float rows (padding rows zero), then every used expert over all T tokens.
#pragma omp parallel for schedule(static) if (dm.tokens * dm.d > (1 << 15))
  for (index_t t = 0; t < rows; ++t)
    for (index_t i = 0; i < dm.d; ++i) xs[t * dm.d + i] = t < dm.tokens ? to_float(x(t, i)) : 0.0f;
  for (index_t e = 0; e < dm.experts; ++e) {
    if (g.row_count[e] == 0) continue;
    const index_t n_items = detail::dense_items(rp, dm.tokens, e, l.items);
    detail::run_work_items(act, rp, w, dm, l.items, n_items, xs, y_all, h, w1_buf, w2_buf);
    for (index_t t = 0; t < dm.tokens; ++t)
      for (index_t j = 0; j < plan.counts(t); ++j)
        if (plan.expert_ids(t, j) == e)
          std::copy_n(y_all + t * dm.d, dm.d, pair_out + dispatch::pair_index(t, j, dm.width) * dm.d);
  }
  detail::combine(plan, g, pair_out, x, extra, y);
}

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
template <class Dispatch, class Act, ElementType T, class Id, class W>
void experts_backward(const Dispatch& dispatch, const Act& act, const expert_dims& dm,
                      const matrix_view<const T>& x, const routing::plan_view<Id, W>& plan,
                      const expert_weights<T>& w, const matrix_view<const T>& dy,
                      const matrix_view<float>& dx, const expert_grads& grads,
                      float* d_weights, workspace_arena& ws) {
  const bool grouped = Dispatch::layout == dispatch::dispatch_layout::grouped_rows;
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
  const bool gw1_direct = !::switchyard::detail::present(grads.w1) || detail::blas_layout(grads.w1);
  const bool gw2_direct = !::switchyard::detail::present(grads.w2) || detail::blas_layout(grads.w2);
  // One expert's dW1 [P, d] / dW2 [d, d_ff] for gradient views BLAS cannot write (always
  // reserved: the size query does not see the gradient views).
  float* gw1 = ws.take<float>(dm.p * dm.d);
  float* gw2 = ws.take<float>(dm.d * dm.d_ff);
  if (!ws.carving()) return;
  detail::check_gemm_dims(dm, rows);

  const index_t tokens = dm.tokens, width = dm.width, d = dm.d, f = dm.d_ff, p = dm.p;
  dispatch::expert_groups& g = l.g;
  dispatch.plan_groups(plan, g);
  const bool pass_through = g.drop == dispatch::dropped_output::scaled_input;
  std::fill(d_weights, d_weights + tokens * width, 0.0f);

  // Forward recompute of one expert over m rows into (he, ae, ye).
  auto recompute = [&](index_t e, index_t m, const float* xe, float* he, float* ae, float* ye,
                       detail::float_panel w1, detail::float_panel w2) {
    detail::gemm_rows(rp, op::none, op::transpose, m, p, d, xe, d, w1.data, w1.ld, he, p);
    if (w.has_b1()) detail::add_bias(w.b1, e, he, m, p, p);
    for (index_t r = 0; r < m; ++r)
      for (index_t c = 0; c < f; ++c) {
        if constexpr (activation_traits<Act>::is_gated) ae[r * f + c] = act(he[r * p + c], he[r * p + f + c]);
        else ae[r * f + c] = act(he[r * p + c]);
      }
    detail::gemm_rows(rp, op::none, op::transpose, m, d, f, ae, f, w2.data, w2.ld, ye, d);
    if (w.has_b2()) detail::add_bias(w.b2, e, ye, m, d, d);
  };

  // grad[e] += Lᵀ · R over the n real rows (L [n, rows of grad[e]], R [n, its columns]):
  // straight into the gradient view when BLAS can write it, else through `tmp` (either way
  // decided by the view's layout, never by the thread count).
  auto accumulate_weight_grad = [&](const tensor_view<float, 3>& grad, bool direct, float* tmp,
                                    index_t e, index_t n, const float* l, index_t ldl,
                                    const float* r, index_t ldr) {
    if (!::switchyard::detail::present(grad)) return;
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
    if (::switchyard::detail::present(grads.b2)) {
      for (index_t c = 0; c < d; ++c) {
        float s = 0.0f;
        for (index_t r = 0; r < n; ++r) s += dye[r * d + c];
        grads.b2(e, c) += s;
      }
    }
    // dH from dA through the activation, in place over H.
    for (index_t r = 0; r < m; ++r) {
      float* hr = he + r * p;
      const float* dar = dae + r * f;
      for (index_t c = 0; c < f; ++c) {
        if constexpr (activation_traits<Act>::is_gated) {
          float dg, du;
          act.backward(hr[c], hr[f + c], dar[c], dg, du);
          hr[c] = dg;
          hr[f + c] = du;
        } else {
          hr[c] = dar[c] * act.derivative(hr[c]);
        }
      }
    }
    // dW1 += dHᵀ · X ([P, n] × [n, d]); db1 += Σ_rows dH; dX = dH · W1 ([m, P] × [P, d]).
    accumulate_weight_grad(grads.w1, gw1_direct, gw1, e, n, he, p, xe, d);
    if (::switchyard::detail::present(grads.b1)) {
      for (index_t c = 0; c < p; ++c) {
        float s = 0.0f;
        for (index_t r = 0; r < n; ++r) s += he[r * p + c];
        grads.b1(e, c) += s;
      }
    }
    detail::gemm_rows(rp, op::none, op::none, m, d, p, he, p, w1.data, w1.ld, dye, d);
  };

  auto dot_dy = [&](index_t t, const float* row) {
    float s = 0.0f;
    for (index_t i = 0; i < d; ++i) s += to_float(dy(t, i)) * row[i];
    return s;
  };

  const blas_single_thread_scope single_threaded_blas;
  const bool panels = w1_buf != nullptr || w2_buf != nullptr;
  const bool parallel = !panels && gw1_direct && gw2_direct &&
                        ::switchyard::detail::openmp_parallel_available();
  if (grouped) {
    detail::pad_groups(l, rp, dm.experts);
    detail::gather_groups(x, g, rp, dm.experts, width, xs);
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
      for (index_t r = r0; r < r0 + n; ++r) {
        const index_t pr = g.row_pair[r], t = pr / width, j = pr % width;
        const float wt = plan.weights(t, j);
        for (index_t i = 0; i < d; ++i) dys[r * d + i] = wt * to_float(dy(t, i));
        d_weights[pr] = dot_dy(t, ys + r * d);
      }
      std::fill(dys + (r0 + n) * d, dys + (r0 + m) * d, 0.0f);
      run_expert(e, n, m, xe, he, ae, dye, da + r0 * f, w1, w2);
    };
    if (!panels) {
      ::switchyard::detail::parallel_for(dm.experts, parallel, [&](index_t e) {
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
    const index_t m = rp.padded(tokens);
#pragma omp parallel for schedule(static) if (tokens * d > (1 << 15))
    for (index_t t = 0; t < m; ++t)
      for (index_t i = 0; i < d; ++i) xs[t * d + i] = t < tokens ? to_float(x(t, i)) : 0.0f;
    for (index_t e = 0; e < dm.experts; ++e) {
      if (g.row_count[e] == 0) continue;
      const detail::float_panel w1 = detail::expert_panel(w.w1, e, w1_buf);
      const detail::float_panel w2 = detail::expert_panel(w.w2, e, w2_buf);
      recompute(e, m, xs, h, a, ys, w1, w2);
      for (index_t t = 0; t < tokens; ++t) {  // masked dY: Σ of the slots naming e
        float wt = 0.0f;
        for (index_t j = 0; j < plan.counts(t); ++j) {
          if (plan.expert_ids(t, j) != e) continue;
          wt += plan.weights(t, j);
          d_weights[dispatch::pair_index(t, j, width)] = dot_dy(t, ys + t * d);
        }
        for (index_t i = 0; i < d; ++i) dys[t * d + i] = wt * to_float(dy(t, i));
      }
      std::fill(dys + tokens * d, dys + m * d, 0.0f);
      run_expert(e, tokens, m, xs, h, a, dys, da, w1, w2);
      for (index_t t = 0; t < tokens; ++t)
        for (index_t j = 0; j < plan.counts(t); ++j)
          if (plan.expert_ids(t, j) == e)
            std::copy_n(dys + t * d, d, pair_dx + dispatch::pair_index(t, j, width) * d);
    }
  }

  // dx_t += Σ_j dX rows of its slots, in slot order; dropped scaled_input pairs: w_tj · dy_t.
  const float* dx_rows = grouped ? dys : pair_dx;
  const bool has_dx = ::switchyard::detail::present(dx);
#pragma omp parallel for schedule(static) if (tokens * width * d > (1 << 15))
  for (index_t t = 0; t < tokens; ++t) {
    const index_t c = plan.counts(t);
    for (index_t j = 0; j < c; ++j) {
      const index_t pr = dispatch::pair_index(t, j, width), row = g.pair_row[pr];
      if (row == dispatch::dropped_pair && pass_through) {
        float s = 0.0f;
        for (index_t i = 0; i < d; ++i) s += to_float(dy(t, i)) * to_float(x(t, i));
        d_weights[pr] = s;
      }
    }
    for (index_t i = 0; i < d && has_dx; ++i) {
      float s = 0.0f;
      for (index_t j = 0; j < c; ++j) {
        const index_t row = g.pair_row[dispatch::pair_index(t, j, width)];
        if (row >= 0) s += dx_rows[row * d + i];
        else if (row == dispatch::dropped_pair && pass_through) s += plan.weights(t, j) * to_float(dy(t, i));
      }
      dx(t, i) += s;
    }
  }
}

}  // namespace switchyard::host

namespace switchyard::host {

//! Whether the linked BLAS gives a token row the same bits wherever the row-panel rule puts it
//! (any position inside a call, any call row count the rule allows), i.e. whether a layer
//! without `batch_invariant` is batch-invariant on this machine too. Probed once with a few
//! single-threaded products of the two token-row forms (X·Wᵀ and dY·W) and cached. True
//! without a BLAS (the blocked fallback's per-element order is fixed). Thread invariance does
//! not depend on it.
inline bool blas_batch_invariant() {
  static const bool invariant = [] {
    if (!SWITCHYARD_HOST_GEMM_CBLAS) return true;
    const blas_single_thread_scope single_threaded_blas;
    constexpr index_t n = 320, k = 320, max_m = 32;
    const row_panels rp = row_panels::for_shape(n, k);
    std::vector<float> a(max_m * k), b(n * k), c(max_m * n), ref(n), x(k);
    std::uint32_t state = 12345u;  // a small LCG: values in [-1, 1)
    auto next = [&] {
      state = state * 1664525u + 1013904223u;
      return static_cast<float>(state >> 8) / 8388608.0f - 1.0f;
    };
    for (auto& v : b) v = next();
    for (auto& v : x) v = next();
    for (const op tb : {op::transpose, op::none}) {
      bool first = true;
      for (index_t m = rp.min_rows; m <= max_m; m += row_panels::granule) {
        for (index_t q = 0; q < m; ++q) {
          for (auto& v : a) v = next();
          std::copy(x.begin(), x.end(), a.begin() + q * k);
          detail::gemm_rows(rp, op::none, tb, m, n, k, a.data(), k, b.data(), tb == op::transpose ? k : n,
                            c.data(), n);
          if (first) {
            std::copy_n(c.begin() + q * n, n, ref.begin());
            first = false;
          } else if (!std::equal(ref.begin(), ref.end(), c.begin() + q * n)) {
            return false;
          }
        }
      }
    }
    return true;
  }();
  return invariant;
}

}  // namespace switchyard::host
