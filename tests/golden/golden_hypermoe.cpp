// Golden checker for `hypermoe` (spec §4), both upstream variants:
//   switch_top1 — routers::TopK{k = 1, raw weights}, HF capacity in token order, HF z-loss and
//                 load balance (dropped token counts as expert 0), ReLU DenseActDense experts;
//   gpt2_topk   — logits = x·w_gate (w_gate [d, E], read through a transposed strided view),
//                 renormalised top-k, eval cv² loss, GPT-2 Conv1D/gelu_tanh experts.
// The expert FFNs are plain loops here (the general MoELayer is tested elsewhere); the
// hypernetwork adapter is layer::hypermoe_module.
#include <cmath>
#include <string>
#include <vector>

#include <switchyard/layer/hypermoe.hpp>
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
  array<float> emb, pw1, pb1, pw2, pb2, le, gw1, gb1, wup, bwup, wdown, bwdown, bupw, bupb,
      bdownw, bdownb;
  explicit hyper_inputs(const golden_case& c)
      : emb(c.input("expert_emb")), pw1(c.input("proc_w1")), pb1(c.input("proc_b1")),
        pw2(c.input("proc_w2")), pb2(c.input("proc_b2")), le(c.input("layer_embed")),
        gw1(c.input("gen_w1")), gb1(c.input("gen_b1")), wup(c.input("gen_wup")),
        bwup(c.input("gen_bwup")), wdown(c.input("gen_wdown")), bwdown(c.input("gen_bwdown")),
        bupw(c.input("gen_bup_w")), bupb(c.input("gen_bup_b")), bdownw(c.input("gen_bdown_w")),
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

float gelu_tanh(float v) {
  const double x = v;
  return static_cast<float>(0.5 * x *
                            (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x))));
}

// Switch DenseActDense: Expert_e(x) = wo[e] · ReLU(wi[e] · x); wi [E, d_ff, d], wo [E, d, d_ff].
std::vector<float> switch_expert(const array<float>& wi, const array<float>& wo, const float* x,
                                 index_t e) {
  const index_t dff = wi.dim(1), d = wi.dim(2);
  std::vector<double> h(dff);
  for (index_t f = 0; f < dff; ++f) {
    double acc = 0.0;
    for (index_t i = 0; i < d; ++i) acc += double(wi.data[(e * dff + f) * d + i]) * x[i];
    h[f] = std::max(0.0, double(static_cast<float>(acc)));
  }
  std::vector<float> y(d);
  for (index_t o = 0; o < d; ++o) {
    double acc = 0.0;
    for (index_t f = 0; f < dff; ++f) acc += double(wo.data[(e * d + o) * dff + f]) * h[f];
    y[o] = static_cast<float>(acc);
  }
  return y;
}

// GPT-2 MLP with Conv1D layout: Expert_e(x) = gelu_tanh(x·w_fc[e] + b_fc[e])·w_proj[e] + b_proj[e];
// w_fc [E, d, 4d], w_proj [E, 4d, d].
std::vector<float> gpt2_expert(const array<float>& wfc, const array<float>& bfc,
                               const array<float>& wproj, const array<float>& bproj,
                               const float* x, index_t e) {
  const index_t d = wfc.dim(1), dff = wfc.dim(2);
  std::vector<double> h(dff);
  for (index_t f = 0; f < dff; ++f) {
    double acc = bfc.data[e * dff + f];
    for (index_t i = 0; i < d; ++i) acc += double(wfc.data[(e * d + i) * dff + f]) * x[i];
    h[f] = gelu_tanh(static_cast<float>(acc));
  }
  std::vector<float> y(d);
  for (index_t o = 0; o < d; ++o) {
    double acc = bproj.data[e * d + o];
    for (index_t f = 0; f < dff; ++f) acc += double(wproj.data[(e * dff + f) * d + o]) * h[f];
    y[o] = static_cast<float>(acc);
  }
  return y;
}

void check_if(const golden_case& c, const std::string& key, const std::vector<float>& got,
              double atol, double rtol) {
  if (c.has_expected(key)) check_close(key, got, c.expected(key).data, atol, rtol);
}

void check_hypermoe(const golden_case& c) {
  const auto tol = tolerance_of(c);
  const auto& prm = c.params();
  const std::string variant = prm.at("variant").get<std::string>();
  const auto x = c.input("x");
  const index_t tokens = x.dim(0), d = x.dim(1);
  const auto xv = matrix_view<const float>(make_view(x.data.data(), tokens, d));

  // 1. Routing.
  routing::routing_plan plan;
  routing::softmax_router_losses losses;
  std::vector<std::int32_t> dropped;
  std::vector<float> expert_out(static_cast<std::size_t>(tokens * d), 0.0f);
  index_t experts = 0;
  if (variant == "switch_top1") {
    const auto w = c.input("w_router");
    experts = w.dim(0);
    routers::TopK router{.k = 1, .renormalize = false};
    router.forward(xv, {make_view(w.data.data(), experts, d)}, plan, losses);
    dropped.resize(static_cast<std::size_t>(tokens));
    const index_t capacity = prm.value("expert_capacity", 64);
    layer::switch_capacity_drop(plan, capacity, dropped);
    check_close("z_loss", losses.z, c.expected("z_loss").scalar(), tol.atol, tol.loss_rtol);
    check_close("lb_loss_switch", layer::switch_hf_load_balance_loss(plan, dropped),
                c.expected("lb_loss_switch").scalar(), tol.atol, tol.loss_rtol);
    if (c.has_expected("dropped"))
      check_exact("dropped", dropped, c.expected<std::int64_t>("dropped").data);
    const auto wi = c.input("expert_wi"), wo = c.input("expert_wo");
    for (index_t t = 0; t < tokens; ++t) {
      const float* xt = x.data.data() + t * d;
      const float pstar = plan.weight(t, 0);
      std::vector<float> y(xt, xt + d);  // dropped: the token itself
      if (!dropped[t]) y = switch_expert(wi, wo, xt, plan.id(t, 0));
      for (index_t o = 0; o < d; ++o) expert_out[t * d + o] = pstar * y[o];
    }
  } else if (variant == "gpt2_topk") {
    const auto w = c.input("w_gate");  // [d, E]
    experts = w.dim(1);
    routers::TopK router{.k = prm.at("k").get<int>(), .renormalize = true};
    router.forward(xv, {make_strided_view<const float, 2>(w.data.data(), {experts, d}, {1, experts})}, plan,
                   losses);
    check_close("cv_loss", layer::gpt2_cv_loss_eval(plan), c.expected("cv_loss").scalar(),
                tol.atol, tol.loss_rtol);
    const auto wfc = c.input("expert_w_fc"), bfc = c.input("expert_b_fc");
    const auto wproj = c.input("expert_w_proj"), bproj = c.input("expert_b_proj");
    for (index_t t = 0; t < tokens; ++t) {
      std::vector<double> acc(d, 0.0);
      for (index_t j = 0; j < plan.counts[t]; ++j) {
        const auto y = gpt2_expert(wfc, bfc, wproj, bproj, x.data.data() + t * d, plan.id(t, j));
        for (index_t o = 0; o < d; ++o) acc[o] += double(plan.weight(t, j)) * y[o];
      }
      for (index_t o = 0; o < d; ++o) expert_out[t * d + o] = static_cast<float>(acc[o]);
    }
  } else {
    unsupported(c, "hypermoe variant '" + variant + "'");
  }

  check_if(c, "router_logits", plan.logits, tol.atol, tol.rtol);
  check_if(c, "router_probs", plan.probs, tol.atol, tol.rtol);
  if (c.has_expected("topk_indices"))
    check_exact("topk_indices", plan.expert_ids, c.expected<std::int64_t>("topk_indices").data);
  check_if(c, "combine_weights", plan.weights, tol.atol, tol.rtol);
  if (c.has_expected("num_experts"))
    check_exact("num_experts", plan.counts, c.expected<std::int64_t>("num_experts").data);

  // 2. HyperMoE module.
  const hyper_inputs hin(c);
  const auto hp = hin.params();
  layer::hypermoe_module module{.layer_idx = prm.at("layer_idx").get<int>(),
                                .adapter_dim = prm.at("adapter_dim").get<int>()};
  const index_t d_emb = hin.emb.dim(1);
  std::vector<float> u(static_cast<std::size_t>(tokens * d_emb));
  module.selection_embedding(plan.view(), hp.expert_emb, make_view(u.data(), tokens, d_emb));
  check_close("selection_embedding", u, c.expected("selection_embedding").data, tol.atol,
              tol.rtol);
  std::vector<float> hyper(static_cast<std::size_t>(tokens * d));
  module.forward(xv, plan, hp, make_view(hyper.data(), tokens, d));
  check_close("hyper_output", hyper, c.expected("hyper_output").data, tol.atol, tol.rtol);
  check_close("expert_output", expert_out, c.expected("expert_output").data, tol.atol, tol.rtol);
  std::vector<float> moe(expert_out.size());
  for (std::size_t i = 0; i < moe.size(); ++i) moe[i] = expert_out[i] + hyper[i];
  check_close("moe_output", moe, c.expected("moe_output").data, tol.atol, tol.rtol);
}

const registrar reg{"hypermoe", &check_hypermoe};

}  // namespace
}  // namespace switchyard::golden
