// SPDX-License-Identifier: Apache-2.0
// Golden checker for `da_moe` (spec §2, the documented Switchyard rule).
#include <switchyard/routing/routers/da_moe.hpp>

#include "golden/golden.hpp"

namespace switchyard::golden {
namespace {

template <class Importance>
void run_da_moe(const golden_case& c, Importance imp) {
  const auto tol = tolerance_of(c);
  const auto x = c.input("x");
  const auto w = c.input("w_router");
  const auto a = c.input("attn_probs");
  const index_t tokens = x.dim(0), d = x.dim(1), experts = w.dim(0);

  routers::DAMoE router{
      .importance = imp,
      .k_rule = routing::k_rules::ceil_relative_to_max{.k_min = c.params().at("k_min").get<int>(),
                                                       .k_max = c.params().at("k_max").get<int>()},
      .renormalize = c.params().at("renormalize").get<bool>()};
  routing::da_moe_params p{make_view(w.data.data(), experts, d),
                           make_view(a.data.data(), a.dim(0), a.dim(1), a.dim(2)),
                           {}};
  routing::routing_plan plan;
  routing::softmax_router_losses losses;
  routing::da_moe_importance stats;
  switchyard::host::route(router, matrix_view<const float>(make_view(x.data.data(), tokens, d)), p, plan, losses,
                 stats);

  check_diagnostic(c, "router_logits", plan.logits, tol);
  check_diagnostic(c, "router_probs", plan.probs, tol);
  check_close("token_importance", stats.importance, c.expected("token_importance").data, tol.atol,
              tol.rtol);
  check_close("relative_importance", stats.relative, c.expected("relative_importance").data,
              tol.atol, tol.rtol);
  check_plan(c, plan, tol);
  check_close("lb_loss_switch", losses.lb_switch, c.expected("lb_loss_switch").scalar(), tol.atol,
              tol.loss_rtol);
  if (c.has_expected("lb_loss_topk"))
    check_close("lb_loss_topk", losses.lb_topk, c.expected("lb_loss_topk").scalar(), tol.atol,
                tol.loss_rtol);
  if (c.has_expected("z_loss"))
    check_close("z_loss", losses.z, c.expected("z_loss").scalar(), tol.atol, tol.loss_rtol);

  check_router_logit_gradient(c, router, plan, tol);
}

void check_da_moe(const golden_case& c) {
  const std::string k_rule = c.params().at("k_rule").get<std::string>();
  if (k_rule != "ceil_relative_to_max") unsupported(c, "k_rule=" + k_rule);
  const std::string imp = c.params().at("importance").get<std::string>();
  if (imp == "col_mean") return run_da_moe(c, routing::importance::col_mean{});
  if (imp == "cls_row") return run_da_moe(c, routing::importance::cls_row{});
  unsupported(c, "importance=" + imp);
}

const registrar reg{"da_moe", &check_da_moe};

}  // namespace
}  // namespace switchyard::golden
