// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file cuda_thread_comm.cuh
//! `parallel::cuda_thread_comm`: a `Comm` (parallel/comm.hpp) over CUDA device memory whose N
//! ranks are host threads of one process on one device, for tests of expert parallelism on a
//! single GPU without NCCL or MPI:
//!
//! ```cpp
//! sy::parallel::cuda_thread_group group(4, /*device=*/0);
//! sy::parallel::run_cuda_ranks(group, [&](const sy::parallel::cuda_thread_comm& comm) {
//!   // rank comm.rank(): its own cudaStream_t and cuBLAS handle, ExpertParallel{.comm = &comm}
//! });
//! ```
//!
//! Data collectives are stream-ordered and never wait on the host for the GPU: each rank
//! records an event on its stream when its send buffer is ready and publishes it, the ranks
//! meet at a barrier, each rank's stream waits for the peers' events and copies its blocks out
//! of their send buffers (`cudaMemcpyAsync`, device to device, on its own stream), records a
//! second event, and after a second barrier each rank's stream waits for every peer's second
//! event (so a send buffer stays untouched until every peer's copy out of it completed); a
//! third barrier keeps a rank from re-recording its events before the peers waited on them.
//! `all_gather` and `all_agree` take host values (as every engine's). Errors: as
//! `thread_comm` (thread_comm.hpp), a rank that throws aborts the group and its peers throw
//! comm_error instead of waiting; `run_cuda_ranks` rethrows the lowest rank's own failure.
//! The barrier, its abort logic and the per-rank threads are thread_comm.hpp's
//! (`detail::group_barrier`, parallel/detail/group_barrier.hpp). Not a transport: no
//! timeouts, one group per `run_cuda_ranks` at a time.

#include <cuda_runtime_api.h>

#include <cstddef>
#include <string>
#include <vector>

#include "switchyard/core/config.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/span.hpp"
#include "switchyard/parallel/comm.hpp"
#include "switchyard/parallel/detail/group_barrier.hpp"

namespace switchyard::parallel {

class cuda_thread_comm;

//! The shared state of N thread ranks on one device: the barrier, its abort flag, the
//! argument slots and two CUDA events per rank. Make one, then call `run_cuda_ranks`.
class cuda_thread_group {
 public:
  //! A group of `ranks` >= 1 thread ranks on CUDA device `device` (range_error otherwise;
  //! cuda_error when the events cannot be created).
  cuda_thread_group(int ranks, int device) : size_(ranks), device_(device) {
    if (ranks < 1) {
      throw range_error("ranks", detail::concat("ranks: a cuda_thread_group needs >= 1 ranks, "
                                                "got ",
                                                ranks));
    }
    int count = 0;
    check(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
    if (device < 0 || device >= count) {
      throw range_error("device",
                        detail::concat("device: must be in [0, ", count, "), got ", device));
    }
    check(cudaSetDevice(device), "cudaSetDevice");
    slots_.resize(static_cast<std::size_t>(ranks));
    for (slot& s : slots_) {
      check(cudaEventCreateWithFlags(&s.ready, cudaEventDisableTiming), "cudaEventCreate");
      check(cudaEventCreateWithFlags(&s.done, cudaEventDisableTiming), "cudaEventCreate");
    }
  }
  cuda_thread_group(const cuda_thread_group&) = delete;
  cuda_thread_group& operator=(const cuda_thread_group&) = delete;
  ~cuda_thread_group() {
    for (slot& s : slots_) {
      if (s.ready != nullptr) (void)cudaEventDestroy(s.ready);
      if (s.done != nullptr) (void)cudaEventDestroy(s.done);
    }
  }

  //! The rank count N.
  [[nodiscard]] int size() const { return size_; }
  //! The device every rank runs on.
  [[nodiscard]] int device() const { return device_; }

 private:
  friend class cuda_thread_comm;
  template <class Body>
  friend void run_cuda_ranks(cuda_thread_group& group, Body&& body);

  //! What one rank published for the collective in progress.
  struct slot {
    const void* send = nullptr;
    const index_t* send_bytes = nullptr;  //!< [N] (all_to_all_v) or null (all_to_all)
    const index_t* send_displs = nullptr;
    index_t bytes = 0;            //!< all_to_all's block
    cudaEvent_t ready = nullptr;  //!< the send buffer is ready (on the rank's stream)
    cudaEvent_t done = nullptr;   //!< the rank's copies out of its peers completed
  };

  static void check(cudaError_t status, const char* call) {
    if (status != cudaSuccess) {
      throw cuda_error(static_cast<int>(status),
                       detail::concat("cuda_thread_comm: ", call, " failed: ",
                                      cudaGetErrorName(status), ": ", cudaGetErrorString(status)));
    }
  }

  int size_;
  int device_;
  std::vector<slot> slots_;
  detail::group_barrier sync_{size_, "cuda_thread_comm", "run_cuda_ranks"};
};

//! One rank of a `cuda_thread_group`: a `Comm` over device memory of the group's device
//! (sizes and displacements in bytes; `stream` is the rank's cudaStream_t as void*, nullptr
//! the legacy default stream). Every call is collective over the group's N ranks.
class cuda_thread_comm {
 public:
  //! Data buffers are device memory.
  static constexpr memory_space space = memory_space::device;

  cuda_thread_comm(cuda_thread_group& group, int rank) : group_(&group), rank_(rank) {}

  //! This rank, in [0, size()).
  [[nodiscard]] int rank() const { return rank_; }
  //! The rank count N.
  [[nodiscard]] int size() const { return group_->size(); }

  //! out[r] = rank r's v (host values); out must hold size() entries (shape_error otherwise).
  void all_gather(index_t v, span<index_t> out) const { group_->sync_.all_gather(rank_, v, out); }

  //! True when every rank passed true.
  [[nodiscard]] bool all_agree(bool ok) const { return group_->sync_.all_agree(rank_, ok); }

  //! Block p (`bytes` bytes at send + p·bytes) goes to rank p's block rank(), on `stream`.
  void all_to_all(const void* send, void* recv, index_t bytes, void* stream) const {
    cuda_thread_group::slot& s = mine();
    s.send = send;
    s.send_bytes = nullptr;
    s.send_displs = nullptr;
    s.bytes = bytes;
    exchange(stream, [&](int p, const cuda_thread_group::slot& from, cudaStream_t st) {
      if (from.bytes != bytes) {
        fail(detail::concat("all_to_all: rank ", p, " sends blocks of ", from.bytes,
                            " bytes, rank ", rank_, " expects ", bytes));
      }
      copy(static_cast<std::byte*>(recv) + p * bytes,
           static_cast<const std::byte*>(from.send) + rank_ * bytes, bytes, st);
    });
  }

  //! Rank r's send_bytes[p] bytes at send + send_displs[p] land at rank p's recv +
  //! recv_displs[r], on `stream`; recv_bytes[r] must equal them (comm_error otherwise).
  void all_to_all_v(const void* send, const index_t* send_bytes, const index_t* send_displs,
                    void* recv, const index_t* recv_bytes, const index_t* recv_displs,
                    void* stream) const {
    cuda_thread_group::slot& s = mine();
    s.send = send;
    s.send_bytes = send_bytes;
    s.send_displs = send_displs;
    exchange(stream, [&](int p, const cuda_thread_group::slot& from, cudaStream_t st) {
      const index_t n = from.send_bytes[rank_];
      if (n != recv_bytes[p]) {
        fail(detail::concat("all_to_all_v: rank ", p, " sends ", n, " bytes to rank ", rank_,
                            ", which expects ", recv_bytes[p]));
      }
      copy(static_cast<std::byte*>(recv) + recv_displs[p],
           static_cast<const std::byte*>(from.send) + from.send_displs[rank_], n, st);
    });
  }

 private:
  cuda_thread_group::slot& mine() const { return group_->slots_[static_cast<std::size_t>(rank_)]; }
  const cuda_thread_group::slot& peer(int r) const {
    return group_->slots_[static_cast<std::size_t>(r)];
  }

  //! The event protocol of the file comment around `copy_from(p, peer slot, stream)`. A
  //! failing check still meets the barriers' count through the group's abort.
  template <class CopyFrom>
  void exchange(void* stream, const CopyFrom& copy_from) const {
    const auto st = static_cast<cudaStream_t>(stream);
    cuda_thread_group::slot& s = mine();
    cuda_thread_group::check(cudaEventRecord(s.ready, st), "cudaEventRecord");
    group_->sync_.wait(rank_);
    for (int p = 0; p < size(); ++p) {
      cuda_thread_group::check(cudaStreamWaitEvent(st, peer(p).ready, 0), "cudaStreamWaitEvent");
      copy_from(p, peer(p), st);
    }
    cuda_thread_group::check(cudaEventRecord(s.done, st), "cudaEventRecord");
    group_->sync_.wait(rank_);
    for (int p = 0; p < size(); ++p) {
      cuda_thread_group::check(cudaStreamWaitEvent(st, peer(p).done, 0), "cudaStreamWaitEvent");
    }
    group_->sync_.wait(rank_);
  }

  static void copy(std::byte* to, const std::byte* from, index_t n, cudaStream_t stream) {
    if (n > 0) {
      cuda_thread_group::check(
          cudaMemcpyAsync(to, from, static_cast<std::size_t>(n), cudaMemcpyDeviceToDevice, stream),
          "cudaMemcpyAsync");
    }
  }
  [[noreturn]] void fail(const std::string& what) const {
    throw comm_error(-2, detail::concat("switchyard: cuda_thread_comm ", what));
  }

  cuda_thread_group* group_;
  int rank_;
};

static_assert(Comm<cuda_thread_comm>);

//! Runs body(comm) on size() threads (each with the group's device current), comm the
//! thread's rank, and waits for them; errors as `run_ranks` (thread_comm.hpp).
template <class Body>
void run_cuda_ranks(cuda_thread_group& group, Body&& body) {
  group.sync_.run([&](int r) {
    const cuda_thread_comm comm(group, r);
    cuda_thread_group::check(cudaSetDevice(group.device()), "cudaSetDevice");
    body(comm);
  });
}

}  // namespace switchyard::parallel
