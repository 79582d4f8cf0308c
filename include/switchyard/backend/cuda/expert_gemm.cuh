// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file expert_gemm.cuh
//! The expert phase's device executor (`device_expert_exec`, for expert_phase.hpp): functors
//! through cuda::for_each, and the GEMMs on cuBLAS: the descriptions of gemm.hpp mapped by
//! `to_column_major` and run as `cublasGemmStridedBatchedEx` (padded_capacity, dense: one
//! problem per expert, equal sizes) or, for sorted_grouped (sizes from the host copy of the
//! row counts), `cublasGemmGroupedBatchedEx` (float: one group per expert with rows,
//! group_size 1) or one `cublasGemmEx` per expert with rows (half, bfloat16: the grouped
//! GEMM's type table needs C of the input type, and C is float here).
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
#include "switchyard/backend/cuda/launch.cuh"
#include "switchyard/core/config.hpp"
#include "switchyard/core/element_type.hpp"

namespace switchyard::cuda {

//! Tuning values of the expert phase's own kernels (tuning.hpp holds the shared ones).
namespace expert_tuning {
//! Threads of the single block that builds the grouped GEMMs' pointer arrays.
inline constexpr int group_pointer_block = 256;
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
    if (used) table.write(out, experts, base + rank, e, row_begin);
    base += total;
    __syncthreads();  // the scan's storage is reused by the next chunk
  }
}

}  // namespace switchyard::cuda::kernels

namespace switchyard::cuda {

//! The device executor of the expert phase (expert_phase.hpp): functors through
//! `cuda::for_each` on the stream, GEMMs through cuBLAS (A/B of T, C float,
//! CUBLAS_COMPUTE_32F, host alpha/beta), the grouped pointer arrays by one kernel launch.
struct device_expert_exec {
  using blas_op = cublasOperation_t;                              //!< cuBLAS's op enum
  static constexpr cublasOperation_t op_none = CUBLAS_OP_N;       //!< op none
  static constexpr cublasOperation_t op_transpose = CUBLAS_OP_T;  //!< op transpose

  //! Whether grouped GEMMs of T run as one cublasGemmGroupedBatchedEx: its type table has
  //! C of the input type only (16F -> 16F, 16BF -> 16BF, 32F -> 32F), and C is float here,
  //! so half and bfloat16 run one cublasGemmEx per expert with rows.
  template <ElementType T>
  static constexpr bool grouped_native = std::is_same_v<T, float>;

  cublasHandle_t blas = nullptr;  //!< bound to `stream`, pointer mode host
  cudaStream_t stream = nullptr;  //!< every launch and GEMM

  //! f(i), i in [0, n), on the stream.
  template <class F>
  void launch(index_t n, const F& f, const char* name) const {
    for_each(stream, n, f, name);
  }

  //! The grouped GEMMs' pointer arrays (`out` [3·table.count, E], device).
  void build_group_pointers(const gemm_operand_table& table, const index_t* row_begin,
                            const index_t* row_count, index_t experts, void** out) const {
    kernels::build_group_pointers<expert_tuning::group_pointer_block>
        <<<1, expert_tuning::group_pointer_block, 0, stream>>>(table, row_begin, row_count, experts,
                                                               out);
    check_launch("switchyard::cuda::kernels::build_group_pointers");
  }

  //! `batch` problems of the mapped call `b` (a, b: cuBLAS's A and B).
  template <ElementType T>
  void gemm_strided(const blas_gemm& b, const void* a, const void* bm, void* c, index_t batch,
                    const char* what) const {
    check(cublasGemmStridedBatchedEx(blas, blas_op(b.trans_a), blas_op(b.trans_b), b.m, b.n, b.k,
                                     &b.alpha, a, blas_type<T>, b.lda, b.stride_a, bm, blas_type<T>,
                                     b.ldb, b.stride_b, &b.beta, c, CUDA_R_32F, b.ldc, b.stride_c,
                                     static_cast<int>(batch), CUBLAS_COMPUTE_32F,
                                     CUBLAS_GEMM_DEFAULT),
          what);
  }

  //! One problem of the mapped call `b` (a, b: cuBLAS's A and B).
  template <ElementType T>
  void gemm_single(const blas_gemm& b, const void* a, const void* bm, void* c,
                   const char* what) const {
    check(cublasGemmEx(blas, blas_op(b.trans_a), blas_op(b.trans_b), b.m, b.n, b.k, &b.alpha, a,
                       blas_type<T>, b.lda, bm, blas_type<T>, b.ldb, &b.beta, c, CUDA_R_32F, b.ldc,
                       CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
          what);
  }

  //! The grouped call `c` over device pointer arrays (a, b: cuBLAS's A and B).
  template <ElementType T>
  void gemm_grouped(const grouped_call<cublasOperation_t>& c, const void* const* a,
                    const void* const* b, void* const* out, const char* what) const {
    check(cublasGemmGroupedBatchedEx(blas, c.trans_a, c.trans_b, c.m, c.n, c.k, c.alpha, a,
                                     blas_type<T>, c.lda, b, blas_type<T>, c.ldb, c.beta, out,
                                     CUDA_R_32F, c.ldc, c.groups, c.group_size, CUBLAS_COMPUTE_32F),
          what);
  }
};

}  // namespace switchyard::cuda
