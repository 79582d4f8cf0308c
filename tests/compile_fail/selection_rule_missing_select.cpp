// SPDX-License-Identifier: Apache-2.0
// Must not compile: a user's selection rule that forgot `select`. The diagnostic is the one
// sentence from switchyard::check_selection_rule.
#include <switchyard/routing/concepts.hpp>

struct my_rule {
  using policy_kind = switchyard::selection_rule_tag;
  int width(int) const { return 2; }
};

static_assert(switchyard::check_selection_rule<my_rule>());

int main() { return 0; }
