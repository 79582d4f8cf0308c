// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file remoe_controller.hpp
//! ReMoE's adaptive L1 coefficient (Wang et al., ICLR 2025, §3.3; thu-ml/ReMoE): after each
//! training step, λ ← λ · α^{sign(target_sparsity − measured_sparsity)} with α = 1.2, where
//! the sparsity is 1 − (active pairs) / (T · E) of the ReLU gates (before any max_k cap:
//! `routing::remoe_losses::sparsity`). Too dense (measured below target) raises λ, too sparse
//! lowers it, on target keeps it. The paper targets 1 − k/E for a top-k compute budget
//! (`remoe_target_sparsity`). With several layers or micro-batches, the caller averages their
//! sparsities (ReMoE averages over layers) and updates once per step. No allocation.

#include <cmath>

#include "switchyard/core/error.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/routing/routers/remoe.hpp"

namespace switchyard::training {

//! The sparsity 1 − k/E that matches a top-k compute budget (range_error unless 0 < k <= E).
inline float remoe_target_sparsity(double k, index_t experts) {
  if (experts < 1 || !(k > 0.0) || k > static_cast<double>(experts)) {
    throw range_error("k", detail::concat("k must be in (0, E] = (0, ", experts, "], got ", k));
  }
  return static_cast<float>(1.0 - k / static_cast<double>(experts));
}

//! λ's controller. Aggregate: `{.target_sparsity = 0.75f, .lambda = 1e-8f}`.
struct remoe_controller {
  float target_sparsity = 0.75f;  //!< in [0, 1): 1 − k/E for an average of k experts per token
  float lambda = 1e-8f;           //!< the current coefficient (> 0): pass as coeffs.l1
  float alpha = 1.2f;             //!< the step multiplier (> 1), ReMoE's 1.2

  //! Throws range_error naming target_sparsity, lambda or alpha when out of range.
  void validate() const {
    if (!(target_sparsity >= 0.0f && target_sparsity < 1.0f)) {
      throw range_error("target_sparsity", detail::concat(
                                               "target_sparsity must be in [0, 1), got ", target_sparsity));
    }
    if (!std::isfinite(lambda) || !(lambda > 0.0f)) {
      throw range_error("lambda", detail::concat("lambda must be finite and > 0, got ", lambda));
    }
    if (!std::isfinite(alpha) || !(alpha > 1.0f)) {
      throw range_error("alpha", detail::concat("alpha must be finite and > 1, got ", alpha));
    }
  }

  //! One step: λ ← λ · α^{sign(target − measured)}; returns the new λ. range_error unless the
  //! measured sparsity is in [0, 1] (or when the controller itself is out of range).
  float update(double measured_sparsity) {
    validate();
    if (!(measured_sparsity >= 0.0 && measured_sparsity <= 1.0)) {
      throw range_error("measured_sparsity", detail::concat(
                                                 "measured_sparsity must be in [0, 1], got ", measured_sparsity));
    }
    const double gap = static_cast<double>(target_sparsity) - measured_sparsity;
    if (gap > 0.0) lambda *= alpha;       // too dense: push harder
    else if (gap < 0.0) lambda /= alpha;  // too sparse: ease off
    return lambda;
  }

  //! One step from a forward's measurement (`losses.sparsity`); an empty batch (no scored
  //! pairs) measures nothing and leaves λ as it is.
  float update(const routing::remoe_losses& losses) {
    if (losses.scored_pairs == 0) {
      validate();
      return lambda;
    }
    return update(1.0 - static_cast<double>(losses.active_pairs) /
                            static_cast<double>(losses.scored_pairs));
  }
};

}  // namespace switchyard::training
