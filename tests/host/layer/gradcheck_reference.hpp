// SPDX-License-Identifier: Apache-2.0
#pragma once
// The float64 reference of MoELayer's forward and backward used by the whole-layer gradient
// checks (test_moe_layer_backward_routers.cpp, test_moe_layer_gradcheck_*.cpp): the problem
// (every parameter in double, exact float values), router cases (selection, combine weights
// and aux losses in double: TopK, TopP, AdaptiveGating, DA-MoE, DynMoE, ScoredTopK with the
// production presets' options, ReMoE, ExpertChoice), activation cases (every functor of
// activation/functors.hpp with its float64 twin and its kinks), dispatch cases
// (sorted_grouped, dense, padded_capacity without drops / dropping to zero / passing w·x
// through), the reference layer, and `check_combo<Router, Activation, Dispatch>`, which checks
// one combination against float64 central differences.
//
// Routing is piecewise constant. The reference recomputes the selection in float64 at every
// perturbed point and the case is redrawn (new seed, logged with BOOST_TEST_MESSAGE, at most
// `max_draws` times, then the case FAILS) when the selection at x ± h differs from the
// library's plan at x, or when a pre-activation lies within `kink_margin` of a point where
// the activation is not differentiable (ReLU's 0, the clamps' limits) — never silently
// skipped. Capacity drops depend on the plan only, so a fixed plan also fixes the drops.
//
// DynMoE's backward is straight-through (docs/routers/dynmoe.md): the forward is piecewise
// constant in the gate parameters, so its gradient is checked against the float64 derivative of
//   Σ_{t,e on} gb_te · (S_te − θ_e)  +  c_sim·L_sim + c_simple·L_simple  +  (experts at fixed b)
// where gb_te = ∂F/∂b_te is itself a central difference of F(b) = Σ_t Σ_j b_{t,e_tj}/k_t ·
// ⟨g_t, FFN_{e_tj}(x_t)⟩ + c_lb·L_lb(b) + c_eff·L_eff(b) (integer k in the combine, k = Σb in
// L_lb, ce constant) in the continuous gates b. F reads the slot contributions through the
// plan's ids, so a slot/expert-order mix-up of d_weights changes the expected gradient.
#include <boost/test/unit_test.hpp>

#include <boost/mp11.hpp>

#include <tuple>

#include <boost/core/demangle.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

#include <switchyard/switchyard.hpp>

#include "support/random.hpp"

namespace sy = switchyard;

namespace bwd {

using index_t = sy::index_t;
using vec = std::vector<double>;

// ---- the problem, every parameter in double (exact float values) -------------------------

//! E counts every id the router may pick: the FFN experts, then Z identity experts
//! (LongCat-Flash's zero-computation experts: output x), then N zero experts (AdaMoE's null
//! experts: output 0), so the FFN weights hold E − Z − N experts.
struct problem {
  index_t T = 16, d = 6, f = 4, p = 4, E = 4, Z = 0, N = 0;
  vec x, wr, thr, rb, w1, b1, w2, b2, g;  // wr: router gate (layout per router), thr: DynMoE G,
                                          // rb: router bias (ScoredTopK params.b) or empty
  vec rw, pl;  // MoE++ gating residual: residual_w [E, E_prev], prev_logits [T, E_prev] or empty
  index_t ffn_experts() const { return E - Z - N; }
  bool is_zero_expert(index_t e) const { return e >= E - N; }
};

//! The router's trainable parameters in float (values or gradients): gate, DynMoE
//! thresholds, router bias, gating residual.
struct fstore {
  std::vector<float> wr, thr, rb, rw, pl;
};

inline vec draw(std::mt19937_64& rng, index_t n, float s, float shift = 0.0f) {
  const auto v = sy::test::normal(rng, static_cast<std::size_t>(n), s);
  vec out(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) out[i] = static_cast<float>(v[i] + shift);
  return out;
}
inline std::vector<float> as_float(const vec& v) {
  return {v.begin(), v.end()};
}

//! A selection in float64 and what it weighs: ids/counts in plan layout [T, W].
struct route {
  index_t W = 0;
  std::vector<int> counts, ids;
  vec weights;
  std::vector<char> on;  // DynMoE: [T, E] entries above threshold (eval fallbacks are not on)
  double aux = 0.0;      // Σ coeff · loss (+ DynMoE's straight-through surrogate)
  vec loss_values;       // the router's losses, field by field, for the forward check
};

//! Thrown when the float64 selection at a perturbed point differs from the library's plan.
struct plan_changed {
  std::string why;
};

//! "" when a and b select the same experts in the same slots (and, for DynMoE, the same
//! entries are on: an eval fallback expert crossing its threshold keeps the plan but not the
//! straight-through gradient); else the first token that differs.
inline std::string describe_mismatch(const route& a, const route& b) {
  const index_t per_token =
      a.on.empty() || b.on.empty() ? 0 : static_cast<index_t>(a.on.size() / a.counts.size());
  for (std::size_t t = 0; t < a.counts.size(); ++t) {
    bool same = a.counts[t] == b.counts[t];
    for (index_t j = 0; same && j < a.W; ++j) same = a.ids[t * a.W + j] == b.ids[t * b.W + j];
    for (index_t e = 0; same && e < per_token; ++e)
      same = a.on[t * per_token + e] == b.on[t * per_token + e];
    if (!same) {
      std::ostringstream s;
      s << "token " << t << ": [";
      for (int j = 0; j < a.counts[t]; ++j) s << (j ? "," : "") << a.ids[t * a.W + j];
      s << "] vs [";
      for (int j = 0; j < b.counts[t]; ++j) s << (j ? "," : "") << b.ids[t * b.W + j];
      s << "]";
      return s.str();
    }
  }
  return {};
}

//! Stable descending order of one token's scores (ties to the lower index).
inline std::vector<int> descending(const double* s, index_t n) {
  std::vector<int> o(static_cast<std::size_t>(n));
  std::iota(o.begin(), o.end(), 0);
  std::stable_sort(o.begin(), o.end(), [&](int a, int b) { return s[a] > s[b]; });
  return o;
}

// ---- softmax scoring and losses in double -------------------------------------------------

//! Linear gate w [E, d] (row-major) or, `transposed`, stored [d, E] (HyperMoE GPT-2 layout).
struct linear_gate {
  index_t E = 4;
  bool transposed = false;
  std::vector<float> attention, importance;  // DA-MoE extra inputs (unused otherwise)

  index_t at(const problem& q, index_t e, index_t i) const {
    return transposed ? i * q.E + e : e * q.d + i;
  }
  void init_gate(std::mt19937_64& rng, problem& q) const {
    q.wr = draw(rng, q.E * q.d, 0.6f);
    q.thr.clear();
  }
  sy::matrix_view<const float> view(const std::vector<float>& wr, const problem& q) const {
    return transposed ? sy::make_strided_view<const float, 2>(wr.data(), {q.E, q.d}, {1, q.E})
                      : sy::make_view<const float>(wr.data(), q.E, q.d);
  }
  sy::matrix_view<float> gview(std::vector<float>& dwr, const problem& q) const {
    return transposed ? sy::make_strided_view<float, 2>(dwr.data(), {q.E, q.d}, {1, q.E})
                      : sy::make_view(dwr.data(), q.E, q.d);
  }
  //! logits [T, E] and softmax probs [T, E].
  void score(const problem& q, vec& logits, vec& probs) const {
    logits.assign(static_cast<std::size_t>(q.T * q.E), 0.0);
    probs = logits;
    for (index_t t = 0; t < q.T; ++t) {
      double mx = -1e300;
      for (index_t e = 0; e < q.E; ++e) {
        double s = 0.0;
        for (index_t i = 0; i < q.d; ++i) s += q.x[t * q.d + i] * q.wr[at(q, e, i)];
        logits[t * q.E + e] = s;
        mx = std::max(mx, s);
      }
      double z = 0.0;
      for (index_t e = 0; e < q.E; ++e) z += std::exp(logits[t * q.E + e] - mx);
      for (index_t e = 0; e < q.E; ++e) probs[t * q.E + e] = std::exp(logits[t * q.E + e] - mx) / z;
    }
  }
  //! Top-n of one token (descending, ties low), weights P or P/ΣP; returns n.
  static int take_top(const double* probs, index_t E, int n, bool renorm, int* ids, double* w) {
    const auto o = descending(probs, E);
    double s = 0.0;
    for (int j = 0; j < n; ++j) {
      ids[j] = o[j];
      w[j] = probs[o[j]];
      s += w[j];
    }
    if (renorm)
      for (int j = 0; j < n; ++j) w[j] /= s;
    return n;
  }
  //! Scores and selects with `rule(t, probs_row, ids, weights) -> count`.
  template <class Rule>
  route select(const problem& q, index_t W, vec& logits, vec& probs, Rule&& rule) const {
    score(q, logits, probs);
    route r;
    r.W = W;
    r.counts.assign(static_cast<std::size_t>(q.T), 0);
    r.ids.assign(static_cast<std::size_t>(q.T * W), -1);
    r.weights.assign(static_cast<std::size_t>(q.T * W), 0.0);
    for (index_t t = 0; t < q.T; ++t)
      r.counts[t] = rule(t, &probs[t * q.E], &r.ids[t * W], &r.weights[t * W]);
    return r;
  }
};

//! E·Σ_e f_e·P̄_e; f from slot 0 (Switch) or every used slot (any_slot).
inline double ref_lb(const route& r, const vec& probs, index_t T, index_t E, bool any_slot) {
  vec f(E, 0.0), pbar(E, 0.0);
  for (index_t t = 0; t < T; ++t) {
    const int slots = any_slot ? r.counts[t] : std::min(r.counts[t], 1);
    for (int j = 0; j < slots; ++j) f[r.ids[t * r.W + j]] += 1.0 / T;
    for (index_t e = 0; e < E; ++e) pbar[e] += probs[t * E + e] / T;
  }
  double s = 0.0;
  for (index_t e = 0; e < E; ++e) s += f[e] * pbar[e];
  return E * s;
}
//! Adaptive Gating's load balance: f over the top-1-only tokens, P̄ over all.
inline double ref_lb_top1_only(const route& r, const vec& probs, index_t T, index_t E) {
  vec f(E, 0.0), pbar(E, 0.0);
  int singles = 0;
  for (index_t t = 0; t < T; ++t) {
    if (r.counts[t] == 1) {
      f[r.ids[t * r.W]] += 1.0;
      ++singles;
    }
    for (index_t e = 0; e < E; ++e) pbar[e] += probs[t * E + e] / T;
  }
  if (singles == 0) return 0.0;
  double s = 0.0;
  for (index_t e = 0; e < E; ++e) s += f[e] / singles * pbar[e];
  return E * s;
}
inline double ref_lse(const double* lg, index_t E) {
  double mx = lg[0];
  for (index_t e = 1; e < E; ++e) mx = std::max(mx, lg[e]);
  double z = 0.0;
  for (index_t e = 0; e < E; ++e) z += std::exp(lg[e] - mx);
  return mx + std::log(z);
}
inline double ref_z(const vec& logits, index_t T, index_t E) {
  double s = 0.0;
  for (index_t t = 0; t < T; ++t) {
    const double l = ref_lse(&logits[t * E], E);
    s += l * l / T;
  }
  return s;
}
inline double ref_entropy(const vec& logits, const vec& probs, index_t T, index_t E) {
  double s = 0.0;
  for (index_t t = 0; t < T; ++t) {
    const double l = ref_lse(&logits[t * E], E);
    for (index_t e = 0; e < E; ++e) s -= probs[t * E + e] * (logits[t * E + e] - l) / T;
  }
  return s;
}

// ---- activation cases: the library functor (with its configuration) and its float64 twin ----
// `value(h, up)` is act(h) (plain; `up` unused) or act(gate = h, up) (gated); `margin(h, up)`
// is the distance of the pre-activations to the nearest point where the activation is not
// differentiable (ReLU's 0, the clamps' limits), +inf for a smooth one: central differences
// across such a kink are not derivatives, so a draw with a pre-activation within
// `kink_margin` of one is redrawn (like a selection change).

inline double ref_sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }
inline double ref_silu(double h) { return h * ref_sigmoid(h); }
inline double ref_gelu(double h) { return 0.5 * h * (1.0 + std::erf(h / std::sqrt(2.0))); }
inline double ref_gelu_tanh(double h) {
  const double u = std::sqrt(2.0 / M_PI) * (h + 0.044715 * h * h * h);
  return 0.5 * h * (1.0 + std::tanh(u));
}
constexpr double no_kink = 1e300;

struct relu_act {
  using type = sy::activation::relu;
  static type make() { return {}; }
  static double value(double h, double) { return h > 0.0 ? h : 0.0; }
  static double margin(double h, double) { return std::abs(h); }
  static constexpr int required = 1;
  static int branches(double h, double) { return h < 0.0 ? 1 : 0; }  // the zero branch
};
struct gelu_act {
  using type = sy::activation::gelu;
  static type make() { return {}; }
  static double value(double h, double) { return ref_gelu(h); }
  static double margin(double, double) { return no_kink; }
};
struct gelu_tanh_act {
  using type = sy::activation::gelu_tanh;
  static type make() { return {}; }
  static double value(double h, double) { return ref_gelu_tanh(h); }
  static double margin(double, double) { return no_kink; }
};
struct silu_act {
  using type = sy::activation::silu;
  static type make() { return {}; }
  static double value(double h, double) { return ref_silu(h); }
  static double margin(double, double) { return no_kink; }
};
struct swiglu_act {
  using type = sy::activation::swiglu;
  static type make() { return {}; }
  static double value(double g, double u) { return ref_silu(g) * u; }
  static double margin(double, double) { return no_kink; }
};
struct geglu_act {
  using type = sy::activation::geglu;
  static type make() { return {}; }
  static double value(double g, double u) { return ref_gelu(g) * u; }
  static double margin(double, double) { return no_kink; }
};
//! The clamps' limit of the clamped activations below: 1.5 (the models use 7) so that about a
//! fifth of the gates and two fifths of the ups are clipped (pre-activations here have a
//! standard deviation of about 1.3) and the zero-gradient branches are exercised too.
constexpr float clamp_limit = 1.5f;
inline double clamp_margin(double g, double u) {
  const double L = clamp_limit;
  return std::min({std::abs(g - L), std::abs(u - L), std::abs(u + L)});
}
//! Which clipped branches (gate above, up above, up below the limit) a (gate, up) pair takes.
inline int clamp_branches(double g, double u) {
  const double L = clamp_limit;
  return (g > L ? 1 : 0) | (u > L ? 2 : 0) | (u < -L ? 4 : 0);
}
struct clamped_swiglu_act {
  using type = sy::activation::clamped_swiglu;
  static type make() { return {.limit = clamp_limit}; }
  static double value(double g, double u) {
    const double L = clamp_limit;
    return ref_silu(std::min(g, L)) * std::clamp(u, -L, L);
  }
  static double margin(double g, double u) { return clamp_margin(g, u); }
  static constexpr int required = 7;
  static int branches(double g, double u) { return clamp_branches(g, u); }
};
struct gpt_oss_swiglu_act {
  using type = sy::activation::gpt_oss_swiglu;
  static constexpr float alpha = 1.702f;
  static type make() { return {.limit = clamp_limit, .alpha = alpha}; }
  static double value(double gate, double up) {
    const double L = clamp_limit, g = std::min(gate, L), u = std::clamp(up, -L, L);
    return (u + 1.0) * g * ref_sigmoid(static_cast<double>(alpha) * g);
  }
  static double margin(double g, double u) { return clamp_margin(g, u); }
  static constexpr int required = 7;
  static int branches(double g, double u) { return clamp_branches(g, u); }
};
//! The branches a draw must take (every bit of A::required among the kept pairs' A::branches,
//! else it is redrawn): ReLU's zero branch, each clamp clipping.
template <class A>
constexpr int required_branches() {
  if constexpr (requires { A::required; }) return A::required;
  else return 0;
}
//! What the reference saw of the activation's kinks over the FFNs it evaluated.
struct kink_stats {
  double margin = 1e300;  //!< smallest distance of a pre-activation to a kink
  int branches = 0;       //!< the non-smooth activation's branches taken (A::branches bits)
};
//! A pre-activation closer than this to a kink redraws the case: a perturbation (h = 1e-6)
//! moves a pre-activation by < 1e-5 and float rounding of the library's by ~1e-6, so either
//! side of the kink is then the same for the library, the reference and both differences.
constexpr double kink_margin = 1e-4;

// ---- router cases ----------------------------------------------------------------------
// Each: router_type, `router`, E (router ids), width, init (parameters and extra inputs),
// params/grads views over float storage (fstore), coeffs, library_losses, reference (selection +
// weights + aux in double), prepare (DynMoE's gate cotangent), exercised (why a draw does not
// cover the case); optionally identity_experts() and weight_on_input() (layer options).

//! Shared by the TopK-loss routers (TopK, HyperMoE's two, DA-MoE).
inline double topk_family_aux(const route& r, const vec& lg, const vec& pr, const problem& q,
                              const sy::routing::softmax_router_losses& c, vec& values) {
  const double lbs = ref_lb(r, pr, q.T, q.E, false), lbk = ref_lb(r, pr, q.T, q.E, true),
               z = ref_z(lg, q.T, q.E);
  values = {lbs, lbk, z};
  return c.lb_switch * lbs + c.lb_topk * lbk + c.z * z;
}

template <int K, bool Renorm, bool Transposed>
struct topk_case : linear_gate {
  using router_type = sy::routers::TopK;
  router_type router{.k = K, .renormalize = Renorm};
  topk_case() { transposed = Transposed; }
  index_t width() const { return K; }
  void init(std::mt19937_64& rng, problem& q) { init_gate(rng, q); }
  router_type::params_type params(const fstore& s, const problem& q) const {
    return {view(s.wr, q)};
  }
  router_type::grads_type grads(fstore& s, const problem& q) const {
    return {gview(s.wr, q)};
  }
  router_type::losses_type coeffs() const { return {0.3f, 0.2f, 0.05f}; }
  vec library_losses(const router_type::losses_type& l) const {
    return {l.lb_switch, l.lb_topk, l.z};
  }
  route reference(const problem& q) const {
    vec lg, pr;
    route r = select(q, K, lg, pr, [&](index_t, const double* p, int* ids, double* w) {
      return take_top(p, q.E, K, Renorm, ids, w);
    });
    r.aux = topk_family_aux(r, lg, pr, q, coeffs(), r.loss_values);
    return r;
  }
  void prepare(const problem&, const route&, const vec&) {}
  std::string exercised(const route&) const { return {}; }
};

//! TopP p = Permille/1000, optionally capped at MaxK experts (raw weights; entropy, any-slot
//! load balance, z).
template <int Permille, int MaxK>
struct topp_case : linear_gate {
  using router_type = sy::routers::TopP;
  router_type router{.p = Permille / 1000.0f, .max_k = MaxK};
  index_t width() const { return MaxK > 0 ? MaxK : E; }
  void init(std::mt19937_64& rng, problem& q) { init_gate(rng, q); }
  router_type::params_type params(const fstore& s, const problem& q) const {
    return {view(s.wr, q)};
  }
  router_type::grads_type grads(fstore& s, const problem& q) const {
    return {gview(s.wr, q)};
  }
  router_type::losses_type coeffs() const { return {0.15f, 0.25f, 0.05f}; }
  vec library_losses(const router_type::losses_type& l) const {
    return {l.dynamic_loss, l.lb_loss, l.z_loss};
  }
  route reference(const problem& q) const {
    vec lg, pr;
    route r = select(q, width(), lg, pr, [&](index_t, const double* p, int* ids, double* w) {
      const auto o = descending(p, q.E);
      double cum = 0.0;
      int n = 0;
      while (n < width()) {
        ids[n] = o[n];
        w[n] = p[o[n]];
        cum += p[o[n]];
        ++n;
        if (cum > router.p) break;
      }
      return n;
    });
    const double h = ref_entropy(lg, pr, q.T, q.E), lb = ref_lb(r, pr, q.T, q.E, true),
                 z = ref_z(lg, q.T, q.E);
    r.loss_values = {h, lb, z};
    const auto c = coeffs();
    r.aux = c.dynamic_loss * h + c.lb_loss * lb + c.z_loss * z;
    return r;
  }
  void prepare(const problem&, const route&, const vec&) {}
  std::string exercised(const route& r) const {
    const auto [lo, hi] = std::minmax_element(r.counts.begin(), r.counts.end());
    return *lo < *hi ? std::string{} : "every token keeps the same number of experts";
  }
};

//! AdaptiveGating threshold 0.2, renormalised; top2_fraction's coefficient must be ignored.
struct adaptive_gating_case : linear_gate {
  using router_type = sy::routers::AdaptiveGating;
  router_type router{.threshold = 0.2f, .renormalize = true};
  index_t width() const { return 2; }
  void init(std::mt19937_64& rng, problem& q) { init_gate(rng, q); }
  router_type::params_type params(const fstore& s, const problem& q) const {
    return {view(s.wr, q)};
  }
  router_type::grads_type grads(fstore& s, const problem& q) const {
    return {gview(s.wr, q)};
  }
  // top2_fraction = 0.7 is a diagnostic, not a loss: backward must ignore it.
  router_type::losses_type coeffs() const { return {0.3f, 0.05f, 0.7f}; }
  vec library_losses(const router_type::losses_type& l) const {
    return {l.lb_loss, l.z_loss, l.top2_fraction};
  }
  route reference(const problem& q) const {
    vec lg, pr;
    route r = select(q, 2, lg, pr, [&](index_t, const double* p, int* ids, double* w) {
      const auto o = descending(p, q.E);
      const int n = p[o[0]] - p[o[1]] <= router.threshold ? 2 : 1;
      return take_top(p, q.E, n, true, ids, w);
    });
    const double lb = ref_lb_top1_only(r, pr, q.T, q.E), z = ref_z(lg, q.T, q.E);
    double top2 = 0.0;
    for (auto c : r.counts) top2 += c == 2 ? 1.0 / q.T : 0.0;
    r.loss_values = {lb, z, top2};
    const auto c = coeffs();
    r.aux = c.lb_loss * lb + c.z_loss * z;
    return r;
  }
  void prepare(const problem&, const route&, const vec&) {}
  std::string exercised(const route& r) const {
    const auto n2 = std::count(r.counts.begin(), r.counts.end(), 2);
    return n2 > 0 && n2 < static_cast<long>(r.counts.size())
               ? std::string{}
               : "not a mix of top-1 and top-2 tokens";
  }
};

//! DA-MoE: K_t = clamp(ceil(k_max · I_t / max I), k_min, k_max), top-K_t, renormalised.
template <class Importance, int KMin, int KMax>
struct damoe_case : linear_gate {
  using router_type = sy::routers::DAMoE<Importance>;
  static constexpr bool from_attention =
      !std::is_same_v<Importance, sy::routing::importance::precomputed>;
  static constexpr index_t heads = 2;
  router_type router{.k_rule = {KMin, KMax}, .renormalize = true};
  index_t width() const { return KMax; }
  void init(std::mt19937_64& rng, problem& q) {
    init_gate(rng, q);
    if constexpr (from_attention) {
      // Attention rows: softmax of N(0, 2.5²) scores, so the column means (importance) spread.
      attention.resize(static_cast<std::size_t>(heads * q.T * q.T));
      const auto s = sy::test::normal(rng, attention.size(), 2.5f);
      for (index_t r = 0; r < heads * q.T; ++r) {
        double z = 0.0;
        for (index_t j = 0; j < q.T; ++j) z += std::exp(static_cast<double>(s[r * q.T + j]));
        for (index_t j = 0; j < q.T; ++j)
          attention[r * q.T + j] =
              static_cast<float>(std::exp(static_cast<double>(s[r * q.T + j])) / z);
      }
    } else {
      importance = sy::test::uniform(rng, static_cast<std::size_t>(q.T), 0.0f, 1.0f);
    }
  }
  typename router_type::params_type params(const fstore& s, const problem& q) const {
    typename router_type::params_type p;
    p.w = view(s.wr, q);
    if constexpr (from_attention)
      p.attention = sy::make_view<const float>(attention.data(), heads, q.T, q.T);
    else
      p.importance = sy::make_view<const float>(importance.data(), q.T);
    return p;
  }
  typename router_type::grads_type grads(fstore& s, const problem& q) const {
    return {gview(s.wr, q)};
  }
  typename router_type::losses_type coeffs() const { return {0.25f, 0.35f, 0.05f}; }
  vec library_losses(const typename router_type::losses_type& l) const {
    return {l.lb_switch, l.lb_topk, l.z};
  }
  //! K_t from the importance, in double (importance is stop-gradient: not a function of x, w).
  std::vector<int> k_of_tokens(const problem& q) const {
    vec imp(static_cast<std::size_t>(q.T), 0.0);
    for (index_t j = 0; j < q.T; ++j) {
      if constexpr (from_attention) {
        for (index_t h = 0; h < heads; ++h)
          for (index_t i = 0; i < q.T; ++i) imp[j] += attention[(h * q.T + i) * q.T + j];
        imp[j] /= static_cast<double>(heads * q.T);
      } else {
        imp[j] = importance[j];
      }
    }
    const double peak = *std::max_element(imp.begin(), imp.end());
    std::vector<int> k(static_cast<std::size_t>(q.T));
    for (index_t j = 0; j < q.T; ++j)
      k[j] = std::clamp(static_cast<int>(std::ceil(imp[j] / peak * KMax)), KMin, KMax);
    return k;
  }
  route reference(const problem& q) const {
    const auto kt = k_of_tokens(q);
    vec lg, pr;
    route r = select(q, KMax, lg, pr, [&](index_t t, const double* p, int* ids, double* w) {
      return take_top(p, q.E, kt[t], true, ids, w);
    });
    r.aux = topk_family_aux(r, lg, pr, q, coeffs(), r.loss_values);
    return r;
  }
  void prepare(const problem&, const route&, const vec&) {}
  std::string exercised(const route& r) const {
    const auto [lo, hi] = std::minmax_element(r.counts.begin(), r.counts.end());
    return *lo < *hi ? std::string{} : "every token has the same K";
  }
};

//! DynMoE over E_max = 5 slots (the last one masked), log τ = 0.7 (s ≈ 2.01).
template <bool Training>
struct dynmoe_case {
  using router_type = sy::routers::DynMoE;
  index_t E = 5;
  router_type router{.training = Training};
  std::vector<std::int32_t> mask{1, 1, 1, 1, 0};
  float log_tau = 0.7f;
  vec gb;  // [T, E] ∂F/∂b on the entries that are on (prepare)

  index_t width() const { return E; }
  void init(std::mt19937_64& rng, problem& q) {
    q.wr = draw(rng, q.d * q.E, 1.0f);  // w_gate [d, E_max]
    // G: θ = σ(s·G) a bit above the scores' mean 1/2, more so in eval (fallback tokens).
    q.thr = draw(rng, q.E, 0.3f, Training ? 0.1f : 0.3f);
    gb.clear();
  }
  router_type::params_type params(const fstore& s, const problem& q) const {
    return {sy::make_view<const float>(s.wr.data(), q.d, q.E),
            sy::make_view<const float>(s.thr.data(), q.E),
            sy::make_view<const std::int32_t>(mask.data(), q.E), log_tau};
  }
  router_type::grads_type grads(fstore& s, const problem& q) const {
    return {sy::make_view(s.wr.data(), q.d, q.E), sy::make_view(s.thr.data(), q.E)};
  }
  // Distinct values, so a coefficient applied to the wrong loss shows.
  router_type::losses_type coeffs() const { return {0.3f, 0.2f, 0.4f, 0.5f}; }
  vec library_losses(const router_type::losses_type& l) const {
    return {l.sim_loss, l.simple_loss, l.load_balance_loss, l.efficiency_loss};
  }
  double scale() const { return std::exp(std::min(static_cast<double>(log_tau), std::log(100.0))); }
  static double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }
  vec column_norms(const problem& q) const {
    vec n(static_cast<std::size_t>(q.E), 0.0);
    for (index_t e = 0; e < q.E; ++e) {
      for (index_t i = 0; i < q.d; ++i) n[e] += q.wr[i * q.E + e] * q.wr[i * q.E + e];
      n[e] = std::sqrt(n[e]);
    }
    return n;
  }
  double sim_loss(const problem& q) const {
    const vec n = column_norms(q);
    double s = 0.0;
    for (index_t e = 0; e < q.E; ++e)
      for (index_t f = 0; f < q.E; ++f) {
        if (!mask[e] || !mask[f]) continue;
        double dot = 0.0;
        for (index_t i = 0; i < q.d; ++i) dot += q.wr[i * q.E + e] * q.wr[i * q.E + f];
        const double a = dot / (n[e] * n[f]) - (e == f ? 1.0 : 0.0);
        s += a * a;
      }
    return std::sqrt(s);
  }
  //! S [T, E] = σ(s·cos(x_t, w_e))·m_e and θ [E] = σ(s·G_e).
  void scores(const problem& q, vec& S, vec& theta) const {
    const double s = scale();
    const vec wn = column_norms(q);
    S.assign(static_cast<std::size_t>(q.T * q.E), 0.0);
    theta.resize(static_cast<std::size_t>(q.E));
    for (index_t e = 0; e < q.E; ++e) theta[e] = sigmoid(s * q.thr[e]);
    for (index_t t = 0; t < q.T; ++t) {
      double xn = 0.0;
      for (index_t i = 0; i < q.d; ++i) xn += q.x[t * q.d + i] * q.x[t * q.d + i];
      xn = std::sqrt(xn);
      for (index_t e = 0; e < q.E; ++e) {
        double dot = 0.0;
        for (index_t i = 0; i < q.d; ++i) dot += q.x[t * q.d + i] * q.wr[i * q.E + e];
        S[t * q.E + e] = sigmoid(s * dot / (xn * wn[e])) * mask[e];
      }
    }
  }
  route reference(const problem& q) const {
    vec S, theta;
    scores(q, S, theta);
    route r;
    r.W = q.E;
    r.counts.assign(static_cast<std::size_t>(q.T), 0);
    r.ids.assign(static_cast<std::size_t>(q.T * q.E), -1);
    r.weights.assign(static_cast<std::size_t>(q.T * q.E), 0.0);
    r.on.assign(static_cast<std::size_t>(q.T * q.E), 0);
    for (index_t t = 0; t < q.T; ++t) {
      const double* st = &S[t * q.E];
      int k = 0;
      for (int e : descending(st, q.E))
        if (st[e] > theta[e]) {
          r.ids[t * q.E + k++] = e;
          r.on[t * q.E + e] = 1;
        }
      if (k == 0 && !Training) {
        int best = -1;
        for (index_t e = 0; e < q.E; ++e)
          if (mask[e] && (best < 0 || st[e] > st[best])) best = static_cast<int>(e);
        r.ids[t * q.E] = best;
        k = 1;
      }
      r.counts[t] = k;
      for (int j = 0; j < k; ++j) r.weights[t * q.E + j] = 1.0 / k;
    }
    // Losses (forward check): sim, simple, load balance over routed tokens, efficiency.
    vec me(static_cast<std::size_t>(q.E), 0.0), ce(me);
    int routed = 0, total = 0;
    for (index_t t = 0; t < q.T; ++t) {
      total += r.counts[t];
      if (r.counts[t] == 0) continue;
      ++routed;
      for (int j = 0; j < r.counts[t]; ++j) {
        me[r.ids[t * q.E + j]] += 1.0 / r.counts[t];
        ce[r.ids[t * q.E + j]] += 1.0;
      }
    }
    double lb = 0.0;
    for (index_t e = 0; routed > 0 && e < q.E; ++e) lb += me[e] / routed * ce[e] / routed;
    lb *= static_cast<double>(q.E);
    const vec wn = column_norms(q);
    const double simple = std::accumulate(wn.begin(), wn.end(), 0.0) / static_cast<double>(q.E);
    const double sim = sim_loss(q);
    r.loss_values = {sim, simple, lb, static_cast<double>(total) / static_cast<double>(q.T * q.E)};
    // Differentiable part: straight-through surrogate + the parameter-only losses.
    const auto c = coeffs();
    r.aux = c.sim_loss * sim + c.simple_loss * simple;
    if (!gb.empty())
      for (index_t t = 0; t < q.T; ++t)
        for (index_t e = 0; e < q.E; ++e)
          if (r.on[t * q.E + e]) r.aux += gb[t * q.E + e] * (S[t * q.E + e] - theta[e]);
    return r;
  }
  //! F(b) of the file comment, at gates b [T, E] (the plan's entries), slot contributions c.
  double gate_objective(const problem& q, const route& r, const vec& b, const vec& c) const {
    const auto co = coeffs();
    double combine = 0.0, eff = 0.0;
    vec me(static_cast<std::size_t>(q.E), 0.0), ce(me);
    int routed = 0;
    for (index_t t = 0; t < q.T; ++t) {
      const int k = r.counts[t];
      if (k == 0) continue;
      ++routed;
      double ksum = 0.0;
      for (int j = 0; j < k; ++j) ksum += b[t * q.E + r.ids[t * q.E + j]];
      for (int j = 0; j < k; ++j) {
        const int e = r.ids[t * q.E + j];
        combine += b[t * q.E + e] / k * c[t * q.E + j];  // integer k: no gradient through it
        me[e] += b[t * q.E + e] / ksum;                  // k = Σ b: differentiable
        ce[e] += 1.0;                                    // from the integer gates: constant
        eff += b[t * q.E + e];
      }
    }
    double lb = 0.0;
    for (index_t e = 0; routed > 0 && e < q.E; ++e) lb += me[e] / routed * ce[e] / routed;
    return combine + co.load_balance_loss * q.E * lb +
           co.efficiency_loss * eff / static_cast<double>(q.T * q.E);
  }
  void prepare(const problem& q, const route& r, const vec& c) {
    vec b(static_cast<std::size_t>(q.T * q.E), 0.0);
    for (index_t t = 0; t < q.T; ++t)
      for (int j = 0; j < r.counts[t]; ++j) b[t * q.E + r.ids[t * q.E + j]] = 1.0;
    gb.assign(b.size(), 0.0);
    const double h = 1e-6;
    for (std::size_t i = 0; i < b.size(); ++i) {
      if (!r.on[i]) continue;  // off entries and eval fallbacks pass no gradient
      b[i] = 1.0 + h;
      const double fp = gate_objective(q, r, b, c);
      b[i] = 1.0 - h;
      const double fm = gate_objective(q, r, b, c);
      b[i] = 1.0;
      gb[i] = (fp - fm) / (2 * h);
    }
  }
  std::string exercised(const route& r) const {
    int multi = 0, fallback = 0;
    for (std::size_t t = 0; t < r.counts.size(); ++t) {
      multi += r.counts[t] >= 2;
      bool any_on = false;
      for (index_t e = 0; e < E; ++e) any_on |= r.on[t * E + e] != 0;
      fallback += r.counts[t] == 1 && !any_on;
    }
    if (multi == 0) return "no token with k >= 2";
    if (!Training && fallback == 0) return "no eval fallback token";
    return {};
  }
};

// ---- ScoredTopK (the production routers), ReMoE, ExpertChoice ----------------------------

//! A ScoredTopK configuration (a preset of routing/routers/presets.hpp) and what the layer
//! and the params need with it.
struct scored_preset {
  std::string name;
  sy::routers::ScoredTopK router;
  bool bias = false;             //!< params.b (trainable router bias, gpt-oss)
  bool selection_bias = false;   //!< params.selection_bias (no gradient)
  index_t identity = 0;          //!< MoELayer::identity_experts (LongCat-Flash)
  bool weight_on_input = false;  //!< MoELayer::router_weight_on_input (Llama-4)
  index_t vocab = 0;             //!< hash selection: params.hash_table [vocab, k], token_ids [T]
  index_t null = 0;     //!< router null_experts = MoELayer::zero_experts (AdaMoE)
  index_t residual = 0; //!< E_prev of the MoE++ gating residual (params.prev_logits, residual_w)
};

//! ScoredTopK over E = 4 FFN experts (+ `identity`), the preset's options at run time (one
//! layer type serves every preset). Losses lb, sequence_balance (sequence_length from the
//! preset) and z with distinct non-zero coefficients.
struct scored_case : linear_gate {
  using router_type = sy::routers::ScoredTopK;
  scored_preset preset;
  router_type router;
  std::vector<float> sel_bias;
  std::vector<std::int32_t> table, token_ids;

  explicit scored_case(scored_preset p) : preset(std::move(p)), router(preset.router) {
    E = 4 + preset.identity + preset.null;
  }
  std::string name() const { return preset.name; }
  index_t width() const { return router.k; }
  index_t identity_experts() const { return preset.identity; }
  index_t zero_experts() const { return preset.null; }
  bool weight_on_input() const { return preset.weight_on_input; }
  void init(std::mt19937_64& rng, problem& q) {
    init_gate(rng, q);
    q.rb.clear();
    if (preset.bias) q.rb = draw(rng, q.E, 0.5f);
    q.rw.clear();
    q.pl.clear();
    if (preset.residual > 0) {
      q.rw = draw(rng, q.E * preset.residual, 0.5f);
      q.pl = draw(rng, q.T * preset.residual, 1.0f);
    }
    if (preset.selection_bias) sel_bias = sy::test::normal(rng, static_cast<std::size_t>(q.E), 0.4f);
    if (preset.vocab > 0) {
      table.clear();
      for (index_t v = 0; v < preset.vocab; ++v) {
        std::vector<std::int32_t> perm(static_cast<std::size_t>(q.E));
        std::iota(perm.begin(), perm.end(), 0);
        std::shuffle(perm.begin(), perm.end(), rng);
        table.insert(table.end(), perm.begin(), perm.begin() + router.k);
      }
      token_ids.resize(static_cast<std::size_t>(q.T));
      for (auto& id : token_ids)
        id = static_cast<std::int32_t>(rng() % static_cast<std::uint64_t>(preset.vocab));
    }
  }
  router_type::params_type params(const fstore& s, const problem& q) const {
    router_type::params_type p;
    p.w = view(s.wr, q);
    if (preset.bias) p.b = sy::make_view<const float>(s.rb.data(), q.E);
    if (preset.residual > 0) {
      p.residual_w = sy::make_view<const float>(s.rw.data(), q.E, preset.residual);
      p.prev_logits = sy::make_view<const float>(s.pl.data(), q.T, preset.residual);
    }
    if (preset.selection_bias) p.selection_bias = sy::make_view<const float>(sel_bias.data(), q.E);
    if (preset.vocab > 0) {
      p.hash_table = sy::make_view<const std::int32_t>(table.data(), preset.vocab, router.k);
      p.token_ids = sy::make_view<const std::int32_t>(token_ids.data(), q.T);
    }
    return p;
  }
  router_type::grads_type grads(fstore& s, const problem& q) const {
    router_type::grads_type g;
    g.w = gview(s.wr, q);
    if (preset.bias) g.b = sy::make_view(s.rb.data(), q.E);
    if (preset.residual > 0) {
      g.residual_w = sy::make_view(s.rw.data(), q.E, preset.residual);
      g.prev_logits = sy::make_view(s.pl.data(), q.T, preset.residual);
    }
    return g;
  }
  router_type::losses_type coeffs() const { return {0.3f, 0.25f, 0.05f}; }
  vec library_losses(const router_type::losses_type& l) const {
    return {l.lb, l.sequence_balance, l.z};
  }
  //! Steps 1-8 of routing/scored.hpp in double.
  route reference(const problem& q) const {
    using sy::routing::normalization;
    using sy::routing::score_function;
    const index_t T = q.T, n = q.E, k = router.k;
    vec lg(static_cast<std::size_t>(T * n)), sc(lg.size());
    const score_function fn = router.softmax_after_topk ? score_function::softmax : router.scoring;
    for (index_t t = 0; t < T; ++t) {
      double* l = &lg[t * n];
      double* s = &sc[t * n];
      for (index_t e = 0; e < n; ++e) {
        double v = q.rb.empty() ? 0.0 : q.rb[e];
        for (index_t i = 0; i < q.d; ++i) v += q.x[t * q.d + i] * q.wr[at(q, e, i)];
        for (index_t i = 0; i < preset.residual; ++i)
          v += q.pl[t * preset.residual + i] * q.rw[e * preset.residual + i];
        l[e] = v;
      }
      if (fn == score_function::softmax) {
        const double m = *std::max_element(l, l + n);
        double z = 0.0;
        for (index_t e = 0; e < n; ++e) z += std::exp(l[e] - m);
        for (index_t e = 0; e < n; ++e) s[e] = std::exp(l[e] - m) / z;
      } else {
        for (index_t e = 0; e < n; ++e)
          s[e] = fn == score_function::sigmoid         ? ref_sigmoid(l[e])
                 : fn == score_function::sqrt_softplus ? std::sqrt(std::log1p(std::exp(l[e])))
                                                       : l[e];
      }
    }
    route r;
    r.W = k;
    r.counts.assign(static_cast<std::size_t>(T), static_cast<int>(k));
    r.ids.assign(static_cast<std::size_t>(T * k), -1);
    r.weights.assign(static_cast<std::size_t>(T * k), 0.0);
    const bool on_logits = router.select_on_logits || router.softmax_after_topk;
    for (index_t t = 0; t < T; ++t) {
      const double* l = &lg[t * n];
      const double* s = &sc[t * n];
      int* ids = &r.ids[t * k];
      if (preset.vocab > 0) {
        for (index_t j = 0; j < k; ++j) ids[j] = table[token_ids[t] * k + j];
      } else {
        vec c(static_cast<std::size_t>(n));
        for (index_t e = 0; e < n; ++e)
          c[e] = (on_logits ? l[e] : s[e]) + (sel_bias.empty() ? 0.0 : sel_bias[e]);
        const auto& gl = router.groups;
        if (gl.n_group > 1) {
          const index_t size = n / gl.n_group;
          vec gv(static_cast<std::size_t>(gl.n_group));
          for (index_t g = 0; g < gl.n_group; ++g) {
            const auto o = descending(&c[g * size], size);
            gv[g] = gl.score == sy::routing::group_score::max ? c[g * size + o[0]]
                                                               : c[g * size + o[0]] + c[g * size + o[1]];
          }
          const auto go = descending(gv.data(), gl.n_group);
          for (index_t r2 = gl.topk_group; r2 < gl.n_group; ++r2)
            for (index_t e = go[r2] * size; e < (go[r2] + 1) * size; ++e) c[e] = gl.excluded_fill;
        }
        const auto o = descending(c.data(), n);
        for (index_t j = 0; j < k; ++j) ids[j] = o[j];
      }
      vec raw(static_cast<std::size_t>(k));
      if (router.softmax_after_topk) {
        double m = l[ids[0]];
        for (index_t j = 1; j < k; ++j) m = std::max(m, l[ids[j]]);
        double z = 0.0;
        for (index_t j = 0; j < k; ++j) z += std::exp(l[ids[j]] - m);
        for (index_t j = 0; j < k; ++j) raw[j] = std::exp(l[ids[j]] - m) / z;
      } else {
        for (index_t j = 0; j < k; ++j) raw[j] = s[ids[j]];
      }
      const auto& nz = router.normalize;
      double N = 1.0;
      if (nz.kind == normalization::sum) {
        const double sum = std::accumulate(raw.begin(), raw.end(), 0.0);
        N = nz.eps == sy::routing::epsilon_kind::add         ? sum + nz.eps_value
            : nz.eps == sy::routing::epsilon_kind::clamp_min ? std::max<double>(sum, nz.eps_value)
                                                             : sum;
      } else if (nz.kind == normalization::pnorm) {
        double sum = 0.0;
        for (double v : raw) sum += std::pow(std::abs(v), static_cast<double>(nz.p));
        N = std::pow(sum, 1.0 / nz.p);
      }
      for (index_t j = 0; j < k; ++j) r.weights[t * k + j] = raw[j] / N * router.scaling;
    }
    // Losses on plan.probs (= sc) and plan.logits (= lg); lb over the E' = E − null true
    // experts (f from their slots, P̄ of their scores), E' · Σ_{e<E'} f_e/T · P̄_e/T.
    double lb = 0.0;
    {
      const index_t true_e = n - preset.null;
      vec f(static_cast<std::size_t>(n), 0.0), pbar(f);
      for (index_t t = 0; t < T; ++t) {
        for (index_t j = 0; j < k; ++j)
          if (r.ids[t * k + j] < true_e) f[r.ids[t * k + j]] += 1.0 / T;
        for (index_t e = 0; e < n; ++e) pbar[e] += sc[t * n + e] / T;
      }
      for (index_t e = 0; e < true_e; ++e) lb += f[e] * pbar[e];
      lb *= static_cast<double>(true_e);
    }
    const double z = ref_z(lg, T, n);
    const index_t S = router.sequence_length > 0 ? router.sequence_length : T;
    double seq = 0.0;
    for (index_t first = 0; first < T; first += S) {
      vec f(static_cast<std::size_t>(n), 0.0), p(f);
      for (index_t t = first; t < first + S; ++t) {
        for (index_t j = 0; j < k; ++j) f[r.ids[t * k + j]] += 1.0;
        const double sum = std::accumulate(&sc[t * n], &sc[t * n] + n, 0.0);
        for (index_t e = 0; e < n; ++e) p[e] += sc[t * n + e] / sum;
      }
      for (index_t e = 0; e < n; ++e)
        seq += static_cast<double>(n) / static_cast<double>(k * S) * f[e] * (p[e] / S);
    }
    seq /= static_cast<double>(T / S);
    r.loss_values = {lb, seq, z};
    const auto c = coeffs();
    r.aux = c.lb * lb + c.sequence_balance * seq + c.z * z;
    return r;
  }
  void prepare(const problem&, const route&, const vec&) {}
  std::string exercised(const route& r) const {
    const index_t n_ffn = E - preset.identity - preset.null;
    int ffn = 0, ident = 0, null = 0;
    for (int id : r.ids) (id < n_ffn ? ffn : id < n_ffn + preset.identity ? ident : null)++;
    if (preset.identity > 0 && (ident == 0 || ffn == 0)) return "no mix of FFN and identity slots";
    if (preset.null > 0 && (null == 0 || ffn == 0)) return "no mix of FFN and null-expert slots";
    return {};
  }
};

//! ReMoE: gates g = ReLU(x·Wᵀ), every positive gate up to max_k = 2 (E = 4), weights g; L1
//! and load-balanced L1 with non-zero coefficients. `on` pins the set of positive gates (the
//! L1 terms' support), so a gate crossing 0 under a perturbation redraws the case.
struct remoe_case : linear_gate {
  using router_type = sy::routers::ReMoE;
  router_type router{.max_k = 2};
  index_t width() const { return router.max_k; }
  void init(std::mt19937_64& rng, problem& q) { init_gate(rng, q); }
  router_type::params_type params(const fstore& s, const problem& q) const {
    return {view(s.wr, q)};
  }
  router_type::grads_type grads(fstore& s, const problem& q) const { return {gview(s.wr, q)}; }
  router_type::losses_type coeffs() const { return {0.2f, 0.3f}; }
  vec library_losses(const router_type::losses_type& l) const { return {l.l1, l.l1_balanced}; }
  route reference(const problem& q) const {
    vec lg, pr;
    score(q, lg, pr);
    const index_t T = q.T, n = q.E, W = width();
    vec g(lg.size());
    for (std::size_t i = 0; i < lg.size(); ++i) g[i] = std::max(lg[i], 0.0);
    route r;
    r.W = W;
    r.counts.assign(static_cast<std::size_t>(T), 0);
    r.ids.assign(static_cast<std::size_t>(T * W), -1);
    r.weights.assign(static_cast<std::size_t>(T * W), 0.0);
    r.on.assign(lg.size(), 0);
    vec ne(static_cast<std::size_t>(n), 0.0), gsum(ne);
    double l1 = 0.0;
    for (index_t t = 0; t < T; ++t) {
      const auto o = descending(&g[t * n], n);
      int c = 0;
      for (index_t e = 0; e < n; ++e) {
        if (g[t * n + e] > 0.0) {
          r.on[t * n + e] = 1;
          ne[e] += 1.0;
        }
        gsum[e] += g[t * n + e];
        l1 += g[t * n + e] / T;
      }
      for (int e : o)
        if (g[t * n + e] > 0.0 && c < W) {
          r.ids[t * W + c] = e;
          r.weights[t * W + c] = g[t * n + e];
          ++c;
        }
      r.counts[t] = c;
    }
    double bal = 0.0;
    for (index_t e = 0; e < n; ++e) bal += ne[e] * gsum[e];
    bal *= static_cast<double>(n) / (static_cast<double>(T) * T);
    r.loss_values = {l1, bal};
    const auto c = coeffs();
    r.aux = c.l1 * l1 + c.l1_balanced * bal;
    return r;
  }
  void prepare(const problem&, const route&, const vec&) {}
  std::string exercised(const route& r) const {
    const auto [lo, hi] = std::minmax_element(r.counts.begin(), r.counts.end());
    int capped = 0;
    for (std::size_t t = 0; t < r.counts.size(); ++t)
      capped += std::count(&r.on[t * E], &r.on[t * E] + E, 1) > r.counts[t];
    if (*lo == *hi) return "every token has the same number of positive gates";
    return capped > 0 ? std::string{} : "no token capped at max_k";
  }
};

//! ExpertChoice, capacity factor 1 (c = 4 of T = 16 tokens per expert, E = 4): S =
//! softmax(x·Wᵀ), each expert takes its c highest-S tokens, a token lists its experts in
//! descending S with weights S (0…E of them). No trainable loss: the losses struct's capacity,
//! pairs and unrouted tokens are checked instead.
struct expert_choice_case : linear_gate {
  using router_type = sy::routers::ExpertChoice;
  router_type router{.capacity_factor = 1.0f};
  index_t width() const { return E; }
  void init(std::mt19937_64& rng, problem& q) { init_gate(rng, q); }
  router_type::params_type params(const fstore& s, const problem& q) const {
    return {view(s.wr, q)};
  }
  router_type::grads_type grads(fstore& s, const problem& q) const { return {gview(s.wr, q)}; }
  router_type::losses_type coeffs() const { return {}; }
  vec library_losses(const router_type::losses_type& l) const {
    return {static_cast<double>(l.capacity), static_cast<double>(l.routed_pairs),
            static_cast<double>(l.unrouted_tokens)};
  }
  route reference(const problem& q) const {
    vec lg, pr;
    score(q, lg, pr);
    const index_t T = q.T, n = q.E;
    const index_t cap = std::min<index_t>(
        T, static_cast<index_t>(std::ceil(static_cast<double>(T) * router.capacity_factor / n)));
    std::vector<char> taken(static_cast<std::size_t>(T * n), 0);
    vec col(static_cast<std::size_t>(T));
    for (index_t e = 0; e < n; ++e) {
      for (index_t t = 0; t < T; ++t) col[t] = pr[t * n + e];
      const auto o = descending(col.data(), T);
      for (index_t i = 0; i < cap; ++i) taken[o[i] * n + e] = 1;
    }
    route r;
    r.W = n;
    r.counts.assign(static_cast<std::size_t>(T), 0);
    r.ids.assign(static_cast<std::size_t>(T * n), -1);
    r.weights.assign(static_cast<std::size_t>(T * n), 0.0);
    int unrouted = 0;
    for (index_t t = 0; t < T; ++t) {
      int c = 0;
      for (int e : descending(&pr[t * n], n))
        if (taken[t * n + e]) {
          r.ids[t * n + c] = e;
          r.weights[t * n + c] = pr[t * n + e];
          ++c;
        }
      r.counts[t] = c;
      unrouted += c == 0;
    }
    r.loss_values = {static_cast<double>(cap), static_cast<double>(cap * n),
                     static_cast<double>(unrouted)};
    return r;
  }
  void prepare(const problem&, const route&, const vec&) {}
  std::string exercised(const route& r) const {
    const auto [lo, hi] = std::minmax_element(r.counts.begin(), r.counts.end());
    return *lo == 0 && *hi >= 2 ? std::string{} : "no token without expert and one with >= 2";
  }
};

// ---- dispatch cases -----------------------------------------------------------------------

struct sorted_grouped_case {
  using type = sy::dispatch::sorted_grouped;
  static constexpr int drops = -1;             // -1: no capacity; 0: capacity, no drop; 1: drops
  static constexpr bool pass_through = false;  // a dropped pair contributes w·x
  static type make() { return {}; }
};
struct dense_case {
  using type = sy::dispatch::dense;
  static constexpr int drops = -1;
  static constexpr bool pass_through = false;
  static type make() { return {}; }
};
//! cf = 4 = E: every expert can hold every pair (and C is rounded to 8): nothing dropped.
struct padded_capacity_no_drops_case {
  using type = sy::dispatch::padded_capacity;
  static constexpr int drops = 0;
  static constexpr bool pass_through = false;
  static type make() {
    return {.capacity_factor = 4.0f, .min_capacity = 0, .capacity_multiple = 8};
  }
};
//! cf = 0.5: E·C < Σ counts, so pairs are dropped; a dropped pair contributes 0.
struct padded_capacity_drop_zero_case {
  using type = sy::dispatch::padded_capacity;
  static constexpr int drops = 1;
  static constexpr bool pass_through = false;
  static type make() {
    return {.capacity_factor = 0.5f,
            .min_capacity = 0,
            .capacity_multiple = 1,
            .drop = sy::dispatch::dropped_output::zero};
  }
};
//! As above; a dropped pair contributes w·x (Switch's pass-through).
struct padded_capacity_drop_scaled_input_case {
  using type = sy::dispatch::padded_capacity;
  static constexpr int drops = 1;
  static constexpr bool pass_through = true;
  static type make() {
    return {.capacity_factor = 0.5f,
            .min_capacity = 0,
            .capacity_multiple = 1,
            .drop = sy::dispatch::dropped_output::scaled_input};
  }
};

//! Kept pairs [T, W] of a capacity dispatch: C from the documented formula, token then slot
//! order; E = the FFN experts (ids >= E are identity experts, never dropped).
template <class D>
std::vector<char> reference_keep(const route& r, index_t T, index_t E,
                                 std::vector<index_t>& dropped) {
  std::vector<char> keep(r.ids.size(), 1);
  dropped.assign(static_cast<std::size_t>(E), 0);
  if constexpr (D::drops >= 0) {
    const auto disp = D::make();
    // Identity slots (ids >= E_ffn) never reach the dispatch: C counts the FFN pairs over the
    // FFN experts, which fill their rows in token then slot order (docs/layer.md).
    index_t A = 0;
    for (index_t t = 0; t < T; ++t)
      for (int j = 0; j < r.counts[t]; ++j) A += r.ids[t * r.W + j] < E;
    const auto up = [&](index_t n) {
      return (n + disp.capacity_multiple - 1) / disp.capacity_multiple * disp.capacity_multiple;
    };
    index_t cap =
        static_cast<index_t>(std::ceil(static_cast<double>(disp.capacity_factor) * A / E));
    cap = std::min(up(std::max(cap, disp.min_capacity)), up(T));
    std::vector<index_t> fill(static_cast<std::size_t>(E), 0);
    for (index_t t = 0; t < T; ++t)
      for (int j = 0; j < r.counts[t]; ++j) {
        const int e = r.ids[t * r.W + j];
        if (e >= E) continue;  // identity expert: always kept
        if (fill[e] < cap) {
          ++fill[e];
        } else {
          keep[t * r.W + j] = 0;
          ++dropped[e];
        }
      }
  }
  return keep;
}

// ---- the reference layer ---------------------------------------------------------------

//! FFN_e(x_t) in double through activation case A; `k` records the distance of this FFN's
//! pre-activations to a kink of A and the branches they take.
template <class A>
void ffn(const problem& q, index_t e, const double* xt, double* out, kink_stats& k) {
  constexpr bool gated = sy::activation_traits<typename A::type>::is_gated;
  vec h(static_cast<std::size_t>(q.p)), a(static_cast<std::size_t>(q.f));
  for (index_t r = 0; r < q.p; ++r) {
    double s = q.b1[e * q.p + r];
    for (index_t i = 0; i < q.d; ++i) s += q.w1[(e * q.p + r) * q.d + i] * xt[i];
    h[r] = s;
  }
  for (index_t c = 0; c < q.f; ++c) {
    const double up = gated ? h[q.f + c] : 0.0;
    a[c] = A::value(h[c], up);
    k.margin = std::min(k.margin, A::margin(h[c], up));
    if constexpr (required_branches<A>() != 0) k.branches |= A::branches(h[c], up);
  }
  for (index_t o = 0; o < q.d; ++o) {
    double s = q.b2[e * q.d + o];
    for (index_t c = 0; c < q.f; ++c) s += q.w2[(e * q.d + o) * q.f + c] * a[c];
    out[o] = s;
  }
}

inline double dot(const vec& a, const vec& b) {
  double s = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}
inline double dot(const double* a, const double* b, index_t n) {
  double s = 0.0;
  for (index_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

//! c [T, W]: ⟨g_t, FFN_{e_tj}(x_t)⟩ for a kept FFN pair, ⟨g_t, x_t⟩ for an identity expert or
//! a dropped pass-through pair, 0 for a zero expert, a dropped zero pair or an unused slot
//! (Σ g·y = ⟨w, c⟩).
template <class A>
vec slot_contributions(const problem& q, const route& r, const std::vector<char>& keep,
                       bool pass_through, kink_stats& margin) {
  vec c(r.ids.size(), 0.0), out(static_cast<std::size_t>(q.d));
  for (index_t t = 0; t < q.T; ++t) {
    const double* xt = &q.x[t * q.d];
    const double* gt = &q.g[t * q.d];
    for (int j = 0; j < r.counts[t]; ++j) {
      const int e = r.ids[t * r.W + j];
      if (q.is_zero_expert(e)) continue;  // AdaMoE null expert: no term
      if (e >= q.ffn_experts() || (!keep[t * r.W + j] && pass_through)) {
        c[t * r.W + j] = dot(gt, xt, q.d);
      } else if (keep[t * r.W + j]) {
        ffn<A>(q, e, xt, out.data(), margin);
        c[t * r.W + j] = dot(gt, out.data(), q.d);
      }
    }
  }
  return c;
}

//! Σ_t ⟨g_t, y_t⟩ of the reference layer on route r: ⟨w, c⟩, or with the weight on the input
//! (Llama-4) Σ ⟨g_t, FFN_e(w_tj · x_t)⟩ over the kept FFN pairs (identity and pass-through
//! pairs still give w_tj · x_t: FFN(w·x) = w·x for them, docs/layer.md).
template <class A>
double layer_term(const problem& q, const route& r, const std::vector<char>& keep,
                  bool pass_through, bool weight_on_input, kink_stats& margin) {
  if (!weight_on_input) return dot(r.weights, slot_contributions<A>(q, r, keep, pass_through, margin));
  double s = 0.0;
  vec xs(static_cast<std::size_t>(q.d)), out(xs);
  for (index_t t = 0; t < q.T; ++t) {
    const double* xt = &q.x[t * q.d];
    const double* gt = &q.g[t * q.d];
    for (int j = 0; j < r.counts[t]; ++j) {
      const int e = r.ids[t * r.W + j];
      const double w = r.weights[t * r.W + j];
      if (q.is_zero_expert(e)) continue;
      if (e >= q.ffn_experts() || (!keep[t * r.W + j] && pass_through)) {
        s += w * dot(gt, xt, q.d);
      } else if (keep[t * r.W + j]) {
        for (index_t i = 0; i < q.d; ++i) xs[i] = w * xt[i];
        ffn<A>(q, e, xs.data(), out.data(), margin);
        s += dot(gt, out.data(), q.d);
      }
    }
  }
  return s;
}

// ---- one draw ----------------------------------------------------------------------------

//! Largest |got − fd| / (|fd_i| + max_j |fd_j|) of a block, for the report.
struct block_result {
  const char* name;
  double worst = 0.0;
  int bad = 0;
};

// Tolerance. The library runs in float32 (float accumulation in the router's linear layer and
// in the expert GEMMs), the reference and its central differences in float64 (h = 1e-6 on
// O(1) values: truncation O(h²) ≈ 1e-12, cancellation ≈ 1e-16·|L|/h ≈ 1e-10, both far below
// float32 rounding). A float32 gradient entry is a sum of O(d·d_ff·k) terms each rounded to
// ~6e-8 relative, so its error scales with the magnitude of the block's gradients, not with
// the entry itself (an entry that nearly cancels keeps the absolute error of its terms). The
// test therefore accepts |got − fd| <= rtol·(|fd_i| + max_block |fd|) with rtol = 1e-4: the
// largest error measured over 30 seeds × every case of test_moe_layer_backward_routers.cpp was
// 2.1e-6 of that scale (the per-block worst is printed with --log_level=message), and over 12
// seeds × every case of the test_moe_layer_gradcheck_*.cpp files 2.8e-6 (ScoredTopK; the
// activation, ReMoE and ExpertChoice files 1.3e-6), so ~35x headroom, while a 1.001 scaling of
// the expert dx or of an activation's derivative, a missing loss term or a slot/expert mix-up
// is ≥ 5e-4 of it and fails.
constexpr double rtol = 1e-4;
constexpr int max_draws = 8;

//! One draw of router case R (a copy of `proto`) × activation case A × dispatch case D:
//! true when checked (failures reported through Boost.Test), false with `why` when the draw
//! must be redrawn.
template <class R, class A, class D>
bool run_draw(R rc, std::uint64_t seed, std::string& why, std::vector<block_result>& report) {
  using router_type = typename R::router_type;
  using act_type = typename A::type;
  constexpr bool gated = sy::activation_traits<act_type>::is_gated;
  constexpr bool pass_through = D::pass_through;

  std::mt19937_64 rng(seed);
  problem q;
  q.E = rc.E;
  if constexpr (requires { rc.identity_experts(); }) q.Z = rc.identity_experts();
  if constexpr (requires { rc.zero_experts(); }) q.N = rc.zero_experts();
  bool weight_on_input = false;
  if constexpr (requires { rc.weight_on_input(); }) weight_on_input = rc.weight_on_input();
  const index_t EF = q.ffn_experts();
  q.p = gated ? 2 * q.f : q.f;
  q.x = draw(rng, q.T * q.d, 1.0f);
  rc.init(rng, q);
  q.w1 = draw(rng, EF * q.p * q.d, 0.5f);
  q.b1 = draw(rng, EF * q.p, 0.2f);
  q.w2 = draw(rng, EF * q.d * q.f, 0.5f);
  q.b2 = draw(rng, EF * q.d, 0.2f);
  q.g = draw(rng, q.T * q.d, 1.0f);

  // ---- library forward + backward in float ----
  auto xf = as_float(q.x), w1f = as_float(q.w1), b1f = as_float(q.b1), w2f = as_float(q.w2),
       b2f = as_float(q.b2), gf = as_float(q.g);
  const fstore rf{as_float(q.wr), as_float(q.thr), as_float(q.rb), as_float(q.rw),
                  as_float(q.pl)};
  fstore rg{std::vector<float>(q.wr.size()), std::vector<float>(q.thr.size()),
            std::vector<float>(q.rb.size()), std::vector<float>(q.rw.size()),
            std::vector<float>(q.pl.size())};
  const sy::expert_weights<float> w{sy::make_view<const float>(w1f.data(), EF, q.p, q.d),
                                    sy::make_view<const float>(b1f.data(), EF, q.p),
                                    sy::make_view<const float>(w2f.data(), EF, q.d, q.f),
                                    sy::make_view<const float>(b2f.data(), EF, q.d)};
  const auto rp = rc.params(rf, q);
  sy::MoELayer<router_type, act_type, typename D::type> layer{
      .router = rc.router, .activation = A::make(), .dispatch = D::make()};
  layer.identity_experts = q.Z;
  layer.zero_experts = q.N;
  layer.router_weight_on_input = weight_on_input;
  std::vector<float> y(static_cast<std::size_t>(q.T * q.d));
  typename decltype(layer)::result_type res;
  const auto xv = sy::make_view<const float>(xf.data(), q.T, q.d);
  layer.template forward<float>(sy::host_context{}, xv, rp, w, sy::make_view(y.data(), q.T, q.d),
                                res);

  std::vector<float> dx(q.x.size()), dw1(q.w1.size()), db1(q.b1.size()), dw2(q.w2.size()),
      db2(q.b2.size());
  const sy::expert_grads eg{
      sy::make_view(dw1.data(), EF, q.p, q.d), sy::make_view(db1.data(), EF, q.p),
      sy::make_view(dw2.data(), EF, q.d, q.f), sy::make_view(db2.data(), EF, q.d)};
  layer.template backward<float>(sy::host_context{}, xv, rp, w, res,
                                 sy::make_view<const float>(gf.data(), q.T, q.d), rc.coeffs(),
                                 sy::make_view(dx.data(), q.T, q.d), eg, rc.grads(rg, q));

  // ---- the reference at x: the same selection, the same drops, the same forward ----
  route base = rc.reference(q);
  {
    route lib;
    lib.W = res.plan.width;
    lib.counts.assign(res.plan.counts.begin(), res.plan.counts.end());
    lib.ids.assign(res.plan.expert_ids.begin(), res.plan.expert_ids.end());
    if (lib.W != base.W) {
      BOOST_ERROR("plan width " << lib.W << ", expected " << base.W);
      return true;
    }
    if (const auto m = describe_mismatch(lib, base); !m.empty()) {
      why = "library plan differs from the float64 selection (a near tie?) at " + m;
      return false;
    }
  }
  if (auto m = rc.exercised(base); !m.empty()) {
    why = "the draw does not exercise the router: " + m;
    return false;
  }
  std::vector<index_t> ref_dropped;
  const auto keep = reference_keep<D>(base, q.T, EF, ref_dropped);
  const index_t n_dropped = std::accumulate(ref_dropped.begin(), ref_dropped.end(), index_t{0});
  if (D::drops == 1 && n_dropped == 0) {
    why = "no pair dropped";
    return false;
  }
  ref_dropped.resize(static_cast<std::size_t>(q.E), 0);  // identity / zero experts drop nothing
  kink_stats margin;
  {
    const vec c = slot_contributions<A>(q, base, keep, pass_through, margin);
    const double ref = layer_term<A>(q, base, keep, pass_through, weight_on_input, margin);
    if (margin.margin < kink_margin) {
      why = "a pre-activation lies within " + std::to_string(margin.margin) +
            " of a kink of the activation";
      return false;
    }
    if ((margin.branches & required_branches<A>()) != required_branches<A>()) {
      why = "the activation's non-smooth branches are not all taken";
      return false;
    }
    BOOST_TEST(res.dropped == ref_dropped, "dropped pairs per expert");
    for (std::size_t i = 0; i < base.weights.size(); ++i)
      BOOST_TEST(std::abs(res.plan.weights[i] - base.weights[i]) <= 1e-5,
                 "combine weight [" << i << "] " << res.plan.weights[i] << " vs "
                                    << base.weights[i]);
    const vec lib_losses = rc.library_losses(res.losses);
    BOOST_TEST_REQUIRE(lib_losses.size() == base.loss_values.size());
    for (std::size_t i = 0; i < lib_losses.size(); ++i)
      BOOST_TEST(std::abs(lib_losses[i] - base.loss_values[i]) <=
                     1e-5 * (1.0 + std::abs(base.loss_values[i])),
                 "aux loss field " << i << ": " << lib_losses[i] << " vs " << base.loss_values[i]);
    double lib = 0.0, ab = 0.0;
    for (std::size_t i = 0; i < y.size(); ++i) {
      lib += q.g[i] * y[i];
      ab += std::abs(q.g[i] * y[i]);
    }
    BOOST_TEST(std::abs(lib - ref) <= 1e-5 * (1.0 + ab), "forward Σ g·y " << lib << " vs " << ref);
    rc.prepare(q, base, c);
    base = rc.reference(q);  // DynMoE: now with the straight-through surrogate
  }

  // ---- central differences of the reference loss, the selection pinned ----
  auto loss_at = [&](const char* name, std::size_t i) {
    const route r = rc.reference(q);
    if (const auto m = describe_mismatch(r, base); !m.empty())
      throw plan_changed{std::string("the selection changes under a perturbation of ") + name +
                         "[" + std::to_string(i) + "]: " + m};
    kink_stats unused;
    return layer_term<A>(q, r, keep, pass_through, weight_on_input, unused) + r.aux;
  };
  auto check = [&](const char* name, vec& param, const std::vector<float>& got) {
    const double h = 1e-6;
    vec fd(param.size());
    double max_fd = 0.0;
    for (std::size_t i = 0; i < param.size(); ++i) {
      const double v = param[i];
      param[i] = v + h;
      const double lp = loss_at(name, i);
      param[i] = v - h;
      const double lm = loss_at(name, i);
      param[i] = v;
      fd[i] = (lp - lm) / (2 * h);
      max_fd = std::max(max_fd, std::abs(fd[i]));
    }
    return [=, &got]() {
      block_result b{name};
      BOOST_TEST(max_fd > 0.0, name << ": the gradient is not identically zero");
      for (std::size_t i = 0; i < fd.size(); ++i) {
        const double err = std::abs(got[i] - fd[i]), scale = std::abs(fd[i]) + max_fd;
        b.worst = std::max(b.worst, err / scale);
        if (!(err <= rtol * scale) && b.bad++ < 4)
          BOOST_ERROR(name << "[" << i << "]: backward " << got[i] << ", central difference "
                           << fd[i] << " (block max |fd| " << max_fd << ")");
      }
      BOOST_TEST(b.bad == 0, name << ": " << b.bad << " of " << fd.size() << " entries off");
      return b;
    };
  };
  try {
    // Every difference first (a plan change redraws before anything is reported).
    std::vector<std::function<block_result()>> verdicts;
    verdicts.push_back(check("dx", q.x, dx));
    verdicts.push_back(check(
        std::is_same_v<router_type, sy::routers::DynMoE> ? "router w_gate" : "router w", q.wr,
        rg.wr));
    if (!q.thr.empty()) verdicts.push_back(check("router thresholds", q.thr, rg.thr));
    if (!q.rb.empty()) verdicts.push_back(check("router b", q.rb, rg.rb));
    if (!q.rw.empty()) verdicts.push_back(check("router residual_w", q.rw, rg.rw));
    if (!q.pl.empty()) verdicts.push_back(check("router prev_logits", q.pl, rg.pl));
    verdicts.push_back(check("W1", q.w1, dw1));
    verdicts.push_back(check("b1", q.b1, db1));
    verdicts.push_back(check("W2", q.w2, dw2));
    verdicts.push_back(check("b2", q.b2, db2));
    for (auto& v : verdicts) report.push_back(v());
  } catch (const plan_changed& e) {
    why = e.why;
    return false;
  }
  return true;
}

template <class T>
std::string type_label() {
  std::string s = boost::core::demangle(typeid(T).name());
  if (const auto k = s.rfind("::"); k != std::string::npos) s = s.substr(k + 2);
  if (const auto k = s.find('<'); k != std::string::npos) s = s.substr(0, k);
  return s;
}

//! The activation case's name without its "_act" suffix (for labels).
template <class A>
std::string act_label() {
  std::string a = type_label<A>();
  if (a.size() > 4 && a.substr(a.size() - 4) == "_act") a.resize(a.size() - 4);
  return a;
}

//! Draws until one is usable (each redraw logged with its reason), then checks it; fails after
//! `max_draws` rejected draws (a library plan that never matches the float64 selection is a
//! bug in the selection or the reference, not bad luck).
template <class R, class A, class D>
void check_combo(const R& proto, const std::string& label) {
  const std::uint64_t case_seed =
      sy::test::base_seed() + 7919u * std::hash<std::string>{}(label) % 1000003u;
  std::string reasons;
  for (int draw = 0; draw < max_draws; ++draw) {
    const std::uint64_t seed = case_seed + 104729u * static_cast<std::uint64_t>(draw);
    std::string why;
    std::vector<block_result> report;
    if (run_draw<R, A, D>(proto, seed, why, report)) {
      std::ostringstream s;
      s << label << " (seed " << seed << ", draw " << draw << "): worst |err|/(|fd|+max|fd|)";
      for (const auto& b : report) s << "  " << b.name << " " << b.worst;
      BOOST_TEST_MESSAGE(s.str());
      return;
    }
    BOOST_TEST_MESSAGE(label << ": redrawing (seed " << seed << "): " << why);
    reasons += "\n  seed " + std::to_string(seed) + ": " + why;
  }
  BOOST_ERROR(label << ": no usable draw in " << max_draws << ":" << reasons);
}

//! A typed combination: router case × activation case × dispatch case.
template <class R, class A, class D>
struct combo {
  using router_case = R;
  using act_case = A;
  using dispatch_case = D;
  static std::string label() {
    return type_label<R>() + " x " + act_label<A>() + " x " + type_label<D>();
  }
  static void run() { check_combo<R, A, D>(R{}, label()); }
};

}  // namespace bwd

// ---- the dispatch axis, shared by every gradcheck file -----------------------------------
// (global names, so that Boost.Test's case names read e.g. combo<TopP_p05, gelu_act, dense>)

struct sorted_grouped : bwd::sorted_grouped_case {};
struct dense : bwd::dense_case {};
struct padded_capacity_no_drops : bwd::padded_capacity_no_drops_case {};
struct padded_capacity_drop_zero : bwd::padded_capacity_drop_zero_case {};
struct padded_capacity_drop_scaled_input : bwd::padded_capacity_drop_scaled_input_case {};

//! Every dispatch case.
using gradcheck_dispatch_cases =
    boost::mp11::mp_list<sorted_grouped, dense, padded_capacity_no_drops, padded_capacity_drop_zero,
                         padded_capacity_drop_scaled_input>;

//! Router case R × every activation case of the list Acts × every dispatch case, as the
//! std::tuple BOOST_AUTO_TEST_CASE_TEMPLATE takes.
template <class R, class Acts>
using gradcheck_activation_combos = boost::mp11::mp_rename<
    boost::mp11::mp_product_q<boost::mp11::mp_bind_front<bwd::combo, R>, Acts,
                              gradcheck_dispatch_cases>,
    std::tuple>;
