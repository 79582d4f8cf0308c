// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file policy.hpp
//! The policy vocabulary in one place: every tag a policy declares as `policy_kind`, and the
//! opt-in test the concepts share. A type opts in by name (`using policy_kind =
//! switchyard::router_tag;`), so it cannot satisfy a concept by accident.

#include <type_traits>

namespace switchyard {

//! Tag a per-token selection rule declares as `policy_kind` (routing/selection/).
struct selection_rule_tag {};
//! Tag a router declares as `policy_kind` (routing/routers/).
struct router_tag {};
//! Tag an activation declares as `policy_kind` (activation/).
struct activation_tag {};
//! Tag a dispatch policy declares as `policy_kind` (dispatch/).
struct dispatch_tag {};
//! Tag an add-on module declares as `policy_kind` (layer/addon.hpp).
struct addon_tag {};

namespace detail {
//! P opted in as a policy of kind Tag.
template <class P, class Tag>
concept declares_kind = requires { typename P::policy_kind; } &&
                        std::is_same_v<typename P::policy_kind, Tag>;
}  // namespace detail

}  // namespace switchyard
