// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file comm.hpp
//! The `Comm` concept: what expert parallelism (`parallel::ExpertParallel`, issue #16) needs
//! from a communication engine. Models: `parallel::thread_comm` (N ranks as threads of one
//! process, host memory; for tests), `parallel::cuda_thread_comm` (N thread ranks on one GPU,
//! device memory; for tests), `parallel::mpi_comm` (Open MPI, host memory) and
//! `parallel::nccl_comm` (NCCL, device memory, stream-ordered).
//!
//! Every operation is collective: every rank of the communicator calls it, in the same order,
//! with arguments that agree (a receive count on rank r is the matching send count on the
//! peer). Counts, displacements and `all_gather`'s values are host memory on every engine
//! (NCCL takes counts as host arguments); the data buffers live in the engine's
//! `memory_space`. `stream` is the CUDA stream (`cudaStream_t` cast to `void*`) for a device
//! engine and is ignored (pass nullptr) by a host engine, whose calls complete before they
//! return. A device engine's calls are stream-ordered: `all_to_all` of a fixed size and
//! `all_to_all_v` with host counts can be captured into a CUDA graph; `all_gather` and
//! `all_agree` synchronise (they validate arguments, before any exchange).
//!
//! Errors are agreed before anyone exchanges: a rank that finds a bad argument calls
//! `all_agree(false)` rather than throwing alone, so every rank learns of it and throws the
//! same typed error (no rank hangs waiting for another).

#include <concepts>
#include <cstddef>

#include "switchyard/core/config.hpp"
#include "switchyard/core/span.hpp"

namespace switchyard::parallel {

//! Where a communicator's data buffers live.
enum class memory_space {
  host,    //!< ordinary CPU memory (thread_comm, mpi_comm)
  device,  //!< CUDA device memory of the current device (nccl_comm)
};

//! A communication engine for expert parallelism. Sizes and displacements are in bytes.
//!
//! - `rank()`, `size()`: this rank in [0, size) and the rank count (>= 1).
//! - `C::space`: the memory space of the data buffers.
//! - `all_gather(v, out)`: out[r] = rank r's v (`out.size() == size()`; host memory).
//! - `all_agree(ok)`: true when every rank passed ok = true (a logical AND).
//! - `all_to_all(send, recv, bytes, stream)`: rank r's block p of `bytes` bytes
//!   (send + p·bytes) lands in rank p's block r (recv + r·bytes).
//! - `all_to_all_v(send, send_bytes, send_displs, recv, recv_bytes, recv_displs, stream)`:
//!   rank r sends send_bytes[p] bytes from send + send_displs[p] to rank p, which receives
//!   them at recv + recv_displs[r] (recv_bytes[r] == the sender's send_bytes[p]); the four
//!   arrays hold size() entries, host memory.
template <class C>
concept Comm = requires(const C& c, const void* src, void* dst, const index_t* counts,
                        index_t n, bool ok, span<index_t> out, void* stream) {
  { c.rank() } -> std::convertible_to<int>;
  { c.size() } -> std::convertible_to<int>;
  { C::space } -> std::convertible_to<memory_space>;
  c.all_gather(n, out);
  { c.all_agree(ok) } -> std::convertible_to<bool>;
  c.all_to_all(src, dst, n, stream);
  c.all_to_all_v(src, counts, counts, dst, counts, counts, stream);
};

}  // namespace switchyard::parallel
