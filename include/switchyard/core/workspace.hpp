// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file workspace.hpp
//! Two-phase workspace, CUB style: a policy runs the same carving code twice, first over a
//! *measuring* arena (no memory; `take` returns null and only counts bytes) to learn the
//! size, then over the caller's bytes. One code path for both phases means the size query
//! cannot drift from what forward actually takes, and forward given a workspace performs no
//! allocation.

#include <cstddef>
#include <cstdint>

#include <cuda/std/span>

#include "switchyard/core/checked.hpp"
#include "switchyard/core/span.hpp"
#include "switchyard/core/config.hpp"
#include "switchyard/core/error.hpp"

namespace switchyard {

//! Carves aligned arrays out of a byte span; with no span it only measures.
class workspace_arena {
 public:
  //! Alignment of every array (a cache line; also enough for any SIMD load).
  static constexpr std::size_t alignment = 64;

  //! Measuring arena: `take` returns null and only counts bytes.
  workspace_arena() = default;
  //! Carving arena over the caller's bytes (any alignment; arrays are aligned inside).
  explicit workspace_arena(span<std::byte> bytes)
      : base_(bytes.data()), capacity_(bytes.size()) {
    if (base_ == nullptr && capacity_ != 0) {
      throw null_pointer_error("workspace", "workspace: pointer is null but its size is non-zero");
    }
  }

  //! Whether the arena hands out memory (false while measuring).
  [[nodiscard]] bool carving() const { return base_ != nullptr; }
  //! Bytes handed out (or measured) so far, alignment padding included.
  [[nodiscard]] std::size_t used() const { return used_; }
  //! Bytes a caller must supply for what this measuring arena counted: the count plus one
  //! alignment of slack for a span that does not start on an aligned boundary.
  [[nodiscard]] std::size_t required() const {
    return static_cast<std::size_t>(detail::checked_add(
        "workspace size", static_cast<index_t>(used_), static_cast<index_t>(alignment)));
  }

  //! The next `n` elements of U (aligned); throws shape_error("workspace") naming the sizes
  //! when the caller's span is too small, range_error("workspace size") when n < 0 or the
  //! byte count does not fit in index_t.
  template <class U>
  U* take(index_t n) {
    if (base_ != nullptr) {  // align the address: the caller's span may start anywhere
      const auto addr = reinterpret_cast<std::uintptr_t>(base_ + used_);
      used_ += (alignment - addr % alignment) % alignment;
    } else {
      used_ = (used_ + alignment - 1) / alignment * alignment;
    }
    // A negative count or a byte count past index_t (sizes multiplied from user input that
    // wrapped) is a range_error, never a too small block.
    const std::size_t bytes = detail::checked_bytes("workspace size", n, sizeof(U));
    U* p = base_ != nullptr ? reinterpret_cast<U*>(base_ + used_) : nullptr;
    used_ = static_cast<std::size_t>(
        detail::checked_add("workspace size", static_cast<index_t>(used_), static_cast<index_t>(bytes)));
    if (base_ != nullptr && used_ > capacity_) {
      throw shape_error("workspace", detail::concat(
                                         "workspace: expected at least ", used_,
                                         " bytes (see workspace_size), got ", capacity_));
    }
    return p;
  }

 private:
  std::byte* base_ = nullptr;
  std::size_t capacity_ = 0;
  std::size_t used_ = 0;
};

}  // namespace switchyard
