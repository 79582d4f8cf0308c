// SPDX-License-Identifier: Apache-2.0
// A user-defined selection rule in a Mixture-of-Experts layer. The rule ("confident top-k")
// takes experts in descending probability, at most k of them, and stops early once the ones
// taken hold `mass` of the probability; weights are renormalised. One static_assert checks it.
// The example checks that the plan keeps the rule's promises and that backward through the
// custom router gives finite gradients; a failed check is named on stderr and exits non-zero.
#include <switchyard/switchyard.hpp>

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <random>
#include <vector>

namespace sy = switchyard;

namespace {
int failed_checks = 0;
// Reports a failed check on stderr (printf-style message); main returns 1 if any failed.
void check(bool ok, const char* format, ...) {
  if (ok) return;
  ++failed_checks;
  std::va_list args;
  va_start(args, format);
  std::fprintf(stderr, "custom_router CHECK FAILED: ");
  std::vfprintf(stderr, format, args);
  std::fprintf(stderr, "\n");
  va_end(args);
}
}  // namespace

// ---- the selection rule: one __host__ __device__ function over one token's scores --------
struct confident_topk {
  using policy_kind = sy::selection_rule_tag;
  int k = 3;           // most experts per token
  float mass = 0.6f;   // stop once the selected probabilities sum to this

  SWITCHYARD_HD int width(int /*num_experts*/) const { return k; }

  SWITCHYARD_HD int select(::cuda::std::span<const float> probs, ::cuda::std::span<std::int32_t> ids,
                           ::cuda::std::span<float> weights) const {
    sy::routing::ranked_cursor order(probs);  // descending, ties to the lower id
    float sum = 0.0f;
    int n = 0;
    while (n < k && n < static_cast<int>(probs.size()) && sum < mass) {
      const int e = order.next();
      ids[n] = e;
      weights[n] = probs[e];
      sum += probs[e];
      ++n;
    }
    for (int j = n; j < static_cast<int>(ids.size()); ++j) {
      ids[j] = -1;
      weights[j] = 0.0f;
    }
    for (int j = 0; j < n; ++j) weights[j] /= sum;
    return n;
  }
};
static_assert(sy::check_selection_rule<confident_topk>());  // the one-line check

// ---- a router around it: linear + softmax scoring, the rule, Mixtral's load balance ------
// A custom router is one struct with forward/backward (the host backend calls them); state in
// the caller's plan_ref, scratch from the workspace arena (sized by workspace_size), so
// neither allocates. It reuses the library's row functions and the `terms::load_balance` part.
struct ConfidentRouter {
  using policy_kind = sy::router_tag;
  using params_type = sy::routing::linear_router_params;
  using grads_type = sy::routing::linear_router_grads;
  using losses_type = sy::routing::softmax_router_losses;
  confident_topk rule{};

  sy::index_t num_experts(const params_type& p) const { return p.w.extent(0); }
  sy::index_t width(const params_type&) const { return rule.k; }

  // Bytes forward/backward take from the workspace: the same carving, measured.
  std::size_t workspace_size(sy::index_t tokens, const params_type& p) const {
    sy::workspace_arena ws;
    (void)carve(ws, tokens, p.w.extent(0));
    return ws.required();
  }

  template <sy::ElementType T>
  void forward(const sy::matrix_view<const T>& x, const params_type& p, const sy::routing::plan_ref& plan,
               losses_type& losses, sy::workspace_arena& ws) const {
    sy::detail::check_linear_router_inputs(x, p);
    sy::detail::require_plan(plan, x.extent(0), rule.k, p.w.extent(0));
    const scratch s = carve(ws, x.extent(0), p.w.extent(0));
    sy::routing::linear_softmax_scores(x, p, plan);
    sy::routing::select_all(rule, plan);
    losses.lb_topk = lb.value(plan, s.lb);
  }

  template <sy::ElementType T>
  void backward(const sy::matrix_view<const T>& x, const params_type& p, const sy::routing::plan_ref& plan,
                const float* d_weights, const losses_type& coeffs, const sy::matrix_view<float>& dx,
                const grads_type& grads, sy::workspace_arena& ws) const {
    const sy::index_t tokens = plan.num_tokens, e = plan.num_experts, w = plan.width;
    const scratch s = carve(ws, tokens, e);
    std::fill(s.d_probs, s.d_probs + tokens * e, 0.0f);
    std::fill(s.d_logits, s.d_logits + tokens * e, 0.0f);
    for (sy::index_t t = 0; t < tokens; ++t)  // renormalised weights: w_j = P_j / Σ_selected P
      sy::routing::combine_weights_backward_accumulate(
          {plan.probs.data() + t * e, static_cast<std::size_t>(e)},
          {plan.expert_ids.data() + t * w, static_cast<std::size_t>(w)},
          {plan.weights.data() + t * w, static_cast<std::size_t>(w)},
          {d_weights + t * w, static_cast<std::size_t>(w)}, plan.counts[t], true,
          {s.d_probs + t * e, static_cast<std::size_t>(e)});
    lb.backward(plan, coeffs.lb_topk, s.d_probs, s.lb);
    sy::routing::softmax_backward_rows(plan, s.d_probs, s.d_logits);
    sy::routing::linear_backward(x, p, s.d_logits, dx, grads);
  }

 private:
  static constexpr sy::routing::terms::load_balance lb{.any_slot = true};
  struct scratch {
    float* d_probs;   // [T, E]
    float* d_logits;  // [T, E]
    double* lb;       // the load-balance term's scratch
  };
  static scratch carve(sy::workspace_arena& ws, sy::index_t tokens, sy::index_t experts) {
    scratch s{};
    s.d_probs = ws.take<float>(tokens * experts);
    s.d_logits = ws.take<float>(tokens * experts);
    s.lb = ws.take<double>(lb.scratch_doubles(experts));
    return s;
  }
};
static_assert(sy::check_router<ConfidentRouter>());

int main() {
  constexpr int tokens = 12, d = 32, d_ff = 48, experts = 6;
  std::mt19937 gen(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto randn = [&](std::size_t n, float s) {
    std::vector<float> v(n);
    for (auto& a : v) a = normal(gen) * s;
    return v;
  };
  const auto x = randn(tokens * d, 1.0f), gate = randn(experts * d, 0.4f);
  const auto w1 = randn(experts * d_ff * d, 0.18f), w2 = randn(experts * d * d_ff, 0.14f);
  std::vector<float> y(tokens * d);

  const sy::MoELayer<ConfidentRouter, sy::activation::gelu, sy::dispatch::dense> layer{
      .router = {.rule = {.k = 3, .mass = 0.5f}}};
  const auto xv = sy::make_view<const float>(x.data(), tokens, d);
  const sy::routing::linear_router_params params{sy::make_view<const float>(gate.data(), experts, d)};
  const sy::expert_weights<float> weights{sy::make_view<const float>(w1.data(), experts, d_ff, d), {},
                                          sy::make_view<const float>(w2.data(), experts, d, d_ff), {}};
  decltype(layer)::result_type result;
  layer.forward<float>(switchyard::host_context{}, xv, params, weights, sy::make_view(y.data(), tokens, d), result);
  std::printf("custom rule 'confident top-k' (k <= 3, stop at 50%% mass), GELU experts, dense dispatch\n");
  std::vector<int> per_expert(experts, 0);
  for (int t = 0; t < tokens; ++t) {
    std::printf("token %2d:", t);
    for (int j = 0; j < result.plan.counts[t]; ++j) {
      std::printf("  expert %d (w=%.2f)", result.plan.id(t, j), result.plan.weight(t, j));
      const int e = result.plan.id(t, j);
      if (e >= 0 && e < experts) ++per_expert[e];  // range: checked below
    }
    std::printf("\n");
  }
  std::printf("tokens per expert:");
  for (int e = 0; e < experts; ++e) std::printf("  e%d: %d", e, per_expert[e]);
  std::printf("\nmean k = %.2f, load balance %.4f, y[0][0] = %.4f\n", result.plan.mean_k(),
              result.losses.lb_topk, y[0]);

  // ---- the rule's promises, token by token ---------------------------------------------------
  const auto& rule = layer.router.rule;
  int pairs = 0;
  for (int t = 0; t < tokens; ++t) {
    const int k = result.plan.counts[t];
    const float* probs = &result.plan.probs[static_cast<std::size_t>(t * experts)];
    pairs += k;
    check(k >= 1 && k <= rule.k, "token %d: %d experts, expected 1..%d", t, k, rule.k);
    float taken = 0.0f, weight_sum = 0.0f;
    for (int j = 0; j < k; ++j) {
      const int e = result.plan.id(t, j);
      check(e >= 0 && e < experts, "token %d slot %d: expert %d outside [0, %d)", t, j, e, experts);
      if (e < 0 || e >= experts) continue;
      check(j == 0 || probs[e] <= probs[result.plan.id(t, j - 1)],
            "token %d: slot %d has a higher probability than slot %d", t, j, j - 1);
      check(j + 1 == k || taken + probs[e] < rule.mass,
            "token %d: %d experts already held %.2f of the mass, yet %d were taken", t, j + 1,
            rule.mass, k);
      taken += probs[e];
      weight_sum += result.plan.weight(t, j);
    }
    check(k == rule.k || taken >= rule.mass, "token %d stopped at %d experts holding only %.4f", t, k,
          taken);
    check(std::abs(weight_sum - 1.0f) <= 1e-5f, "token %d: renormalised weights sum to %.7f, not 1",
          t, weight_sum);
    for (int j = 0; j < k; ++j) {
      const int e = result.plan.id(t, j);
      if (e < 0 || e >= experts) continue;
      check(std::abs(result.plan.weight(t, j) - probs[e] / taken) <= 1e-6f,
            "token %d slot %d: weight %.7f is not P / sum(P taken) = %.7f", t, j,
            result.plan.weight(t, j), probs[e] / taken);
    }
  }
  int expert_pairs = 0;
  for (int e = 0; e < experts; ++e) expert_pairs += per_expert[e];
  check(pairs == result.plan.total_assignments() && expert_pairs == pairs,
        "pairs: %d by token, %d by expert, %d in the plan", pairs, expert_pairs,
        static_cast<int>(result.plan.total_assignments()));
  check(std::abs(result.plan.mean_k() * tokens - pairs) <= 1e-9, "mean k %.6f != %d pairs / %d tokens",
        result.plan.mean_k(), pairs, tokens);
  check(result.total_dropped() == 0, "dense dispatch dropped %d pairs",
        static_cast<int>(result.total_dropped()));
  bool y_finite = true;
  for (float a : y) y_finite = y_finite && std::isfinite(a);
  check(y_finite, "y has a non-finite entry");

  // ---- backward through the custom router: dy = y, load-balance coefficient 0.01 -----------
  std::vector<float> dx(x.size()), dgate(gate.size()), dw1(w1.size()), dw2(w2.size());
  layer.backward<float>(switchyard::host_context{}, xv, params, weights, result, sy::make_view<const float>(y.data(), tokens, d),
                        {.lb_topk = 0.01f}, sy::make_view(dx.data(), tokens, d),
                        {sy::make_view(dw1.data(), experts, d_ff, d), {},
                         sy::make_view(dw2.data(), experts, d, d_ff), {}},
                        {sy::make_view(dgate.data(), experts, d)});
  auto norm = [](const std::vector<float>& v, const char* name) {
    double n2 = 0.0;
    bool finite = true;
    for (float a : v) {
      finite = finite && std::isfinite(a);
      n2 += static_cast<double>(a) * a;
    }
    check(finite, "%s has a non-finite entry", name);
    check(n2 > 0.0, "%s is all zero", name);
    return std::sqrt(n2);
  };
  const double n_dx = norm(dx, "dx"), n_dgate = norm(dgate, "d gate"), n_dw1 = norm(dw1, "dW1"),
               n_dw2 = norm(dw2, "dW2");
  std::printf("backward: |dx| = %.4f, |d gate| = %.4f, |dW1| = %.4f, |dW2| = %.4f\n", n_dx,
              n_dgate, n_dw1, n_dw2);

  if (failed_checks != 0) {
    std::fprintf(stderr, "custom_router: %d check(s) failed\n", failed_checks);
    return 1;
  }
  std::printf("all checks passed\n");
  return 0;
}
