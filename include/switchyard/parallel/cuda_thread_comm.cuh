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
//! The barrier and abort logic is a copy of thread_comm.hpp's `thread_group` (whose pieces are
//! private there). Not a transport: no timeouts, one group per `run_cuda_ranks` at a time.

#include <cuda_runtime_api.h>

#include <condition_variable>
#include <cstddef>
#include <exception>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "switchyard/core/config.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/span.hpp"
#include "switchyard/parallel/comm.hpp"

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
    index_t bytes = 0;            //!< all_to_all's block, all_gather's value
    bool ok = true;               //!< all_agree's vote
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

  //! Waits until every rank arrived (thread_group::barrier of thread_comm.hpp).
  void barrier(int rank) {
    std::unique_lock<std::mutex> lock(mutex_);
    const std::size_t generation = generation_;
    if (!aborted_ && finished_ == 0) {
      if (++arrived_ == size_) {
        arrived_ = 0;
        ++generation_;
        cv_.notify_all();
        return;
      }
      cv_.wait(lock, [&] { return generation_ != generation || aborted_ || finished_ > 0; });
      if (generation_ != generation) return;
    }
    peer_caused_[static_cast<std::size_t>(rank)] = 1;
    throw comm_error(-1, aborted_ ? "switchyard: cuda_thread_comm: a peer rank threw out of "
                                    "run_cuda_ranks' body, so this collective call cannot "
                                    "complete"
                                  : "switchyard: cuda_thread_comm: a peer rank's body returned "
                                    "without calling this collective, so it cannot complete");
  }

  void abort() {
    const std::lock_guard<std::mutex> lock(mutex_);
    aborted_ = true;
    cv_.notify_all();
  }

  void finish() {
    const std::lock_guard<std::mutex> lock(mutex_);
    ++finished_;
    cv_.notify_all();
  }

  void reset() {
    aborted_ = false;
    arrived_ = 0;
    finished_ = 0;
    peer_caused_.assign(static_cast<std::size_t>(size_), 0);
  }

  int size_;
  int device_;
  std::vector<slot> slots_;
  std::mutex mutex_;
  std::condition_variable cv_;
  int arrived_ = 0;
  int finished_ = 0;
  std::size_t generation_ = 0;
  bool aborted_ = false;
  std::vector<char> peer_caused_;
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
  void all_gather(index_t v, span<index_t> out) const {
    if (static_cast<int>(out.size()) != size()) {
      throw shape_error("out", detail::concat("out: all_gather needs size() = ", size(),
                                              " entries, got ", out.size()));
    }
    mine().bytes = v;
    group_->barrier(rank_);
    for (int r = 0; r < size(); ++r) out[static_cast<std::size_t>(r)] = peer(r).bytes;
    group_->barrier(rank_);
  }

  //! True when every rank passed true.
  [[nodiscard]] bool all_agree(bool ok) const {
    mine().ok = ok;
    group_->barrier(rank_);
    bool all = true;
    for (int r = 0; r < size(); ++r) all = all && peer(r).ok;
    group_->barrier(rank_);
    return all;
  }

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
    group_->barrier(rank_);
    for (int p = 0; p < size(); ++p) {
      cuda_thread_group::check(cudaStreamWaitEvent(st, peer(p).ready, 0), "cudaStreamWaitEvent");
      copy_from(p, peer(p), st);
    }
    cuda_thread_group::check(cudaEventRecord(s.done, st), "cudaEventRecord");
    group_->barrier(rank_);
    for (int p = 0; p < size(); ++p) {
      cuda_thread_group::check(cudaStreamWaitEvent(st, peer(p).done, 0), "cudaStreamWaitEvent");
    }
    group_->barrier(rank_);
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
  const int n = group.size();
  group.reset();
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(n));
  auto one = [&](int r) {
    const cuda_thread_comm comm(group, r);
    try {
      cuda_thread_group::check(cudaSetDevice(group.device()), "cudaSetDevice");
      body(comm);
      group.finish();
    } catch (...) {
      errors[static_cast<std::size_t>(r)] = std::current_exception();
      group.abort();
    }
  };
  std::vector<std::thread> threads;
  threads.reserve(static_cast<std::size_t>(n));
  for (int r = 1; r < n; ++r) threads.emplace_back(one, r);
  one(0);
  for (std::thread& t : threads) t.join();
  for (int r = 0; r < n; ++r)
    if (errors[static_cast<std::size_t>(r)] && !group.peer_caused_[static_cast<std::size_t>(r)])
      std::rethrow_exception(errors[static_cast<std::size_t>(r)]);
  for (int r = 0; r < n; ++r)
    if (errors[static_cast<std::size_t>(r)])
      std::rethrow_exception(errors[static_cast<std::size_t>(r)]);
}

}  // namespace switchyard::parallel
