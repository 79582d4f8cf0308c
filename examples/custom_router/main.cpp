// A user-defined selection rule in a Mixture-of-Experts layer. The rule ("confident top-k")
// takes experts in descending probability, at most k of them, and stops early once the ones
// taken hold `mass` of the probability; weights are renormalised. One static_assert checks it.
#include <switchyard/switchyard.hpp>

#include <cstdio>
#include <random>
#include <vector>

namespace sy = switchyard;

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
struct ConfidentRouter {
  using policy_kind = sy::router_tag;
  using params_type = sy::routing::linear_router_params;
  using grads_type = sy::routing::linear_router_grads;
  using losses_type = sy::routing::softmax_router_losses;
  confident_topk rule{};

  sy::index_t num_experts(const params_type& p) const { return p.w.extent(0); }
  sy::index_t width(const params_type&) const { return rule.k; }

  template <sy::ElementType T>
  void forward(const sy::matrix_view<const T>& x, const params_type& p, sy::routing::routing_plan& plan,
               losses_type& losses) const {
    plan.resize(x.extent(0), rule.k, p.w.extent(0));
    sy::routing::linear_softmax_scores(x, p, plan);
    sy::routing::select_all(rule, plan);
    losses.lb_topk = sy::routing::load_balance_loss(plan, true);
  }

  template <sy::ElementType T>
  void backward(const sy::matrix_view<const T>& x, const params_type& p, const sy::routing::routing_plan& plan,
                const float* d_weights, const losses_type& coeffs, const sy::matrix_view<float>& dx,
                const grads_type& grads) const {
    const sy::index_t tokens = plan.num_tokens, e = plan.num_experts, w = plan.width;
    std::vector<float> d_probs(tokens * e, 0.0f), d_logits(tokens * e, 0.0f);
    for (sy::index_t t = 0; t < tokens; ++t)  // renormalised weights: w_j = P_j / Σ_selected P
      sy::routing::combine_weights_backward_accumulate(
          {plan.probs.data() + t * e, static_cast<std::size_t>(e)},
          {plan.expert_ids.data() + t * w, static_cast<std::size_t>(w)},
          {plan.weights.data() + t * w, static_cast<std::size_t>(w)},
          {d_weights + t * w, static_cast<std::size_t>(w)}, plan.counts[t], true,
          {d_probs.data() + t * e, static_cast<std::size_t>(e)});
    sy::routing::load_balance_backward(plan, true, coeffs.lb_topk, d_probs.data());
    sy::routing::softmax_backward_rows(plan, d_probs.data(), d_logits.data());
    sy::routing::linear_backward(x, p, d_logits.data(), dx, grads);
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
  decltype(layer)::result_type result;
  layer.forward<float>(sy::make_view<const float>(x.data(), tokens, d),
                       {sy::make_view<const float>(gate.data(), experts, d)},
                       {sy::make_view<const float>(w1.data(), experts, d_ff, d), {},
                        sy::make_view<const float>(w2.data(), experts, d, d_ff), {}},
                       sy::make_view(y.data(), tokens, d), result);
  std::printf("custom rule 'confident top-k' (k <= 3, stop at 50%% mass), GELU experts, dense dispatch\n");
  for (int t = 0; t < tokens; ++t) {
    std::printf("token %2d:", t);
    for (int j = 0; j < result.plan.counts[t]; ++j)
      std::printf("  expert %d (w=%.2f)", result.plan.id(t, j), result.plan.weight(t, j));
    std::printf("\n");
  }
  std::printf("mean k = %.2f, load balance %.4f, y[0][0] = %.4f\n", result.plan.mean_k(),
              result.losses.lb_topk, y[0]);
  return 0;
}
