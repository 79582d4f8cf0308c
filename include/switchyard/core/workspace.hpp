#pragma once
//! \file workspace.hpp
//! Two-phase workspace (CUB style): a policy first *plans* its scratch buffers against a
//! `workspace_planner` to learn the size, the caller allocates (or reuses) that many bytes,
//! and the same plan is then *carved* out of the caller's buffer with a `workspace_arena`,
//! so a forward pass given a workspace performs no allocation.

#include <cstddef>
#include <cstdint>

#include "switchyard/core/config.hpp"
#include "switchyard/core/error.hpp"

namespace switchyard {

//! Alignment of every buffer carved from a workspace (one cache line / a 16-byte vector and
//! the 256-byte alignment cuBLAS recommends for its pointers).
inline constexpr std::size_t workspace_alignment = 256;

//! Rounds `bytes` up to the workspace alignment.
constexpr std::size_t align_workspace(std::size_t bytes) {
  return (bytes + workspace_alignment - 1) / workspace_alignment * workspace_alignment;
}

//! Size query: accumulates the aligned sizes of the buffers a policy will take.
class workspace_planner {
 public:
  //! Reserves `count` elements of T; returns the byte offset they will have.
  template <class T>
  std::size_t reserve(index_t count) {
    const std::size_t at = bytes_;
    bytes_ += align_workspace(static_cast<std::size_t>(count) * sizeof(T));
    return at;
  }
  //! Total bytes needed.
  [[nodiscard]] std::size_t bytes() const { return bytes_; }

 private:
  std::size_t bytes_ = 0;
};

//! Carves typed buffers, in planning order, out of caller-supplied memory.
class workspace_arena {
 public:
  workspace_arena() = default;
  //! `base` must be aligned to workspace_alignment (throws range_error otherwise).
  workspace_arena(void* base, std::size_t bytes) : base_(static_cast<std::byte*>(base)), size_(bytes) {
    if (base_ == nullptr && bytes != 0) {
      throw null_pointer_error("workspace", "workspace: pointer is null but its size is non-zero");
    }
    if (reinterpret_cast<std::uintptr_t>(base_) % workspace_alignment != 0) {
      throw range_error("workspace", detail::concat("workspace: pointer must be aligned to ",
                                                    workspace_alignment, " bytes"));
    }
  }
  //! Takes `count` elements of T; throws range_error naming the sizes when it is too small.
  template <class T>
  T* take(index_t count) {
    const std::size_t need = align_workspace(static_cast<std::size_t>(count) * sizeof(T));
    if (used_ + need > size_) {
      throw range_error("workspace", detail::concat("workspace: too small, needs at least ",
                                                    used_ + need, " bytes (query the size "
                                                    "first), got ", size_));
    }
    T* p = reinterpret_cast<T*>(base_ + used_);
    used_ += need;
    return p;
  }
  [[nodiscard]] std::size_t used() const { return used_; }
  [[nodiscard]] std::size_t size() const { return size_; }

 private:
  std::byte* base_ = nullptr;
  std::size_t size_ = 0;
  std::size_t used_ = 0;
};

}  // namespace switchyard
