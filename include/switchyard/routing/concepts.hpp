// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file concepts.hpp
//! What a policy must provide, as C++20 concepts, plus `check_*` helpers that state each
//! missing piece in one sentence (a `static_assert` per requirement) instead of a wall of
//! unsatisfied-constraint notes.
//!
//! A type opts in by name (`using policy_kind = switchyard::selection_rule_tag;`), so it
//! cannot satisfy a concept by accident.

#include <concepts>
#include <cstdint>
#include <type_traits>

#include <cuda/std/span>

#include "switchyard/core/span.hpp"
#include "switchyard/core/config.hpp"
#include "switchyard/core/policy.hpp"

namespace switchyard {

namespace detail {
template <class R>
concept has_width = requires(const R& r, int num_experts) {
  { r.width(num_experts) } -> std::convertible_to<int>;
};

template <class R>
concept has_select = requires(const R& r, span<const float> scores,
                              span<std::int32_t> ids, span<float> weights) {
  { r.select(scores, ids, weights) } -> std::convertible_to<int>;
};

template <class R>
concept has_validate = requires(const R& r, int num_experts) { r.validate(num_experts); };
}  // namespace detail

//! A per-token selection rule: given one token's scores over E experts, writes up to
//! `width(E)` expert ids (descending score, ties to the lower id, -1 padded) and combine
//! weights (0 padded) and returns how many slots it used. `__host__ __device__`.
template <class R>
concept SelectionRule = detail::declares_kind<R, selection_rule_tag> && detail::has_width<R> &&
                        detail::has_select<R> && std::is_trivially_copyable_v<R>;

//! One readable sentence per missing requirement of a selection rule.
template <class R>
consteval bool check_selection_rule() {
  static_assert(detail::declares_kind<R, selection_rule_tag>,
                "switchyard: a selection rule must declare "
                "`using policy_kind = switchyard::selection_rule_tag;`");
  static_assert(detail::has_width<R>,
                "switchyard: a selection rule must have `int width(int num_experts) const` "
                "returning the most experts one token may use");
  static_assert(detail::has_select<R>,
                "switchyard: a selection rule must have `SWITCHYARD_HD int select("
                "span<const float> scores, span<std::int32_t> ids, "
                "span<float> weights) const` returning the number of slots used");
  static_assert(std::is_trivially_copyable_v<R>,
                "switchyard: a selection rule must be trivially copyable (it is passed to "
                "CUDA kernels by value)");
  return true;
}

//! A router: scoring × selection, with forward (plan + aux losses) and backward.
//! The full shape of the contract is documented in docs/design.md; the concept checks the
//! parts the layer calls.
template <class R>
concept Router = detail::declares_kind<R, router_tag> && requires {
  typename R::params_type;
  typename R::grads_type;
  typename R::losses_type;
} && requires(const R& r, const typename R::params_type& p) {
  { r.num_experts(p) } -> std::convertible_to<index_t>;
  { r.width(p) } -> std::convertible_to<index_t>;
};

//! One readable sentence per missing requirement of a router.
template <class R>
consteval bool check_router() {
  static_assert(detail::declares_kind<R, router_tag>,
                "switchyard: a router must declare `using policy_kind = switchyard::router_tag;`");
  static_assert(requires { typename R::params_type; },
                "switchyard: a router must name its parameter views as `params_type`");
  static_assert(requires { typename R::grads_type; },
                "switchyard: a router must name its parameter-gradient views as `grads_type`");
  static_assert(requires { typename R::losses_type; },
                "switchyard: a router must name its auxiliary-loss struct as `losses_type`");
  if constexpr (requires { typename R::params_type; }) {
    static_assert(requires(const R& r, const typename R::params_type& p) {
      { r.num_experts(p) } -> std::convertible_to<index_t>;
      { r.width(p) } -> std::convertible_to<index_t>;
    }, "switchyard: a router must have `index_t num_experts(const params_type&) const` and "
       "`index_t width(const params_type&) const`");
  }
  return true;
}

}  // namespace switchyard
