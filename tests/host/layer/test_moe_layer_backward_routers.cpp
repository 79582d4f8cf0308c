// MoELayer::backward through EVERY router × EVERY dispatch against float64 central differences
// of a float64 reference layer written out here (router scoring, selection, combine weights,
// aux losses, capacity drops, expert FFNs), for x, the router's parameters, W1, b1, W2, b2,
// with nonzero aux-loss coefficients.
//
// Routers: TopK (GShard/Mixtral), the two routers HyperMoE plugs into MoELayer (Switch top-1
// raw weights; GPT-2 top-2 over a transposed, strided gate), TopP, AdaptiveGating, DA-MoE with
// caller-supplied importance and with attention-derived importance (K_t rule), DynMoE in
// training and eval mode. Dispatches: sorted_grouped, dense, padded_capacity without drops,
// with drops contributing zero, with drops passing w·x through.
//
// Routing is piecewise constant. The reference recomputes the selection in float64 at every
// perturbed point and the case is redrawn (new seed, logged with BOOST_TEST_MESSAGE, at most
// `max_draws` times, then the case FAILS) when the selection at x ± h differs from the
// library's plan at x — never silently skipped. Capacity drops depend on the plan only, so a
// fixed plan also fixes the drops.
//
// DynMoE's backward is straight-through (docs/routers/dynmoe.md): the forward is piecewise
// constant in the gate parameters, so its gradient is checked against the float64 derivative of
//   Σ_{t,e on} gb_te · (S_te − θ_e)  +  c_sim·L_sim + c_simple·L_simple  +  (experts at fixed b)
// where gb_te = ∂F/∂b_te is itself a central difference of F(b) = Σ_t Σ_j b_{t,e_tj}/k_t ·
// ⟨g_t, FFN_{e_tj}(x_t)⟩ + c_lb·L_lb(b) + c_eff·L_eff(b) (integer k in the combine, k = Σb in
// L_lb, ce constant) in the continuous gates b. F reads the slot contributions through the
// plan's ids, so a slot/expert-order mix-up of d_weights changes the expected gradient.
#include <boost/test/unit_test.hpp>

#include <boost/core/demangle.hpp>
#include <boost/mp11.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <typeinfo>
#include <vector>

#include <switchyard/switchyard.hpp>

#include "host/layer/layer_reference.hpp"
#include "support/random.hpp"

namespace sy = switchyard;
using sy::index_t;
using vec = std::vector<double>;

namespace bwd {

// ---- the problem, every parameter in double (exact float values) -------------------------

struct problem {
  index_t T = 16, d = 6, f = 4, p = 4, E = 4;
  vec x, wr, thr, w1, b1, w2, b2, g;  // wr: router gate (layout per router), thr: DynMoE G
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

// ---- router cases ----------------------------------------------------------------------
// Each: router_type, activation, `router`, init (parameters and extra inputs), params/grads
// views over float storage, coeffs, library_losses, reference (selection + weights + aux in
// double), prepare (DynMoE's gate cotangent), exercised (why a draw does not cover the case).

//! Shared by the TopK-loss routers (TopK, HyperMoE's two, DA-MoE).
inline double topk_family_aux(const route& r, const vec& lg, const vec& pr, const problem& q,
                              const sy::routing::softmax_router_losses& c, vec& values) {
  const double lbs = ref_lb(r, pr, q.T, q.E, false), lbk = ref_lb(r, pr, q.T, q.E, true),
               z = ref_z(lg, q.T, q.E);
  values = {lbs, lbk, z};
  return c.lb_switch * lbs + c.lb_topk * lbk + c.z * z;
}

template <int K, bool Renorm, bool Transposed, class Act>
struct topk_case : linear_gate {
  using router_type = sy::routers::TopK;
  using act = Act;
  router_type router{.k = K, .renormalize = Renorm};
  topk_case() { transposed = Transposed; }
  index_t width() const { return K; }
  void init(std::mt19937_64& rng, problem& q) { init_gate(rng, q); }
  router_type::params_type params(const std::vector<float>& wr, const std::vector<float>&,
                                  const problem& q) const {
    return {view(wr, q)};
  }
  router_type::grads_type grads(std::vector<float>& dwr, std::vector<float>&,
                                const problem& q) const {
    return {gview(dwr, q)};
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
template <int Permille, int MaxK, class Act>
struct topp_case : linear_gate {
  using router_type = sy::routers::TopP;
  using act = Act;
  router_type router{.p = Permille / 1000.0f, .max_k = MaxK};
  index_t width() const { return MaxK > 0 ? MaxK : E; }
  void init(std::mt19937_64& rng, problem& q) { init_gate(rng, q); }
  router_type::params_type params(const std::vector<float>& wr, const std::vector<float>&,
                                  const problem& q) const {
    return {view(wr, q)};
  }
  router_type::grads_type grads(std::vector<float>& dwr, std::vector<float>&,
                                const problem& q) const {
    return {gview(dwr, q)};
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
  using act = sy::activation::swiglu;
  router_type router{.threshold = 0.2f, .renormalize = true};
  index_t width() const { return 2; }
  void init(std::mt19937_64& rng, problem& q) { init_gate(rng, q); }
  router_type::params_type params(const std::vector<float>& wr, const std::vector<float>&,
                                  const problem& q) const {
    return {view(wr, q)};
  }
  router_type::grads_type grads(std::vector<float>& dwr, std::vector<float>&,
                                const problem& q) const {
    return {gview(dwr, q)};
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
template <class Importance, int KMin, int KMax, class Act>
struct damoe_case : linear_gate {
  using router_type = sy::routers::DAMoE<Importance>;
  using act = Act;
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
  typename router_type::params_type params(const std::vector<float>& wr, const std::vector<float>&,
                                           const problem& q) const {
    typename router_type::params_type p;
    p.w = view(wr, q);
    if constexpr (from_attention)
      p.attention = sy::make_view<const float>(attention.data(), heads, q.T, q.T);
    else
      p.importance = sy::make_view<const float>(importance.data(), q.T);
    return p;
  }
  typename router_type::grads_type grads(std::vector<float>& dwr, std::vector<float>&,
                                         const problem& q) const {
    return {gview(dwr, q)};
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
template <bool Training, class Act>
struct dynmoe_case {
  using router_type = sy::routers::DynMoE;
  using act = Act;
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
  router_type::params_type params(const std::vector<float>& wr, const std::vector<float>& thr,
                                  const problem& q) const {
    return {sy::make_view<const float>(wr.data(), q.d, q.E),
            sy::make_view<const float>(thr.data(), q.E),
            sy::make_view<const std::int32_t>(mask.data(), q.E), log_tau};
  }
  router_type::grads_type grads(std::vector<float>& dwr, std::vector<float>& dthr,
                                const problem& q) const {
    return {sy::make_view(dwr.data(), q.d, q.E), sy::make_view(dthr.data(), q.E)};
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

//! Kept pairs [T, W] of a capacity dispatch: C from the documented formula, token then slot order.
template <class D>
std::vector<char> reference_keep(const route& r, index_t T, index_t E,
                                 std::vector<index_t>& dropped) {
  std::vector<char> keep(r.ids.size(), 1);
  dropped.assign(static_cast<std::size_t>(E), 0);
  if constexpr (D::drops >= 0) {
    const auto disp = D::make();
    const index_t A = std::accumulate(r.counts.begin(), r.counts.end(), index_t{0});
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

//! FFN_e(x_t) in double.
template <class A>
void ffn(const problem& q, index_t e, const double* xt, double* out) {
  constexpr bool gated = sy::activation_traits<A>::is_gated;
  vec h(static_cast<std::size_t>(q.p)), a(static_cast<std::size_t>(q.f));
  for (index_t r = 0; r < q.p; ++r) {
    double s = q.b1[e * q.p + r];
    for (index_t i = 0; i < q.d; ++i) s += q.w1[(e * q.p + r) * q.d + i] * xt[i];
    h[r] = s;
  }
  for (index_t c = 0; c < q.f; ++c)
    a[c] =
        gated ? sy::test::ref_activation<A>(h[c], h[q.f + c]) : sy::test::ref_activation<A>(h[c]);
  for (index_t o = 0; o < q.d; ++o) {
    double s = q.b2[e * q.d + o];
    for (index_t c = 0; c < q.f; ++c) s += q.w2[(e * q.d + o) * q.f + c] * a[c];
    out[o] = s;
  }
}

//! c [T, W]: ⟨g_t, FFN_{e_tj}(x_t)⟩ for a kept pair, ⟨g_t, x_t⟩ for a dropped pass-through
//! pair, 0 for a dropped zero pair or an unused slot.
template <class A>
vec slot_contributions(const problem& q, const route& r, const std::vector<char>& keep,
                       bool pass_through) {
  vec c(r.ids.size(), 0.0), out(static_cast<std::size_t>(q.d));
  for (index_t t = 0; t < q.T; ++t) {
    const double* xt = &q.x[t * q.d];
    const double* gt = &q.g[t * q.d];
    for (int j = 0; j < r.counts[t]; ++j) {
      double s = 0.0;
      if (keep[t * r.W + j]) {
        ffn<A>(q, r.ids[t * r.W + j], xt, out.data());
        for (index_t i = 0; i < q.d; ++i) s += gt[i] * out[i];
      } else if (pass_through) {
        for (index_t i = 0; i < q.d; ++i) s += gt[i] * xt[i];
      }
      c[t * r.W + j] = s;
    }
  }
  return c;
}

inline double dot(const vec& a, const vec& b) {
  double s = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
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
// largest error measured over 30 seeds × every case was 2.1e-6 of that scale (the per-block
// worst is printed with --log_level=message), so ~50x headroom, while a 1.001 scaling of the
// expert dx, a missing loss term or a slot/expert mix-up is ≥ 5e-4 of it and fails.
constexpr double rtol = 1e-4;
constexpr int max_draws = 8;

template <class C>
bool run_draw(std::uint64_t seed, std::string& why, std::vector<block_result>& report) {
  using R = typename C::router_case;
  using D = typename C::dispatch_case;
  using A = typename R::act;
  using router_type = typename R::router_type;
  constexpr bool gated = sy::activation_traits<A>::is_gated;
  constexpr bool pass_through = D::pass_through;

  std::mt19937_64 rng(seed);
  R rc;
  problem q;
  q.E = rc.E;
  q.p = gated ? 2 * q.f : q.f;
  q.x = draw(rng, q.T * q.d, 1.0f);
  rc.init(rng, q);
  q.w1 = draw(rng, q.E * q.p * q.d, 0.5f);
  q.b1 = draw(rng, q.E * q.p, 0.2f);
  q.w2 = draw(rng, q.E * q.d * q.f, 0.5f);
  q.b2 = draw(rng, q.E * q.d, 0.2f);
  q.g = draw(rng, q.T * q.d, 1.0f);

  // ---- library forward + backward in float ----
  auto xf = as_float(q.x), wrf = as_float(q.wr), thrf = as_float(q.thr), w1f = as_float(q.w1),
       b1f = as_float(q.b1), w2f = as_float(q.w2), b2f = as_float(q.b2), gf = as_float(q.g);
  const sy::expert_weights<float> w{sy::make_view<const float>(w1f.data(), q.E, q.p, q.d),
                                    sy::make_view<const float>(b1f.data(), q.E, q.p),
                                    sy::make_view<const float>(w2f.data(), q.E, q.d, q.f),
                                    sy::make_view<const float>(b2f.data(), q.E, q.d)};
  const auto rp = rc.params(wrf, thrf, q);
  sy::MoELayer<router_type, A, typename D::type> layer{.router = rc.router, .dispatch = D::make()};
  std::vector<float> y(static_cast<std::size_t>(q.T * q.d));
  typename decltype(layer)::result_type res;
  const auto xv = sy::make_view<const float>(xf.data(), q.T, q.d);
  layer.template forward<float>(switchyard::host_context{}, xv, rp, w, sy::make_view(y.data(), q.T, q.d), res);

  std::vector<float> dx(q.x.size()), dwr(q.wr.size()), dthr(q.thr.size()), dw1(q.w1.size()),
      db1(q.b1.size()), dw2(q.w2.size()), db2(q.b2.size());
  const sy::expert_grads eg{
      sy::make_view(dw1.data(), q.E, q.p, q.d), sy::make_view(db1.data(), q.E, q.p),
      sy::make_view(dw2.data(), q.E, q.d, q.f), sy::make_view(db2.data(), q.E, q.d)};
  layer.template backward<float>(switchyard::host_context{}, xv, rp, w, res, sy::make_view<const float>(gf.data(), q.T, q.d),
                                 rc.coeffs(), sy::make_view(dx.data(), q.T, q.d), eg,
                                 rc.grads(dwr, dthr, q));

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
  const auto keep = reference_keep<D>(base, q.T, q.E, ref_dropped);
  const index_t n_dropped = std::accumulate(ref_dropped.begin(), ref_dropped.end(), index_t{0});
  if (D::drops == 1 && n_dropped == 0) {
    why = "no pair dropped";
    return false;
  }
  BOOST_TEST(res.dropped == ref_dropped, "dropped pairs per expert");
  for (std::size_t i = 0; i < base.weights.size(); ++i)
    BOOST_TEST(std::abs(res.plan.weights[i] - base.weights[i]) <= 1e-5,
               "combine weight [" << i << "] " << res.plan.weights[i] << " vs " << base.weights[i]);
  const vec lib_losses = rc.library_losses(res.losses);
  for (std::size_t i = 0; i < lib_losses.size(); ++i)
    BOOST_TEST(std::abs(lib_losses[i] - base.loss_values[i]) <=
                   1e-5 * (1.0 + std::abs(base.loss_values[i])),
               "aux loss field " << i << ": " << lib_losses[i] << " vs " << base.loss_values[i]);
  {
    const vec c = slot_contributions<A>(q, base, keep, pass_through);
    double lib = 0.0, ab = 0.0;
    for (std::size_t i = 0; i < y.size(); ++i) {
      lib += q.g[i] * y[i];
      ab += std::abs(q.g[i] * y[i]);
    }
    const double ref = dot(base.weights, c);
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
    return dot(r.weights, slot_contributions<A>(q, r, keep, pass_through)) + r.aux;
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
    verdicts.push_back(
        check(std::is_same_v<router_type, sy::routers::DynMoE> ? "router w_gate" : "router w", q.wr,
              dwr));
    if (!q.thr.empty()) verdicts.push_back(check("router thresholds", q.thr, dthr));
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
  return s;
}

}  // namespace bwd

// ---- the typed list: router × dispatch, one test case each ----------------------------------
// (global names, so that the case names read e.g. combo<TopP_p05, padded_capacity_drop_zero>)

//! TopK k = 2, renormalised (GShard / Mixtral).
struct TopK_k2_renorm : bwd::topk_case<2, true, false, sy::activation::swiglu> {};
//! HyperMoE's Switch variant (HM-sw): TopK k = 1, raw weights.
struct HyperMoE_switch_TopK_k1_raw : bwd::topk_case<1, false, false, sy::activation::gelu> {};
//! HyperMoE's GPT-2 variant (HM-g2): TopK k = 2, renormalised, gate stored [d, E] and passed
//! as a strided [E, d] view (docs/routers/hypermoe.md).
struct HyperMoE_gpt2_TopK_k2_strided_gate : bwd::topk_case<2, true, true, sy::activation::swiglu> {
};
struct DAMoE_precomputed_importance_k1to3
    : bwd::damoe_case<sy::routing::importance::precomputed, 1, 3, sy::activation::gelu> {};
struct DAMoE_attention_col_mean_k1to2
    : bwd::damoe_case<sy::routing::importance::col_mean, 1, 2, sy::activation::swiglu> {};
struct DynMoE_training : bwd::dynmoe_case<true, sy::activation::swiglu> {};
struct DynMoE_eval : bwd::dynmoe_case<false, sy::activation::gelu> {};
//! TopP p = 0.5, raw weights; entropy, any-slot load balance and z losses.
struct TopP_p05 : bwd::topp_case<500, 0, sy::activation::gelu> {};
//! TopP p = 0.7 capped at 2 experts (plan width 2 < E).
struct TopP_p07_max_k2 : bwd::topp_case<700, 2, sy::activation::swiglu> {};
//! AdaptiveGating threshold 0.2, renormalised; the top2_fraction coefficient must be ignored.
struct AdaptiveGating_t02 : bwd::adaptive_gating_case {};

struct sorted_grouped : bwd::sorted_grouped_case {};
struct dense : bwd::dense_case {};
struct padded_capacity_no_drops : bwd::padded_capacity_no_drops_case {};
struct padded_capacity_drop_zero : bwd::padded_capacity_drop_zero_case {};
struct padded_capacity_drop_scaled_input : bwd::padded_capacity_drop_scaled_input_case {};

template <class R, class D>
struct combo {
  using router_case = R;
  using dispatch_case = D;
};

using router_cases =
    boost::mp11::mp_list<TopK_k2_renorm, HyperMoE_switch_TopK_k1_raw,
                         HyperMoE_gpt2_TopK_k2_strided_gate, TopP_p05, TopP_p07_max_k2,
                         AdaptiveGating_t02, DAMoE_precomputed_importance_k1to3,
                         DAMoE_attention_col_mean_k1to2, DynMoE_training, DynMoE_eval>;
using dispatch_cases =
    boost::mp11::mp_list<sorted_grouped, dense, padded_capacity_no_drops, padded_capacity_drop_zero,
                         padded_capacity_drop_scaled_input>;
using combos = boost::mp11::mp_rename<boost::mp11::mp_product<combo, router_cases, dispatch_cases>,
                                      std::tuple>;

BOOST_AUTO_TEST_CASE_TEMPLATE(layer_backward_matches_float64_central_differences, C, combos) {
  const std::string label = bwd::type_label<typename C::router_case>() + " x " +
                            bwd::type_label<typename C::dispatch_case>();
  const std::uint64_t case_seed =
      sy::test::base_seed() + 7919u * std::hash<std::string>{}(label) % 1000003u;
  std::string reasons;
  for (int draw = 0; draw < bwd::max_draws; ++draw) {
    const std::uint64_t seed = case_seed + 104729u * static_cast<std::uint64_t>(draw);
    std::string why;
    std::vector<bwd::block_result> report;
    if (bwd::run_draw<C>(seed, why, report)) {
      std::ostringstream s;
      s << label << " (seed " << seed << ", draw " << draw << "): worst |err|/(|fd|+max|fd|)";
      for (const auto& b : report) s << "  " << b.name << " " << b.worst;
      BOOST_TEST_MESSAGE(s.str());
      return;
    }
    BOOST_TEST_MESSAGE(label << ": redrawing (seed " << seed << "): " << why);
    reasons += "\n  seed " + std::to_string(seed) + ": " + why;
  }
  // Every draw rejected: a library plan that never matches the float64 selection is a bug
  // in selection (or the reference), not bad luck.
  BOOST_FAIL(label << ": no usable draw in " << bwd::max_draws << ":" << reasons);
}
