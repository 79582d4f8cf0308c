// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file mpi_comm.hpp
//! `parallel::mpi_comm`: the `Comm` concept (parallel/comm.hpp) over host memory on an MPI
//! communicator (Open MPI from Debian: `openmpi-bin`, `libopenmpi-dev`). Only translation units
//! that include this header need MPI (`<mpi.h>`, link `MPI::MPI_CXX`); no other Switchyard
//! header includes it. docs/communicators.md: launching with mpirun, running as root.
//!
//! Every collective validates its arguments and agrees on the outcome with the peers before
//! any data moves, so a bad argument on one rank makes every rank throw the same typed error
//! (shape_error, range_error, null_pointer_error) instead of leaving the others waiting. The
//! rank that found it throws a message with the details; its peers throw the same type naming
//! the argument and that rank. What this costs per call: `all_gather` none (the verdict travels
//! with the values), `all_agree` none, `all_to_all` one MPI_Allreduce of one integer,
//! `all_to_all_v` one MPI_Alltoall of the send sizes (each receiver checks its `recv_bytes`
//! against them) and one MPI_Allreduce of one integer.
//!
//! MPI counts and displacements are `int`: a size or displacement above INT_MAX bytes
//! (2 GiB - 1) is a range_error naming the argument (split the exchange). MPI return codes are
//! all checked (comm_error with MPI's message); they only come back when the communicator's
//! error handler is MPI_ERRORS_RETURN (MPI's default, MPI_ERRORS_ARE_FATAL, aborts the job).
//!
//! Without `<mpi.h>` on the include path the header still compiles (so that "every public
//! header compiles alone" holds on any machine), and declares an `mpi_comm` whose use fails
//! with a static_assert that says what to link.

#include "switchyard/core/config.hpp"
#include "switchyard/parallel/comm.hpp"

#if !__has_include(<mpi.h>)

namespace switchyard::parallel {

//! Stand-in declared when `<mpi.h>` is not reachable: constructing it fails to compile.
class mpi_comm {
 public:
  template <class... Args>
  explicit mpi_comm(Args&&...) {
    static_assert(sizeof...(Args) > 1000,
                  "switchyard/parallel/mpi_comm.hpp: <mpi.h> was not found. Link the CMake "
                  "target switchyard::mpi (MPI found with find_package(MPI COMPONENTS CXX); "
                  "Debian: apt-get install openmpi-bin libopenmpi-dev), or add MPI's include "
                  "directory (mpicxx --showme:compile).");
  }
};

}  // namespace switchyard::parallel

#else  // <mpi.h> is reachable

#include <mpi.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "switchyard/core/error.hpp"
#include "switchyard/core/span.hpp"

// Helpers in switchyard::detail (a nested parallel::detail would hide it from the other
// parallel headers included after this one).
namespace switchyard::detail {

//! Throws comm_error when an MPI call did not return MPI_SUCCESS.
inline void mpi_check(int code, std::string_view call) {
  if (code == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING] = {};
  int length = 0;
  if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) length = 0;
  throw comm_error(code, switchyard::detail::concat("mpi_comm: ", call, " failed with MPI error ",
                                                    code, ": ", std::string_view(text, length)));
}

//! The kinds of argument error the MPI engine agrees on (the order is the precedence: when
//! several ranks fail, the lowest failing rank's error is the one every rank throws).
enum class mpi_fault : int { none = 0, shape = 1, range = 2, null_pointer = 3 };

//! One rank's verdict on its own arguments before a collective: the first problem found.
struct mpi_verdict {
  mpi_fault fault = mpi_fault::none;
  int argument = 0;     //!< index into the operation's argument names
  std::string message;  //!< the details (this rank only)

  void fail(mpi_fault f, int arg, std::string text) {
    if (fault != mpi_fault::none) return;  // keep the first
    fault = f;
    argument = arg;
    message = std::move(text);
  }
};

//! Packs a verdict into one integer that MPI_MAX reduces to the lowest failing rank's verdict
//! (0 when every rank is fine).
inline std::int64_t mpi_pack(const mpi_verdict& v, int rank, int size) {
  if (v.fault == mpi_fault::none) return 0;
  return (static_cast<std::int64_t>(size - rank) << 16) |
         (static_cast<std::int64_t>(v.fault) << 8) | static_cast<std::int64_t>(v.argument);
}

//! Throws the agreed error on every rank (nothing when `packed` is 0).
template <std::size_t N>
void mpi_throw_agreed(std::int64_t packed, const mpi_verdict& mine, int rank, int size,
                      std::string_view operation, const std::string_view (&arguments)[N]) {
  if (packed == 0) return;
  const int failing_rank = size - static_cast<int>(packed >> 16);
  const auto fault = static_cast<mpi_fault>((packed >> 8) & 0xff);
  const int argument_index = static_cast<int>(packed & 0xff);
  const std::string argument(argument_index >= 0 && argument_index < static_cast<int>(N)
                                 ? arguments[argument_index]
                                 : std::string_view("?"));
  const std::string message =
      failing_rank == rank && mine.fault == fault
          ? switchyard::detail::concat("mpi_comm::", operation, " (rank ", rank,
                                       "): ", mine.message)
          : switchyard::detail::concat("mpi_comm::", operation, ": rank ", failing_rank,
                                       " rejected its argument ", argument, " (rank ", rank,
                                       " stops with it; the collective did not run)");
  switch (fault) {
    case mpi_fault::shape:
      throw shape_error(argument, message);
    case mpi_fault::range:
      throw range_error(argument, message);
    case mpi_fault::null_pointer:
      throw null_pointer_error(argument, message);
    case mpi_fault::none:
      break;
  }
  throw comm_error(0, message);
}

//! Checks one byte size or displacement (entry `peer` of `name`; -1: a scalar): >= 0 and
//! representable as an MPI int.
inline void mpi_check_int(mpi_verdict& v, int arg, std::string_view name, int peer, index_t value) {
  if (value < 0 || value > INT_MAX) {
    v.fail(mpi_fault::range, arg,
           switchyard::detail::concat(
               name, peer < 0 ? "" : "[", peer < 0 ? std::string() : std::to_string(peer),
               peer < 0 ? "" : "]", " must be in [0, ", INT_MAX,
               "] bytes (MPI counts are int; split larger exchanges), got ", value));
  }
}

}  // namespace switchyard::detail

namespace switchyard::parallel {

//! The `Comm` concept over host memory on an MPI communicator (non-owning: the caller keeps
//! MPI initialised and the communicator alive while this object is used). Sizes in bytes.
class mpi_comm {
 public:
  //! Data buffers are host memory.
  static constexpr memory_space space = memory_space::host;

  //! Wraps `comm` (default MPI_COMM_WORLD). Throws comm_error when MPI is not initialised or
  //! already finalised.
  explicit mpi_comm(MPI_Comm comm = MPI_COMM_WORLD) : comm_(comm) {
    int initialized = 0;
    int finalized = 0;
    detail::mpi_check(MPI_Initialized(&initialized), "MPI_Initialized");
    detail::mpi_check(MPI_Finalized(&finalized), "MPI_Finalized");
    if (initialized == 0 || finalized != 0) {
      throw comm_error(0,
                       "mpi_comm: MPI is not initialised (call MPI_Init before, and "
                       "MPI_Finalize after, every use)");
    }
    detail::mpi_check(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
    detail::mpi_check(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
  }

  //! This process's rank in [0, size()).
  [[nodiscard]] int rank() const noexcept { return rank_; }
  //! The number of ranks of the communicator.
  [[nodiscard]] int size() const noexcept { return size_; }
  //! The wrapped communicator.
  [[nodiscard]] MPI_Comm native() const noexcept { return comm_; }

  //! out[r] = rank r's `value`. `out.size()` must be size() on every rank (shape_error on
  //! every rank otherwise).
  void all_gather(index_t value, span<index_t> out) const {
    static constexpr std::string_view arguments[] = {"out"};
    detail::mpi_verdict verdict;
    if (out.size() != static_cast<std::size_t>(size_)) {
      verdict.fail(detail::mpi_fault::shape, 0,
                   switchyard::detail::concat("out must hold size() = ", size_, " values, got ",
                                              out.size()));
    } else if (out.data() == nullptr) {
      verdict.fail(detail::mpi_fault::null_pointer, 0, "out: data pointer is null");
    }
    // Each rank sends {value, verdict}: the verdicts arrive with the values, no extra call.
    const std::int64_t mine[2] = {static_cast<std::int64_t>(value),
                                  detail::mpi_pack(verdict, rank_, size_)};
    std::vector<std::int64_t> all(2 * static_cast<std::size_t>(size_));
    detail::mpi_check(MPI_Allgather(mine, 2, MPI_INT64_T, all.data(), 2, MPI_INT64_T, comm_),
                      "MPI_Allgather");
    std::int64_t packed = 0;
    for (int r = 0; r < size_; ++r) packed = std::max(packed, all[2 * r + 1]);
    detail::mpi_throw_agreed(packed, verdict, rank_, size_, "all_gather", arguments);
    for (int r = 0; r < size_; ++r) out[r] = static_cast<index_t>(all[2 * r]);
  }

  //! True when every rank passed `ok = true` (MPI_Allreduce with MPI_LAND).
  [[nodiscard]] bool all_agree(bool ok) const {
    int mine = ok ? 1 : 0;
    int all = 0;
    detail::mpi_check(MPI_Allreduce(&mine, &all, 1, MPI_INT, MPI_LAND, comm_), "MPI_Allreduce");
    return all != 0;
  }

  //! Rank r's block p of `bytes` bytes (send + p·bytes) lands in rank p's block r
  //! (recv + r·bytes). `bytes` must be the same on every rank, in [0, INT_MAX]. `stream` is
  //! ignored (host engine: complete on return).
  void all_to_all(const void* send, void* recv, index_t bytes, void* stream = nullptr) const {
    (void)stream;
    static constexpr std::string_view arguments[] = {"bytes", "send", "recv"};
    detail::mpi_verdict verdict;
    detail::mpi_check_int(verdict, 0, "bytes", -1, bytes);
    if (bytes > 0 && (send == nullptr || recv == nullptr)) {
      verdict.fail(detail::mpi_fault::null_pointer, send == nullptr ? 1 : 2,
                   switchyard::detail::concat(send == nullptr ? "send" : "recv",
                                              ": data pointer is null but bytes = ", bytes));
    }
    // One reduction carries the verdict and the extremes of `bytes` (a mismatch would make
    // MPI truncate or wait): {verdict, bytes, -bytes} under MPI_MAX.
    std::int64_t mine[3] = {detail::mpi_pack(verdict, rank_, size_), bytes, -bytes};
    std::int64_t all[3] = {};
    detail::mpi_check(MPI_Allreduce(mine, all, 3, MPI_INT64_T, MPI_MAX, comm_), "MPI_Allreduce");
    detail::mpi_throw_agreed(all[0], verdict, rank_, size_, "all_to_all", arguments);
    if (all[1] != -all[2]) {
      throw shape_error("bytes", switchyard::detail::concat(
                                     "mpi_comm::all_to_all: bytes must be the same on every rank, "
                                     "got values from ",
                                     -all[2], " to ", all[1], " (rank ", rank_, ": ", bytes, ")"));
    }
    detail::mpi_check(MPI_Alltoall(send, static_cast<int>(bytes), MPI_BYTE, recv,
                                   static_cast<int>(bytes), MPI_BYTE, comm_),
                      "MPI_Alltoall");
  }

  //! Rank r sends send_bytes[p] bytes from send + send_displs[p] to rank p, which receives them
  //! at recv + recv_displs[r]; recv_bytes[r] on rank p must equal send_bytes[p] on rank r (each
  //! receiver checks it: shape_error on every rank otherwise). Each of the four arrays holds
  //! size() host values in [0, INT_MAX]. `stream` is ignored.
  void all_to_all_v(const void* send, const index_t* send_bytes, const index_t* send_displs,
                    void* recv, const index_t* recv_bytes, const index_t* recv_displs,
                    void* stream = nullptr) const {
    (void)stream;
    static constexpr std::string_view arguments[] = {"send_bytes",  "send_displs", "recv_bytes",
                                                     "recv_displs", "send",        "recv"};
    const auto n = static_cast<std::size_t>(size_);
    detail::mpi_verdict verdict;
    const index_t* const arrays[4] = {send_bytes, send_displs, recv_bytes, recv_displs};
    for (int a = 0; a < 4; ++a) {
      if (arrays[a] == nullptr) {
        verdict.fail(detail::mpi_fault::null_pointer, a,
                     switchyard::detail::concat(
                         arguments[a], ": null, but it must hold size() = ", size_, " values"));
      }
    }
    std::vector<int> counts[4];
    index_t total[2] = {0, 0};  // bytes sent, bytes received
    if (verdict.fault == detail::mpi_fault::none) {
      for (int a = 0; a < 4; ++a) {
        counts[a].resize(n);
        for (std::size_t p = 0; p < n; ++p) {
          detail::mpi_check_int(verdict, a, arguments[a], static_cast<int>(p), arrays[a][p]);
          counts[a][p] = static_cast<int>(arrays[a][p]);
        }
      }
      for (std::size_t p = 0; p < n; ++p) {
        total[0] += send_bytes[p];
        total[1] += recv_bytes[p];
      }
    }
    if (total[0] > 0 && send == nullptr) {
      verdict.fail(detail::mpi_fault::null_pointer, 4,
                   switchyard::detail::concat(
                       "send: data pointer is null but send_bytes add up to ", total[0]));
    }
    if (total[1] > 0 && recv == nullptr) {
      verdict.fail(detail::mpi_fault::null_pointer, 5,
                   switchyard::detail::concat(
                       "recv: data pointer is null but recv_bytes add up to ", total[1]));
    }
    // Each receiver learns what its peers will send (-1 from a peer whose sizes are invalid)
    // and checks recv_bytes against it.
    std::vector<std::int64_t> sent(n, -1);
    std::vector<std::int64_t> announced(n, -1);
    if (send_bytes != nullptr) {
      for (std::size_t p = 0; p < n; ++p) sent[p] = send_bytes[p];
    }
    detail::mpi_check(
        MPI_Alltoall(sent.data(), 1, MPI_INT64_T, announced.data(), 1, MPI_INT64_T, comm_),
        "MPI_Alltoall");
    if (recv_bytes != nullptr) {
      for (std::size_t p = 0; p < n; ++p) {
        if (announced[p] >= 0 && announced[p] != recv_bytes[p]) {
          verdict.fail(detail::mpi_fault::shape, 2,
                       switchyard::detail::concat("recv_bytes[", p, "] must equal rank ", p,
                                                  "'s send_bytes[", rank_, "] = ", announced[p],
                                                  ", got ", recv_bytes[p]));
          break;
        }
      }
    }
    std::int64_t mine = detail::mpi_pack(verdict, rank_, size_);
    std::int64_t agreed = 0;
    detail::mpi_check(MPI_Allreduce(&mine, &agreed, 1, MPI_INT64_T, MPI_MAX, comm_),
                      "MPI_Allreduce");
    detail::mpi_throw_agreed(agreed, verdict, rank_, size_, "all_to_all_v", arguments);
    detail::mpi_check(MPI_Alltoallv(send, counts[0].data(), counts[1].data(), MPI_BYTE, recv,
                                    counts[2].data(), counts[3].data(), MPI_BYTE, comm_),
                      "MPI_Alltoallv");
  }

 private:
  MPI_Comm comm_;
  int rank_ = 0;
  int size_ = 1;
};

static_assert(Comm<mpi_comm>);

}  // namespace switchyard::parallel

#endif  // __has_include(<mpi.h>)
