// SPDX-License-Identifier: Apache-2.0
// Golden checker for `hypermoe` (spec §4), both upstream variants, run through the library's
// layer: `MoELayer<routers::TopK, Act, Dispatch, layer::hypermoe_addon>` gives `moe_output`
// (upstream's layer output) and the same layer without the add-on gives `expert_output`;
// the plan and the router losses are the layer's. The expert FFN conventions map onto the
// layer's policies exactly:
//   switch_top1 — routers::TopK{k = 1, raw weights}; DenseActDense experts = activation::relu
//                 with w1 = wi [E, d_ff, d], w2 = wo [E, d, d_ff], no biases; HF capacity in
//                 token order = dispatch::padded_capacity with C = expert_capacity (capacity
//                 factor → 0, min_capacity = C, multiple 1) and dropped_output::scaled_input
//                 (a dropped token contributes p*·x); HF z-loss from the layer's losses, HF
//                 load balance (dropped token counts as expert 0) from the module functions;
//   gpt2_topk   — logits = x·w_gate (w_gate [d, E], read through a transposed strided view),
//                 renormalised top-k, eval cv² loss; GPT-2 Conv1D experts (y = x·W + b) =
//                 activation::gelu_tanh with w1/w2 as transposed strided views of w_fc [E, d,
//                 4d] / w_proj [E, 4d, d] and b1 = b_fc, b2 = b_proj.
// Module-level checks kept: the selection embedding and hyper(x) of layer::hypermoe_module on
// the layer's plan (upstream's `hyper_output`), and the per-token capacity drops.
// The files carry no backward quantities for hypermoe, so there is no gradient to compare.
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include <switchyard/activation/functors.hpp>
#include <switchyard/backend/host.hpp>
#include <switchyard/dispatch/padded_capacity.hpp>
#include <switchyard/layer/hypermoe_addon.hpp>
#include <switchyard/layer/moe_layer.hpp>
#include <switchyard/routing/routers/topk.hpp>

#include "golden/golden.hpp"

namespace switchyard::golden {
namespace {

matrix_view<const float> mat(const array<float>& a) {
  BOOST_TEST_REQUIRE(a.shape.size() == 2u);
  return make_view(a.data.data(), a.dim(0), a.dim(1));
}
vector_view<const float> vec(const array<float>& a) {
  BOOST_TEST_REQUIRE(a.shape.size() == 1u);
  return make_view(a.data.data(), a.dim(0));
}

//! Owns the hypernetwork inputs of a case and views them as layer::hypermoe_params.
struct hyper_inputs {
  array<float> emb, pw1, pb1, pw2, pb2, le, gw1, gb1, wup, bwup, wdown, bwdown, bupw, bupb, bdownw,
      bdownb;
  explicit hyper_inputs(const golden_case& c)
      : emb(c.input("expert_emb")),
        pw1(c.input("proc_w1")),
        pb1(c.input("proc_b1")),
        pw2(c.input("proc_w2")),
        pb2(c.input("proc_b2")),
        le(c.input("layer_embed")),
        gw1(c.input("gen_w1")),
        gb1(c.input("gen_b1")),
        wup(c.input("gen_wup")),
        bwup(c.input("gen_bwup")),
        wdown(c.input("gen_wdown")),
        bwdown(c.input("gen_bwdown")),
        bupw(c.input("gen_bup_w")),
        bupb(c.input("gen_bup_b")),
        bdownw(c.input("gen_bdown_w")),
        bdownb(c.input("gen_bdown_b")) {}
  [[nodiscard]] layer::hypermoe_params params() const {
    layer::hypermoe_params p;
    p.expert_emb = mat(emb);
    p.process1 = {mat(pw1), vec(pb1)};
    p.process2 = {mat(pw2), vec(pb2)};
    p.generator.layer_embed = mat(le);
    p.generator.linear1 = {mat(gw1), vec(gb1)};
    p.generator.weight_up = {mat(wup), vec(bwup)};
    p.generator.weight_down = {mat(wdown), vec(bwdown)};
    p.generator.bias_up = {mat(bupw), vec(bupb)};
    p.generator.bias_down = {mat(bdownw), vec(bdownb)};
    return p;
  }
};

//! The optional size params (spec §4 "Defaults" names) must agree with the input shapes.
void check_size_params(const golden_case& c, const hyper_inputs& h) {
  const auto& prm = c.params();
  auto same = [&](const char* key, std::int64_t actual, const char* from) {
    if (prm.contains(key) && prm.at(key).get<std::int64_t>() != actual)
      BOOST_ERROR(c.path << ": params." << key << " = " << prm.at(key).get<std::int64_t>()
                         << " but " << from << " gives " << actual);
  };
  same("experts_embedding_dim", h.emb.dim(1), "inputs.expert_emb [E, d_emb]");
  same("process_dim", h.pw1.dim(0), "inputs.proc_w1 [p, d_emb]");
  same("hypernet_input", h.pw2.dim(0), "inputs.proc_w2 [h_in, p]");
  same("hypernetwork_bottleneck", h.gw1.dim(0), "inputs.gen_w1 [b, h_in + d_le]");
  same("layer_emb_dim", h.le.dim(1), "inputs.layer_embed [L, d_le]");
  same("num_layers", h.le.dim(0), "inputs.layer_embed [L, d_le]");
}

//! What the two layers (with and without the HyperMoE add-on) produced.
struct layer_outputs {
  moe_result<routing::softmax_router_losses> result;  //!< of the layer with the add-on
  std::vector<float> moe;                             //!< y with the add-on: moe_output
  std::vector<float> experts;                         //!< y without it: expert_output
};

template <class Act, class Dispatch>
layer_outputs run_layers(const golden_case& c, const routers::TopK& router, const Act& act,
                         const Dispatch& dispatch, const layer::hypermoe_module& hmod,
                         const matrix_view<const float>& x, const routing::linear_router_params& rp,
                         const expert_weights<float>& w, const layer::hypermoe_params& hp) {
  const index_t tokens = x.extent(0), d = x.extent(1);
  layer_outputs out;
  out.moe.assign(static_cast<std::size_t>(tokens * d), 0.0f);
  out.experts.assign(out.moe.size(), 0.0f);
  const MoELayer<routers::TopK, Act, Dispatch, layer::hypermoe_addon> with{
      .router = router, .activation = act, .dispatch = dispatch, .addon = {.hyper = hmod}};
  const MoELayer<routers::TopK, Act, Dispatch> plain{
      .router = router, .activation = act, .dispatch = dispatch};
  with.template forward<float>(switchyard::host_context{}, x, rp, w, make_view(out.moe.data(), tokens, d), out.result, {}, hp);
  typename MoELayer<routers::TopK, Act, Dispatch>::result_type plain_result;
  plain.template forward<float>(switchyard::host_context{}, x, rp, w, make_view(out.experts.data(), tokens, d), plain_result);
  BOOST_TEST_CONTEXT(c.path << ": the layer without the add-on routes like the one with it") {
    check_exact("plain layer topk_indices", plain_result.plan.expert_ids,
                out.result.plan.expert_ids);
    check_exact("plain layer dropped", plain_result.dropped, out.result.dropped);
  }
  return out;
}

void check_hypermoe(const golden_case& c) {
  const auto tol = tolerance_of(c);
  const auto& prm = c.params();
  const std::string variant = prm.at("variant").get<std::string>();
  const std::string act = prm.value("expert_act", variant == "switch_top1" ? "relu" : "gelu_tanh");
  const auto x = c.input("x");
  const index_t tokens = x.dim(0), d = x.dim(1);
  const auto xv = matrix_view<const float>(make_view(x.data.data(), tokens, d));

  const hyper_inputs hin(c);
  check_size_params(c, hin);
  const auto hp = hin.params();
  const layer::hypermoe_module hmod{.layer_idx = prm.at("layer_idx").get<int>(),
                                      .adapter_dim = prm.at("adapter_dim").get<int>()};

  // 1. The layer (router + experts + add-on) and its plan, losses and capacity drops.
  layer_outputs out;
  if (variant == "switch_top1") {
    if (act != "relu") unsupported(c, "switch_top1 with expert_act '" + act + "' (spec: ReLU)");
    const auto wr = c.input("w_router");
    const index_t experts = wr.dim(0);
    const auto wi = c.input("expert_wi"), wo = c.input("expert_wo");  // [E,d_ff,d], [E,d,d_ff]
    BOOST_TEST_REQUIRE(wi.shape.size() == 3u);
    BOOST_TEST_REQUIRE(wo.shape.size() == 3u);
    const index_t capacity = prm.at("expert_capacity").get<index_t>();
    if (capacity < 1) unsupported(c, "expert_capacity < 1");
    const expert_weights<float> w{.w1 = make_view(wi.data.data(), wi.dim(0), wi.dim(1), wi.dim(2)),
                                  .b1 = {},
                                  .w2 = make_view(wo.data.data(), wo.dim(0), wo.dim(1), wo.dim(2)),
                                  .b2 = {}};
    // C = max(ceil(cf·T·k/E), min_capacity) rounded to a multiple of 1 (padded_capacity.hpp):
    // with cf → 0 the first term is at most 1, so C = expert_capacity (capped at T, which
    // drops nothing: top-1 routes at most T tokens to an expert).
    const dispatch::padded_capacity hf_capacity{
        .capacity_factor = std::numeric_limits<float>::min(),
        .min_capacity = capacity,
        .capacity_multiple = 1,
        .drop = dispatch::dropped_output::scaled_input};
    out = run_layers(c, routers::TopK{.k = 1, .renormalize = false}, activation::relu{},
                     hf_capacity, hmod, xv, {make_view(wr.data.data(), experts, d)}, w, hp);
    const auto& plan = out.result.plan;
    check_close("z_loss", out.result.losses.z, c.expected("z_loss").scalar(), tol.atol,
                tol.loss_rtol);
    // Per-token drops (HF's token order) from the module function; the layer's per-expert
    // drop counts must agree with them.
    std::vector<std::int32_t> dropped(static_cast<std::size_t>(tokens));
    layer::switch_capacity_drop(plan, capacity, dropped);
    const auto want_dropped = c.expected<std::int64_t>("dropped");
    check_exact("dropped", dropped, want_dropped.data);
    std::vector<index_t> per_expert(static_cast<std::size_t>(experts), 0);
    for (index_t t = 0; t < tokens && t < static_cast<index_t>(want_dropped.data.size()); ++t)
      if (want_dropped.data[t] != 0 && plan.counts[t] > 0) ++per_expert[plan.id(t, 0)];
    check_exact("layer dropped per expert (from expected.dropped)", out.result.dropped, per_expert);
    check_close("lb_loss_switch", layer::switch_hf_load_balance_loss(plan, dropped),
                c.expected("lb_loss_switch").scalar(), tol.atol, tol.loss_rtol);
  } else if (variant == "gpt2_topk") {
    if (act != "gelu_tanh")
      unsupported(c, "gpt2_topk with expert_act '" + act + "' (spec: gelu_new = gelu_tanh)");
    if (prm.value("training", false))
      unsupported(c, "gpt2_topk training=true (noisy top-k gating; spec §4.2)");
    const auto wg = c.input("w_gate");  // [d, E]
    const index_t experts = wg.dim(1);
    const auto wfc = c.input("expert_w_fc"), bfc = c.input("expert_b_fc");  // [E,d,f], [E,f]
    const auto wproj = c.input("expert_w_proj"),
               bproj = c.input("expert_b_proj");  // [E,f,d], [E,d]
    BOOST_TEST_REQUIRE(wfc.shape.size() == 3u);
    BOOST_TEST_REQUIRE(wproj.shape.size() == 3u);
    const index_t e = wfc.dim(0), dff = wfc.dim(2);
    BOOST_TEST_REQUIRE(wfc.dim(1) == d);
    // Conv1D: h = x·w_fc[e] + b_fc[e], so w1[e, f, i] = w_fc[e, i, f]; y = a·w_proj[e] +
    // b_proj[e], so w2[e, o, f] = w_proj[e, f, o].
    const expert_weights<float> w{
        .w1 = make_strided_view<const float, 3>(wfc.data.data(), {e, dff, d}, {d * dff, 1, dff}),
        .b1 = make_view(bfc.data.data(), bfc.dim(0), bfc.dim(1)),
        .w2 = make_strided_view<const float, 3>(wproj.data.data(), {wproj.dim(0), d, dff},
                                                {dff * d, 1, d}),
        .b2 = make_view(bproj.data.data(), bproj.dim(0), bproj.dim(1))};
    out = run_layers(
        c, routers::TopK{.k = prm.at("k").get<int>(), .renormalize = true}, activation::gelu_tanh{},
        dispatch::sorted_grouped{}, hmod, xv,
        {make_strided_view<const float, 2>(wg.data.data(), {experts, d}, {1, experts})}, w, hp);
    check_close("cv_loss", layer::gpt2_cv_loss_eval(out.result.plan),
                c.expected("cv_loss").scalar(), tol.atol, tol.loss_rtol);
  } else {
    unsupported(c, "hypermoe variant '" + variant + "'");
  }
  const auto& plan = out.result.plan;

  // 2. The plan (README "Plan outputs": required for hypermoe, width 1 or k) and diagnostics.
  check_diagnostic(c, "router_logits", plan.logits, tol);
  check_diagnostic(c, "router_probs", plan.probs, tol);
  check_plan(c, plan, tol);

  // 3. Layer outputs against the upstream numbers.
  check_close("expert_output (MoELayer without add-on)", out.experts,
              c.expected("expert_output").data, tol.atol, tol.rtol);
  check_close("moe_output (MoELayer + hypermoe_addon)", out.moe, c.expected("moe_output").data,
              tol.atol, tol.rtol);

  // 4. The HyperMoE module on the layer's plan: selection embedding and hyper(x).
  const index_t d_emb = hin.emb.dim(1);
  std::vector<float> u(static_cast<std::size_t>(tokens * d_emb));
  hmod.selection_embedding(plan.view(), hp.expert_emb, make_view(u.data(), tokens, d_emb));
  check_close("selection_embedding", u, c.expected("selection_embedding").data, tol.atol, tol.rtol);
  std::vector<float> hyper(static_cast<std::size_t>(tokens * d));
  hmod.forward(xv, plan, hp, make_view(hyper.data(), tokens, d));
  check_close("hyper_output", hyper, c.expected("hyper_output").data, tol.atol, tol.rtol);
}

const registrar reg{"hypermoe", &check_hypermoe};

}  // namespace
}  // namespace switchyard::golden
