// SPDX-License-Identifier: Apache-2.0
// Must not compile: a router without `losses_type`.
#include <switchyard/routing/concepts.hpp>
#include <switchyard/routing/linear_softmax.hpp>

struct my_router {
  using policy_kind = switchyard::router_tag;
  using params_type = switchyard::routing::linear_router_params;
  using grads_type = switchyard::routing::linear_router_grads;
  switchyard::index_t num_experts(const params_type& p) const { return p.w.extent(0); }
  switchyard::index_t width(const params_type&) const { return 1; }
};

static_assert(switchyard::check_router<my_router>());

int main() { return 0; }
