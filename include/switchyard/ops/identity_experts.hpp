#pragma once
//! \file identity_experts.hpp
//! Identity (zero-computation) experts, LongCat-Flash: plan ids in `[E, E + Z)` name experts
//! that output their input, so such a slot contributes `w_tj · x_t` and runs no FFN. Per-token
//! functors (backend-neutral; see gather.hpp for the convention): the compaction of a plan to
//! its FFN slots (the expert phase then sees E experts only), the identity slots' forward
//! term, and their backward with the scatter of the FFN slots' d_weights back to slot order.
//!
//! Every functor handles one token t and writes only that token's outputs, summing in slot
//! order (then column order for a dot product), so the bits do not depend on the threads.

#include <cstdint>

#include "switchyard/core/config.hpp"
#include "switchyard/core/element_type.hpp"
#include "switchyard/core/view.hpp"

namespace switchyard::ops {

//! The FFN slots of token t (ids < `experts`) in slot order, padded with -1 / 0: the plan
//! the expert phase runs when the layer has identity experts. Writes ids, weights [T, width]
//! and counts [T] of the compacted plan.
template <class Id, class W>
struct compact_identity_slots {
  matrix_view<Id> expert_ids;   //!< [T, width] the routed plan's ids (E + Z experts)
  matrix_view<W> weights;       //!< [T, width] its combine weights
  vector_view<Id> counts;       //!< [T] its used slots
  index_t width = 0;            //!< slots per token
  index_t experts = 0;          //!< E: ids >= E are identity experts
  std::int32_t* out_ids;        //!< [T·width] compacted ids
  float* out_weights;           //!< [T·width] compacted weights
  std::int32_t* out_counts;     //!< [T] FFN slots per token

  SWITCHYARD_HD void operator()(index_t t) const {
    const index_t c = counts(t);
    index_t n = 0;
    for (index_t j = 0; j < c; ++j) {
      const index_t id = expert_ids(t, j);
      if (id >= experts) continue;
      out_ids[t * width + n] = static_cast<std::int32_t>(id);
      out_weights[t * width + n] = static_cast<float>(weights(t, j));
      ++n;
    }
    for (index_t j = n; j < width; ++j) {
      out_ids[t * width + j] = -1;
      out_weights[t * width + j] = 0.0f;
    }
    out_counts[t] = static_cast<std::int32_t>(n);
  }
};

//! out[t, i] = (in[t, i] when `in` is non-null, else 0) + Σ_{identity slots j, slot order}
//! w_tj · x[t, i]. `out` may be `in` (each element is read before it is written).
template <ElementType T, class Id, class W>
struct identity_rows {
  matrix_view<Id> expert_ids;  //!< [T, width] the routed plan's ids
  matrix_view<W> weights;      //!< [T, width] its combine weights
  vector_view<Id> counts;      //!< [T] its used slots
  index_t experts = 0;         //!< E: ids >= E are identity experts
  matrix_view<const T> x;      //!< [T, d] tokens
  index_t d = 0;               //!< model width
  const float* in = nullptr;   //!< [T, d] term to add to, or null
  float* out;                  //!< [T, d] output

  SWITCHYARD_HD void operator()(index_t t) const {
    const index_t c = counts(t);
    for (index_t i = 0; i < d; ++i) {
      float s = 0.0f;
      for (index_t j = 0; j < c; ++j) {
        if (static_cast<index_t>(expert_ids(t, j)) < experts) continue;
        s += static_cast<float>(weights(t, j)) * to_float(x(t, i));
      }
      out[t * d + i] = (in != nullptr ? in[t * d + i] : 0.0f) + s;
    }
  }
};

//! Backward of the identity slots and of the compaction for token t:
//! d_weights[t, j] = ⟨dy_t, x_t⟩ (float, column order) for an identity slot, the compacted
//! d_weights of the FFN slot's compacted position for an FFN slot, 0 for an unused slot; and,
//! when `has_dx`, dx[t, i] += Σ_{identity slots j, slot order} w_tj · dy[t, i].
template <ElementType T, class Id, class W>
struct identity_backward_rows {
  matrix_view<Id> expert_ids;     //!< [T, width] the routed plan's ids
  matrix_view<W> weights;         //!< [T, width] its combine weights
  vector_view<Id> counts;         //!< [T] its used slots
  index_t width = 0;              //!< slots per token
  index_t experts = 0;            //!< E: ids >= E are identity experts
  matrix_view<const T> x;         //!< [T, d] tokens
  matrix_view<const T> dy;        //!< [T, d] output cotangent
  index_t d = 0;                  //!< model width
  const float* compact_d_weights;  //!< [T·width] d_weights of the compacted plan
  float* d_weights;               //!< [T·width] d_weights in the routed plan's slot order
  matrix_view<float> dx;          //!< [T, d] accumulated into when `has_dx`
  bool has_dx = false;            //!< dx is present

  SWITCHYARD_HD void operator()(index_t t) const {
    const index_t c = counts(t);
    index_t n = 0;  // FFN slots so far: the compacted position of the next one
    bool any_identity = false;
    for (index_t j = 0; j < width; ++j) {
      float v = 0.0f;
      if (j < c) {
        if (static_cast<index_t>(expert_ids(t, j)) >= experts) {
          v = dot(t);
          any_identity = true;
        } else {
          v = compact_d_weights[t * width + n++];
        }
      }
      d_weights[t * width + j] = v;
    }
    if (!has_dx || !any_identity) return;
    for (index_t i = 0; i < d; ++i) {
      float s = 0.0f;
      for (index_t j = 0; j < c; ++j) {
        if (static_cast<index_t>(expert_ids(t, j)) < experts) continue;
        s += static_cast<float>(weights(t, j)) * to_float(dy(t, i));
      }
      dx(t, i) += s;
    }
  }

  //! ⟨dy_t, x_t⟩ summed in column order in float.
  SWITCHYARD_HD float dot(index_t t) const {
    float s = 0.0f;
    for (index_t i = 0; i < d; ++i) s += to_float(dy(t, i)) * to_float(x(t, i));
    return s;
  }
};

}  // namespace switchyard::ops
