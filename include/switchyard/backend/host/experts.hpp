#pragma once
//! \file experts.hpp
//! Host execution of the expert FFNs for a routing plan: dispatch planning (any policy from
//! `switchyard/dispatch/`), gather into float rows, one BLAS GEMM pair per expert with the
//! activation between, and a combine that gathers each token's slots in slot order.
//!
//! Threading: experts run one after another and each GEMM uses the BLAS's own threads
//! (OpenBLAS's pool; the blocked fallback uses OpenMP over output tiles). The gather before
//! and the combine after the expert phase are OpenMP loops over rows or tokens; inside the
//! expert phase the element-wise work (bias, activation, weight conversion) stays on the
//! calling thread: it is O(1/d) of the GEMMs' work, and an OpenMP region between two BLAS
//! calls leaves OpenMP workers spinning on the cores the BLAS threads need (measured: the
//! expert phase ran at 0.24× a dense sgemm with those regions, 0.78× without). No loop
//! reduces across threads, so outputs are bitwise identical for any OpenMP thread count.
//!
//! Element types: half/bfloat16 tokens and weights are converted to float panels; every
//! product and sum is float; only y is rounded to the storage type.

#include <algorithm>
#include <cstddef>
#include <type_traits>

#include <cuda/std/span>

#if defined(_OPENMP)
#  include <omp.h>
#endif

#include "switchyard/activation/concepts.hpp"
#include "switchyard/backend/host/gemm.hpp"
#include "switchyard/core/workspace.hpp"
#include "switchyard/core/element_type.hpp"
#include "switchyard/core/view.hpp"
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
  index_t max_rows = 0;  //!< rows of the grouped buffers (dispatch's max_rows)
};

namespace detail {

//! A float matrix in memory the GEMM can read: pointer and leading dimension.
struct float_panel {
  const float* data;
  index_t ld;
};

//! Whether expert slices of `w` must be converted to a float panel (non-float storage, or a
//! layout BLAS cannot read directly).
template <ElementType T>
bool needs_panel(const tensor_view<const T, 3>& w) {
  if constexpr (!std::is_same_v<T, float>) {
    return true;
  } else {
    return !(w.stride(2) == 1 && w.stride(1) >= w.extent(2));
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

//! rows[r] = float(x[token of row r]) for the n rows of `row_pair` starting at `first`.
template <ElementType T>
void gather_rows(const matrix_view<const T>& x, const index_t* row_pair, index_t first,
                 index_t n, index_t width, float* rows) {
  const index_t d = x.extent(1);
  for (index_t r = first; r < first + n; ++r) {
    const index_t t = row_pair[r] / width;
    float* out = rows + ::switchyard::detail::row_offset(r, d);
    for (index_t i = 0; i < d; ++i) out[i] = to_float(x(t, i));
  }
}

//! Gathers every expert's rows (one OpenMP region over experts; pure copies).
template <ElementType T>
void gather_groups(const matrix_view<const T>& x, const dispatch::expert_groups& g,
                   index_t experts, index_t width, float* rows) {
  const index_t d = x.extent(1);
#pragma omp parallel for schedule(dynamic) if (g.num_rows * d > (1 << 15))
  for (index_t e = 0; e < experts; ++e)
    gather_rows(x, g.row_pair.data(), g.row_begin[e], g.row_count[e], width, rows);
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
void expert_forward(const Act& act, const expert_weights<T>& w, const expert_dims& dm,
                    index_t e, index_t n, const float* x, float* h, float* y, float* w1_buf,
                    float* w2_buf) {
  const float_panel w1 = expert_panel(w.w1, e, w1_buf);
  const float_panel w2 = expert_panel(w.w2, e, w2_buf);
  sgemm(op::none, op::transpose, n, dm.p, dm.d, 1.0f, x, dm.d, w1.data, w1.ld, 0.0f, h, dm.p);
  if (w.has_b1()) add_bias(w.b1, e, h, n, dm.p, dm.p);
  activate(act, h, n, dm.d_ff, dm.p);
  sgemm(op::none, op::transpose, n, dm.d, dm.d_ff, 1.0f, h, dm.p, w2.data, w2.ld, 0.0f, y, dm.d);
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

//! Runs every non-empty expert over its contiguous rows of `xs` [R, d] (grouped layout),
//! writing the expert outputs over the same rows. With OpenBLAS and more than one OpenMP
//! thread, and when no expert needs a float conversion panel (float weights stored
//! contiguously), experts run in parallel, one per thread, each GEMM single-threaded: the
//! per-expert GEMMs are small (≈ T·k/E rows) and scale poorly when OpenBLAS splits each one.
//! Every expert's rows are written by one thread with the same arithmetic either way, so the
//! result is bitwise the same as the serial loop.
template <class Act, ElementType T>
void run_grouped_experts(const Act& act, const expert_weights<T>& w, const expert_dims& dm,
                         const dispatch::expert_groups& g, float* xs, float* h, float* w1_buf,
                         float* w2_buf) {
  auto one = [&](index_t e) {
    const index_t n = g.row_count[e], r0 = g.row_begin[e];
    if (n == 0) return;
    float* xe = xs + ::switchyard::detail::row_offset(r0, dm.d);
    expert_forward(act, w, dm, e, n, xe, h + ::switchyard::detail::row_offset(r0, dm.p), xe,
                   w1_buf, w2_buf);
  };
  index_t busy = 0;
  for (index_t e = 0; e < dm.experts; ++e) busy += g.row_count[e] > 0 ? 1 : 0;
  bool parallel = blas_single_thread_scope::active() && busy > 1 && w1_buf == nullptr &&
                  w2_buf == nullptr;
#if defined(_OPENMP)
  parallel = parallel && omp_get_max_threads() > 1;
#else
  parallel = false;
#endif
  if (!parallel) {
    for (index_t e = 0; e < dm.experts; ++e) one(e);
    return;
  }
  const blas_single_thread_scope single_threaded_blas;
#pragma omp parallel for schedule(dynamic, 1)
  for (index_t e = 0; e < dm.experts; ++e) one(e);
}

//! The index arrays every dispatch fills.
inline dispatch::expert_groups carve_groups(workspace_arena& ws, const expert_dims& dm) {
  dispatch::expert_groups g;
  const index_t pairs = dm.tokens * dm.width;
  index_t* begin = ws.take<index_t>(dm.experts);
  index_t* count = ws.take<index_t>(dm.experts);
  index_t* dropped = ws.take<index_t>(dm.experts);
  index_t* pair_row = ws.take<index_t>(pairs);
  index_t* row_pair = ws.take<index_t>(std::max(dm.max_rows, pairs));
  if (ws.carving()) {
    g.row_begin = {begin, static_cast<std::size_t>(dm.experts)};
    g.row_count = {count, static_cast<std::size_t>(dm.experts)};
    g.dropped = {dropped, static_cast<std::size_t>(dm.experts)};
    g.pair_row = {pair_row, static_cast<std::size_t>(pairs)};
    g.row_pair = {row_pair, static_cast<std::size_t>(std::max(dm.max_rows, pairs))};
  }
  return g;
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
  dispatch::expert_groups g = detail::carve_groups(ws, dm);
  const bool grouped = Dispatch::layout == dispatch::dispatch_layout::grouped_rows;
  const index_t rows = grouped ? dm.max_rows : dm.tokens;
  float* xs = ws.take<float>(rows * dm.d);  // grouped: [R, d] gathered rows, then Y rows
  float* h = ws.take<float>(rows * dm.p);   // [R, P] pre-activation, then A over [R, d_ff]
  float* y_all = grouped ? nullptr : ws.take<float>(dm.tokens * dm.d);  // dense: [T, d]
  float* pair_out = grouped ? nullptr : ws.take<float>(dm.tokens * dm.width * dm.d);
  float* w1_buf = detail::needs_panel(w.w1) ? ws.take<float>(dm.p * dm.d) : nullptr;
  float* w2_buf = detail::needs_panel(w.w2) ? ws.take<float>(dm.d * dm.d_ff) : nullptr;
  if (!ws.carving()) return;

  dispatch.plan_groups(plan, g);
  if (grouped) {
    detail::gather_groups(x, g, dm.experts, dm.width, xs);
    detail::run_grouped_experts(act, w, dm, g, xs, h, w1_buf, w2_buf);
    detail::combine(plan, g, xs, x, extra, y);
  } else {
    // Dense: x once as float rows, then every used expert over all T tokens.
#pragma omp parallel for schedule(static) if (dm.tokens * dm.d > (1 << 15))
    for (index_t t = 0; t < dm.tokens; ++t)
      for (index_t i = 0; i < dm.d; ++i) xs[t * dm.d + i] = to_float(x(t, i));
    for (index_t e = 0; e < dm.experts; ++e) {
      if (g.row_count[e] == 0) continue;
      detail::expert_forward(act, w, dm, e, dm.tokens, xs, h, y_all, w1_buf, w2_buf);
      for (index_t t = 0; t < dm.tokens; ++t)
        for (index_t j = 0; j < plan.counts(t); ++j)
          if (plan.expert_ids(t, j) == e)
            std::copy_n(y_all + t * dm.d, dm.d,
                        pair_out + dispatch::pair_index(t, j, dm.width) * dm.d);
    }
    detail::combine(plan, g, pair_out, x, extra, y);
  }
  std::copy(g.dropped.begin(), g.dropped.end(), dropped.begin());
}

//! Backward of `experts_forward` (recomputing the hidden activations):
//! dx [T, d] += ∂/∂x, grads += ∂/∂weights (present views only), d_weights [T·width] =
//! ∂/∂(combine weights) = ⟨dy_t, FFN_e(x_t)⟩ per used slot (⟨dy_t, x_t⟩ for a dropped
//! `scaled_input` pair, 0 otherwise). Measuring arena: only counts the workspace.
template <class Dispatch, class Act, ElementType T, class Id, class W>
void experts_backward(const Dispatch& dispatch, const Act& act, const expert_dims& dm,
                      const matrix_view<const T>& x, const routing::plan_view<Id, W>& plan,
                      const expert_weights<T>& w, const matrix_view<const T>& dy,
                      const matrix_view<float>& dx, const expert_grads& grads,
                      float* d_weights, workspace_arena& ws) {
  dispatch::expert_groups g = detail::carve_groups(ws, dm);
  const bool grouped = Dispatch::layout == dispatch::dispatch_layout::grouped_rows;
  const index_t rows = grouped ? dm.max_rows : dm.tokens;
  float* xs = ws.take<float>(rows * dm.d);     // [R, d] gathered x rows
  float* h = ws.take<float>(rows * dm.p);      // [R, P] pre-activation, then dH
  float* a = ws.take<float>(rows * dm.d_ff);   // [R, d_ff] activation
  float* ys = ws.take<float>(rows * dm.d);     // [R, d] expert outputs (for d_weights)
  float* dys = ws.take<float>(rows * dm.d);    // [R, d] dY rows, then dX rows
  float* da = ws.take<float>(rows * dm.d_ff);  // [R, d_ff]
  float* pair_dx = grouped ? nullptr : ws.take<float>(dm.tokens * dm.width * dm.d);
  float* w1_buf = detail::needs_panel(w.w1) ? ws.take<float>(dm.p * dm.d) : nullptr;
  float* w2_buf = detail::needs_panel(w.w2) ? ws.take<float>(dm.d * dm.d_ff) : nullptr;
  float* gw1 = ws.take<float>(dm.p * dm.d);     // [P, d] one expert's dW1
  float* gw2 = ws.take<float>(dm.d * dm.d_ff);  // [d, d_ff] one expert's dW2
  if (!ws.carving()) return;

  const index_t tokens = dm.tokens, width = dm.width, d = dm.d, f = dm.d_ff, p = dm.p;
  dispatch.plan_groups(plan, g);
  const bool pass_through = g.drop == dispatch::dropped_output::scaled_input;
  std::fill(d_weights, d_weights + tokens * width, 0.0f);

  // One expert over n rows whose x rows are `xe` and dY rows `dye`; writes dX rows over dye.
  auto run_expert = [&](index_t e, index_t n, const float* xe, float* he, const float* ae,
                        float* dye, float* dae) {
    const detail::float_panel w1 = detail::expert_panel(w.w1, e, w1_buf);
    const detail::float_panel w2 = detail::expert_panel(w.w2, e, w2_buf);
    // dA = dY · W2 ([n, d] × [d, d_ff]); dW2 = dYᵀ · A; db2 = Σ_rows dY.
    sgemm(op::none, op::none, n, f, d, 1.0f, dye, d, w2.data, w2.ld, 0.0f, dae, f);
    if (::switchyard::detail::present(grads.w2)) {
      sgemm(op::transpose, op::none, d, f, n, 1.0f, dye, d, ae, f, 0.0f, gw2, f);
      for (index_t r = 0; r < d; ++r)
        for (index_t c = 0; c < f; ++c) grads.w2(e, r, c) += gw2[r * f + c];
    }
    if (::switchyard::detail::present(grads.b2)) {
      for (index_t c = 0; c < d; ++c) {
        float s = 0.0f;
        for (index_t r = 0; r < n; ++r) s += dye[r * d + c];
        grads.b2(e, c) += s;
      }
    }
    // dH from dA through the activation, in place over H.
    for (index_t r = 0; r < n; ++r) {
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
    // dW1 = dHᵀ · X ([P, n] × [n, d]); db1 = Σ_rows dH; dX = dH · W1 ([n, P] × [P, d]).
    if (::switchyard::detail::present(grads.w1)) {
      sgemm(op::transpose, op::none, p, d, n, 1.0f, he, p, xe, d, 0.0f, gw1, d);
      for (index_t r = 0; r < p; ++r)
        for (index_t c = 0; c < d; ++c) grads.w1(e, r, c) += gw1[r * d + c];
    }
    if (::switchyard::detail::present(grads.b1)) {
      for (index_t c = 0; c < p; ++c) {
        float s = 0.0f;
        for (index_t r = 0; r < n; ++r) s += he[r * p + c];
        grads.b1(e, c) += s;
      }
    }
    sgemm(op::none, op::none, n, d, p, 1.0f, he, p, w1.data, w1.ld, 0.0f, dye, d);
  };

  // Forward recompute of one expert into (he → ae copy, ye).
  auto recompute = [&](index_t e, index_t n, const float* xe, float* he, float* ae, float* ye) {
    const detail::float_panel w1 = detail::expert_panel(w.w1, e, w1_buf);
    const detail::float_panel w2 = detail::expert_panel(w.w2, e, w2_buf);
    sgemm(op::none, op::transpose, n, p, d, 1.0f, xe, d, w1.data, w1.ld, 0.0f, he, p);
    if (w.has_b1()) detail::add_bias(w.b1, e, he, n, p, p);
    for (index_t r = 0; r < n; ++r)
      for (index_t c = 0; c < f; ++c) {
        if constexpr (activation_traits<Act>::is_gated) ae[r * f + c] = act(he[r * p + c], he[r * p + f + c]);
        else ae[r * f + c] = act(he[r * p + c]);
      }
    sgemm(op::none, op::transpose, n, d, f, 1.0f, ae, f, w2.data, w2.ld, 0.0f, ye, d);
    if (w.has_b2()) detail::add_bias(w.b2, e, ye, n, d, d);
  };

  auto dot_dy = [&](index_t t, const float* row) {
    float s = 0.0f;
    for (index_t i = 0; i < d; ++i) s += to_float(dy(t, i)) * row[i];
    return s;
  };

  if (grouped) {
    detail::gather_groups(x, g, dm.experts, width, xs);
    for (index_t e = 0; e < dm.experts; ++e) {
      const index_t n = g.row_count[e], r0 = g.row_begin[e];
      if (n == 0) continue;
      float* xe = xs + r0 * d;
      float* he = h + r0 * p;
      float* ae = a + r0 * f;
      float* ye = ys + r0 * d;
      float* dye = dys + r0 * d;
      recompute(e, n, xe, he, ae, ye);
      for (index_t r = r0; r < r0 + n; ++r) {  // dY row = w_tj · dy_t; d_weight = ⟨dy_t, Y⟩
        const index_t pr = g.row_pair[r], t = pr / width, j = pr % width;
        const float wt = plan.weights(t, j);
        for (index_t i = 0; i < d; ++i) dys[r * d + i] = wt * to_float(dy(t, i));
        d_weights[pr] = dot_dy(t, ys + r * d);
      }
      run_expert(e, n, xe, he, ae, dye, da + r0 * f);
    }
  } else {
#pragma omp parallel for schedule(static) if (tokens * d > (1 << 15))
    for (index_t t = 0; t < tokens; ++t)
      for (index_t i = 0; i < d; ++i) xs[t * d + i] = to_float(x(t, i));
    for (index_t e = 0; e < dm.experts; ++e) {
      if (g.row_count[e] == 0) continue;
      recompute(e, tokens, xs, h, a, ys);
      for (index_t t = 0; t < tokens; ++t) {  // masked dY: Σ of the slots naming e
        float wt = 0.0f;
        for (index_t j = 0; j < plan.counts(t); ++j) {
          if (plan.expert_ids(t, j) != e) continue;
          wt += plan.weights(t, j);
          d_weights[dispatch::pair_index(t, j, width)] = dot_dy(t, ys + t * d);
        }
        for (index_t i = 0; i < d; ++i) dys[t * d + i] = wt * to_float(dy(t, i));
      }
      run_expert(e, tokens, xs, h, a, dys, da);
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
