#pragma once
//! \file expert_gemm.cuh
//! The expert phase's GEMMs on cuBLAS: the descriptions of gemm.hpp mapped by
//! `to_column_major` and run as `cublasGemmStridedBatchedEx` (padded_capacity, dense: one
//! problem per expert, equal sizes) or `cublasGemmGroupedBatchedEx` (sorted_grouped: one
//! group per expert with rows, group_size 1, sizes from the host copy of the row counts).
//! A/B of the storage type (CUDA_R_32F, CUDA_R_16F, CUDA_R_16BF), C float, CUBLAS_COMPUTE_32F.
//!
//! The grouped GEMM's A/B/C pointer arrays live in device memory: one small single-block
//! kernel (`kernels::build_group_pointers`) compacts the experts with rows in expert order
//! (a block scan over the device row counts) and writes every operand's address from the
//! device `row_begin` and the base pointers, for all GEMMs of a forward or backward at once.

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cub/block/block_scan.cuh>

#include <cstddef>
#include <type_traits>

#include "switchyard/backend/cuda/error.hpp"
#include "switchyard/backend/cuda/gemm.hpp"
#include "switchyard/core/config.hpp"
#include "switchyard/core/element_type.hpp"

namespace switchyard::cuda {

//! Tuning values of the expert phase's own kernels (tuning.hpp holds the shared ones).
namespace expert_tuning {
//! Threads of the single block that builds the grouped GEMMs' pointer arrays.
inline constexpr int group_pointer_block = 256;
//! Operands (3 per GEMM) one pointer-building launch writes: the backward's six GEMMs.
inline constexpr int max_group_operands = 18;
}  // namespace expert_tuning

//! cuBLAS's data type of a storage element type.
template <ElementType T>
inline constexpr cudaDataType_t blas_type = std::is_same_v<T, float>  ? CUDA_R_32F
                                            : std::is_same_v<T, half> ? CUDA_R_16F
                                                                      : CUDA_R_16BF;

//! cuBLAS's operation of a gemm_op.
constexpr cublasOperation_t blas_op(gemm_op o) {
  return o == gemm_op::none ? CUBLAS_OP_N : CUBLAS_OP_T;
}

//! The three operands of one GEMM (the intent's A, B and C) as grouped-GEMM operands; the
//! strided path uses their bases (its strides come from the description).
struct gemm_operands {
  group_operand a;  //!< left operand
  group_operand b;  //!< right operand
  group_operand c;  //!< float output
};

//! The operands of up to `max_group_operands / 3` GEMMs, passed by value to the kernel.
struct gemm_operand_table {
  gemm_operands gemm[expert_tuning::max_group_operands / 3];  //!< per GEMM
  int count = 0;                                              //!< GEMMs used
};

}  // namespace switchyard::cuda

namespace switchyard::cuda::kernels {

//! out[(3·i + o)·E + g] = operand o of GEMM i for the g-th expert with rows (expert order),
//! for every GEMM of `table`. One block; `out` has 3·table.count·E slots.
template <int Block>
__global__ void build_group_pointers(gemm_operand_table table, const index_t* row_begin,
                                     const index_t* row_count, index_t experts, void** out) {
  using scan_t = cub::BlockScan<int, Block>;
  __shared__ typename scan_t::TempStorage storage;
  index_t base = 0;
  for (index_t e0 = 0; e0 < experts; e0 += Block) {
    const index_t e = e0 + threadIdx.x;
    const int used = e < experts && row_count[e] > 0 ? 1 : 0;
    int rank = 0, total = 0;
    scan_t(storage).ExclusiveSum(used, rank, total);
    if (used) {
      const index_t g = base + rank;
      for (int i = 0; i < table.count; ++i) {
        const gemm_operands& op = table.gemm[i];
        out[(3 * i + 0) * experts + g] = const_cast<std::byte*>(op.a.at(e, row_begin));
        out[(3 * i + 1) * experts + g] = const_cast<std::byte*>(op.b.at(e, row_begin));
        out[(3 * i + 2) * experts + g] = const_cast<std::byte*>(op.c.at(e, row_begin));
      }
    }
    base += total;
    __syncthreads();  // the scan's storage is reused by the next chunk
  }
}

}  // namespace switchyard::cuda::kernels

namespace switchyard::cuda {

//! Runs the expert GEMMs of one forward or backward, strided-batched (`grouped` false: E
//! problems of `rows` rows) or grouped (one group per expert with rows).
template <ElementType T>
class expert_gemm_runner {
 public:
  //! `args` / `pointers` ([3·max GEMMs·E] device) only for grouped.
  expert_gemm_runner(cublasHandle_t blas, cudaStream_t stream, bool grouped,
                     const expert_gemm_rows& rows, index_t experts,
                     group_args<cublasOperation_t>* args, void** pointers)
      : blas_(blas),
        stream_(stream),
        grouped_(grouped),
        rows_(rows),
        experts_(experts),
        args_(args),
        pointers_(pointers) {}

  //! Sets the GEMMs' operands; grouped: builds their device pointer arrays (one launch) and
  //! the groups from the host row counts `host_row_count` [E].
  void prepare(const gemm_operand_table& table, const index_t* row_begin, const index_t* row_count,
               const index_t* host_row_count) {
    table_ = table;
    if (!grouped_) return;
    args_->reset(host_row_count, experts_);
    if (args_->groups() == 0 || table.count == 0) return;
    kernels::build_group_pointers<expert_tuning::group_pointer_block>
        <<<1, expert_tuning::group_pointer_block, 0, stream_>>>(table, row_begin, row_count,
                                                                experts_, pointers_);
    check_launch("switchyard::cuda::kernels::build_group_pointers");
  }

  //! Runs GEMM `i` of the table: `describe(expert_gemm_rows)` gives its description.
  template <class Describe>
  void run(int i, const Describe& describe, const char* what) const {
    const gemm_operands& op = table_.gemm[i];
    if (!grouped_) {
      const blas_gemm b = to_column_major(describe(rows_), what);
      if (gemm_is_noop(b) || experts_ == 0) return;
      const auto ab = column_major_operands(static_cast<const void*>(op.a.base),
                                            static_cast<const void*>(op.b.base));
      check(cublasGemmStridedBatchedEx(
                blas_, blas_op(b.trans_a), blas_op(b.trans_b), b.m, b.n, b.k, &b.alpha, ab.a,
                blas_type<T>, b.lda, b.stride_a, ab.b, blas_type<T>, b.ldb, b.stride_b, &b.beta,
                const_cast<std::byte*>(op.c.base), CUDA_R_32F, b.ldc, b.stride_c,
                static_cast<int>(experts_), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
            what);
      return;
    }
    const grouped_call<cublasOperation_t> c = make_grouped_call(
        *args_,
        [&](index_t n) {
          return describe(expert_gemm_rows{n, 0, 0});
        },
        what);
    if (c.groups == 0) return;
    void** base = pointers_ + static_cast<index_t>(3 * i) * experts_;
    const auto ab = column_major_operands(const_cast<const void* const*>(base),
                                          const_cast<const void* const*>(base + experts_));
    check(cublasGemmGroupedBatchedEx(blas_, c.trans_a, c.trans_b, c.m, c.n, c.k, c.alpha, ab.a,
                                     blas_type<T>, c.lda, ab.b, blas_type<T>, c.ldb, c.beta,
                                     base + 2 * experts_, CUDA_R_32F, c.ldc, c.groups, c.group_size,
                                     CUBLAS_COMPUTE_32F),
          what);
  }

 private:
  cublasHandle_t blas_;
  cudaStream_t stream_;
  bool grouped_;
  expert_gemm_rows rows_;
  index_t experts_;
  group_args<cublasOperation_t>* args_;
  void** pointers_;
  gemm_operand_table table_{};
};

}  // namespace switchyard::cuda
