// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file memory.hpp
//! Device memory for the CUDA backend: the checks every entry point runs before any launch
//! (a pointer must be device or managed memory of the stream's device, aligned for its
//! element type) and `device_array<T>`, a stream-ordered owner (cudaMallocAsync) for the
//! convenient case, tests and examples. Host code only.

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <string_view>
#include <utility>
#include <vector>

#include "switchyard/backend/cuda/error.hpp"
#include "switchyard/core/config.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/span.hpp"

namespace switchyard::cuda {

//! The device `stream` runs on. While the stream is being captured into a CUDA graph,
//! cudaStreamGetDevice is not permitted (cudaErrorStreamCaptureUnsupported, which would also
//! invalidate the capture), so the current device is taken instead: capture a stream of the
//! current device (as CUDA's own graph examples do).
inline int stream_device(cudaStream_t stream) {
  int device = -1;
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  check(cudaStreamIsCapturing(stream, &capture), "cudaStreamIsCapturing");
  if (capture != cudaStreamCaptureStatusNone) {
    check(cudaGetDevice(&device), "cudaGetDevice");
    return device;
  }
  check(cudaStreamGetDevice(stream, &device), "cudaStreamGetDevice");
  return device;
}

//! Throws memory_space_error naming `argument` unless `p` (when non-null) is device or
//! managed memory of `device` and aligned to `align` bytes. Null pointers are the shape
//! checks' business (an empty array may be null).
inline void require_device_memory(std::string_view argument, const void* p, int device,
                                  std::size_t align) {
  if (p == nullptr) return;
  cudaPointerAttributes a{};
  const cudaError_t st = cudaPointerGetAttributes(&a, p);
  if (st != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky-free error of an unknown pointer
    throw memory_space_error(std::string(argument),
                             detail::concat(argument, ": expected device memory, got a pointer "
                                                      "CUDA does not know (", cudaGetErrorName(st),
                                            "); the CUDA backend reads device or managed memory"));
  }
  if (a.type != cudaMemoryTypeDevice && a.type != cudaMemoryTypeManaged) {
    throw memory_space_error(
        std::string(argument),
        detail::concat(argument, ": expected device or managed memory, got ",
                       a.type == cudaMemoryTypeHost ? "pinned host memory" : "host memory",
                       " (copy it to the device first, or use host_context)"));
  }
  if (a.type == cudaMemoryTypeDevice && a.device != device) {
    throw memory_space_error(std::string(argument),
                             detail::concat(argument, ": memory of device ", a.device,
                                            ", but the context's stream runs on device ", device));
  }
  if (reinterpret_cast<std::uintptr_t>(p) % align != 0) {
    throw memory_space_error(std::string(argument),
                             detail::concat(argument, ": expected ", align,
                                            "-byte alignment, got address ", p));
  }
}

//! A device array owned on a stream: allocated with cudaMallocAsync and freed with
//! cudaFreeAsync on the same stream (tests, examples, the backend's convenience workspace).
template <class T>
class device_array {
 public:
  device_array() = default;
  device_array(std::size_t n, cudaStream_t stream) : n_(n), stream_(stream) {
    if (n_ != 0) {
      void* p = nullptr;
      check(cudaMallocAsync(&p, n_ * sizeof(T), stream_), "cudaMallocAsync");
      p_ = static_cast<T*>(p);
    }
  }
  //! A copy of `host` (enqueued on `stream`; `host` must outlive the copy: synchronize).
  device_array(const std::vector<T>& host, cudaStream_t stream) : device_array(host.size(), stream) {
    copy_from(host);
  }
  device_array(const device_array&) = delete;
  device_array& operator=(const device_array&) = delete;
  device_array(device_array&& o) noexcept
      : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)), stream_(o.stream_) {}
  device_array& operator=(device_array&& o) noexcept {
    if (this != &o) {
      reset();
      p_ = std::exchange(o.p_, nullptr);
      n_ = std::exchange(o.n_, 0);
      stream_ = o.stream_;
    }
    return *this;
  }
  ~device_array() { reset(); }

  [[nodiscard]] T* data() const { return p_; }
  [[nodiscard]] std::size_t size() const { return n_; }
  [[nodiscard]] span<T> view() const { return {p_, n_}; }
  [[nodiscard]] span<std::byte> bytes() const {
    return {reinterpret_cast<std::byte*>(p_), n_ * sizeof(T)};
  }

  //! Enqueues a copy of `host` (same size) to the device.
  void copy_from(const std::vector<T>& host) {
    if (host.size() != n_) {
      throw shape_error("host", detail::concat("host: expected ", n_, " elements, got ", host.size()));
    }
    if (n_ != 0) {
      check(cudaMemcpyAsync(p_, host.data(), n_ * sizeof(T), cudaMemcpyHostToDevice, stream_),
            "cudaMemcpyAsync");
    }
  }
  //! Fills every byte with `byte` (poisoning outputs in tests: 0xFF is a NaN pattern).
  void fill_bytes(int byte) {
    if (n_ != 0) check(cudaMemsetAsync(p_, byte, n_ * sizeof(T), stream_), "cudaMemsetAsync");
  }
  //! Copies the array to the host (synchronises the stream).
  [[nodiscard]] std::vector<T> to_host() const {
    std::vector<T> out(n_);
    if (n_ != 0) {
      check(cudaMemcpyAsync(out.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost, stream_),
            "cudaMemcpyAsync");
    }
    check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    return out;
  }

 private:
  void reset() noexcept {
    if (p_ != nullptr) (void)cudaFreeAsync(p_, stream_);
    p_ = nullptr;
    n_ = 0;
  }
  T* p_ = nullptr;
  std::size_t n_ = 0;
  cudaStream_t stream_ = nullptr;
};

}  // namespace switchyard::cuda
