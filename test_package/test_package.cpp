// SPDX-License-Identifier: Apache-2.0
// Conan test_package: route a batch whose top-2 experts are known (identity gate) with
// routers::TopK; exit 1 when the plan is wrong.
#include <switchyard/switchyard.hpp>

#include <cstdio>
#include <vector>

int main() {
  namespace sy = switchyard;
  const std::vector<float> x = {4, 0, 3, 1, 0, 5, 1, 2, 2, 2, 0, 0};  // 3 tokens, d = 4
  const std::vector<float> w = {1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1};  // E = 4
  const int expected[3][2] = {{0, 2}, {1, 3}, {0, 1}};  // token 2 is a tie: lower index first

  const sy::routers::TopK router{.k = 2, .renormalize = true};
  sy::routing::routing_plan plan;
  sy::routing::softmax_router_losses losses;
  sy::host::route(router, sy::matrix_view<const float>(sy::make_view(x.data(), 3, 4)),
                  {sy::make_view<const float>(w.data(), 4, 4)}, plan, losses);
  int errors = 0;
  for (int t = 0; t < 3; ++t) {
    std::printf("token %d -> experts %d, %d\n", t, plan.id(t, 0), plan.id(t, 1));
    errors += plan.id(t, 0) != expected[t][0] || plan.id(t, 1) != expected[t][1];
  }
#ifdef SWITCHYARD_HAS_CBLAS
  std::printf("switchyard::host_blas: SWITCHYARD_HAS_CBLAS (the host GEMMs call cblas_sgemm)\n");
#else
  std::printf("switchyard::host_blas: no CBLAS found (the host GEMMs use the blocked loop nest)\n");
#endif
  std::printf("switchyard %d.%d.%d (Conan package): routing %s\n", sy::version.major,
              sy::version.minor, sy::version.patch, errors == 0 ? "OK" : "WRONG");
  return errors == 0 ? 0 : 1;
}
