// SPDX-License-Identifier: Apache-2.0
// Golden checker for `topk_softmax` (spec §0.1).
#include <switchyard/routing/routers/topk.hpp>

#include "golden/golden.hpp"

namespace switchyard::golden {
namespace {

void check_topk_softmax(const golden_case& c) {
  const auto tol = tolerance_of(c);
  const auto x = c.input("x");
  const auto w = c.input("w_router");
  const index_t tokens = x.dim(0), d = x.dim(1), experts = w.dim(0);

  routers::TopK router{.k = c.params().at("k").get<int>(),
                       .renormalize = c.params().at("renormalize").get<bool>()};
  routing::routing_plan plan;
  routing::softmax_router_losses losses;
  switchyard::host::route(router, matrix_view<const float>(make_view(x.data.data(), tokens, d)),
                 {make_view(w.data.data(), experts, d)}, plan, losses);

  check_diagnostic(c, "router_logits", plan.logits, tol);
  check_diagnostic(c, "router_probs", plan.probs, tol);
  check_plan(c, plan, tol);
  check_close("lb_loss_switch", losses.lb_switch, c.expected("lb_loss_switch").scalar(), tol.atol,
              tol.loss_rtol);
  check_close("lb_loss_topk", losses.lb_topk, c.expected("lb_loss_topk").scalar(), tol.atol,
              tol.loss_rtol);
  check_close("z_loss", losses.z, c.expected("z_loss").scalar(), tol.atol, tol.loss_rtol);

  check_router_logit_gradient(c, router, plan, tol);
}

const registrar reg{"topk_softmax", &check_topk_softmax};

}  // namespace
}  // namespace switchyard::golden
