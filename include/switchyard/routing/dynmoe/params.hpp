// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file params.hpp
//! What a DynMoE gate (`routers::DynMoE`, routing/routers/dynmoe.hpp) reads and writes: its
//! parameters, its gradients and its four auxiliary losses (also backward's coefficients).

#include <cstdint>

#include "switchyard/core/view.hpp"
#include "switchyard/routing/loss_fields.hpp"

namespace switchyard::routing {

//! Parameters of a DynMoE gate (views of caller memory). `E_max` slots, of which the experts
//! with `experts_mask[e] != 0` are active.
struct dynmoe_params {
  matrix_view<const float> w_gate;                   //!< [d, E_max], one column per expert
  vector_view<const float> thresholds;               //!< [E_max], threshold logits G
  vector_view<const std::int32_t> experts_mask;      //!< [E_max], 1 = active, 0 = masked
  float log_temperature = 0.0f;                      //!< log τ; scale s = exp(min(log τ, log 100))
};

//! Gradients of a DynMoE gate, accumulated (+=) into caller memory; an empty view skips it.
//! (The temperature is not trainable in the DeepSpeed variant, so it has no gradient.)
struct dynmoe_grads {
  matrix_view<float> w_gate;      //!< [d, E_max]
  vector_view<float> thresholds;  //!< [E_max]
};

//! The four auxiliary losses of DynMoE (DeepSpeed variant). Also the coefficient set of
//! backward: each field multiplies the gradient of its loss (upstream uses 0.01 for all four,
//! see `deepspeed()`; the golden files differentiate with 1 for each).
struct dynmoe_losses {
  float sim_loss = 0.0f;           //!< ‖(ŴᵀŴ − I) ⊙ m mᵀ‖_F (diversity of the active columns)
  float simple_loss = 0.0f;        //!< mean_e ‖W[:, e]‖₂ over all E_max columns
  float load_balance_loss = 0.0f;  //!< E_max · Σ_e me_e·ce_e over tokens with k > 0
  float efficiency_loss = 0.0f;    //!< mean_{t,e} b_{t,e}

  //! l_aux = the sum of the four parts (what upstream returns as `l_aux`).
  [[nodiscard]] float aux_loss() const {
    return sim_loss + simple_loss + load_balance_loss + efficiency_loss;
  }
  //! The same coefficient `c` for every part (as upstream: `loss = task + c·l_aux`).
  [[nodiscard]] static dynmoe_losses uniform(float c) { return {c, c, c, c}; }
  //! Upstream's coefficients: 0.01 for every part (`DY: Examples/DeepSpeed-MoE/train.py`).
  [[nodiscard]] static dynmoe_losses deepspeed() { return uniform(0.01f); }
  //! The fields backward reads as coefficients (training/aux_loss.hpp).
  static constexpr auto coefficient_fields() {
    return std::tuple{loss_field<&dynmoe_losses::sim_loss>{"sim_loss"},
                      loss_field<&dynmoe_losses::simple_loss>{"simple_loss"},
                      loss_field<&dynmoe_losses::load_balance_loss>{"load_balance_loss"},
                      loss_field<&dynmoe_losses::efficiency_loss>{"efficiency_loss"}};
  }
};

}  // namespace switchyard::routing
