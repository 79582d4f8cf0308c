// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file expert_phase.hpp
//! The CUDA expert phase's pipeline, written once over an executor of its primitives (launch a
//! per-row functor, run a mapped GEMM, build the grouped GEMM's pointer arrays), with no CUDA
//! header: experts.cuh runs it with the device executor (cuda::for_each, cuBLAS), the host
//! tests with a naive one, so the row layout, the buffers, the GEMM sequence and the
//! functors checked on the host are the very ones the GPU runs.
//!
//! Row layout (one row per (token, slot) pair an expert computes; `expert_groups_ref`, the
//! dispatch's `device_groups` without CUDA types):
//! - sorted_grouped: expert e's rows [row_begin[e], row_begin[e] + row_count[e]), the
//!   n = Σ row_count real rows only (the host copy of the counts says n and each GEMM group);
//! - padded_capacity: E blocks of C = g.capacity rows, expert e's at e·C, its real rows first,
//!   then padding rows (row_pair < 0: zero Xs, A = 0, dH = 0, dY = 0);
//! - dense: E blocks of T rows (expert e over every token), Xs the T token rows once.
//!
//! Buffers (R rows): Xs [R, d] of T gathered from x (a zero row for padding); H [R, P] float
//! = Xs·W1ᵀ (+ b1, written back in the backward); A [R, d_ff] of T = act(H) (gated: over
//! [gate | up]); Y [R, d] float = A·W2ᵀ (+ b2). Combine: y[t] = Σ_j w_tj · Y[pair_row(t, j)]
//! in slot order in float (+ w_tj · x_t for a dropped pair under scaled_input) (+ extra[t]),
//! rounded to T: `ops::combine_slot_elements`, the host's `combine_slots` one element per
//! thread, bitwise the same (dense: each slot's row is first
//! copied into a [T·width, d] pair buffer by `ops::keep_dense_slots`).
//! A and the GEMM inputs are stored in T (the host keeps float rows): with T = half or
//! bfloat16 the device differs from the host by that rounding, within the dtype tolerance.
//!
//! Backward: Xs, H, A, Y again; dY [R, d] = w_tj · dy_t per row (float, and its T copy) with
//! d_weights[p] = ⟨dy_t, Y row⟩ written for every used pair; dA = dY·W2 (float);
//! grads.w2[e] += dYᵀ·A; dH = act'(H) ⊙ dA (float, and its T copy); grads.w1[e] += dHᵀ·Xs;
//! grads.b2 / b1 by a segmented column sum over each expert's real rows in row order (one
//! thread per element, no atomics); dXs = dH·W1 (float) and dx[t] += Σ_j dXs rows of its
//! slots in slot order (`ops::combine_backward_slots`, which also gives a dropped
//! pass-through pair's d_weights and dx term). Dense computes every expert's weight
//! gradients into scratch and adds only the used experts' (the host skips the others, whose
//! weights may be anything). Gradient views that are absent are skipped, and so is dXs
//! when dx is absent.

#include <cstddef>
#include <type_traits>

#include "switchyard/backend/cuda/gemm.hpp"
#include "switchyard/core/config.hpp"
#include "switchyard/core/element_type.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/core/workspace.hpp"
#include "switchyard/dispatch/dense.hpp"
#include "switchyard/dispatch/groups.hpp"
#include "switchyard/dispatch/padded_capacity.hpp"
#include "switchyard/dispatch/sorted_grouped.hpp"
#include "switchyard/layer/expert_weights.hpp"
#include "switchyard/ops/combine.hpp"
#include "switchyard/ops/drops.hpp"
#include "switchyard/ops/expert_rows.hpp"
#include "switchyard/ops/gather.hpp"
#include "switchyard/routing/plan.hpp"

namespace switchyard::cuda {

//! Sizes of one expert phase on the device.
struct expert_dims {
  index_t tokens = 0;   //!< T
  index_t width = 0;    //!< plan slots per token
  index_t experts = 0;  //!< E
  index_t d = 0;        //!< model width
  index_t d_ff = 0;     //!< expert hidden width
  index_t p = 0;        //!< first-projection width: d_ff or 2·d_ff (gated)
};

//! The dispatch's groups as the phase reads them (`device_groups`, dispatch.cuh, without
//! its CUDA header): same fields, same meaning.
struct expert_groups_ref {
  const index_t* row_begin = nullptr;       //!< [E] first row of expert e
  const index_t* row_count = nullptr;       //!< [E] rows expert e computes
  const index_t* dropped = nullptr;         //!< [E] pairs dropped (capacity)
  const index_t* pair_row = nullptr;        //!< [T·width] row of pair p, or negative
  const index_t* row_pair = nullptr;        //!< [rows] pair of each row, negative for padding
  index_t rows = 0;                         //!< rows of the expert buffers
  index_t capacity = 0;                     //!< padded_capacity: rows per expert block
  const index_t* host_row_count = nullptr;  //!< sorted_grouped: host copy of row_count
  dispatch::dropped_output drop = dispatch::dropped_output::zero;  //!< dropped pairs' term
};

}  // namespace switchyard::cuda

// No using-directive for switchyard::cuda here (names both backends define would clash in
// switchyard::detail): names are qualified, helpers prefixed cuda_.
namespace switchyard::detail {

//! How the device runs a dispatch's experts.
enum class cuda_expert_layout {
  grouped_gemm,  //!< sorted_grouped: grouped GEMM over the real rows
  strided,       //!< padded_capacity: strided-batched over E blocks of C rows
  dense,         //!< dense: strided-batched over E blocks of all T rows
};

//! The dispatch policies the CUDA expert phase runs.
template <class D>
inline constexpr bool cuda_expert_dispatch =
    std::is_same_v<D, dispatch::sorted_grouped> || std::is_same_v<D, dispatch::padded_capacity> ||
    std::is_same_v<D, dispatch::dense>;

//! The layout of policy D.
template <class D>
inline constexpr cuda_expert_layout cuda_expert_layout_of =
    std::is_same_v<D, dispatch::sorted_grouped>    ? cuda_expert_layout::grouped_gemm
    : std::is_same_v<D, dispatch::padded_capacity> ? cuda_expert_layout::strided
                                                   : cuda_expert_layout::dense;

//! Rows of the expert buffers: R, the rows between expert blocks, and the rows of Xs.
struct cuda_expert_rows {
  index_t rows = 0;
  index_t block = 0;
  index_t x_rows = 0;
};

//! The rows the size query measures for (no data): the largest any plan of this size gives.
template <class D>
cuda_expert_rows cuda_expert_rows_bound(const D& policy, const cuda::expert_dims& dm) {
  constexpr cuda_expert_layout k = cuda_expert_layout_of<D>;
  if constexpr (k == cuda_expert_layout::grouped_gemm) {
    (void)policy;
    const index_t r = dm.tokens * dm.width;
    return {r, 0, r};
  } else if constexpr (k == cuda_expert_layout::strided) {
    const index_t c =
        dm.experts > 0 ? policy.capacity(dm.tokens, dm.tokens * dm.width, dm.experts) : 0;
    return {dm.experts * c, c, dm.experts * c};
  } else {
    (void)policy;
    return {dm.experts * dm.tokens, dm.tokens, dm.tokens};
  }
}

//! The rows this call computes and the rows between expert blocks, from the dispatch's
//! groups (carving only); throws unsupported_error when the groups break the bounds the
//! workspace was measured for (a dispatch bug, never user input).
template <class D>
cuda_expert_rows cuda_expert_rows_in_use(const cuda::expert_dims& dm,
                                         const cuda::expert_groups_ref& g,
                                         const cuda_expert_rows& bound) {
  constexpr cuda_expert_layout k = cuda_expert_layout_of<D>;
  cuda_expert_rows u = bound;
  if constexpr (k == cuda_expert_layout::grouped_gemm) {
    if (g.host_row_count == nullptr) {
      throw unsupported_error(
          "switchyard::cuda::experts: sorted_grouped needs the host copy of "
          "the row counts (device_groups::host_row_count)");
    }
    index_t n = 0;
    for (index_t e = 0; e < dm.experts; ++e) n += g.host_row_count[e];
    u.rows = n;
  } else if constexpr (k == cuda_expert_layout::strided) {
    u.block = g.capacity;
    u.rows = dm.experts * g.capacity;
  }
  if (u.rows < 0 || u.rows > bound.rows || u.block < 0) {
    throw unsupported_error(detail::concat("switchyard::cuda::experts: the dispatch's groups hold ",
                                           u.rows, " rows (blocks of ", u.block, "), past the ",
                                           bound.rows, " the workspace was measured for"));
  }
  return u;
}

//! The row -> expert map of layout K.
template <cuda_expert_layout K>
auto cuda_row_expert_of(const cuda::expert_groups_ref& g, const cuda::expert_dims& dm) {
  if constexpr (K == cuda_expert_layout::dense)
    return ops::dense_row_expert{dm.tokens};
  else
    return ops::grouped_row_expert{g.row_begin, g.row_count, dm.experts};
}

//! Each expert's real rows, as the bias gradients sum them.
template <cuda_expert_layout K>
auto cuda_expert_segments_of(const cuda::expert_groups_ref& g, const cuda::expert_dims& dm) {
  if constexpr (K == cuda_expert_layout::dense)
    return ops::dense_segments{dm.tokens, g.row_count};
  else
    return ops::grouped_segments{g.row_begin, g.row_count};
}

//! A row buffer as a GEMM operand (grouped: offset by the expert's first row).
template <class U>
cuda::group_operand cuda_rows_operand(const U* base, index_t ld) {
  return {reinterpret_cast<const std::byte*>(base), ld * static_cast<index_t>(sizeof(U)), true};
}

//! A per-expert tensor as a GEMM operand (offset by e · stride(0)).
template <class V>
cuda::group_operand cuda_expert_operand(const V& v) {
  using U = typename V::element_type;
  return {reinterpret_cast<const std::byte*>(v.data_handle()),
          v.stride(0) * static_cast<index_t>(sizeof(U)), false};
}

//! An expert-strided float buffer as a GEMM operand.
inline cuda::group_operand cuda_expert_operand(const float* base, index_t stride) {
  return {reinterpret_cast<const std::byte*>(base), stride * static_cast<index_t>(sizeof(float)),
          false};
}

//! The weights' part of the GEMM layout (the gradients' default: contiguous scratch).
template <ElementType T>
cuda::expert_gemm_layout cuda_gemm_layout(const cuda::expert_dims& dm, const expert_weights<T>& w) {
  cuda::expert_gemm_layout l;
  l.d = dm.d, l.d_ff = dm.d_ff, l.p = dm.p;
  l.ld_w1 = w.w1.stride(1), l.stride_w1 = w.w1.stride(0);
  l.ld_w2 = w.w2.stride(1), l.stride_w2 = w.w2.stride(0);
  l.ld_gw1 = dm.d, l.stride_gw1 = dm.p * dm.d;
  l.ld_gw2 = dm.d_ff, l.stride_gw2 = dm.d * dm.d_ff;
  return l;
}

//! Slots of the grouped GEMM's device pointer arrays for `gemms` GEMMs (none when the
//! executor runs grouped GEMMs of T one expert at a time).
template <class Exec, ElementType T>
index_t cuda_group_pointer_slots(cuda_expert_layout k, int gemms, index_t experts) {
  const bool native = Exec::template grouped_native<T>;
  return k == cuda_expert_layout::grouped_gemm && native ? 3 * gemms * experts : 0;
}

//! The grouped GEMM's host arguments (sorted_grouped only).
template <class Exec>
cuda::group_args<typename Exec::blas_op> cuda_take_group_args(cuda_expert_layout k,
                                                              workspace_arena& host_ws,
                                                              index_t experts) {
  if (k != cuda_expert_layout::grouped_gemm) return {};
  return cuda::group_args<typename Exec::blas_op>(host_ws, experts, Exec::op_none,
                                                  Exec::op_transpose);
}

}  // namespace switchyard::detail

namespace switchyard::cuda {

//! Runs the expert GEMMs of one forward or backward through `Exec`: strided-batched (E
//! problems of `rows.rows` rows) or grouped (one group per expert with rows; the groups from
//! the host copy of the counts). Grouped GEMMs run as one grouped call over device pointer
//! arrays written once for every GEMM when `Exec::grouped_native<T>` (cuBLAS's grouped GEMM
//! takes C of the input type only: float), else one GEMM per expert with rows, its
//! pointers computed on the host from the host counts (half, bfloat16: C stays float).
//!
//! `Exec` provides `blas_op` (the BLAS's op enum) with `op_none` / `op_transpose`,
//! `grouped_native<T>`, `gemm_strided<T>(blas_gemm, A, B, C, batch, what)`,
//! `gemm_single<T>(blas_gemm, A, B, C, what)`, `gemm_grouped<T>(grouped_call, A[], B[], C[],
//! what)` (A, B: cuBLAS's operands, already swapped) and
//! `build_group_pointers(table, row_begin, row_count, E, out)`.
template <class Exec, ElementType T>
class expert_gemm_runner {
 public:
  //! Whether grouped GEMMs of T run as one grouped call.
  static constexpr bool native = Exec::template grouped_native<T>;

  //! `args` / `pointers` ([3·GEMMs·E] slots, native only) only for grouped.
  expert_gemm_runner(const Exec& exec, bool grouped, const expert_gemm_rows& rows, index_t experts,
                     group_args<typename Exec::blas_op>* args, void** pointers)
      : exec_(exec),
        grouped_(grouped),
        rows_(rows),
        experts_(experts),
        args_(args),
        pointers_(pointers) {}

  //! Sets the GEMMs' operands; grouped: the groups from `g.host_row_count` and (native) the
  //! pointer arrays from the device `g.row_begin` / `g.row_count`.
  void prepare(const gemm_operand_table& table, const expert_groups_ref& g) {
    table_ = table;
    if (!grouped_) return;
    args_->reset(g.host_row_count, experts_);
    if (!native || args_->groups() == 0 || table.count == 0) return;
    exec_.build_group_pointers(table, g.row_begin, g.row_count, experts_, pointers_);
  }

  //! Runs GEMM `i` of the table; `describe(expert_gemm_rows)` gives its description.
  template <class Describe>
  void run(int i, const Describe& describe, const char* what) const {
    const gemm_operands& op = table_.gemm[i];
    if (!grouped_) {
      const blas_gemm b = to_column_major(describe(rows_), what);
      if (gemm_is_noop(b) || experts_ == 0) return;
      const auto ab = column_major_operands(static_cast<const void*>(op.a.base),
                                            static_cast<const void*>(op.b.base));
      exec_.template gemm_strided<T>(b, ab.a, ab.b, const_cast<std::byte*>(op.c.base), experts_,
                                     what);
      return;
    }
    if constexpr (!native) {
      const index_t* counts = args_->counts();
      const index_t* begin = args_->row_begin();
      for (index_t e = 0; e < args_->experts(); ++e) {
        if (counts[e] == 0) continue;
        const blas_gemm b = to_column_major(describe(expert_gemm_rows{counts[e], 0, 0}), what);
        if (gemm_is_noop(b)) continue;
        const auto ab = column_major_operands(static_cast<const void*>(op.a.at(e, begin)),
                                              static_cast<const void*>(op.b.at(e, begin)));
        exec_.template gemm_single<T>(b, ab.a, ab.b, const_cast<std::byte*>(op.c.at(e, begin)),
                                      what);
      }
    } else {
      const auto c = make_grouped_call(
          *args_,
          [&](index_t n) {
            return describe(expert_gemm_rows{n, 0, 0});
          },
          what);
      if (c.groups == 0) return;
      void** base = pointers_ + static_cast<index_t>(3 * i) * experts_;
      const auto ab = column_major_operands(const_cast<const void* const*>(base),
                                            const_cast<const void* const*>(base + experts_));
      exec_.template gemm_grouped<T>(c, ab.a, ab.b, base + 2 * experts_, what);
    }
  }

 private:
  const Exec& exec_;
  bool grouped_;
  expert_gemm_rows rows_;
  index_t experts_;
  group_args<typename Exec::blas_op>* args_;
  void** pointers_;
  gemm_operand_table table_{};
};

//! The forward of the expert phase through `exec` (`exec.launch(n, functor, name)` runs a
//! per-row functor; GEMMs as `expert_gemm_runner`): y [T, d] = Σ_j w_tj · FFN_{e_tj}(x_t)
//! (+ extra [T, d] float when non-null) rounded to `Out` (T, or float: expert parallelism's
//! receiver keeps its one-slot rows unrounded, backend/cuda/expert_parallel.cuh); `dropped`
//! [E] = g.dropped (when non-null). With a measuring `ws` it only takes (the size query) and
//! touches nothing.
template <class Exec, class D, class Act, ElementType T, class Id, class W, class Out>
void experts_forward_phase(const Exec& exec, const D& policy, const Act& act, const expert_dims& dm,
                           const matrix_view<const T>& x, const routing::plan_view<Id, W>& plan,
                           const expert_weights<T>& w, const expert_groups_ref& g,
                           const float* extra, const matrix_view<Out>& y, index_t* dropped,
                           workspace_arena& ws, workspace_arena& host_ws) {
  static_assert(detail::cuda_expert_dispatch<D>,
                "The CUDA backend runs the dispatch policies sorted_grouped, padded_capacity and "
                "dense.");
  using layout = detail::cuda_expert_layout;
  constexpr layout K = detail::cuda_expert_layout_of<D>;
  const index_t tokens = dm.tokens, width = dm.width, E = dm.experts, d = dm.d, f = dm.d_ff,
                p = dm.p;
  const detail::cuda_expert_rows bound = detail::cuda_expert_rows_bound(policy, dm);
  T* xs = ws.take<T>(bound.x_rows * d);        // [R, d] gathered rows (dense: [T, d])
  float* h = ws.take<float>(bound.rows * p);   // [R, P] H
  T* a = ws.take<T>(bound.rows * f);           // [R, d_ff] A
  float* ys = ws.take<float>(bound.rows * d);  // [R, d] Y
  float* pair_out = K == layout::dense ? ws.take<float>(tokens * width * d) : nullptr;
  void** pointers = ws.take<void*>(detail::cuda_group_pointer_slots<Exec, T>(K, 2, E));
  auto args = detail::cuda_take_group_args<Exec>(K, host_ws, E);
  if (!ws.carving()) return;

  const detail::cuda_expert_rows u = detail::cuda_expert_rows_in_use<D>(dm, g, bound);
  if (dropped != nullptr)
    exec.launch(E, ops::report_drops{g.dropped, dropped}, "switchyard::ops::report_drops");
  if constexpr (K == layout::dense)
    exec.launch(tokens * d, ops::load_as<T>{x, d, xs}, "switchyard::ops::load_as");
  else
    exec.launch(u.rows * d, ops::gather_as<T>{x, g.row_pair, width, d, xs},
                "switchyard::ops::gather_as");

  const expert_gemm_layout l = detail::cuda_gemm_layout(dm, w);
  expert_gemm_runner<Exec, T> gemm(exec, K == layout::grouped_gemm,
                                   {u.block, u.block, K == layout::dense ? 0 : u.block}, E, &args,
                                   pointers);
  gemm_operand_table table;
  table.count = 2;
  table.gemm[0] = {detail::cuda_rows_operand(xs, d), detail::cuda_expert_operand(w.w1),
                   detail::cuda_rows_operand(h, p)};
  table.gemm[1] = {detail::cuda_rows_operand(a, f), detail::cuda_expert_operand(w.w2),
                   detail::cuda_rows_operand(ys, d)};
  gemm.prepare(table, g);

  const auto rx = detail::cuda_row_expert_of<K>(g, dm);
  gemm.run(
      0, [&](const expert_gemm_rows& r) { return expert_gemm::up(l, r); },
      "switchyard::cuda::experts_forward: H = Xs·W1ᵀ");
  exec.launch(u.rows * f,
              ops::bias_activate<T, Act, decltype(rx)>{act, rx, h, p, w.b1, a, f, f, false},
              "switchyard::ops::bias_activate");
  gemm.run(
      1, [&](const expert_gemm_rows& r) { return expert_gemm::down(l, r); },
      "switchyard::cuda::experts_forward: Y = A·W2ᵀ");
  if (w.has_b2())
    exec.launch(u.rows * d, ops::add_expert_bias<T, decltype(rx)>{rx, w.b2, ys, d, d},
                "switchyard::ops::add_expert_bias");

  const float* rows = ys;
  if constexpr (K == layout::dense) {
    // Per element (coalesced): bitwise keep_dense_slots_all (one thread per row over d).
    exec.launch(E * tokens * d,
                ops::keep_dense_slot_elements<Id>{
                    {plan.expert_ids, plan.counts, 0, width, d, ys, pair_out}, tokens},
                "switchyard::ops::keep_dense_slot_elements");
    rows = pair_out;
  }
  if constexpr (std::is_same_v<Out, T>) {
    exec.launch(
        tokens * d,
        ops::combine_slot_elements<T, Id, W>{
            {plan.weights, plan.counts, g.pair_row, width, d, rows, x,
             g.drop == dispatch::dropped_output::scaled_input, extra, y}},
        "switchyard::ops::combine_slot_elements");
  } else {  // float rows (one thread per token: the same sums, bitwise)
    exec.launch(tokens,
                ops::combine_slots<T, Id, W, Out>{plan.weights, plan.counts, g.pair_row, width, d,
                                                  rows, x,
                                                  g.drop == dispatch::dropped_output::scaled_input,
                                                  extra, y},
                "switchyard::ops::combine_slots");
  }
}

//! The backward of the expert phase through `exec` (recomputing the forward): dx [T, d] +=
//! (when present), grads += (present views), d_weights [T·width] = the combine weights'
//! cotangent, written for every used pair. No floating-point atomics. Same arenas and
//! measuring behaviour as experts_forward_phase.
template <class Exec, class D, class Act, ElementType T, class Id, class W>
void experts_backward_phase(const Exec& exec, const D& policy, const Act& act,
                            const expert_dims& dm, const matrix_view<const T>& x,
                            const routing::plan_view<Id, W>& plan, const expert_weights<T>& w,
                            const expert_groups_ref& g, const matrix_view<const T>& dy,
                            const matrix_view<float>& dx, const expert_grads& grads,
                            float* d_weights, workspace_arena& ws, workspace_arena& host_ws) {
  static_assert(detail::cuda_expert_dispatch<D>,
                "The CUDA backend runs the dispatch policies sorted_grouped, padded_capacity and "
                "dense.");
  using layout = detail::cuda_expert_layout;
  constexpr layout K = detail::cuda_expert_layout_of<D>;
  constexpr bool dense = K == layout::dense;
  const index_t tokens = dm.tokens, width = dm.width, E = dm.experts, d = dm.d, f = dm.d_ff,
                p = dm.p;
  const detail::cuda_expert_rows bound = detail::cuda_expert_rows_bound(policy, dm);
  const index_t R = bound.rows;
  T* xs = ws.take<T>(bound.x_rows * d);  // [R, d] gathered rows (dense: [T, d])
  float* h = ws.take<float>(R * p);      // [R, P] H (biased), then dH
  T* a = ws.take<T>(R * f);              // [R, d_ff] A
  float* ys = ws.take<float>(R * d);     // [R, d] Y, then dXs
  float* dys = ws.take<float>(R * d);    // [R, d] dY
  T* dys_t = ws.take<T>(R * d);          // [R, d] dY as T
  float* da = ws.take<float>(R * f);     // [R, d_ff] dA
  T* dh_t = ws.take<T>(R * p);           // [R, P] dH as T
  float* pair_dx = dense ? ws.take<float>(tokens * width * d) : nullptr;  // [T·width, d]
  // Dense: every expert's weight gradients [E, P, d] / [E, d, d_ff] before the used ones are
  // added (always reserved: the size query does not see the gradient views).
  float* gw1_part = dense ? ws.take<float>(E * p * d) : nullptr;
  float* gw2_part = dense ? ws.take<float>(E * d * f) : nullptr;
  void** pointers = ws.take<void*>(detail::cuda_group_pointer_slots<Exec, T>(K, 6, E));
  auto args = detail::cuda_take_group_args<Exec>(K, host_ws, E);
  if (!ws.carving()) return;

  const detail::cuda_expert_rows u = detail::cuda_expert_rows_in_use<D>(dm, g, bound);
  const bool has_gw1 = detail::present(grads.w1), has_gw2 = detail::present(grads.w2);
  const bool has_dx = detail::present(dx);

  if constexpr (dense)
    exec.launch(tokens * d, ops::load_as<T>{x, d, xs}, "switchyard::ops::load_as");
  else
    exec.launch(u.rows * d, ops::gather_as<T>{x, g.row_pair, width, d, xs},
                "switchyard::ops::gather_as");

  expert_gemm_layout l = detail::cuda_gemm_layout(dm, w);
  const float* gw1_base = gw1_part;
  const float* gw2_base = gw2_part;
  if (!dense && has_gw1) {
    l.ld_gw1 = grads.w1.stride(1), l.stride_gw1 = grads.w1.stride(0);
    gw1_base = grads.w1.data_handle();
  }
  if (!dense && has_gw2) {
    l.ld_gw2 = grads.w2.stride(1), l.stride_gw2 = grads.w2.stride(0);
    gw2_base = grads.w2.data_handle();
  }
  expert_gemm_runner<Exec, T> gemm(exec, K == layout::grouped_gemm,
                                   {u.block, u.block, dense ? 0 : u.block}, E, &args, pointers);
  gemm_operand_table table;
  table.count = 6;
  table.gemm[0] = {detail::cuda_rows_operand(xs, d), detail::cuda_expert_operand(w.w1),
                   detail::cuda_rows_operand(h, p)};
  table.gemm[1] = {detail::cuda_rows_operand(a, f), detail::cuda_expert_operand(w.w2),
                   detail::cuda_rows_operand(ys, d)};
  table.gemm[2] = {detail::cuda_rows_operand(dys_t, d), detail::cuda_expert_operand(w.w2),
                   detail::cuda_rows_operand(da, f)};
  table.gemm[3] = {detail::cuda_rows_operand(dys_t, d), detail::cuda_rows_operand(a, f),
                   detail::cuda_expert_operand(gw2_base, l.stride_gw2)};
  table.gemm[4] = {detail::cuda_rows_operand(dh_t, p), detail::cuda_rows_operand(xs, d),
                   detail::cuda_expert_operand(gw1_base, l.stride_gw1)};
  table.gemm[5] = {detail::cuda_rows_operand(dh_t, p), detail::cuda_expert_operand(w.w1),
                   detail::cuda_rows_operand(ys, d)};
  gemm.prepare(table, g);

  // Recompute: Xs -> H (biased, kept) -> A -> Y.
  const auto rx = detail::cuda_row_expert_of<K>(g, dm);
  gemm.run(
      0, [&](const expert_gemm_rows& r) { return expert_gemm::up(l, r); },
      "switchyard::cuda::experts_backward: H = Xs·W1ᵀ");
  exec.launch(u.rows * f,
              ops::bias_activate<T, Act, decltype(rx)>{act, rx, h, p, w.b1, a, f, f, true},
              "switchyard::ops::bias_activate");
  gemm.run(
      1, [&](const expert_gemm_rows& r) { return expert_gemm::down(l, r); },
      "switchyard::cuda::experts_backward: Y = A·W2ᵀ");
  if (w.has_b2())
    exec.launch(u.rows * d, ops::add_expert_bias<T, decltype(rx)>{rx, w.b2, ys, d, d},
                "switchyard::ops::add_expert_bias");

  // dY rows (w_tj · dy_t, float and T) and d_weights of every used pair.
  if constexpr (dense) {
    // Per element (coalesced), then the per-row d_weights dots (reading ys only): bitwise
    // dense_dy_rows_as (one thread per row over d columns, like grouped_dy_rows_as below).
    const ops::dense_dy_rows<T, Id, W> dy_rows{plan.expert_ids, plan.weights, plan.counts, 0,
                                               tokens, width, d, dy, ys, dys, d_weights};
    exec.launch(E * tokens * d, ops::dense_dy_elements<T, Id, W>{dy_rows, dys_t},
                "switchyard::ops::dense_dy_elements");
    exec.launch(E * tokens, ops::dense_dy_weights<T, Id, W>{dy_rows},
                "switchyard::ops::dense_dy_weights");
  } else {
    // Per element (coalesced), then the per-row d_weights dots (reading ys only): bitwise
    // grouped_dy_rows_as, whose one thread per row over d columns took 1.1 ms at T = 4096,
    // d = 1024, k = 2 on an H200.
    const ops::grouped_dy_rows<T, W> dy_rows{plan.weights, g.row_pair, width, d,
                                             dy,           ys,         dys,   d_weights};
    exec.launch(u.rows * d, ops::grouped_dy_elements<T, W>{dy_rows, dys_t},
                "switchyard::ops::grouped_dy_elements");
    exec.launch(u.rows, ops::grouped_dy_weights<T, W>{dy_rows},
                "switchyard::ops::grouped_dy_weights");
  }
  const auto segments = detail::cuda_expert_segments_of<K>(g, dm);
  if (detail::present(grads.b2))
    exec.launch(E * d, ops::bias_grad_segments<decltype(segments)>{segments, dys, d, d, grads.b2},
                "switchyard::ops::bias_grad_segments");

  // dA = dY·W2; grads.w2 += dYᵀ·A.
  gemm.run(
      2, [&](const expert_gemm_rows& r) { return expert_gemm::d_act(l, r); },
      "switchyard::cuda::experts_backward: dA = dY·W2");
  if (has_gw2) {
    gemm.run(
        3, [&](const expert_gemm_rows& r) { return expert_gemm::grad_w2(l, r, !dense); },
        "switchyard::cuda::experts_backward: dW2 += dYᵀ·A");
    if constexpr (dense)
      exec.launch(E * d * f, ops::add_used_expert_grads{gw2_part, g.row_count, grads.w2},
                  "switchyard::ops::add_used_expert_grads");
  }

  // dH = act'(H) ⊙ dA (over H; padding rows 0); grads.b1; grads.w1 += dHᵀ·Xs.
  exec.launch(u.rows * f,
              ops::activate_backward_as<T, Act, decltype(rx)>{act, rx, h, p, da, f, f, dh_t},
              "switchyard::ops::activate_backward_as");
  if (detail::present(grads.b1))
    exec.launch(E * p, ops::bias_grad_segments<decltype(segments)>{segments, h, p, p, grads.b1},
                "switchyard::ops::bias_grad_segments");
  if (has_gw1) {
    gemm.run(
        4, [&](const expert_gemm_rows& r) { return expert_gemm::grad_w1(l, r, !dense); },
        "switchyard::cuda::experts_backward: dW1 += dHᵀ·Xs");
    if constexpr (dense)
      exec.launch(E * p * d, ops::add_used_expert_grads{gw1_part, g.row_count, grads.w1},
                  "switchyard::ops::add_used_expert_grads");
  }

  // dXs = dH·W1 (over Y), then each token sums its slots' rows in slot order.
  const float* dx_rows = ys;
  if (has_dx) {
    gemm.run(
        5, [&](const expert_gemm_rows& r) { return expert_gemm::d_x(l, r); },
        "switchyard::cuda::experts_backward: dXs = dH·W1");
    if constexpr (dense) {
      exec.launch(E * tokens * d,
                  ops::keep_dense_slot_elements<Id>{
                      {plan.expert_ids, plan.counts, 0, width, d, ys, pair_dx}, tokens},
                  "switchyard::ops::keep_dense_slot_elements");
      dx_rows = pair_dx;
    }
  }
  const ops::combine_backward_slots<T, Id, W> back{
      plan.weights, plan.counts, g.pair_row, width, d, dx_rows, x, dy,
      g.drop == dispatch::dropped_output::scaled_input, d_weights, dx, has_dx};
  if (back.pass_through)
    exec.launch(tokens, ops::combine_backward_pass_weights<T, Id, W>{back},
                "switchyard::ops::combine_backward_pass_weights");
  if (has_dx)
    exec.launch(tokens * d, ops::combine_backward_elements<T, Id, W>{back},
                "switchyard::ops::combine_backward_elements");
}

}  // namespace switchyard::cuda
