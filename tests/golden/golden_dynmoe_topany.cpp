// SPDX-License-Identifier: Apache-2.0
// Golden checker for `dynmoe_topany` (spec §3): the routing cases (forward plan, losses and
// straight-through gradients) and op=adaptive_update (record in training mode, then remove /
// add experts).
#include <switchyard/backend/host/route.hpp>
#include <switchyard/routing/routers/dynmoe.hpp>
#include <switchyard/training/dynmoe_update.hpp>

#include "golden/golden.hpp"

namespace switchyard::golden {
namespace {

std::vector<std::int32_t> mask_of(const array<float>& m) {
  std::vector<std::int32_t> out;
  for (float v : m.data) out.push_back(v != 0.0f ? 1 : 0);
  return out;
}

struct gate_inputs {
  array<float> w, g;
  std::vector<std::int32_t> mask;
  float log_t = 0.0f;
  index_t d = 0, e_max = 0;

  explicit gate_inputs(const golden_case& c)
      : w(c.input("w_gate")),
        g(c.input("thresholds")),
        mask(mask_of(c.input("experts_mask"))),
        log_t(c.input("log_temperature").scalar()),
        d(w.dim(0)),
        e_max(w.dim(1)) {}

  [[nodiscard]] routing::dynmoe_params params() const {
    return {make_view(w.data.data(), d, e_max), make_view(g.data.data(), e_max),
            make_view(mask.data(), e_max), log_t};
  }
};

void check_adaptive_update(const golden_case& c, const tolerance& tol) {
  const auto x = c.input("x_record");
  gate_inputs in(c);
  const index_t tokens = x.dim(0);

  // Record one training-mode forward over x_record.
  routers::DynMoE router{.training = true};
  routing::routing_plan plan;
  routing::dynmoe_losses losses;
  const auto xv = matrix_view<const float>(make_view(x.data.data(), tokens, in.d));
  switchyard::host::route(router, xv, in.params(), plan, losses);
  training::dynmoe_recorder rec;
  rec.reset(in.e_max, in.d);
  rec.record(plan, xv);
  check_close("routing_records", rec.routing_records, c.expected("routing_records").data, tol.atol,
              tol.rtol);
  check_close("sample_records", rec.sample_records, c.expected("sample_records").data, tol.atol,
              tol.rtol);

  const auto result = training::adaptive_update(rec, make_view(in.w.data.data(), in.d, in.e_max),
                                                make_view(in.g.data.data(), in.e_max),
                                                make_view(in.mask.data(), in.e_max));
  check_exact("new_experts_mask", in.mask, c.expected<double>("new_experts_mask").data);
  check_close("new_w_gate", in.w.data, c.expected("new_w_gate").data, tol.atol, tol.rtol);
  check_close("new_thresholds", in.g.data, c.expected("new_thresholds").data, tol.atol, tol.rtol);
  check_exact("added_expert", std::vector<std::int64_t>{result.added_expert},
              c.expected<std::int64_t>("added_expert").data);
  // Not in the README table (optional; the harness's schema lists it): compared when present.
  if (c.has_expected("num_active_experts"))
    check_exact("num_active_experts", std::vector<std::int64_t>{result.num_active_experts},
                c.expected<std::int64_t>("num_active_experts").data);
}

void check_routing(const golden_case& c, const tolerance& tol) {
  const auto x = c.input("x");
  const gate_inputs in(c);
  const index_t tokens = x.dim(0);
  const auto xv = matrix_view<const float>(make_view(x.data.data(), tokens, in.d));
  const auto p = in.params();

  const routers::DynMoE router{.training = c.params().at("training").get<bool>()};
  routing::routing_plan plan;
  routing::dynmoe_losses losses;
  switchyard::host::route(router, xv, p, plan, losses);

  check_close("scores", plan.probs, c.expected("scores").data, tol.atol, tol.rtol);
  check_close("threshold_probs", routers::DynMoE::threshold_probs(p),
              c.expected("threshold_probs").data, tol.atol, tol.rtol);
  check_exact("gates", routers::DynMoE::dense_gates(plan), c.expected<double>("gates").data);
  check_exact("topk_indices", plan.expert_ids, c.expected<std::int64_t>("topk_indices").data);
  check_close("combine_weights", plan.weights, c.expected("combine_weights").data, tol.atol,
              tol.rtol);
  check_exact("num_experts", plan.counts, c.expected<std::int64_t>("num_experts").data);
  check_exact("top_k_reported", plan.counts, c.expected<std::int64_t>("top_k_reported").data);
  check_close("aux_loss", losses.aux_loss(), c.expected("aux_loss").scalar(), tol.atol,
              tol.loss_rtol);
  check_close("sim_loss", losses.sim_loss, c.expected("sim_loss").scalar(), tol.atol,
              tol.loss_rtol);
  check_close("simple_loss", losses.simple_loss, c.expected("simple_loss").scalar(), tol.atol,
              tol.loss_rtol);
  check_close("load_balance_loss", losses.load_balance_loss,
              c.expected("load_balance_loss").scalar(), tol.atol, tol.loss_rtol);
  check_close("efficiency_loss", losses.efficiency_loss, c.expected("efficiency_loss").scalar(),
              tol.atol, tol.loss_rtol);

  // README: a gradient case carries grad_combine_dense and expects grad_w_gate and
  // grad_thresholds. A case with none of the three is not a gradient case; one with only some
  // fails (the harness rejects it, and reading a missing key fails here too).
  if (c.has_input("grad_combine_dense") || c.has_expected("grad_w_gate") ||
      c.has_expected("grad_thresholds")) {
    const auto cot = c.input("grad_combine_dense");
    const auto want_gw = c.expected("grad_w_gate"), want_gg = c.expected("grad_thresholds");
    std::vector<float> d_slots(static_cast<std::size_t>(tokens * plan.width));
    routing::dense_to_slot_cotangent(plan, cot.data.data(), d_slots.data());
    std::vector<float> gw(static_cast<std::size_t>(in.d * in.e_max), 0.0f);
    std::vector<float> gg(static_cast<std::size_t>(in.e_max), 0.0f);
    switchyard::host::route_backward(router, xv, p, plan, d_slots.data(), routing::dynmoe_losses::uniform(1.0f),
                    matrix_view<float>{},
                    {make_view(gw.data(), in.d, in.e_max), make_view(gg.data(), in.e_max)});
    check_close("grad_w_gate", gw, want_gw.data, tol.atol, tol.loss_rtol);
    check_close("grad_thresholds", gg, want_gg.data, tol.atol, tol.loss_rtol);
  }
}

void check_dynmoe_topany(const golden_case& c) {
  const auto tol = tolerance_of(c);
  const std::string variant = c.params().value("variant", "deepspeed");
  if (variant != "deepspeed") unsupported(c, "dynmoe_topany variant '" + variant + "'");
  const std::string op = c.params().value("op", "route");
  if (op == "adaptive_update") {
    check_adaptive_update(c, tol);
  } else if (op == "route") {
    check_routing(c, tol);
  } else {
    unsupported(c, "dynmoe_topany op '" + op + "'");
  }
}

const registrar reg{"dynmoe_topany", &check_dynmoe_topany};

}  // namespace
}  // namespace switchyard::golden
