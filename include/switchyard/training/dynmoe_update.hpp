// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file dynmoe_update.hpp
//! DynMoE's adaptive expert count (spec §3.5, `DY-ds: layer.py::MoE.forward`,
//! `sharded_moe.py::TopKGate.forward`, `MOELayer.remove_experts` / `add_experts`):
//!
//! - `dynmoe_recorder` accumulates, while recording, how many tokens each expert received and
//!   the sum of the tokens that activated no expert;
//! - `adaptive_update` masks every expert that received nothing, then adds at most one expert
//!   at the lowest free slot, initialised on the un-routed tokens' mean direction;
//! - `dynmoe_schedule` says, forward by forward, when to start recording and when to update
//!   (record 300 training forwards, update, every 900 by default).

#include <cmath>
#include <cstdint>
#include <vector>

#include "switchyard/core/element_type.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/routing/plan.hpp"

namespace switchyard::training {

//! Routing statistics gathered between two adaptive updates (fp32, as upstream).
struct dynmoe_recorder {
  std::vector<float> routing_records;  //!< [E_max]: Σ_t b_{t,e}, tokens routed to each expert
  std::vector<float> sample_records;   //!< [d]: Σ x_t over tokens with k_t = 0
  index_t recorded_forwards = 0;       //!< forwards recorded since the last reset
  index_t recorded_tokens = 0;         //!< tokens recorded since the last reset

  //! Clears the records and sizes them for E_max experts and model width d.
  void reset(index_t e_max, index_t d) {
    routing_records.assign(static_cast<std::size_t>(e_max), 0.0f);
    sample_records.assign(static_cast<std::size_t>(d), 0.0f);
    recorded_forwards = 0;
    recorded_tokens = 0;
  }

  //! Adds one forward's plan (of a DynMoE router, width E_max) and its input x [T, d]:
  //! routing_records[e] += number of tokens using e (eval fallbacks included, as upstream),
  //! sample_records += Σ x_t over tokens that use no expert (only happens in training).
  //! Sizes the records on first use; throws shape_error when x or the plan disagree with them
  //! (or the plan's arrays with its T and width), range_error when the plan fails
  //! routing::validate_plan (a count outside [0, width], an id outside [0, E), a repeat).
  //! Takes a plan in caller memory (a layer's plan_ref) or a routing_plan (converts).
  template <ElementType T>
  void record(const routing::plan_ref& plan, const matrix_view<const T>& x) {
    const index_t e_max = plan.num_experts, d = x.extent(1);
    if (e_max < 0) {
      throw range_error("plan.num_experts", detail::concat(
                                                "plan.num_experts must be >= 0, got ", e_max));
    }
    if (plan.num_tokens < 0 || plan.width < 0) {
      throw range_error(plan.num_tokens < 0 ? "plan.num_tokens" : "plan.width",
                        detail::concat("plan: num_tokens and width must be >= 0, got ",
                                                     plan.num_tokens, " and ", plan.width));
    }
    const auto slots = static_cast<std::size_t>(plan.num_tokens * plan.width);
    const auto require_size = [](const char* name, std::size_t got, std::size_t want,
                                 const char* meaning) {
      if (got != want) {
        throw shape_error(name, detail::concat(name, ": expected ", want,
                                                             " elements ", meaning, ", got ", got));
      }
    };
    require_size("plan.expert_ids", plan.expert_ids.size(), slots, "[T·width]");
    require_size("plan.weights", plan.weights.size(), slots, "[T·width]");
    require_size("plan.counts", plan.counts.size(), static_cast<std::size_t>(plan.num_tokens),
                 "[T]");
    routing::validate_plan("plan", plan.const_view(), plan.num_tokens, e_max);
    // Every check before the first mutation: a rejected call leaves the records unchanged.
    const bool fresh = routing_records.empty() && sample_records.empty();
    detail::require_extent(
        "plan.num_experts", 0, e_max,
        fresh ? e_max : static_cast<index_t>(routing_records.size()),
        "E_max of the recorded experts");
    check_view("x", x, {plan.num_tokens, fresh ? d : static_cast<index_t>(sample_records.size())},
               "[T, d] with T = plan.num_tokens and d of the records");
    if (fresh) reset(e_max, d);
    for (index_t t = 0; t < plan.num_tokens; ++t) {
      const index_t k = plan.counts[static_cast<std::size_t>(t)];
      for (index_t j = 0; j < k; ++j) routing_records[static_cast<std::size_t>(plan.id(t, j))] += 1.0f;
      if (k == 0)
        for (index_t i = 0; i < d; ++i) sample_records[static_cast<std::size_t>(i)] += to_float(x(t, i));
    }
    ++recorded_forwards;
    recorded_tokens += plan.num_tokens;
  }
};

//! What adaptive_update changed.
struct dynmoe_update_result {
  index_t removed = 0;             //!< experts masked because they received no token
  std::int32_t added_expert = -1;  //!< slot of the added expert, or -1 when none was added
  index_t num_active_experts = 0;  //!< Σ experts_mask after the update
};

//! The adaptive expert update (DeepSpeed variant), in place on the gate's parameters:
//! 1. remove: m ← m ⊙ sign(routing_records) (weights are kept, only masked);
//! 2. add: when Σ_i sample_records_i ≠ 0 (the element sum, as upstream, not the norm) and some
//!    slot is masked, the lowest masked slot e* gets m = 1, W[:, e*] = sample/‖sample‖ and
//!    threshold logit G = 0 (θ = 0.5). An expert removed in step 1 may be re-added at once.
//! Expert FFN weights are the caller's business (upstream does not re-initialise them).
//! If nothing was recorded (`recorded_forwards == 0`), nothing changes (upstream's guard).
//! Throws shape_error when the views disagree with each other or with the records.
//! Note: when every expert received nothing and the sample sum is exactly 0, the mask ends up
//! all zero (as upstream); the router then rejects it with range_error.
inline dynmoe_update_result adaptive_update(const dynmoe_recorder& records,
                                            const matrix_view<float>& w_gate,
                                            const vector_view<float>& thresholds,
                                            const vector_view<std::int32_t>& experts_mask) {
  check_view("w_gate", w_gate, {-1, -1}, "[d, E_max]");
  const index_t d = w_gate.extent(0), e_max = w_gate.extent(1);
  check_view("thresholds", thresholds, {e_max}, "[E_max] with E_max = w_gate.extent(1)");
  check_view("experts_mask", experts_mask, {e_max}, "[E_max] with E_max = w_gate.extent(1)");
  dynmoe_update_result r;
  auto count_active = [&] {
    index_t n = 0;
    for (index_t e = 0; e < e_max; ++e) n += experts_mask(e) != 0 ? 1 : 0;
    return n;
  };
  if (records.recorded_forwards == 0) {
    r.num_active_experts = count_active();
    return r;
  }
  detail::require_extent("records.routing_records", 0,
                         static_cast<index_t>(records.routing_records.size()), e_max, "E_max");
  detail::require_extent("records.sample_records", 0,
                         static_cast<index_t>(records.sample_records.size()), d, "d");
  // 1. remove every expert that received no token
  for (index_t e = 0; e < e_max; ++e) {
    const float rec = records.routing_records[static_cast<std::size_t>(e)];
    const std::int32_t sign = rec > 0.0f ? 1 : 0;  // counts are >= 0
    if (experts_mask(e) != 0 && sign == 0) ++r.removed;
    experts_mask(e) = experts_mask(e) * sign;
  }
  // 2. add one expert at the lowest free slot from the un-routed tokens
  float sum = 0.0f;  // sequential fp32 sum, as upstream's Python `sum(tensor)`
  double sq = 0.0;
  for (float v : records.sample_records) {
    sum += v;
    sq += static_cast<double>(v) * v;
  }
  if (sum != 0.0f) {
    for (index_t e = 0; e < e_max; ++e) {
      if (experts_mask(e) != 0) continue;
      const double norm = std::sqrt(sq);
      experts_mask(e) = 1;
      for (index_t i = 0; i < d; ++i)
        w_gate(i, e) = static_cast<float>(records.sample_records[static_cast<std::size_t>(i)] / norm);
      thresholds(e) = 0.0f;
      r.added_expert = static_cast<std::int32_t>(e);
      break;
    }
  }
  r.num_active_experts = count_active();
  return r;
}

//! When to record and when to update, counted in training forwards (upstream: a forward whose
//! count c (before it runs) satisfies c % 300 == 0 and (c/300) % 3 == 1 starts recording;
//! c % 300 == 0 and (c/300) % 3 == 2 updates after the forward and stops recording. With the
//! defaults: record forwards 300..600, update after forward 600, again 1200..1500, ...).
struct dynmoe_schedule {
  index_t period = 300;       //!< length of one phase, in training forwards (>= 1)
  index_t phases = 3;         //!< phases per cycle (>= 2)
  index_t record_phase = 1;   //!< phase at whose first forward recording starts
  index_t update_phase = 2;   //!< phase at whose first forward the update runs
  index_t forward_count = 0;  //!< training forwards seen so far
  bool recording = false;     //!< between a record start and the next update

  //! What to do around one forward.
  struct step {
    bool begin_recording = false;  //!< reset the recorder before this forward
    bool record = false;           //!< record this forward (dynmoe_recorder::record)
    bool update = false;           //!< run adaptive_update after this forward, then stop
  };

  //! Throws range_error unless period >= 1, phases >= 2 and the two phases are distinct and
  //! in [0, phases).
  void validate() const {
    if (period < 1)
      throw range_error("period", detail::concat("period must be >= 1, got ", period));
    if (phases < 2)
      throw range_error("phases", detail::concat("phases must be >= 2, got ", phases));
    detail::require_in_range<index_t>("record_phase", record_phase, 0, phases - 1);
    detail::require_in_range<index_t>("update_phase", update_phase, 0, phases - 1);
    if (record_phase == update_phase)
      throw range_error("update_phase",
                        detail::concat("update_phase must differ from record_phase = ",
                                                     record_phase, ", got ", update_phase));
  }

  //! Call once per forward of the layer, before it runs; `training` forwards advance the
  //! count (eval forwards do not, as upstream). The update is only requested while recording.
  step on_forward(bool training = true) {
    validate();
    step s;
    if (forward_count % period == 0) {
      const index_t phase = (forward_count / period) % phases;
      if (phase == record_phase) {
        s.begin_recording = true;
        recording = true;
      } else if (phase == update_phase && recording) {
        s.update = true;
      }
    }
    s.record = recording;
    if (s.update) recording = false;
    if (training) ++forward_count;
    return s;
  }
};

}  // namespace switchyard::training
