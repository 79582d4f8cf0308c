// SPDX-License-Identifier: Apache-2.0
// Golden checker for `topp` (spec §1).
#include <switchyard/routing/routers/topp.hpp>

#include "golden/golden.hpp"

namespace switchyard::golden {
namespace {

void check_topp(const golden_case& c) {
  const auto tol = tolerance_of(c);
  const auto x = c.input("x");
  const auto w = c.input("w_router");
  const index_t tokens = x.dim(0), d = x.dim(1), experts = w.dim(0);

  routers::TopP router{.p = c.params().at("p").get<float>(), .max_k = c.params().value("max_k", 0)};
  routing::routing_plan plan;
  routing::topp_losses losses;
  switchyard::host::route(router, matrix_view<const float>(make_view(x.data.data(), tokens, d)),
                 {make_view(w.data.data(), experts, d)}, plan, losses);

  check_diagnostic(c, "router_logits", plan.logits, tol);
  check_diagnostic(c, "router_probs", plan.probs, tol);
  check_plan(c, plan, tol);
  check_close("dynamic_loss", losses.dynamic_loss, c.expected("dynamic_loss").scalar(), tol.atol,
              tol.loss_rtol);
  check_close("lb_loss", losses.lb_loss, c.expected("lb_loss").scalar(), tol.atol, tol.loss_rtol);

  check_router_logit_gradient(c, router, plan, tol);
}

const registrar reg{"topp", &check_topp};

}  // namespace
}  // namespace switchyard::golden
