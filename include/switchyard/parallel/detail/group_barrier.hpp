// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file group_barrier.hpp
//! `detail::group_barrier`: the barrier with an abort flag that the thread-rank communicators
//! (`parallel::thread_group` in thread_comm.hpp, `parallel::cuda_thread_group` in
//! cuda_thread_comm.cuh) share, their host-value collectives (`all_gather`, `all_agree`) and
//! the loop that runs one body per rank on its own thread.
//! A rank that throws out of its body aborts the group: ranks waiting at the barrier, or
//! reaching it later, throw `comm_error` instead of waiting forever; a rank whose body returns
//! while a peer waits releases it with `comm_error` too. `run` rethrows the exception of the
//! lowest rank that failed on its own (not because a peer aborted), else the lowest rank's.

#include <condition_variable>
#include <cstddef>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "switchyard/core/config.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/span.hpp"

namespace switchyard::detail {

//! The barrier, abort flag and failure bookkeeping of N thread ranks. `comm` and `runner` name
//! the engine and its run function in the comm_error messages (string literals: kept as
//! pointers).
class group_barrier {
 public:
  group_barrier(int ranks, const char* comm, const char* runner)
      : size_(ranks), comm_(comm), runner_(runner) {
    if (ranks > 0) values_.resize(static_cast<std::size_t>(ranks));
  }
  group_barrier(const group_barrier&) = delete;
  group_barrier& operator=(const group_barrier&) = delete;

  //! Waits until every rank arrived; throws comm_error (and notes that `rank` failed only
  //! because of a peer) when the group is aborted or a peer's body has already returned.
  void wait(int rank) {
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
    throw comm_error(-1, aborted_
                             ? concat("switchyard: ", comm_, ": a peer rank threw out of ", runner_,
                                      "' body, so this collective call cannot complete")
                             : concat("switchyard: ", comm_,
                                      ": a peer rank's body returned without calling this "
                                      "collective, so it cannot complete"));
  }

  //! `rank`'s part of the Comm's all_gather: out[r] = rank r's v; out must hold N entries
  //! (shape_error otherwise, which aborts the group like any exception).
  void all_gather(int rank, index_t v, span<index_t> out) {
    if (static_cast<int>(out.size()) != size_) {
      throw shape_error(
          "out", concat("out: all_gather needs size() = ", size_, " entries, got ", out.size()));
    }
    values_[static_cast<std::size_t>(rank)].value = v;
    wait(rank);
    for (int r = 0; r < size_; ++r)
      out[static_cast<std::size_t>(r)] = values_[static_cast<std::size_t>(r)].value;
    wait(rank);
  }

  //! `rank`'s part of the Comm's all_agree: true when every rank passed true.
  [[nodiscard]] bool all_agree(int rank, bool ok) {
    values_[static_cast<std::size_t>(rank)].ok = ok;
    wait(rank);
    bool all = true;
    for (int r = 0; r < size_; ++r) all = all && values_[static_cast<std::size_t>(r)].ok;
    wait(rank);
    return all;
  }

  //! Runs rank_body(r) for r in [0, N), rank 0 on the calling thread and the others on their
  //! own threads, and waits for them. A body that throws aborts the group; the failure is
  //! rethrown here as the file comment says. One `run` at a time.
  template <class RankBody>
  void run(RankBody&& rank_body) {
    reset();
    std::vector<std::exception_ptr> errors(static_cast<std::size_t>(size_));
    auto one = [&](int r) {
      try {
        rank_body(r);
        finish();
      } catch (...) {
        errors[static_cast<std::size_t>(r)] = std::current_exception();
        abort();
      }
    };
    std::vector<std::thread> threads;
    threads.reserve(static_cast<std::size_t>(size_));
    for (int r = 1; r < size_; ++r) threads.emplace_back(one, r);
    one(0);
    for (std::thread& t : threads) t.join();
    for (int r = 0; r < size_; ++r) {
      const auto i = static_cast<std::size_t>(r);
      if (errors[i] && peer_caused_[i] == 0) std::rethrow_exception(errors[i]);
    }
    for (const std::exception_ptr& e : errors)
      if (e) std::rethrow_exception(e);
  }

 private:
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

  //! What one rank published for the host-value collective in progress.
  struct host_values {
    index_t value = 0;  //!< all_gather's value
    bool ok = true;     //!< all_agree's vote
  };

  int size_;
  std::vector<host_values> values_;  //!< [N]
  const char* comm_;
  const char* runner_;
  std::mutex mutex_;
  std::condition_variable cv_;
  int arrived_ = 0;
  int finished_ = 0;  //!< ranks whose body returned normally
  std::size_t generation_ = 0;
  bool aborted_ = false;
  std::vector<char> peer_caused_;  //!< [N] the rank threw only because a peer failed
};

}  // namespace switchyard::detail
