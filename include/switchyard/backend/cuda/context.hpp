// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file context.hpp
//! `switchyard::cuda::context`: where a layer runs on the GPU — a stream, a cuBLAS handle and
//! optional pinned host scratch — and `cuda::stream_context`, the RAII owner of all three
//! for the convenient case. Host code only (no kernels): any C++20 compiler with the CUDA
//! include path can use it.
//!
//! The context is a value of handles; the caller keeps them alive. The backend sets the
//! handle's stream to `stream` and its atomics mode to CUBLAS_ATOMICS_NOT_ALLOWED at each
//! entry point (docs/cuda.md): everything is ordered on `stream`.

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <utility>

#include "switchyard/backend/cuda/error.hpp"
#include "switchyard/backend/cuda/tuning.hpp"
#include "switchyard/core/span.hpp"

namespace switchyard::cuda {

//! The CUDA execution context (non-owning).
struct context {
  cudaStream_t stream = nullptr;   //!< every launch and copy is ordered on this stream
  cublasHandle_t blas = nullptr;   //!< cuBLAS handle (required)
  //! Pinned host bytes for the per-expert counts of `sorted_grouped` and the grouped GEMM's
  //! host arguments (`host_workspace_size(E)`). Empty: the backend uses pageable memory it
  //! allocates per call (documented exception to the no-allocation promise).
  span<std::byte> host_workspace = {};
};

//! Host bytes the backend takes from `context::host_workspace` for E experts.
[[nodiscard]] constexpr std::size_t host_workspace_size(index_t experts) {
  return tuning::host_bytes_fixed + tuning::host_bytes_per_expert * static_cast<std::size_t>(experts);
}

//! Owns a non-blocking stream, a cuBLAS handle bound to it (atomics not allowed) and a pinned
//! host workspace for up to `max_experts` experts, on `device` (-1: the current device).
class stream_context {
 public:
  explicit stream_context(index_t max_experts = 4096, int device = -1) {
    if (device >= 0) check(cudaSetDevice(device), "cudaSetDevice");
    check(cudaStreamCreateWithFlags(&ctx_.stream, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
    try {
      check(cublasCreate(&ctx_.blas), "cublasCreate");
      check(cublasSetStream(ctx_.blas, ctx_.stream), "cublasSetStream");
      check(cublasSetAtomicsMode(ctx_.blas, CUBLAS_ATOMICS_NOT_ALLOWED), "cublasSetAtomicsMode");
      const std::size_t bytes = host_workspace_size(max_experts);
      void* host = nullptr;
      check(cudaMallocHost(&host, bytes), "cudaMallocHost");
      ctx_.host_workspace = {static_cast<std::byte*>(host), bytes};
    } catch (...) {
      release();
      throw;
    }
  }
  stream_context(const stream_context&) = delete;
  stream_context& operator=(const stream_context&) = delete;
  stream_context(stream_context&& o) noexcept : ctx_(std::exchange(o.ctx_, {})) {}
  stream_context& operator=(stream_context&& o) noexcept {
    if (this != &o) {
      release();
      ctx_ = std::exchange(o.ctx_, {});
    }
    return *this;
  }
  ~stream_context() { release(); }

  //! The context to pass to a layer.
  [[nodiscard]] const context& get() const { return ctx_; }
  operator const context&() const { return ctx_; }  // NOLINT(google-explicit-constructor)
  [[nodiscard]] cudaStream_t stream() const { return ctx_.stream; }
  //! Waits for everything enqueued on the stream; throws cuda_error on a failed kernel.
  void synchronize() const { check(cudaStreamSynchronize(ctx_.stream), "cudaStreamSynchronize"); }

 private:
  void release() noexcept {
    if (ctx_.host_workspace.data() != nullptr) (void)cudaFreeHost(ctx_.host_workspace.data());
    if (ctx_.blas != nullptr) (void)cublasDestroy(ctx_.blas);
    if (ctx_.stream != nullptr) (void)cudaStreamDestroy(ctx_.stream);
    ctx_ = {};
  }
  context ctx_{};
};

}  // namespace switchyard::cuda
