// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file gpt2_variant.hpp
//! GPT-2 variant of HyperMoE (spec §4.2): logits = x·w_gate with w_gate [d, E] — pass
//! `make_strided_view(w_gate, {E, d}, {1, E})` to routers::TopK{.k = k, .renormalize = true};
//! its balance loss (Shazeer's cv²) is here.

#include <cstddef>
#include <vector>

#include <cuda/std/span>

#include "switchyard/core/view.hpp"
#include "switchyard/layer/hypermoe/owned_plan.hpp"
#include "switchyard/routing/plan.hpp"

namespace switchyard::layer {

//! `cv²(v) = var(v)/(mean(v)² + 1e-10)` with the unbiased variance; 0 when v has < 2 entries
//! (upstream's `x.shape[0] == 1` guard).
inline double cv_squared(span<const double> v) {
  const auto n = static_cast<index_t>(v.size());
  if (n < 2) return 0.0;
  double mean = 0.0;
  for (double a : v) mean += a;
  mean /= static_cast<double>(n);
  double var = 0.0;
  for (double a : v) var += (a - mean) * (a - mean);
  var /= static_cast<double>(n - 1);
  return var / (mean * mean + 1e-10);
}

//! Eval-mode balance loss of the GPT-2 variant (Shazeer): `coef·(cv²(importance) +
//! cv²(load))`, importance_e = Σ_t gate_{t,e} (the plan's combine weights), load_e = number of
//! tokens with gate_{t,e} > 0. `coef` is upstream's `loss_coef` (0.01). The training-mode
//! smooth load estimate (`_prob_in_top_k`) is not implemented. Throws range_error when the
//! plan fails routing::validate_plan.
inline float gpt2_cv_loss_eval(const routing::routing_plan& plan, double coef = 0.01) {
  detail::validate_owned_plan(plan);
  const index_t e_count = plan.num_experts;
  std::vector<double> importance(static_cast<std::size_t>(e_count), 0.0), load(importance);
  for (index_t t = 0; t < plan.num_tokens; ++t) {
    for (index_t j = 0; j < plan.counts[t]; ++j) {
      const auto e = plan.id(t, j);
      const float w = plan.weight(t, j);
      importance[e] += w;
      if (w > 0.0f) load[e] += 1.0;
    }
  }
  return static_cast<float>(coef * (cv_squared({importance.data(), importance.size()}) +
                                    cv_squared({load.data(), load.size()})));
}

}  // namespace switchyard::layer
