// SPDX-License-Identifier: Apache-2.0
// Golden checker for `adaptive_gating` (spec §5): the router, and op=curriculum_order.
#include <switchyard/routing/routers/adaptive_gating.hpp>
#include <switchyard/training/curriculum.hpp>

#include "golden/golden.hpp"

namespace switchyard::golden {
namespace {

void check_curriculum(const golden_case& c) {
  const auto tol = tolerance_of(c);
  const auto counts = c.input<std::int32_t>("top2_counts");
  const auto len = c.input<std::int32_t>("seq_len");
  const index_t n = counts.dim(0), layers = counts.dim(1);
  const auto r = training::curriculum_order(
      matrix_view<const std::int32_t>(make_view(counts.data.data(), n, layers)),
      vector_view<const std::int32_t>(make_view(len.data.data(), n)));
  check_close("complexity", r.complexity, c.expected("complexity").data, tol.atol, tol.rtol);
  check_close("cosine_to_reference", r.cosine_to_reference, c.expected("cosine_to_reference").data,
              tol.atol, tol.rtol);
  check_exact("order", r.order, c.expected<std::int64_t>("order").data);
}

void check_adaptive_gating(const golden_case& c) {
  if (c.params().value("op", std::string()) == "curriculum_order") return check_curriculum(c);
  if (c.params().contains("op")) unsupported(c, "op=" + c.params().at("op").dump());
  const auto tol = tolerance_of(c);
  const auto x = c.input("x");
  const auto w = c.input("w_router");
  const index_t tokens = x.dim(0), d = x.dim(1), experts = w.dim(0);

  routers::AdaptiveGating router{.threshold = c.params().at("threshold").get<float>(),
                                 .renormalize = c.params().at("renormalize").get<bool>()};
  routing::routing_plan plan;
  routing::adaptive_gating_losses losses;
  switchyard::host::route(router, matrix_view<const float>(make_view(x.data.data(), tokens, d)),
                 {make_view(w.data.data(), experts, d)}, plan, losses);

  check_diagnostic(c, "router_logits", plan.logits, tol);
  check_diagnostic(c, "router_probs", plan.probs, tol);
  check_plan(c, plan, tol);
  check_close("lb_loss", losses.lb_loss, c.expected("lb_loss").scalar(), tol.atol, tol.loss_rtol);
  check_close("top2_fraction", losses.top2_fraction, c.expected("top2_fraction").scalar(), tol.atol,
              tol.rtol);

  check_router_logit_gradient(c, router, plan, tol);
}

const registrar reg{"adaptive_gating", &check_adaptive_gating};

}  // namespace
}  // namespace switchyard::golden
