#pragma once
//! \file concepts.hpp
//! What a dispatch policy must provide, and `check_dispatch<D>()`, one sentence per missing
//! requirement.

#include <concepts>
#include <type_traits>

#include "switchyard/core/config.hpp"
#include "switchyard/dispatch/groups.hpp"
#include "switchyard/routing/concepts.hpp"
#include "switchyard/routing/plan.hpp"

namespace switchyard {

namespace detail {
template <class D>
concept dispatch_ops = requires(const D& d, index_t n, routing::plan_view<const std::int32_t, const float> plan,
                                dispatch::expert_groups& g) {
  { D::layout } -> std::convertible_to<dispatch::dispatch_layout>;
  { d.max_rows(n, n, n) } -> std::convertible_to<index_t>;
  d.validate();
  d.plan_groups(plan, g);
};
}  // namespace detail

//! A dispatch policy: declares `policy_kind = dispatch_tag`, a `static constexpr
//! dispatch_layout layout`, `validate()` (throws on bad hyperparameters), `max_rows(T, width,
//! E)` (rows of the expert buffers, for the workspace query) and `plan_groups(plan, groups)`.
template <class D>
concept Dispatch = detail::declares_kind<D, dispatch_tag> && detail::dispatch_ops<D>;

//! One readable sentence per missing requirement of a dispatch policy.
template <class D>
consteval bool check_dispatch() {
  static_assert(detail::declares_kind<D, dispatch_tag>,
                "switchyard: a dispatch must declare `using policy_kind = switchyard::dispatch_tag;`");
  static_assert(detail::dispatch_ops<D>,
                "switchyard: a dispatch must have `static constexpr dispatch::dispatch_layout "
                "layout`, `void validate() const`, `index_t max_rows(index_t tokens, index_t "
                "width, index_t experts) const` and `void plan_groups(plan_view, "
                "dispatch::expert_groups&) const`");
  return true;
}

}  // namespace switchyard
