// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file gemm.hpp
//! The expert phase's GEMMs as descriptions, with no CUDA header (g++ compiles this file, and
//! the host tests check every description against a naive reference).
//!
//! Each GEMM is first written as what it means on row-major buffers, a `gemm_desc`:
//!
//!     C[M, N] (ldc) = alpha · op(A)[M, K] · op(B)[K, N] + beta · C,   batched with strides,
//!
//! and mapped to cuBLAS's column-major arguments in ONE function, `to_column_major`: a
//! row-major matrix with leading dimension ld is the column-major matrix of its transpose with
//! the same ld, so Cᵀ[N, M] = op(B)ᵀ · op(A)ᵀ — cuBLAS's A is the intent's B and cuBLAS's B
//! the intent's A (`column_major_operands`), transa = op_b, transb = op_a, (m, n, k) =
//! (N, M, K), lda = ldb_intent, ldb = lda_intent.
//!
//! `expert_gemm` names every GEMM the forward and backward make (row layout in experts.cuh):
//!
//!     up      H   [n, P]    = Xs [n, d] · W1ᵀ          (W1 [P, d])
//!     down    Y   [n, d]    = A  [n, d_ff] · W2ᵀ       (W2 [d, d_ff])
//!     d_act   dA  [n, d_ff] = dY [n, d] · W2
//!     grad_w2 gW2 [d, d_ff] += dYᵀ · A                 (K = n)
//!     grad_w1 gW1 [P, d]    += dHᵀ · Xs                (K = n)
//!     d_x     dXs [n, d]    = dH [n, P] · W1
//!
//! For the grouped GEMM the batch strides are unused (each problem's pointers come from
//! `group_operand`); `group_args` holds the grouped GEMM's host argument arrays, shared by
//! content so the whole backward fits `host_workspace_size(E)`, and the host copy of the
//! groups' rows and first rows (the per-expert fallback's pointers).

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string_view>

#include "switchyard/core/config.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/span.hpp"
#include "switchyard/core/workspace.hpp"

namespace switchyard::detail {
//! A GEMM dimension as cuBLAS's int; range_error naming the GEMM otherwise.
inline int cuda_blas_dim(std::string_view what, std::string_view field, index_t v) {
  if (v < 0 || v > std::numeric_limits<int>::max()) {
    throw range_error(std::string(what),
                      detail::concat(what, ": GEMM ", field, " must be in [0, 2^31), got ", v));
  }
  return static_cast<int>(v);
}
//! Throws shape_error unless a leading dimension covers the stored row (and is >= 1).
inline void cuda_require_ld(std::string_view what, std::string_view field, index_t ld,
                            index_t cols) {
  if (ld < std::max<index_t>(cols, 1)) {
    throw shape_error(std::string(what),
                      detail::concat(what, ": GEMM ", field, " = ", ld,
                                     " is below the stored row length ", cols, " (or 1)"));
  }
}
}  // namespace switchyard::detail

namespace switchyard::cuda {

//! op(X) of a GEMM operand.
enum class gemm_op {
  none,       //!< op(X) = X
  transpose,  //!< op(X) = Xᵀ
};

//! One (batched) GEMM over row-major buffers (file comment). Element strides between the
//! problems of a batch: 0 reads the same operand for every problem.
struct gemm_desc {
  gemm_op op_a = gemm_op::none;  //!< op of the left operand
  gemm_op op_b = gemm_op::none;  //!< op of the right operand
  index_t m = 0;                 //!< rows of C
  index_t n = 0;                 //!< columns of C
  index_t k = 0;                 //!< the summed extent
  index_t lda = 0;               //!< row stride of A as stored
  index_t ldb = 0;               //!< row stride of B as stored
  index_t ldc = 0;               //!< row stride of C
  index_t stride_a = 0;          //!< elements between the batch's A operands
  index_t stride_b = 0;          //!< elements between the batch's B operands
  index_t stride_c = 0;          //!< elements between the batch's C operands
  float alpha = 1.0f;            //!< scale of the product
  float beta = 0.0f;             //!< scale of C (1: accumulate)

  //! Columns of A as stored (row-major): K for op none, M for transpose.
  [[nodiscard]] constexpr index_t a_cols() const { return op_a == gemm_op::none ? k : m; }
  //! Rows of A as stored.
  [[nodiscard]] constexpr index_t a_rows() const { return op_a == gemm_op::none ? m : k; }
  //! Columns of B as stored: N for op none, K for transpose.
  [[nodiscard]] constexpr index_t b_cols() const { return op_b == gemm_op::none ? n : k; }
  //! Rows of B as stored.
  [[nodiscard]] constexpr index_t b_rows() const { return op_b == gemm_op::none ? k : n; }
};

//! A GEMM as cuBLAS's column-major arguments (cuBLAS's A = the intent's B, see
//! `column_major_operands`).
struct blas_gemm {
  gemm_op trans_a = gemm_op::none;  //!< cuBLAS transa
  gemm_op trans_b = gemm_op::none;  //!< cuBLAS transb
  int m = 0;                        //!< cuBLAS m (rows of its column-major C)
  int n = 0;                        //!< cuBLAS n
  int k = 0;                        //!< cuBLAS k
  int lda = 0;                      //!< leading dimension of cuBLAS's A
  int ldb = 0;                      //!< leading dimension of cuBLAS's B
  int ldc = 0;                      //!< leading dimension of C
  long long stride_a = 0;           //!< batch stride of cuBLAS's A (elements)
  long long stride_b = 0;           //!< batch stride of cuBLAS's B
  long long stride_c = 0;           //!< batch stride of C
  float alpha = 1.0f;               //!< scale of the product
  float beta = 0.0f;                //!< scale of C
};

//! cuBLAS's (A, B) operands for the intent's (a, b): swapped.
template <class P>
struct blas_operand_pair {
  P a;  //!< cuBLAS's A (the intent's B)
  P b;  //!< cuBLAS's B (the intent's A)
};

//! The one place the operand order is decided: cuBLAS's A is the intent's B.
template <class P>
constexpr blas_operand_pair<P> column_major_operands(P intent_a, P intent_b) {
  return {intent_b, intent_a};
}

//! Validates `g` (extents >= 0, leading dimensions >= the stored row lengths, 32-bit
//! dimensions; `what` names the GEMM in errors) and maps it to cuBLAS's column-major call:
//! Cᵀ[N, M] = op(B)ᵀ[N, K] · op(A)ᵀ[K, M].
inline blas_gemm to_column_major(const gemm_desc& g, std::string_view what) {
  detail::cuda_require_ld(what, "lda", g.lda, g.a_cols());
  detail::cuda_require_ld(what, "ldb", g.ldb, g.b_cols());
  detail::cuda_require_ld(what, "ldc", g.ldc, g.n);
  blas_gemm b;
  b.trans_a = g.op_b;
  b.trans_b = g.op_a;
  b.m = detail::cuda_blas_dim(what, "n", g.n);
  b.n = detail::cuda_blas_dim(what, "m", g.m);
  b.k = detail::cuda_blas_dim(what, "k", g.k);
  b.lda = detail::cuda_blas_dim(what, "ldb", g.ldb);
  b.ldb = detail::cuda_blas_dim(what, "lda", g.lda);
  b.ldc = detail::cuda_blas_dim(what, "ldc", g.ldc);
  b.stride_a = g.stride_b;
  b.stride_b = g.stride_a;
  b.stride_c = g.stride_c;
  b.alpha = g.alpha;
  b.beta = g.beta;
  return b;
}

//! Whether the call computes nothing (an empty C, or K = 0 with C kept as it is).
constexpr bool gemm_is_noop(const blas_gemm& b) {
  return b.m == 0 || b.n == 0 || (b.k == 0 && b.beta == 1.0f);
}

//! Sizes and layouts of the expert weights and weight-gradient buffers (elements).
struct expert_gemm_layout {
  index_t d = 0;           //!< model width
  index_t d_ff = 0;        //!< expert hidden width
  index_t p = 0;           //!< first-projection width (d_ff or 2·d_ff)
  index_t ld_w1 = 0;       //!< w1.stride(1)
  index_t stride_w1 = 0;   //!< w1.stride(0)
  index_t ld_w2 = 0;       //!< w2.stride(1)
  index_t stride_w2 = 0;   //!< w2.stride(0)
  index_t ld_gw1 = 0;      //!< row stride of the w1 gradient written (grads or scratch)
  index_t stride_gw1 = 0;  //!< its expert stride
  index_t ld_gw2 = 0;      //!< row stride of the w2 gradient written
  index_t stride_gw2 = 0;  //!< its expert stride
};

//! The rows of one problem and how far apart the batch's row buffers lie (in rows).
struct expert_gemm_rows {
  index_t rows = 0;     //!< n: rows of one expert's problem
  index_t block = 0;    //!< rows between experts in the row buffers (H, A, Y, dY, dH, dXs)
  index_t x_block = 0;  //!< rows between experts in Xs (0: every expert reads the same rows)
};

//! The expert phase's GEMMs (file comment), row-major intents.
namespace expert_gemm {

//! H [n, P] = Xs [n, d] · W1ᵀ.
constexpr gemm_desc up(const expert_gemm_layout& l, const expert_gemm_rows& r) {
  gemm_desc g;
  g.op_a = gemm_op::none;
  g.op_b = gemm_op::transpose;
  g.m = r.rows, g.n = l.p, g.k = l.d;
  g.lda = l.d, g.ldb = l.ld_w1, g.ldc = l.p;
  g.stride_a = r.x_block * l.d, g.stride_b = l.stride_w1, g.stride_c = r.block * l.p;
  return g;
}

//! Y [n, d] = A [n, d_ff] · W2ᵀ.
constexpr gemm_desc down(const expert_gemm_layout& l, const expert_gemm_rows& r) {
  gemm_desc g;
  g.op_a = gemm_op::none;
  g.op_b = gemm_op::transpose;
  g.m = r.rows, g.n = l.d, g.k = l.d_ff;
  g.lda = l.d_ff, g.ldb = l.ld_w2, g.ldc = l.d;
  g.stride_a = r.block * l.d_ff, g.stride_b = l.stride_w2, g.stride_c = r.block * l.d;
  return g;
}

//! dA [n, d_ff] = dY [n, d] · W2.
constexpr gemm_desc d_act(const expert_gemm_layout& l, const expert_gemm_rows& r) {
  gemm_desc g;
  g.op_a = gemm_op::none;
  g.op_b = gemm_op::none;
  g.m = r.rows, g.n = l.d_ff, g.k = l.d;
  g.lda = l.d, g.ldb = l.ld_w2, g.ldc = l.d_ff;
  g.stride_a = r.block * l.d, g.stride_b = l.stride_w2, g.stride_c = r.block * l.d_ff;
  return g;
}

//! gW2 [d, d_ff] (+)= dYᵀ · A over the n rows (accumulate: beta = 1).
constexpr gemm_desc grad_w2(const expert_gemm_layout& l, const expert_gemm_rows& r,
                            bool accumulate) {
  gemm_desc g;
  g.op_a = gemm_op::transpose;
  g.op_b = gemm_op::none;
  g.m = l.d, g.n = l.d_ff, g.k = r.rows;
  g.lda = l.d, g.ldb = l.d_ff, g.ldc = l.ld_gw2;
  g.stride_a = r.block * l.d, g.stride_b = r.block * l.d_ff, g.stride_c = l.stride_gw2;
  g.beta = accumulate ? 1.0f : 0.0f;
  return g;
}

//! gW1 [P, d] (+)= dHᵀ · Xs over the n rows.
constexpr gemm_desc grad_w1(const expert_gemm_layout& l, const expert_gemm_rows& r,
                            bool accumulate) {
  gemm_desc g;
  g.op_a = gemm_op::transpose;
  g.op_b = gemm_op::none;
  g.m = l.p, g.n = l.d, g.k = r.rows;
  g.lda = l.p, g.ldb = l.d, g.ldc = l.ld_gw1;
  g.stride_a = r.block * l.p, g.stride_b = r.x_block * l.d, g.stride_c = l.stride_gw1;
  g.beta = accumulate ? 1.0f : 0.0f;
  return g;
}

//! dXs [n, d] = dH [n, P] · W1.
constexpr gemm_desc d_x(const expert_gemm_layout& l, const expert_gemm_rows& r) {
  gemm_desc g;
  g.op_a = gemm_op::none;
  g.op_b = gemm_op::none;
  g.m = r.rows, g.n = l.d, g.k = l.p;
  g.lda = l.p, g.ldb = l.ld_w1, g.ldc = l.d;
  g.stride_a = r.block * l.p, g.stride_b = l.stride_w1, g.stride_c = r.block * l.d;
  return g;
}

}  // namespace expert_gemm

//! Where one grouped-GEMM operand of expert e starts: `base + (by_row ? row_begin[e] : e) ·
//! stride_bytes` — an expert's first row in a row buffer (stride = ld · element size) or its
//! slice of a weight tensor (stride = stride(0) · element size). 64-bit offsets.
struct group_operand {
  const std::byte* base = nullptr;  //!< buffer or tensor start
  index_t stride_bytes = 0;         //!< bytes per row (by_row) or per expert
  bool by_row = false;              //!< offset by the expert's first row, else by e

  //! Byte offset of expert e's operand (64-bit).
  SWITCHYARD_HD index_t offset(index_t e, const index_t* row_begin) const {
    return (by_row ? row_begin[e] : e) * stride_bytes;
  }
  //! The operand's address for expert e.
  SWITCHYARD_HD const std::byte* at(index_t e, const index_t* row_begin) const {
    return base + offset(e, row_begin);
  }
};

//! The three operands of one GEMM (the intent's A, B and C) as grouped-GEMM operands; the
//! strided path uses their bases (its strides come from the description).
struct gemm_operands {
  group_operand a;  //!< left operand
  group_operand b;  //!< right operand
  group_operand c;  //!< float output
};

//! The operands of every GEMM of one forward (2) or backward (6); passed by value to the
//! device kernel that writes the grouped GEMM's pointer arrays.
struct gemm_operand_table {
  //! GEMMs a table holds at most (the backward's six).
  static constexpr int max_gemms = 6;
  gemm_operands gemm[max_gemms];  //!< per GEMM
  int count = 0;                  //!< GEMMs used

  //! Writes group g's (= expert e's) three operand addresses of every GEMM into `out`
  //! [3·count, experts]: row (3·i + o) holds operand o of GEMM i.
  SWITCHYARD_HD void write(void** out, index_t experts, index_t g, index_t e,
                           const index_t* row_begin) const {
    for (int i = 0; i < count; ++i) {
      const gemm_operands& op = gemm[i];
      out[(3 * i + 0) * experts + g] = const_cast<std::byte*>(op.a.at(e, row_begin));
      out[(3 * i + 1) * experts + g] = const_cast<std::byte*>(op.b.at(e, row_begin));
      out[(3 * i + 2) * experts + g] = const_cast<std::byte*>(op.c.at(e, row_begin));
    }
  }
};

//! The grouped GEMM's host argument arrays (one entry per group), carved from the host
//! workspace and shared by content: an array is filled once and reused by every later GEMM
//! of the same call asking for the same values (the per-expert row counts, d, P, 1, ...),
//! and never written again, so cuBLAS may read it whenever it likes during the call. `Op` is
//! the BLAS's operation enum (cublasOperation_t; any enum in tests).
template <class Op>
class group_args {
 public:
  //! Int arrays one call may need (m, n, k, ld of up to six GEMMs share at most 9 values).
  static constexpr int int_slots = 12;
  //! Float arrays (alpha 1, beta 0, beta 1).
  static constexpr int float_slots = 3;

  group_args() = default;
  //! Carves the arrays for up to `max_groups` groups from `host_ws` (measures when it
  //! measures). `none`/`transpose`: the BLAS's values of the two ops.
  group_args(workspace_arena& host_ws, index_t max_groups, Op none, Op transpose)
      : max_(max_groups), none_(none), transpose_(transpose) {
    for (auto& s : ints_) s = host_ws.take<int>(max_groups);
    for (auto& s : floats_) s = host_ws.take<float>(max_groups);
    ops_[0] = host_ws.take<Op>(max_groups);
    ops_[1] = host_ws.take<Op>(max_groups);
    rows_ = host_ws.take<index_t>(max_groups);
    begin_ = host_ws.take<index_t>(max_groups);
    scratch_ = host_ws.take<int>(max_groups);
  }

  //! Makes one group per expert with rows (`counts` [experts], host memory, in expert order:
  //! the order the device's pointer arrays use), their first rows (the exclusive scan of
  //! the counts, as the sorted layout places them) and forgets every array's contents.
  void reset(const index_t* counts, index_t experts) {
    if (experts < 0 || experts > max_) {
      throw range_error("experts",
                        detail::concat("experts: expected [0, ", max_, "], got ", experts));
    }
    groups_ = 0;
    index_t run = 0;
    for (index_t e = 0; e < experts; ++e) {
      begin_[e] = run;
      run += counts[e];
      if (counts[e] > 0) rows_[groups_++] = counts[e];
    }
    counts_ = counts;
    experts_ = experts;
    used_ints_ = used_floats_ = 0;
    ops_filled_[0] = ops_filled_[1] = false;
  }
  //! Experts of the last reset.
  [[nodiscard]] index_t experts() const { return experts_; }
  //! Host row counts of the last reset [experts].
  [[nodiscard]] const index_t* counts() const { return counts_; }
  //! Host first rows of the last reset [experts] (exclusive scan of the counts).
  [[nodiscard]] const index_t* row_begin() const { return begin_; }
  //! Groups of the current GEMMs (experts with rows).
  [[nodiscard]] index_t groups() const { return groups_; }
  //! Rows of each group [groups].
  [[nodiscard]] const index_t* rows() const { return rows_; }
  //! [max_groups] ints to build an array in before `ints` looks it up.
  [[nodiscard]] int* scratch() const { return scratch_; }

  //! An array holding `values[0, groups)`: an equal one already filled, else a new slot.
  const int* ints(const int* values) {
    const auto bytes = static_cast<std::size_t>(groups_) * sizeof(int);
    for (int s = 0; s < used_ints_; ++s)
      if (std::memcmp(ints_[s], values, bytes) == 0) return ints_[s];
    if (used_ints_ == int_slots) {
      throw unsupported_error(
          "switchyard::cuda::group_args: more distinct argument arrays than "
          "its slots (a bug of the expert phase)");
    }
    int* s = ints_[used_ints_++];
    if (bytes != 0) std::memcpy(s, values, bytes);
    return s;
  }
  //! An array holding `value` in every group.
  const float* floats(float value) {
    for (int s = 0; s < used_floats_; ++s)
      if (groups_ == 0 || floats_[s][0] == value) return floats_[s];
    if (used_floats_ == float_slots) {
      throw unsupported_error(
          "switchyard::cuda::group_args: more distinct scalars than its "
          "slots (a bug of the expert phase)");
    }
    float* s = floats_[used_floats_++];
    std::fill(s, s + groups_, value);
    return s;
  }
  //! An array holding `op` (as the BLAS's enum) in every group.
  const Op* ops(gemm_op op) {
    const int i = op == gemm_op::none ? 0 : 1;
    if (!ops_filled_[i]) {
      std::fill(ops_[i], ops_[i] + groups_, i == 0 ? none_ : transpose_);
      ops_filled_[i] = true;
    }
    return ops_[i];
  }

 private:
  index_t max_ = 0, groups_ = 0;
  Op none_{}, transpose_{};
  int* ints_[int_slots] = {};
  float* floats_[float_slots] = {};
  Op* ops_[2] = {};
  index_t* rows_ = nullptr;
  index_t* begin_ = nullptr;
  const index_t* counts_ = nullptr;
  index_t experts_ = 0;
  int* scratch_ = nullptr;
  int used_ints_ = 0, used_floats_ = 0;
  bool ops_filled_[2] = {false, false};
};

//! The host arrays of one grouped GEMM: per group (expert with rows), its `blas_gemm` fields.
template <class Op>
struct grouped_call {
  const Op* trans_a = nullptr;      //!< [groups]
  const Op* trans_b = nullptr;      //!< [groups]
  const int* m = nullptr;           //!< [groups]
  const int* n = nullptr;           //!< [groups]
  const int* k = nullptr;           //!< [groups]
  const int* lda = nullptr;         //!< [groups]
  const int* ldb = nullptr;         //!< [groups]
  const int* ldc = nullptr;         //!< [groups]
  const float* alpha = nullptr;     //!< [groups]
  const float* beta = nullptr;      //!< [groups]
  const int* group_size = nullptr;  //!< [groups], all 1
  int groups = 0;                   //!< group count
};

//! Fills the grouped call of the GEMM `describe(n_g)` over the current groups of `args` (n_g:
//! group g's rows; the row-dependent fields vary per group, the rest are shared). Throws like
//! `to_column_major`.
template <class Op, class Describe>
grouped_call<Op> make_grouped_call(group_args<Op>& args, const Describe& describe,
                                   std::string_view what) {
  grouped_call<Op> c;
  const index_t groups = args.groups();
  const index_t* rows = args.rows();
  int* scratch = args.scratch();
  c.groups = static_cast<int>(groups);
  if (groups == 0) return c;
  const blas_gemm first = to_column_major(describe(rows[0]), what);
  c.trans_a = args.ops(first.trans_a);
  c.trans_b = args.ops(first.trans_b);
  c.alpha = args.floats(first.alpha);
  c.beta = args.floats(first.beta);
  auto field = [&](int blas_gemm::*member) {
    for (index_t i = 0; i < groups; ++i)
      scratch[i] = to_column_major(describe(rows[i]), what).*member;
    return args.ints(scratch);
  };
  c.m = field(&blas_gemm::m);
  c.n = field(&blas_gemm::n);
  c.k = field(&blas_gemm::k);
  c.lda = field(&blas_gemm::lda);
  c.ldb = field(&blas_gemm::ldb);
  c.ldc = field(&blas_gemm::ldc);
  for (index_t i = 0; i < groups; ++i) scratch[i] = 1;
  c.group_size = args.ints(scratch);
  return c;
}

}  // namespace switchyard::cuda
