// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file concepts.hpp
//! What a dispatch policy must provide, and `check_dispatch<D>()`, one sentence per missing
//! requirement.
//!
//! A dispatch policy is a value: its hyperparameters and `SWITCHYARD_HD` math (capacity, sort
//! key, row bounds). Turning a plan into `expert_groups` is the backend's job
//! (`host::plan_groups` in `backend/host/dispatch_plan.hpp`), so no header here includes a
//! backend.

#include <concepts>
#include <type_traits>

#include "switchyard/core/config.hpp"
#include "switchyard/dispatch/groups.hpp"
#include "switchyard/routing/concepts.hpp"

namespace switchyard {

namespace detail {
template <class D>
concept dispatch_ops = requires(const D& d, index_t n) {
  { D::layout } -> std::convertible_to<dispatch::dispatch_layout>;
  { d.max_rows(n, n, n) } -> std::convertible_to<index_t>;
  d.validate();
};
}  // namespace detail

//! A dispatch policy: declares `policy_kind = dispatch_tag`, a `static constexpr
//! dispatch_layout layout`, `validate()` (throws on bad hyperparameters) and `max_rows(T,
//! width, E)` (rows of the expert buffers, for the workspace query). A backend plans it
//! (`host::plan_groups(policy, plan, groups)`; a user-defined policy gives that a
//! `plan_groups(plan, groups)` member).
template <class D>
concept Dispatch = detail::declares_kind<D, dispatch_tag> && detail::dispatch_ops<D>;

//! One readable sentence per missing requirement of a dispatch policy.
template <class D>
consteval bool check_dispatch() {
  static_assert(detail::declares_kind<D, dispatch_tag>,
                "switchyard: a dispatch must declare `using policy_kind = switchyard::dispatch_tag;`");
  static_assert(detail::dispatch_ops<D>,
                "switchyard: a dispatch must have `static constexpr dispatch::dispatch_layout "
                "layout`, `void validate() const` and `index_t max_rows(index_t tokens, index_t "
                "width, index_t experts) const`");
  return true;
}

}  // namespace switchyard
