// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file thread_comm.hpp
//! `parallel::thread_comm`: a `Comm` (parallel/comm.hpp) whose N ranks are threads of one
//! process exchanging host memory, for fast tests of expert parallelism without MPI:
//!
//! ```cpp
//! sy::parallel::thread_group group(4);
//! sy::parallel::run_ranks(group, [&](const sy::parallel::thread_comm& comm) {
//!   // rank comm.rank() of comm.size(): build its layer with ExpertParallel{.comm = &comm}
//! });
//! ```
//!
//! Every collective publishes the rank's arguments in the group, meets the other ranks at a
//! barrier, copies straight out of the peers' send buffers, and meets them again before it
//! returns (so a peer's buffers stay alive while they are read). A rank that throws out of
//! `run_ranks`' body aborts the group: ranks waiting at a barrier, or reaching one later, throw
//! `comm_error` instead of waiting forever, and `run_ranks` rethrows on the caller the
//! exception of the lowest rank that failed on its own (not because a peer aborted). A rank
//! whose body returns while a peer waits in a collective releases it with `comm_error` too (a
//! collective some rank skipped never hangs a test). Not a transport: one `run_ranks` per
//! group at a time.
//!
//! The ranks share one process: its OpenMP and BLAS settings. The host backend makes each BLAS
//! call single-threaded through a process-wide setting that concurrent ranks may restore under
//! one another, so with shapes large enough to reach the BLAS (backend/host/row_panels.hpp) run
//! thread ranks with OPENBLAS_NUM_THREADS=1 when bitwise results matter (the tests' toy shapes
//! use the backend's own GEMM; separate MPI processes are not affected).

#include <cstddef>
#include <cstring>
#include <string>
#include <vector>

#include "switchyard/core/config.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/span.hpp"
#include "switchyard/parallel/comm.hpp"
#include "switchyard/parallel/detail/group_barrier.hpp"

namespace switchyard::parallel {

class thread_comm;

//! The shared state of N thread ranks: the barrier, its abort flag and the argument slots
//! every collective publishes. Make one, then call `run_ranks` with it (repeatedly if
//! wanted; each call starts with the abort flag cleared).
class thread_group {
 public:
  //! A group of `ranks` >= 1 thread ranks (range_error otherwise).
  explicit thread_group(int ranks) : size_(ranks) {
    if (ranks < 1) {
      throw range_error("ranks", detail::concat("ranks: a thread_group needs >= 1 ranks, got ",
                                                ranks));
    }
    slots_.resize(static_cast<std::size_t>(ranks));
  }
  thread_group(const thread_group&) = delete;
  thread_group& operator=(const thread_group&) = delete;

  //! The rank count N.
  [[nodiscard]] int size() const { return size_; }

 private:
  friend class thread_comm;
  template <class Body>
  friend void run_ranks(thread_group& group, Body&& body);

  //! What one rank published for the collective in progress.
  struct slot {
    const void* send = nullptr;
    const index_t* send_bytes = nullptr;  //!< [N] (all_to_all_v) or null (all_to_all)
    const index_t* send_displs = nullptr;
    index_t bytes = 0;  //!< all_to_all's block
  };

  int size_;
  std::vector<slot> slots_;
  detail::group_barrier sync_{size_, "thread_comm", "run_ranks"};
};

//! One rank of a `thread_group`: a `Comm` over host memory (sizes and displacements in bytes;
//! `stream` is ignored). Every call is collective over the group's N ranks.
class thread_comm {
 public:
  //! Data buffers are ordinary host memory.
  static constexpr memory_space space = memory_space::host;

  thread_comm(thread_group& group, int rank) : group_(&group), rank_(rank) {}

  //! This rank, in [0, size()).
  [[nodiscard]] int rank() const { return rank_; }
  //! The rank count N.
  [[nodiscard]] int size() const { return group_->size(); }

  //! out[r] = rank r's v; out must hold size() entries (shape_error otherwise, which aborts
  //! the group like any exception).
  void all_gather(index_t v, span<index_t> out) const { group_->sync_.all_gather(rank_, v, out); }

  //! True when every rank passed true.
  [[nodiscard]] bool all_agree(bool ok) const { return group_->sync_.all_agree(rank_, ok); }

  //! Block p (`bytes` bytes at send + p·bytes) goes to rank p's block rank().
  void all_to_all(const void* send, void* recv, index_t bytes, void* /*stream*/) const {
    thread_group::slot& s = mine();
    s.send = send;
    s.send_bytes = nullptr;
    s.bytes = bytes;
    group_->sync_.wait(rank_);
    for (int p = 0; p < size(); ++p) {
      const thread_group::slot& from = peer(p);
      if (from.bytes != bytes) {
        fail(detail::concat("all_to_all: rank ", p, " sends blocks of ", from.bytes,
                            " bytes, rank ", rank_, " expects ", bytes));
      }
      copy(static_cast<std::byte*>(recv) + p * bytes,
           static_cast<const std::byte*>(from.send) + rank_ * bytes, bytes);
    }
    group_->sync_.wait(rank_);
  }

  //! Rank r's send_bytes[p] bytes at send + send_displs[p] land at rank p's recv +
  //! recv_displs[r]; recv_bytes[r] must equal them (comm_error otherwise).
  void all_to_all_v(const void* send, const index_t* send_bytes, const index_t* send_displs,
                    void* recv, const index_t* recv_bytes, const index_t* recv_displs,
                    void* /*stream*/) const {
    thread_group::slot& s = mine();
    s.send = send;
    s.send_bytes = send_bytes;
    s.send_displs = send_displs;
    group_->sync_.wait(rank_);
    for (int p = 0; p < size(); ++p) {
      const thread_group::slot& from = peer(p);
      const index_t n = from.send_bytes[rank_];
      if (n != recv_bytes[p]) {
        fail(detail::concat("all_to_all_v: rank ", p, " sends ", n, " bytes to rank ", rank_,
                            ", which expects ", recv_bytes[p]));
      }
      copy(static_cast<std::byte*>(recv) + recv_displs[p],
           static_cast<const std::byte*>(from.send) + from.send_displs[rank_], n);
    }
    group_->sync_.wait(rank_);
  }

 private:
  thread_group::slot& mine() const { return group_->slots_[static_cast<std::size_t>(rank_)]; }
  const thread_group::slot& peer(int r) const {
    return group_->slots_[static_cast<std::size_t>(r)];
  }
  static void copy(std::byte* to, const std::byte* from, index_t n) {
    if (n > 0) std::memcpy(to, from, static_cast<std::size_t>(n));
  }
  [[noreturn]] void fail(const std::string& what) const {
    throw comm_error(-2, detail::concat("switchyard: thread_comm ", what));
  }

  thread_group* group_;
  int rank_;
};

static_assert(Comm<thread_comm>);

//! Runs body(comm) on size() threads, comm the thread's rank, and waits for them. When a body
//! throws, the group is aborted (every rank blocked in a collective throws comm_error) and
//! the exception of the lowest rank that failed on its own is rethrown here (if every
//! failure was an abort, the lowest rank's). Bodies must not share unsynchronised state
//! beyond what they read.
template <class Body>
void run_ranks(thread_group& group, Body&& body) {
  group.sync_.run([&](int r) {
    const thread_comm comm(group, r);
    body(comm);
  });
}

}  // namespace switchyard::parallel
