// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file nccl_comm.hpp
//! `parallel::nccl_comm`: the `Comm` concept (parallel/comm.hpp) over CUDA device memory on an
//! NCCL communicator (the NCCL shipped with the CUDA toolkit: `nccl.h`, `libnccl.so`), and
//! `parallel::nccl_local_group`, which creates one communicator per local device in one process
//! (`ncclCommInitAll`). One rank per MPI process: parallel/nccl_mpi.hpp. Only translation units
//! that include this header need NCCL and the CUDA runtime (link `switchyard::nccl`); it has
//! no kernels and compiles with a plain C++ compiler. docs/communicators.md.
//!
//! - `all_to_all` (fixed size) and `all_to_all_v` (host sizes) are grouped `ncclSend` /
//!   `ncclRecv` of bytes (`ncclUint8`) on the caller's stream, asynchronous, capturable into a
//!   CUDA graph; zero-byte pairs are skipped on both sides. They check their arguments on this
//!   rank only (they cannot agree with the peers without a synchronisation): the caller agrees
//!   on the sizes beforehand, as `ExpertParallel` does with `all_gather` / `all_agree`.
//! - `all_gather` and `all_agree` take and return host values: they go through a small device
//!   buffer on the object's own stream (`ncclAllGather` / `ncclAllReduce` with `ncclMin`) and
//!   synchronise that stream. `all_gather`'s values carry each rank's verdict on its
//!   arguments, so a bad `out` on one rank is a shape_error on every rank.
//! - Every `ncclResult_t` is checked (comm_error with NCCL's message and last error), every
//!   `cudaError_t` too (cuda_error).
//!
//! Without `<nccl.h>` and `<cuda_runtime_api.h>` on the include path the header still compiles
//! and declares an `nccl_comm` whose use fails with a static_assert saying what to link.

#include "switchyard/core/config.hpp"
#include "switchyard/parallel/comm.hpp"

#if !(__has_include(<nccl.h>) && __has_include(<cuda_runtime_api.h>))

namespace switchyard::parallel {

//! Stand-in declared when `<nccl.h>` or the CUDA runtime is not reachable: constructing it
//! fails to compile.
class nccl_comm {
 public:
  template <class... Args>
  explicit nccl_comm(Args&&...) {
    static_assert(sizeof...(Args) > 1000,
                  "switchyard/parallel/nccl_comm.hpp: <nccl.h> or <cuda_runtime_api.h> was not "
                  "found. Link the CMake target switchyard::nccl (the CUDA toolkit's NCCL, or "
                  "NCCL_ROOT), or add NCCL's and CUDA's include directories.");
  }
};

}  // namespace switchyard::parallel

#else  // NCCL and the CUDA runtime are reachable

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "switchyard/core/error.hpp"
#include "switchyard/core/span.hpp"

// Helpers in switchyard::detail (a nested parallel::detail would hide it from the other
// parallel headers included after this one).
namespace switchyard::detail {

//! Throws comm_error when an NCCL call failed (`comm` may be null: no last-error text).
inline void nccl_check(ncclResult_t result, std::string_view call, ncclComm_t comm = nullptr) {
  if (result == ncclSuccess) return;
  const char* last = ncclGetLastError(comm);
  throw comm_error(static_cast<int>(result),
                   switchyard::detail::concat(
                       "nccl_comm: ", call, " failed: ", ncclGetErrorString(result), " (",
                       static_cast<int>(result), ")", last != nullptr && *last != '\0' ? ": " : "",
                       last != nullptr ? last : ""));
}

//! Throws cuda_error when a CUDA runtime call failed.
inline void nccl_cuda_check(cudaError_t status, std::string_view call) {
  if (status == cudaSuccess) return;
  throw cuda_error(
      static_cast<int>(status),
      switchyard::detail::concat("nccl_comm: ", call, " failed: ", cudaGetErrorName(status), " (",
                                 static_cast<int>(status), "): ", cudaGetErrorString(status)));
}

//! Makes `device` current for a scope and restores the previous device after it.
class nccl_device_scope {
 public:
  explicit nccl_device_scope(int device) {
    nccl_cuda_check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) nccl_cuda_check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~nccl_device_scope() { (void)cudaSetDevice(previous_); }
  nccl_device_scope(const nccl_device_scope&) = delete;
  nccl_device_scope& operator=(const nccl_device_scope&) = delete;

 private:
  int previous_ = 0;
};

//! Throws memory_space_error unless `p` (holding `bytes` > 0 bytes) is device (or managed)
//! memory of `device`.
inline void nccl_require_device_pointer(std::string_view argument, const void* p, index_t bytes,
                                        int device) {
  if (bytes == 0) return;
  if (p == nullptr) {
    throw null_pointer_error(
        std::string(argument),
        switchyard::detail::concat("nccl_comm: ", argument, ": data pointer is null but ", bytes,
                                   " bytes go through it"));
  }
  cudaPointerAttributes attributes{};
  nccl_cuda_check(cudaPointerGetAttributes(&attributes, p), "cudaPointerGetAttributes");
  const bool on_device =
      attributes.type == cudaMemoryTypeDevice || attributes.type == cudaMemoryTypeManaged;
  if (!on_device || (attributes.type == cudaMemoryTypeDevice && attributes.device != device)) {
    throw memory_space_error(
        std::string(argument),
        switchyard::detail::concat(
            "nccl_comm: ", argument, " must be device memory of the communicator's device ", device,
            " (memory_space::device), got ", on_device ? "memory of device " : "host memory",
            on_device ? std::to_string(attributes.device) : std::string()));
  }
}

//! Throws range_error unless `value` (entry `peer` of `name`, -1: a scalar) is >= 0.
inline void nccl_require_size(std::string_view name, int peer, index_t value) {
  if (value >= 0) return;
  throw range_error(
      std::string(name),
      switchyard::detail::concat("nccl_comm: ", name, peer < 0 ? "" : "[",
                                 peer < 0 ? std::string() : std::to_string(peer),
                                 peer < 0 ? "" : "]", " must be >= 0 bytes, got ", value));
}

//! Ends a group; a non-blocking communicator's ncclInProgress is waited out.
inline void nccl_group_end(ncclComm_t comm) {
  ncclResult_t result = ncclGroupEnd();
  while (result == ncclInProgress) {
    nccl_check(ncclCommGetAsyncError(comm, &result), "ncclCommGetAsyncError", comm);
  }
  nccl_check(result, "ncclGroupEnd", comm);
}

}  // namespace switchyard::detail

namespace switchyard::parallel {

//! The `Comm` concept over device memory on an NCCL communicator (non-owning: the caller keeps
//! `comm` alive, and destroys it, after this object). Owns a stream, a small device buffer and
//! its pinned host twin for `all_gather` / `all_agree` on the communicator's device (pinned:
//! their copies are plain stream work, also while another stream of the thread is being
//! captured into a CUDA graph). Move-only.
class nccl_comm {
 public:
  //! Data buffers are CUDA device memory of the communicator's device.
  static constexpr memory_space space = memory_space::device;

  //! Wraps `comm` (comm_error if null or if NCCL cannot describe it).
  explicit nccl_comm(ncclComm_t comm) : comm_(comm) {
    if (comm == nullptr) throw comm_error(0, "nccl_comm: the ncclComm_t is null");
    detail::nccl_check(ncclCommUserRank(comm_, &rank_), "ncclCommUserRank", comm_);
    detail::nccl_check(ncclCommCount(comm_, &size_), "ncclCommCount", comm_);
    detail::nccl_check(ncclCommCuDevice(comm_, &device_), "ncclCommCuDevice", comm_);
    const detail::nccl_device_scope scope(device_);
    detail::nccl_cuda_check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking),
                            "cudaStreamCreateWithFlags");
    cudaError_t status = cudaMalloc(reinterpret_cast<void**>(&scratch_), scratch_bytes(size_));
    if (status == cudaSuccess) {
      status = cudaMallocHost(reinterpret_cast<void**>(&host_), scratch_bytes(size_));
      if (status != cudaSuccess) (void)cudaFree(scratch_);
    }
    if (status != cudaSuccess) {
      (void)cudaStreamDestroy(stream_);
      detail::nccl_cuda_check(status, "cudaMalloc / cudaMallocHost");
    }
  }

  nccl_comm(const nccl_comm&) = delete;
  nccl_comm& operator=(const nccl_comm&) = delete;
  nccl_comm(nccl_comm&& other) noexcept { swap(other); }
  nccl_comm& operator=(nccl_comm&& other) noexcept {
    if (this != &other) {
      nccl_comm moved(std::move(other));
      swap(moved);
    }
    return *this;
  }
  ~nccl_comm() {
    if (comm_ == nullptr) return;
    int previous = 0;
    if (cudaGetDevice(&previous) == cudaSuccess) {
      (void)cudaSetDevice(device_);
      (void)cudaFree(scratch_);
      (void)cudaFreeHost(host_);
      (void)cudaStreamDestroy(stream_);
      (void)cudaSetDevice(previous);
    }
  }

  //! This rank in [0, size()).
  [[nodiscard]] int rank() const noexcept { return rank_; }
  //! The rank count of the communicator.
  [[nodiscard]] int size() const noexcept { return size_; }
  //! The CUDA device of the communicator (where the data buffers must live).
  [[nodiscard]] int device() const noexcept { return device_; }
  //! The wrapped communicator.
  [[nodiscard]] ncclComm_t native() const noexcept { return comm_; }

  //! out[r] = rank r's `value` (host values; `out.size()` must be size() on every rank:
  //! shape_error on every rank otherwise). Synchronises the object's stream.
  void all_gather(index_t value, span<index_t> out) const {
    const std::int64_t bad =
        out.size() != static_cast<std::size_t>(size_) || out.data() == nullptr ? 1 : 0;
    // Each rank contributes {value, verdict}: the verdicts travel with the values.
    host_[0] = static_cast<std::int64_t>(value);
    host_[1] = bad;
    const std::int64_t* all = host_ + 2;  // [2·size()] after the copy back
    const detail::nccl_device_scope scope(device_);
    detail::nccl_cuda_check(
        cudaMemcpyAsync(scratch_, host_, 2 * sizeof(std::int64_t), cudaMemcpyHostToDevice,
                        stream_),
        "cudaMemcpyAsync");
    detail::nccl_check(ncclAllGather(scratch_, scratch_ + 2, 2, ncclInt64, comm_, stream_),
                       "ncclAllGather", comm_);
    detail::nccl_cuda_check(
        cudaMemcpyAsync(host_ + 2, scratch_ + 2, 2 * static_cast<std::size_t>(size_) *
                                                     sizeof(std::int64_t),
                        cudaMemcpyDeviceToHost, stream_),
        "cudaMemcpyAsync");
    detail::nccl_cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    int failing = -1;
    for (int r = 0; r < size_ && failing < 0; ++r) failing = all[2 * r + 1] != 0 ? r : -1;
    if (failing >= 0) {
      throw shape_error(
          "out",
          failing == rank_
              ? switchyard::detail::concat("nccl_comm::all_gather (rank ", rank_,
                                           "): out must hold size() = ", size_, " values, got ",
                                           out.size(), out.data() == nullptr ? " (null)" : "")
              : switchyard::detail::concat("nccl_comm::all_gather: rank ", failing,
                                           " rejected its argument out (rank ", rank_,
                                           " stops with it)"));
    }
    for (int r = 0; r < size_; ++r) out[r] = static_cast<index_t>(all[2 * r]);
  }

  //! True when every rank passed `ok = true` (ncclAllReduce with ncclMin). Synchronises the
  //! object's stream.
  [[nodiscard]] bool all_agree(bool ok) const {
    auto* vote = reinterpret_cast<std::int32_t*>(host_);
    *vote = ok ? 1 : 0;
    const detail::nccl_device_scope scope(device_);
    auto* cell = reinterpret_cast<std::int32_t*>(scratch_);
    detail::nccl_cuda_check(
        cudaMemcpyAsync(cell, vote, sizeof *vote, cudaMemcpyHostToDevice, stream_),
        "cudaMemcpyAsync");
    detail::nccl_check(ncclAllReduce(cell, cell, 1, ncclInt32, ncclMin, comm_, stream_),
                       "ncclAllReduce", comm_);
    detail::nccl_cuda_check(
        cudaMemcpyAsync(vote, cell, sizeof *vote, cudaMemcpyDeviceToHost, stream_),
        "cudaMemcpyAsync");
    detail::nccl_cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    return *vote != 0;
  }

  //! Rank r's block p of `bytes` bytes (send + p·bytes) lands in rank p's block r
  //! (recv + r·bytes), on `stream` (a `cudaStream_t`; nullptr: the legacy default stream).
  //! Asynchronous; capturable into a CUDA graph (after one exchange outside the capture: NCCL
  //! connects peers on first use). `bytes` must agree on every rank (unchecked).
  void all_to_all(const void* send, void* recv, index_t bytes, void* stream) const {
    detail::nccl_require_size("bytes", -1, bytes);
    if (bytes == 0) return;
    detail::nccl_require_device_pointer("send", send, bytes * size_, device_);
    detail::nccl_require_device_pointer("recv", recv, bytes * size_, device_);
    const auto* s = static_cast<const unsigned char*>(send);
    auto* d = static_cast<unsigned char*>(recv);
    const auto count = static_cast<std::size_t>(bytes);
    auto* st = static_cast<cudaStream_t>(stream);
    const detail::nccl_device_scope scope(device_);
    detail::nccl_check(ncclGroupStart(), "ncclGroupStart", comm_);
    for (int p = 0; p < size_; ++p) {
      const auto offset = static_cast<std::size_t>(p) * count;
      const ncclResult_t sent = ncclSend(s + offset, count, ncclUint8, p, comm_, st);
      const ncclResult_t received =
          sent == ncclSuccess ? ncclRecv(d + offset, count, ncclUint8, p, comm_, st) : sent;
      if (received != ncclSuccess) {
        (void)ncclGroupEnd();
        detail::nccl_check(received, sent != ncclSuccess ? "ncclSend" : "ncclRecv", comm_);
      }
    }
    detail::nccl_group_end(comm_);
  }

  //! Rank r sends send_bytes[p] bytes from send + send_displs[p] to rank p, which receives them
  //! at recv + recv_displs[r] (recv_bytes[r] on rank p == send_bytes[p] on rank r: the caller
  //! agrees on them beforehand). The four arrays are host memory of size() values >= 0; the
  //! buffers device memory. On `stream`, asynchronous, capturable with fixed sizes.
  void all_to_all_v(const void* send, const index_t* send_bytes, const index_t* send_displs,
                    void* recv, const index_t* recv_bytes, const index_t* recv_displs,
                    void* stream) const {
    const index_t* const arrays[4] = {send_bytes, send_displs, recv_bytes, recv_displs};
    static constexpr std::string_view names[4] = {"send_bytes", "send_displs", "recv_bytes",
                                                  "recv_displs"};
    index_t extent[2] = {0, 0};  // bytes reached through send / recv
    for (int a = 0; a < 4; ++a) {
      if (arrays[a] == nullptr) {
        throw null_pointer_error(
            std::string(names[a]),
            switchyard::detail::concat("nccl_comm: ", names[a],
                                       ": null, but it must hold size() = ", size_, " values"));
      }
      for (int p = 0; p < size_; ++p) detail::nccl_require_size(names[a], p, arrays[a][p]);
    }
    for (int p = 0; p < size_; ++p) {
      if (send_bytes[p] > 0) extent[0] = std::max(extent[0], send_displs[p] + send_bytes[p]);
      if (recv_bytes[p] > 0) extent[1] = std::max(extent[1], recv_displs[p] + recv_bytes[p]);
    }
    detail::nccl_require_device_pointer("send", send, extent[0], device_);
    detail::nccl_require_device_pointer("recv", recv, extent[1], device_);
    const auto* s = static_cast<const unsigned char*>(send);
    auto* d = static_cast<unsigned char*>(recv);
    auto* st = static_cast<cudaStream_t>(stream);
    const detail::nccl_device_scope scope(device_);
    detail::nccl_check(ncclGroupStart(), "ncclGroupStart", comm_);
    for (int p = 0; p < size_; ++p) {
      ncclResult_t result = ncclSuccess;
      const char* call = "ncclSend";
      if (send_bytes[p] > 0) {
        result = ncclSend(s + send_displs[p], static_cast<std::size_t>(send_bytes[p]), ncclUint8, p,
                          comm_, st);
      }
      if (result == ncclSuccess && recv_bytes[p] > 0) {
        call = "ncclRecv";
        result = ncclRecv(d + recv_displs[p], static_cast<std::size_t>(recv_bytes[p]), ncclUint8, p,
                          comm_, st);
      }
      if (result != ncclSuccess) {
        (void)ncclGroupEnd();
        detail::nccl_check(result, call, comm_);
      }
    }
    detail::nccl_group_end(comm_);
  }

 private:
  //! {value, verdict} of the caller, then size() of them gathered.
  static std::size_t scratch_bytes(int ranks) {
    return (2 + 2 * static_cast<std::size_t>(ranks)) * sizeof(std::int64_t);
  }
  void swap(nccl_comm& other) noexcept {
    std::swap(comm_, other.comm_);
    std::swap(rank_, other.rank_);
    std::swap(size_, other.size_);
    std::swap(device_, other.device_);
    std::swap(stream_, other.stream_);
    std::swap(scratch_, other.scratch_);
    std::swap(host_, other.host_);
  }

  ncclComm_t comm_ = nullptr;
  int rank_ = 0;
  int size_ = 1;
  int device_ = 0;
  cudaStream_t stream_ = nullptr;
  std::int64_t* scratch_ = nullptr;  // device: [2 + 2·size()]
  std::int64_t* host_ = nullptr;     // pinned host: [2 + 2·size()]
};

static_assert(Comm<nccl_comm>);

//! Owns one NCCL communicator per listed local device, created together by ncclCommInitAll
//! (one process drives every rank: rank i is devices[i]); destroys them on destruction.
//! A one-rank group on device 0 is `nccl_local_group({0})`.
class nccl_local_group {
 public:
  //! Communicators for `devices` (non-empty, distinct valid device ids: range_error naming
  //! `devices` otherwise).
  explicit nccl_local_group(std::vector<int> devices) : devices_(std::move(devices)) {
    int count = 0;
    detail::nccl_cuda_check(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
    if (devices_.empty()) {
      throw range_error("devices", "nccl_local_group: devices must list at least one device");
    }
    for (std::size_t i = 0; i < devices_.size(); ++i) {
      if (devices_[i] < 0 || devices_[i] >= count ||
          std::find(devices_.begin(), devices_.begin() + static_cast<std::ptrdiff_t>(i),
                    devices_[i]) != devices_.begin() + static_cast<std::ptrdiff_t>(i)) {
        throw range_error("devices",
                          switchyard::detail::concat("nccl_local_group: devices[", i,
                                                     "] must be a device in [0, ", count,
                                                     ") not listed before, got ", devices_[i]));
      }
    }
    comms_.assign(devices_.size(), nullptr);
    detail::nccl_check(
        ncclCommInitAll(comms_.data(), static_cast<int>(devices_.size()), devices_.data()),
        "ncclCommInitAll");
  }
  nccl_local_group(const nccl_local_group&) = delete;
  nccl_local_group& operator=(const nccl_local_group&) = delete;
  ~nccl_local_group() {
    for (ncclComm_t c : comms_) {
      if (c != nullptr) (void)ncclCommDestroy(c);
    }
  }

  //! The rank count (devices listed).
  [[nodiscard]] int size() const noexcept { return static_cast<int>(comms_.size()); }
  //! Rank `i`'s communicator (owned by the group).
  [[nodiscard]] ncclComm_t native(int i) const { return comms_.at(static_cast<std::size_t>(i)); }
  //! A `Comm` for rank `i` (valid while the group lives).
  [[nodiscard]] nccl_comm comm(int i) const { return nccl_comm(native(i)); }

 private:
  std::vector<int> devices_;
  std::vector<ncclComm_t> comms_;
};

}  // namespace switchyard::parallel

#endif  // NCCL and the CUDA runtime are reachable
