// SPDX-License-Identifier: Apache-2.0
// The Hugging Face acceptance cases (issue #12): every case in $SWITCHYARD_HF_CASES_DIR
// (default: ../shared/hf-cases beside the checkout; format in its README.md) becomes one
// Boost.Test case. The test builds the layer the case's router description names —
// routers::ScoredTopK with the case's scoring, selection, bias, groups, hash table,
// normalisation and scaling; the activation; shared experts; identity experts; the router
// weight on the input; the capacity rule — runs forward and backward on the host backend and
// checks y, the router logits and scores, the selected ids (as sets, ties by the README's
// rule), the combine weights (matched by id), kept pairs and drops, and every gradient the
// case carries, with the case's tolerances. Unknown families, fields or values fail the case.
// The classic families (Mixtral, Qwen3-MoE, OLMoE, Granite, Switch) also run through
// routers::TopK, which must agree with the same references.
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <iostream>
#include <limits>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <switchyard/routing/routers/scored_topk.hpp>
#include <switchyard/switchyard.hpp>

#include "hf/hf_case.hpp"

namespace bt = boost::unit_test;
namespace sy = switchyard;
using sy::index_t;
using sy::hf::hf_case;
using sy::hf::json;
namespace fs = std::filesystem;

namespace {

fs::path cases_dir() {
  if (const char* env = std::getenv("SWITCHYARD_HF_CASES_DIR"); env && *env) return env;
  return SWITCHYARD_DEFAULT_HF_CASES_DIR;
}

// ---- comparisons ------------------------------------------------------------------------------

double max_abs(const std::vector<double>& v) {
  double m = 0.0;
  for (double a : v) m = std::max(m, std::abs(a));
  return m;
}

template <class A>
std::vector<double> as_double(const std::vector<A>& v) {
  return std::vector<double>(v.begin(), v.end());
}

//! max|ours − ref| <= rel · max|ref| (and the same element count).
void check_rel(const std::string& what, const std::vector<double>& ours,
               const std::vector<double>& ref, double rel) {
  BOOST_TEST_REQUIRE(ours.size() == ref.size(), what << ": " << ours.size() << " values, reference has "
                                                     << ref.size());
  double err = 0.0;
  std::size_t at = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    const double e = std::abs(ours[i] - ref[i]);
    if (!(e <= err)) {  // NaN counts as the largest error
      err = std::isnan(e) ? std::numeric_limits<double>::infinity() : e;
      at = i;
    }
  }
  const double scale = max_abs(ref);
  BOOST_CHECK_MESSAGE(err <= rel * scale, what << ": max|Δ| = " << err << " at element " << at
                                               << " (ours " << ours[at] << ", reference " << ref[at]
                                               << ") > " << rel << " · max|ref| = " << rel * scale);
}

// ---- the case's description -------------------------------------------------------------------

struct tolerances {
  double y = 1e-5, logits = 1e-5, weights_abs = 2e-6, grads = 2e-5;
};

tolerances read_tolerances(const json& h) {
  tolerances t;
  const json& j = h.at("tolerances");
  t.y = j.at("y").at("max_abs_err_over_max_abs_ref").get<double>();
  t.logits = j.at("router_logits").at("max_abs_err_over_max_abs_ref").get<double>();
  const double w = j.at("topk_weights").at("max_abs_err").get<double>();
  t.weights_abs = w;
  t.grads = j.at("gradients").at("max_abs_err_over_max_abs_ref").get<double>();
  return t;
}

//! The router the schema describes.
sy::routers::ScoredTopK make_router(const json& r) {
  namespace rt = sy::routing;
  sy::routers::ScoredTopK out;
  out.k = r.at("k").get<int>();
  const std::string scoring = r.at("scoring").get<std::string>();
  out.scoring = scoring == "softmax"   ? rt::score_function::softmax
                : scoring == "sigmoid" ? rt::score_function::sigmoid
                                       : rt::score_function::sqrt_softplus;
  out.select_on_logits = r.at("select_on").get<std::string>() == "logits";
  out.softmax_after_topk = r.at("softmax_after_topk").get<bool>();
  if (out.softmax_after_topk) out.scoring = rt::score_function::identity;
  out.selection = r.at("selection").get<std::string>() == "hash" ? rt::selection_kind::hash
                                                                 : rt::selection_kind::topk;
  if (const json& g = r.at("group_limit"); !g.is_null()) {
    out.groups.n_group = g.at("n_group").get<int>();
    out.groups.topk_group = g.at("topk_group").get<int>();
    out.groups.score = g.at("group_score").get<std::string>() == "max" ? rt::group_score::max
                                                                       : rt::group_score::top2_sum;
    out.groups.excluded_fill = g.at("excluded_fill").get<std::string>() == "0"
                                   ? 0.0f
                                   : -std::numeric_limits<float>::infinity();
  }
  const std::string norm = r.at("normalize").get<std::string>();
  if (norm == "sum") {
    out.normalize.kind = rt::normalization::sum;
  } else if (norm.rfind("pnorm:", 0) == 0) {
    out.normalize.kind = rt::normalization::pnorm;
    out.normalize.p = std::stof(norm.substr(6));
  }
  if (const json& e = r.at("normalize_eps"); !e.is_null()) {
    out.normalize.eps = e.at("kind").get<std::string>() == "add" ? rt::epsilon_kind::add
                                                                 : rt::epsilon_kind::clamp_min;
    out.normalize.eps_value = e.at("value").get<float>();
  }
  out.scaling = r.at("scaling_factor").get<float>();
  return out;
}

// ---- one run of the layer ---------------------------------------------------------------------

//! Everything the layer reads, host-owned, in Switchyard's layout (the case's arrays).
struct inputs {
  index_t tokens = 0, d = 0, experts = 0, router_experts = 0, k = 0, chunks = 1;
  std::vector<float> x, dy, rw, rb, sbias, w1, b1, w2, b2, sw1, sb1, sw2, sb2, sgate;
  std::vector<index_t> w1_shape, w2_shape, sw1_shape, sw2_shape;
  std::vector<std::int32_t> table, token_ids;
  index_t vocab = 0;
  bool weight_on_input = false;
  index_t identity = 0;
};

//! What one run produced (forward and backward), with the plan per token.
struct outputs {
  std::vector<float> y, logits, probs, weights, d_weights, d_logits, dx;
  std::vector<std::int32_t> ids, counts, kept;
  std::vector<index_t> dropped;  // [chunks, E]
  index_t ffn_pairs = 0;         // pairs of the plans naming an FFN expert (id < E)
  index_t phase_pairs = 0;       // pairs the routed expert phase was handed (expert_rows_probe)
  index_t phase_max_id = -1;     // largest id the phase saw
  std::vector<float> gw1, gb1, gw2, gb2, gsw1, gsb1, gsw2, gsb2, gsgate, grw, grb;
};

template <class T>
auto view3(const std::vector<T>& v, const std::vector<index_t>& s) {
  return sy::make_view<const T>(v.data(), s[0], s[1], s[2]);
}
template <class T>
auto grad3(std::vector<T>& v, const std::vector<index_t>& s) {
  return sy::make_view<T>(v.data(), s[0], s[1], s[2]);
}

//! One forward and backward over the case's chunks. With `ref_dw` (a cotangent of the combine
//! weights in our slot order), `d_logits` is the router's backward of that cotangent instead
//! of our own d_weights'.
template <class Router, class Act, class Dispatch>
outputs run_layer(const inputs& in, const Router& router, const Act& act, const Dispatch& disp,
                  bool with_shared, const std::vector<float>* ref_dw = nullptr) {
  sy::MoELayer<Router, Act, Dispatch> layer{.router = router, .activation = act, .dispatch = disp};
  layer.router_weight_on_input = in.weight_on_input;
  layer.identity_experts = in.identity;
  const index_t T = in.tokens, d = in.d, E = in.experts, Er = in.router_experts, k = in.k;
  const index_t tc = T / in.chunks;
  outputs o;
  o.y.assign(T * d, std::numeric_limits<float>::quiet_NaN());  // poisoned: every row is written
  o.dx.assign(T * d, 0.0f);
  o.logits.resize(T * Er);
  o.probs.resize(T * Er);
  o.ids.resize(T * k);
  o.weights.resize(T * k);
  o.counts.resize(T);
  o.d_weights.resize(T * k);
  o.d_logits.resize(T * Er);
  o.kept.assign(T * k, 1);
  o.gw1.assign(in.w1.size(), 0.0f);
  o.gw2.assign(in.w2.size(), 0.0f);
  o.gb1.assign(in.b1.size(), 0.0f);
  o.gb2.assign(in.b2.size(), 0.0f);
  o.grw.assign(in.rw.size(), 0.0f);
  o.grb.assign(in.rb.size(), 0.0f);
  o.gsw1.assign(in.sw1.size(), 0.0f);
  o.gsw2.assign(in.sw2.size(), 0.0f);
  o.gsb1.assign(in.sb1.size(), 0.0f);
  o.gsb2.assign(in.sb2.size(), 0.0f);
  o.gsgate.assign(in.sgate.size(), 0.0f);

  sy::expert_weights<float> w{view3(in.w1, in.w1_shape), {}, view3(in.w2, in.w2_shape), {}};
  if (!in.b1.empty()) w.b1 = sy::make_view<const float>(in.b1.data(), E, in.w1_shape[1]);
  if (!in.b2.empty()) w.b2 = sy::make_view<const float>(in.b2.data(), E, d);
  sy::expert_grads g{grad3(o.gw1, in.w1_shape), {}, grad3(o.gw2, in.w2_shape), {}};
  if (!in.b1.empty()) g.b1 = sy::make_view<float>(o.gb1.data(), E, in.w1_shape[1]);
  if (!in.b2.empty()) g.b2 = sy::make_view<float>(o.gb2.data(), E, d);
  if (with_shared && !in.sw1.empty()) {
    const index_t s = in.sw1_shape[0];
    w.shared.w1 = view3(in.sw1, in.sw1_shape);
    w.shared.w2 = view3(in.sw2, in.sw2_shape);
    g.shared.w1 = grad3(o.gsw1, in.sw1_shape);
    g.shared.w2 = grad3(o.gsw2, in.sw2_shape);
    if (!in.sb1.empty()) {
      w.shared.b1 = sy::make_view<const float>(in.sb1.data(), s, in.sw1_shape[1]);
      g.shared.b1 = sy::make_view<float>(o.gsb1.data(), s, in.sw1_shape[1]);
    }
    if (!in.sb2.empty()) {
      w.shared.b2 = sy::make_view<const float>(in.sb2.data(), s, d);
      g.shared.b2 = sy::make_view<float>(o.gsb2.data(), s, d);
    }
    if (!in.sgate.empty()) {
      w.shared.gate = sy::make_view<const float>(in.sgate.data(), 1, d);
      g.shared.gate = sy::make_view<float>(o.gsgate.data(), 1, d);
    }
  }

  const sy::host_context host{};
  for (index_t c = 0; c < in.chunks; ++c) {
    const index_t t0 = c * tc;
    const auto x = sy::make_view<const float>(in.x.data() + t0 * d, tc, d);
    const auto dy = sy::make_view<const float>(in.dy.data() + t0 * d, tc, d);
    const auto y = sy::make_view<float>(o.y.data() + t0 * d, tc, d);
    const auto dx = sy::make_view<float>(o.dx.data() + t0 * d, tc, d);
    typename Router::params_type rp{};
    typename Router::grads_type rg{};
    rp.w = sy::make_view<const float>(in.rw.data(), Er, d);
    rg.w = sy::make_view<float>(o.grw.data(), Er, d);
    if constexpr (std::is_same_v<Router, sy::routers::ScoredTopK>) {
      if (!in.rb.empty()) {
        rp.b = sy::make_view<const float>(in.rb.data(), Er);
        rg.b = sy::make_view<float>(o.grb.data(), Er);
      }
      if (!in.sbias.empty()) rp.selection_bias = sy::make_view<const float>(in.sbias.data(), Er);
      if (!in.table.empty()) {
        rp.hash_table = sy::make_view<const std::int32_t>(in.table.data(), in.vocab, k);
        rp.token_ids = sy::make_view<const std::int32_t>(in.token_ids.data() + t0, tc);
      }
    }
    sy::moe_result<typename Router::losses_type> res;
    {
      // The rows the routed expert phase computes: identity slots must cost none.
      sy::host::expert_rows_probe probe;
      layer.forward(host, x, rp, w, y, res);
      index_t ffn_pairs = 0;
      for (index_t t = 0; t < tc; ++t)
        for (index_t j = 0; j < res.plan.counts[t]; ++j) ffn_pairs += res.plan.id(t, j) < E;
      o.ffn_pairs += ffn_pairs;
      o.phase_pairs += probe.stats.pairs;
      o.phase_max_id = std::max(o.phase_max_id, probe.stats.max_id);
    }
    const typename Router::losses_type no_aux{};  // the cases train no auxiliary loss
    layer.backward(host, x, rp, w, res, dy, no_aux, dx, g, rg);

    // The combine weights' cotangent (slot order) and the router logits' one.
    std::vector<float> dw(tc * k, std::numeric_limits<float>::quiet_NaN());
    const auto plan = std::as_const(res.plan).view();
    layer.backward_experts(host, x, plan, w, dy, sy::matrix_view<float>{}, sy::expert_grads{},
                           sy::span<float>(dw.data(), dw.size()));
    std::vector<float> dl(tc * Er, std::numeric_limits<float>::quiet_NaN());
    const float* cot = ref_dw != nullptr ? ref_dw->data() + t0 * k : dw.data();
    sy::host::route_backward_logits(layer.router, res.plan, cot, no_aux, dl.data());

    std::copy(res.plan.logits.begin(), res.plan.logits.end(), o.logits.begin() + t0 * Er);
    std::copy(res.plan.probs.begin(), res.plan.probs.end(), o.probs.begin() + t0 * Er);
    std::copy(res.plan.expert_ids.begin(), res.plan.expert_ids.end(), o.ids.begin() + t0 * k);
    std::copy(res.plan.weights.begin(), res.plan.weights.end(), o.weights.begin() + t0 * k);
    std::copy(res.plan.counts.begin(), res.plan.counts.end(), o.counts.begin() + t0);
    std::copy(dw.begin(), dw.end(), o.d_weights.begin() + t0 * k);
    std::copy(dl.begin(), dl.end(), o.d_logits.begin() + t0 * Er);
    o.dropped.insert(o.dropped.end(), res.dropped.begin(), res.dropped.end());

    if constexpr (std::is_same_v<Dispatch, sy::dispatch::padded_capacity>) {
      // Which pairs the dispatch kept: its own planning of this plan.
      const index_t pairs = tc * k, rows = disp.max_rows(tc, k, E);
      std::vector<index_t> begin(E), count(E), drop(E), pair_row(pairs), row_pair(rows);
      sy::dispatch::expert_groups gr;
      gr.row_begin = {begin.data(), begin.size()};
      gr.row_count = {count.data(), count.size()};
      gr.dropped = {drop.data(), drop.size()};
      gr.pair_row = {pair_row.data(), pair_row.size()};
      gr.row_pair = {row_pair.data(), row_pair.size()};
      sy::host::plan_groups(disp, plan, gr);
      for (index_t p = 0; p < pairs; ++p)
        o.kept[t0 * k + p] = pair_row[p] == sy::dispatch::dropped_pair ? 0 : 1;
    }
  }
  return o;
}

// ---- checks against the case --------------------------------------------------------------------

//! Compares the selection and the combine weights token by token (ids as sets, weights matched
//! by id; at tie tokens the multiset of selection scores and the sorted weights).
void check_selection(hf_case& c, const inputs& in, const outputs& o, const tolerances& tol) {
  const index_t T = in.tokens, k = in.k, Er = in.router_experts;
  const auto ref_ids = c.i32("topk_ids");
  const auto ref_w = c.f32("topk_weights");
  std::vector<std::int32_t> tie(T, 0);
  if (c.has("tie_mask")) tie = c.i32("tie_mask");
  std::vector<float> sel;
  if (c.has("selection_scores")) sel = c.f32("selection_scores");
  double wmax = 1.0;
  for (float v : ref_w) wmax = std::max(wmax, static_cast<double>(std::abs(v)));
  for (index_t t = 0; t < T; ++t) {
    BOOST_TEST_CONTEXT("token " << t) {
      BOOST_CHECK_EQUAL(o.counts[t], k);
      std::vector<std::int32_t> ours(o.ids.begin() + t * k, o.ids.begin() + (t + 1) * k);
      std::vector<std::int32_t> ref(ref_ids.begin() + t * k, ref_ids.begin() + (t + 1) * k);
      if (tie[t] == 0) {
        BOOST_CHECK_MESSAGE(std::set<std::int32_t>(ours.begin(), ours.end()) ==
                                std::set<std::int32_t>(ref.begin(), ref.end()),
                            "selected experts differ from Hugging Face's");
        for (index_t j = 0; j < k; ++j) {
          const auto it = std::find(ours.begin(), ours.end(), ref[j]);
          if (it == ours.end()) continue;
          const float wo = o.weights[t * k + (it - ours.begin())];
          BOOST_CHECK_MESSAGE(std::abs(wo - ref_w[t * k + j]) <= tol.weights_abs * wmax,
                              "weight of expert " << ref[j] << ": " << wo << " vs "
                                                  << ref_w[t * k + j]);
        }
      } else if (!sel.empty()) {
        std::vector<float> so, sr, wo, wr;
        for (index_t j = 0; j < k; ++j) {
          so.push_back(sel[t * Er + ours[j]]);
          sr.push_back(sel[t * Er + ref[j]]);
          wo.push_back(o.weights[t * k + j]);
          wr.push_back(ref_w[t * k + j]);
        }
        for (auto* v : {&so, &sr, &wo, &wr}) std::sort(v->begin(), v->end());
        BOOST_CHECK_MESSAGE(so == sr, "tied token: selection scores of the picks differ");
        for (index_t j = 0; j < k; ++j)
          BOOST_CHECK(std::abs(wo[j] - wr[j]) <= tol.weights_abs * wmax);
      }
      // Our picks are a top-k of the case's selection scores (what the README's step 4 gives).
      if (!sel.empty()) {
        float low = std::numeric_limits<float>::infinity(), high = -low;
        for (index_t e = 0; e < Er; ++e) {
          const float v = sel[t * Er + e];
          if (std::find(ours.begin(), ours.end(), e) != ours.end()) low = std::min(low, v);
          else high = std::max(high, v);
        }
        BOOST_CHECK_MESSAGE(low >= high, "the selected experts are not a top-k of "
                                         "selection_scores (lowest picked "
                                             << low << ", highest left " << high << ")");
      }
      // Slot order: descending selection score (ties to the lower id), as the README orders ids.
      if (!sel.empty() && tie[t] == 0) {
        for (index_t j = 1; j < k; ++j) {
          const float a = sel[t * Er + ours[j - 1]], b = sel[t * Er + ours[j]];
          BOOST_CHECK_MESSAGE(a > b || (a == b && ours[j - 1] < ours[j]),
                              "slot order is not descending selection score");
        }
      }
    }
  }
}

//! Compares gradient `name` (float64 reference, if the case carries it) with ours.
void check_grad(hf_case& c, const std::string& name, const std::vector<float>& ours,
                const tolerances& tol) {
  if (!c.has(name)) return;
  check_rel(name, as_double(ours), c.f64(name), tol.grads);
}

//! A cotangent given per (token, slot) in HF's id order, compared matched by id.
std::vector<double> by_reference_order(const std::vector<float>& ours_slots,
                                       const std::vector<std::int32_t>& our_ids,
                                       const std::vector<std::int32_t>& ref_ids, index_t k) {
  std::vector<double> out(ref_ids.size(), std::numeric_limits<double>::quiet_NaN());
  for (std::size_t p = 0; p < ref_ids.size(); ++p) {
    const std::size_t t = p / static_cast<std::size_t>(k);
    for (index_t j = 0; j < k; ++j)
      if (our_ids[t * k + j] == ref_ids[p]) out[p] = ours_slots[t * k + j];
  }
  return out;
}

//! Σ_t g[t, e] · x[t, i]: the router weight's gradient a logits cotangent implies.
std::vector<double> weight_grad_of(const std::vector<double>& g, const inputs& in) {
  const index_t E = in.router_experts, d = in.d;
  std::vector<double> out(E * d, 0.0);
  for (index_t t = 0; t < in.tokens; ++t)
    for (index_t e = 0; e < E; ++e)
      for (index_t i = 0; i < d; ++i) out[e * d + i] += g[t * E + e] * double(in.x[t * d + i]);
  return out;
}

//! max|a − b| / max|b|.
double rel_err(const std::vector<double>& a, const std::vector<double>& b) {
  double err = 0.0;
  for (std::size_t i = 0; i < b.size(); ++i) err = std::max(err, std::abs(a[i] - b[i]));
  const double scale = max_abs(b);
  return scale > 0.0 ? err / scale : err;
}

//! The case's grad_topk_weights in our slot order (matched by expert id).
std::vector<float> reference_dw_slots(hf_case& c, const outputs& o, index_t k) {
  const auto ref = c.f64("grad_topk_weights");
  const auto ids = c.i32("topk_ids");
  std::vector<float> out(o.ids.size(), 0.0f);
  for (std::size_t p = 0; p < ids.size(); ++p) {
    const std::size_t t = p / static_cast<std::size_t>(k);
    for (index_t j = 0; j < k; ++j)
      if (o.ids[t * k + j] == ids[p]) out[t * k + j] = static_cast<float>(ref[p]);
  }
  return out;
}

template <class Router, class Act, class Dispatch>
outputs run_layer_with_reference_dw(hf_case& c, const inputs& in, const Router& router,
                                    const Act& act, const Dispatch& disp, const outputs& o) {
  const auto ref = reference_dw_slots(c, o, in.k);
  return run_layer(in, router, act, disp, true, &ref);
}

//! The two cotangents of the routing (∂L/∂topk_weights, ∂L/∂router_logits). Ours are checked
//! against the case's arrays, and always through the gradient they imply for router_w (which
//! the case carries from HF's autograd on the weight itself). A case array that contradicts
//! the case's own grad_router_w (some generator runs stored zeros for grad_router_logits, or a
//! doubled grad_topk_weights where shared experts are present) is reported, and then checked
//! only through grad_router_w.
void check_cotangents(hf_case& c, const inputs& in, const outputs& o, const outputs& via_ref,
                      const tolerances& tol) {
  const auto gw = c.f64("grad_router_w");
  const auto ours = weight_grad_of(as_double(o.d_logits), in);
  check_rel("grad_router_w implied by our d_logits", ours, gw, tol.grads);

  const auto ref_logits = c.f64("grad_router_logits");
  const double logits_consistency = rel_err(weight_grad_of(ref_logits, in), gw);
  if (logits_consistency <= tol.grads) {
    check_rel("grad_router_logits", as_double(o.d_logits), ref_logits, tol.grads);
  } else {
    BOOST_TEST_MESSAGE(c.name() << ": case defect: grad_router_logits (max|·| = "
                                << max_abs(ref_logits) << ") does not give the case's own "
                                << "grad_router_w (rel. err. " << logits_consistency
                                << "); ours checked through grad_router_w");
  }
  const auto ref_ids = c.i32("topk_ids");
  const auto ref_dw = c.f64("grad_topk_weights");
  const double dw_consistency =
      rel_err(weight_grad_of(as_double(via_ref.d_logits), in), gw);
  if (dw_consistency <= tol.grads) {
    check_rel("grad_topk_weights", by_reference_order(o.d_weights, o.ids, ref_ids, in.k), ref_dw,
              tol.grads);
  } else {
    BOOST_TEST_MESSAGE(c.name() << ": case defect: grad_topk_weights does not give the case's "
                                << "own grad_router_w through the router (rel. err. "
                                << dw_consistency << "); ours checked through grad_router_w");
  }
}

template <class Act, class Dispatch>
void check_with(hf_case& c, inputs& in, const Act& act, const Dispatch& disp,
                const tolerances& tol) {
  const json& h = c.header();
  const auto router = make_router(h.at("router"));
  const outputs o = run_layer(in, router, act, disp, true);
  const bool shared = !in.sw1.empty();

  check_rel("y", as_double(o.y), as_double(c.f32("y")), tol.y);
  check_rel("y vs y_fp64", as_double(o.y), c.f64("y_fp64"), tol.y);
  check_rel("router_logits", as_double(o.logits), as_double(c.f32("router_logits")), tol.logits);
  if (c.has("router_scores")) {
    check_rel("router_scores", as_double(o.probs), as_double(c.f32("router_scores")), tol.logits);
  }
  check_selection(c, in, o, tol);
  // Only FFN pairs reach the expert GEMMs (identity experts are compacted out of the plan).
  BOOST_CHECK_EQUAL(o.phase_pairs, o.ffn_pairs);
  BOOST_CHECK_LT(o.phase_max_id, in.experts);
  if (c.has("topk_kept")) {
    BOOST_CHECK(o.kept == c.i32("topk_kept"));
    const auto ref = c.i32("dropped");
    BOOST_CHECK_EQUAL(ref.size(), o.dropped.size());
    for (std::size_t i = 0; i < std::min(ref.size(), o.dropped.size()); ++i)
      BOOST_CHECK_MESSAGE(ref[i] == o.dropped[i], "dropped[" << i / in.experts << ", "
                                                             << i % in.experts << "] = "
                                                             << o.dropped[i] << ", expected "
                                                             << ref[i]);
  }

  // Gradients of L = Σ y ⊙ dy.
  check_grad(c, "grad_x", o.dx, tol);
  check_grad(c, "grad_router_w", o.grw, tol);
  check_grad(c, "grad_router_b", o.grb, tol);
  check_grad(c, "grad_w1", o.gw1, tol);
  check_grad(c, "grad_b1", o.gb1, tol);
  check_grad(c, "grad_w2", o.gw2, tol);
  check_grad(c, "grad_b2", o.gb2, tol);
  check_grad(c, "grad_shared_w1", o.gsw1, tol);
  check_grad(c, "grad_shared_b1", o.gsb1, tol);
  check_grad(c, "grad_shared_w2", o.gsw2, tol);
  check_grad(c, "grad_shared_b2", o.gsb2, tol);
  check_grad(c, "grad_shared_gate_w", o.gsgate, tol);
  check_cotangents(c, in, o, run_layer_with_reference_dw(c, in, router, act, disp, o), tol);
  // Every trainable parameter of the case has its gradient checked above.
  for (const auto& [p, hf_names] : h.at("gradients").at("trainable").items()) {
    BOOST_CHECK_MESSAGE(c.has("grad_" + p), "trainable '" << p << "' has no gradient array");
  }

  // The routed experts alone (HF's y_routed, grad_x_routed) and the shared term.
  if (shared) {
    const outputs r = run_layer(in, router, act, disp, false);
    check_rel("y_routed", as_double(r.y), as_double(c.f32("y_routed")), tol.y);
    std::vector<double> ys(o.y.size());
    for (std::size_t i = 0; i < ys.size(); ++i) ys[i] = double(o.y[i]) - double(r.y[i]);
    const auto ref_shared = as_double(c.f32("y_shared"));
    // A difference of two outputs: its error is relative to the whole output's scale.
    const double abs_tol = tol.y * max_abs(as_double(c.f32("y")));
    double err = 0.0;
    for (std::size_t i = 0; i < ys.size(); ++i) err = std::max(err, std::abs(ys[i] - ref_shared[i]));
    BOOST_CHECK_MESSAGE(err <= abs_tol, "y_shared: max|Δ| = " << err << " > " << abs_tol);
    check_rel("grad_x_routed", as_double(r.dx), c.f64("grad_x_routed"), tol.grads);
  } else {
    check_rel("y_routed", as_double(o.y), as_double(c.f32("y_routed")), tol.y);
  }

  // The classic families also run through routers::TopK (softmax, top-k, renormalised or not).
  static const std::set<std::string> classic = {"mixtral", "qwen3_moe", "olmoe", "granitemoe",
                                                "switch_transformers"};
  if (classic.count(h.at("family").get<std::string>())) {
    const json& r = h.at("router");
    sy::routers::TopK topk{.k = r.at("k").get<int>(),
                           .renormalize = r.at("normalize").get<std::string>() == "sum" ||
                                          r.at("softmax_after_topk").get<bool>()};
    const outputs t = run_layer(in, topk, act, disp, true);
    BOOST_TEST_CONTEXT("routers::TopK") {
      check_rel("y", as_double(t.y), as_double(c.f32("y")), tol.y);
      check_rel("grad_x", as_double(t.dx), c.f64("grad_x"), tol.grads);
      check_rel("grad_router_w", as_double(t.grw), c.f64("grad_router_w"), tol.grads);
      check_rel("grad_w1", as_double(t.gw1), c.f64("grad_w1"), tol.grads);
      check_rel("grad_w2", as_double(t.gw2), c.f64("grad_w2"), tol.grads);
    }
  }
}

template <class Act>
void check_dispatch(hf_case& c, inputs& in, const Act& act, const tolerances& tol) {
  const json& cap = c.header().at("capacity");
  if (cap.is_null()) {
    check_with(c, in, act, sy::dispatch::sorted_grouped{}, tol);
    return;
  }
  sy::dispatch::padded_capacity pc;
  pc.expert_capacity = cap.at("expert_capacity").get<index_t>();
  pc.priority = cap.at("priority").get<std::string>() == "slot_major"
                    ? sy::dispatch::capacity_priority::slot_major
                    : sy::dispatch::capacity_priority::token_major;
  pc.drop = cap.at("dropped_output").get<std::string>() == "zero"
                ? sy::dispatch::dropped_output::zero
                : sy::dispatch::dropped_output::scaled_input;
  in.chunks = cap.at("scope").get<std::string>() == "sequence" ? cap.at("sequences").get<index_t>()
                                                               : 1;
  check_with(c, in, act, pc, tol);
}

void run_case(const fs::path& file) {
  std::optional<hf_case> loaded;
  try {
    loaded.emplace(file);
  } catch (const std::exception& e) {
    BOOST_FAIL(file << ": cannot read the case: " << e.what());
  }
  hf_case& c = *loaded;
  const auto problems = c.problems();
  for (const auto& p : problems) BOOST_ERROR(file.filename() << ": " << p);
  if (!problems.empty()) return;
  const json& h = c.header();
  BOOST_TEST_MESSAGE(c.name() << ": " << h.value("description", ""));
  const tolerances tol = read_tolerances(h);
  const json& dims = h.at("dims");
  const json& r = h.at("router");
  const json& ex = h.at("experts");

  inputs in;
  in.tokens = dims.at("T").get<index_t>();
  in.d = dims.at("d").get<index_t>();
  in.experts = dims.at("E").get<index_t>();
  in.router_experts = dims.at("E_router").get<index_t>();
  in.k = dims.at("k").get<index_t>();
  in.x = c.f32("x");
  in.dy = c.f32("dy");
  in.rw = c.f32(r.at("weight").get<std::string>());
  if (!r.at("bias").is_null()) in.rb = c.f32(r.at("bias").get<std::string>());
  if (!r.at("selection_bias").is_null()) in.sbias = c.f32(r.at("selection_bias").get<std::string>());
  if (const json& hs = r.at("hash"); !hs.is_null()) {
    in.table = c.i32(hs.at("table").get<std::string>());
    in.token_ids = c.i32(hs.at("token_ids").get<std::string>());
    in.vocab = hs.at("vocab").get<index_t>();
  }
  in.weight_on_input = r.at("router_weight_on_input").get<bool>();
  if (const json& z = r.at("zero_experts"); !z.is_null()) {
    in.identity = z.at("count").get<index_t>();
    BOOST_TEST_REQUIRE(z.at("first_id").get<index_t>() == in.experts,
                       "zero_experts.first_id must be E (Switchyard's identity experts follow "
                       "the FFN experts)");
  }
  BOOST_TEST_REQUIRE(in.router_experts == in.experts + in.identity);
  const auto array = [&](const json& name, std::vector<float>& out, std::vector<index_t>* shape) {
    if (name.is_null()) return;
    out = c.f32(name.get<std::string>());
    if (shape) *shape = c.shape(name.get<std::string>());
  };
  array(ex.at("w1"), in.w1, &in.w1_shape);
  array(ex.at("b1"), in.b1, nullptr);
  array(ex.at("w2"), in.w2, &in.w2_shape);
  array(ex.at("b2"), in.b2, nullptr);
  if (const json& s = h.at("shared_experts"); !s.is_null()) {
    array(s.at("w1"), in.sw1, &in.sw1_shape);
    array(s.at("b1"), in.sb1, nullptr);
    array(s.at("w2"), in.sw2, &in.sw2_shape);
    array(s.at("b2"), in.sb2, nullptr);
    if (!s.at("gate").is_null()) array(s.at("gate").at("weight"), in.sgate, nullptr);
    BOOST_TEST_REQUIRE(s.at("activation") == ex.at("activation"),
                       "the shared experts use the layer's activation in Switchyard");
  }

  const json& a = ex.at("activation");
  const std::string act = a.at("name").get<std::string>();
  namespace act_ns = sy::activation;
  if (act == "swiglu") {
    check_dispatch(c, in, act_ns::swiglu{}, tol);
  } else if (act == "geglu") {
    check_dispatch(c, in, act_ns::geglu{}, tol);
  } else if (act == "gpt_oss_swiglu") {
    check_dispatch(c, in,
                   act_ns::gpt_oss_swiglu{.limit = a.at("limit").get<float>(),
                                          .alpha = a.at("alpha").get<float>()},
                   tol);
  } else if (act == "clamped_swiglu") {
    check_dispatch(c, in, act_ns::clamped_swiglu{.limit = a.at("limit").get<float>()}, tol);
  } else if (act == "relu") {
    check_dispatch(c, in, act_ns::relu{}, tol);
  } else if (act == "gelu") {
    check_dispatch(c, in, act_ns::gelu{}, tol);
  } else if (act == "gelu_tanh") {
    check_dispatch(c, in, act_ns::gelu_tanh{}, tol);
  } else if (act == "silu") {
    check_dispatch(c, in, act_ns::silu{}, tol);
  } else {
    BOOST_FAIL("unknown activation " << act);
  }
  for (const auto& u : c.unread()) BOOST_ERROR(c.name() << ": array '" << u << "' was not checked");
}

bool init_hf() {
  const fs::path dir = cases_dir();
  std::vector<fs::path> files;
  if (fs::is_directory(dir)) {
    for (const auto& e : fs::directory_iterator(dir))
      if (e.path().extension() == ".json") files.push_back(e.path());
  }
  std::sort(files.begin(), files.end());
  if (files.empty()) {
    std::cerr << "hf: no *.json cases in " << dir
              << " (set SWITCHYARD_HF_CASES_DIR to the hf-cases directory)\n";
    return false;  // a suite that checks nothing must not pass
  }
  std::cout << "hf: " << files.size() << " cases from " << dir << "\n";
  for (const auto& f : files) {
    bt::framework::master_test_suite().add(
        bt::make_test_case([f] { run_case(f); }, f.stem().string(), __FILE__, __LINE__));
  }
  return true;
}

}  // namespace

int main(int argc, char* argv[]) { return bt::unit_test_main(&init_hf, argc, argv); }
