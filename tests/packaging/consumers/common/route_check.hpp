// SPDX-License-Identifier: Apache-2.0
// Shared by every packaging consumer: route four tokens whose top-2 experts are known (the gate
// is the identity, so the logits are the tokens themselves; token 3 is a tie, which goes to the
// lower expert index) with routers::TopK and check the plan. Returns the number of mismatches.
#pragma once
#include <switchyard/switchyard.hpp>

#include <cmath>
#include <cstdio>
#include <vector>

namespace packaging_check {

inline int route_and_check(const char* route) {
  namespace sy = switchyard;
  constexpr int tokens = 4, d = 4, experts = 4;
  const std::vector<float> x = {4, 0, 3, 1,   // -> experts 0, 2
                                0, 5, 1, 2,   // -> 1, 3
                                1, 2, 3, 4,   // -> 3, 2
                                2, 2, 0, 0};  // tie -> 0, 1
  std::vector<float> w(experts * d, 0.0f);
  for (int e = 0; e < experts; ++e) w[e * d + e] = 1.0f;
  const int expected[tokens][2] = {{0, 2}, {1, 3}, {3, 2}, {0, 1}};

  const sy::routers::TopK router{.k = 2, .renormalize = true};
  sy::routing::routing_plan plan;
  sy::routing::softmax_router_losses losses;
  // The host backend's convenience for a router on its own (sizes the plan, allocates scratch).
  sy::host::route(router, sy::matrix_view<const float>(sy::make_view(x.data(), tokens, d)),
                  {sy::make_view<const float>(w.data(), experts, d)}, plan, losses);

  int errors = 0;
  std::printf("switchyard %d.%d.%d via %s: top-%d of %d experts\n", sy::version.major,
              sy::version.minor, sy::version.patch, route, router.k, experts);
  for (int t = 0; t < tokens; ++t) {
    const bool ok = plan.counts[t] == 2 && plan.id(t, 0) == expected[t][0] &&
                    plan.id(t, 1) == expected[t][1] &&
                    std::fabs(plan.weight(t, 0) + plan.weight(t, 1) - 1.0f) < 1e-5f;
    errors += ok ? 0 : 1;
    std::printf("  token %d -> experts %d, %d (w=%.3f, %.3f)%s\n", t, plan.id(t, 0),
                plan.id(t, 1), plan.weight(t, 0), plan.weight(t, 1),
                ok ? "" : "  MISMATCH");
  }
  std::printf("%s\n", errors == 0 ? "routing OK" : "routing WRONG");
  return errors;
}

}  // namespace packaging_check
