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
  router.forward(matrix_view<const float>(make_view(x.data.data(), tokens, d)),
                 {make_view(w.data.data(), experts, d)}, plan, losses);

  if (c.has_expected("router_logits"))
    check_close("router_logits", plan.logits, c.expected("router_logits").data, tol.atol, tol.rtol);
  check_close("router_probs", plan.probs, c.expected("router_probs").data, tol.atol, tol.rtol);
  const auto ids = c.expected<std::int64_t>("topk_indices");
  BOOST_TEST(plan.width == ids.dim(1), "plan width " << plan.width << " vs " << ids.dim(1));
  check_exact("topk_indices", plan.expert_ids, ids.data);
  check_close("combine_weights", plan.weights, c.expected("combine_weights").data, tol.atol,
              tol.rtol);
  check_exact("num_experts", plan.counts, c.expected<std::int64_t>("num_experts").data);
  check_close("dynamic_loss", losses.dynamic_loss, c.expected("dynamic_loss").scalar(), tol.atol,
              tol.loss_rtol);
  check_close("lb_loss", losses.lb_loss, c.expected("lb_loss").scalar(), tol.atol, tol.loss_rtol);

  if (c.has_input("grad_combine_dense")) {
    const auto cot = c.input("grad_combine_dense");
    std::vector<float> d_slots(static_cast<std::size_t>(tokens * plan.width));
    routing::dense_to_slot_cotangent(plan, cot.data.data(), d_slots.data());
    std::vector<float> d_logits(static_cast<std::size_t>(tokens * experts));
    router.backward_logits(plan, d_slots.data(), {}, d_logits.data());  // no aux losses
    check_close("grad_router_logits", d_logits, c.expected("grad_router_logits").data, tol.atol,
                tol.loss_rtol);
  }
}

const registrar reg{"topp", &check_topp};

}  // namespace
}  // namespace switchyard::golden
