// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file loss_fields.hpp
//! Names for the coefficient fields of a router's `losses_type`. Each losses struct lists the
//! fields that backward reads as coefficients (each multiplies its loss's gradient) in
//! `static constexpr auto coefficient_fields()`, a `std::tuple` of `loss_field<&S::member>`
//! holding the member's name:
//!
//!     static constexpr auto coefficient_fields() {
//!       return std::tuple{loss_field<&topp_losses::lb_loss>{"lb_loss"}, ...};
//!     }
//!
//! Diagnostics that forward reports in the same struct (Adaptive Gating's `top2_fraction`,
//! ReMoE's pair counts and sparsity, expert choice's capacity) are not listed: backward
//! ignores them. training/aux_loss.hpp builds schedules, parsing and printing on these lists.
//! Host-only metadata (no `__device__` use); constexpr, no allocation.

#include <cstddef>
#include <tuple>
#include <type_traits>

namespace switchyard::detail {
//! The struct and value type of a data-member pointer `V S::*`.
template <class M>
struct member_pointer_traits;
template <class S, class V>
struct member_pointer_traits<V S::*> {
  using struct_type = S;
  using value_type = V;
};
}  // namespace switchyard::detail

namespace switchyard::routing {

//! One coefficient field of a losses struct: `loss_field<&S::lb_loss>{"lb_loss"}`. The member
//! must be a `float` (coefficients are floats in every backward).
template <auto Member>
struct loss_field {
  using losses_type = typename ::switchyard::detail::member_pointer_traits<
      decltype(Member)>::struct_type;  //!< the losses struct S
  static_assert(
      std::is_same_v<
          typename ::switchyard::detail::member_pointer_traits<decltype(Member)>::value_type,
          float>,
      "loss_field: a coefficient field must be a float member");
  static constexpr auto member = Member;  //!< the member pointer `&S::field`
  const char* name = "";                  //!< the member's name, e.g. "lb_loss"

  //! The field of `s` (a reference to the member).
  [[nodiscard]] constexpr float& of(losses_type& s) const { return s.*Member; }
  //! The field of `s` (read only).
  [[nodiscard]] constexpr float of(const losses_type& s) const { return s.*Member; }
};

//! True when `S::coefficient_fields()` exists (every router's losses struct has it).
template <class S>
concept has_coefficient_fields = requires {
  S::coefficient_fields();
};

//! The number of coefficient fields of `S`.
template <has_coefficient_fields S>
inline constexpr std::size_t coefficient_count =
    std::tuple_size_v<decltype(S::coefficient_fields())>;

}  // namespace switchyard::routing
