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

#include <condition_variable>
#include <cstddef>
#include <cstring>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "switchyard/core/config.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/span.hpp"
#include "switchyard/parallel/comm.hpp"

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
    index_t bytes = 0;                    //!< all_to_all's block, all_gather's value
    bool ok = true;                       //!< all_agree's vote
  };

  //! Waits until every rank arrived; throws comm_error (and notes that `rank` failed only
  //! because of a peer) when the group is aborted or a peer's body has already returned.
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
    throw comm_error(-1, aborted_ ? "switchyard: thread_comm: a peer rank threw out of "
                                    "run_ranks' body, so this collective call cannot complete"
                                  : "switchyard: thread_comm: a peer rank's body returned "
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
  std::vector<slot> slots_;
  std::mutex mutex_;
  std::condition_variable cv_;
  int arrived_ = 0;
  int finished_ = 0;                //!< ranks whose body returned normally
  std::size_t generation_ = 0;
  bool aborted_ = false;
  std::vector<char> peer_caused_;   //!< [N] the rank threw only because a peer failed
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

  //! Block p (`bytes` bytes at send + p·bytes) goes to rank p's block rank().
  void all_to_all(const void* send, void* recv, index_t bytes, void* /*stream*/) const {
    thread_group::slot& s = mine();
    s.send = send;
    s.send_bytes = nullptr;
    s.bytes = bytes;
    group_->barrier(rank_);
    for (int p = 0; p < size(); ++p) {
      const thread_group::slot& from = peer(p);
      if (from.bytes != bytes) {
        fail(detail::concat("all_to_all: rank ", p, " sends blocks of ", from.bytes,
                            " bytes, rank ", rank_, " expects ", bytes));
      }
      copy(static_cast<std::byte*>(recv) + p * bytes,
           static_cast<const std::byte*>(from.send) + rank_ * bytes, bytes);
    }
    group_->barrier(rank_);
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
    group_->barrier(rank_);
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
    group_->barrier(rank_);
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
  const int n = group.size();
  group.reset();
  std::vector<std::exception_ptr> errors(static_cast<std::size_t>(n));
  auto one = [&](int r) {
    const thread_comm comm(group, r);
    try {
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
    if (errors[static_cast<std::size_t>(r)]) std::rethrow_exception(errors[static_cast<std::size_t>(r)]);
}

}  // namespace switchyard::parallel
