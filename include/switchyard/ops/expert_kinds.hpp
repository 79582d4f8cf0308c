// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file expert_kinds.hpp
//! Non-FFN expert kinds (issue #13): a plan id past the E FFN experts names an expert that runs
//! no FFN. Ids in the order FFN `[0, E)`, identity `[E, E + Z)` (LongCat-Flash: outputs x_t),
//! zero `[E + Z, E + Z + N)` (AdaMoE's null experts: outputs 0), constant
//! `[E + Z + N, E + Z + N + C)` (MoE++: expert c outputs `α1 · x_t + α2 · v_c` with
//! `[α1, α2] = softmax(gate_c · x_t)`, `v [C, d]`, `gate [C, 2, d]`).
//!
//! Per-token (and per-parameter-element) functors, backend neutral (see gather.hpp for the
//! convention): the compaction of a plan to its FFN slots (the expert phase then sees E experts
//! only, so no GEMM row is spent on another kind), the non-FFN slots' forward term, their
//! backward with the scatter of the FFN slots' d_weights back to slot order, and the constant
//! experts' parameter gradients. Every sum runs in a fixed order (slots, then columns for a
//! dot product, then tokens for a parameter gradient): the bits do not depend on the threads.

#include <cmath>
#include <cstdint>

#include "switchyard/core/config.hpp"
#include "switchyard/core/element_type.hpp"
#include "switchyard/core/view.hpp"

namespace switchyard::ops {

//! What an expert id names.
enum class expert_kind : std::int32_t {
  ffn,       //!< an FFN expert, id in [0, E)
  identity,  //!< outputs x_t
  zero,      //!< outputs 0
  constant,  //!< outputs α1 · x_t + α2 · v_c
};

//! The id ranges of a layer's experts: FFN [0, E), identity, zero, constant (in that order).
struct expert_ranges {
  index_t ffn = 0;       //!< E
  index_t identity = 0;  //!< Z
  index_t zero = 0;      //!< N
  index_t constant = 0;  //!< C

  //! E + Z + N + C: the experts the router and the plan count.
  [[nodiscard]] SWITCHYARD_HD constexpr index_t total() const {
    return ffn + identity + zero + constant;
  }
  //! Z + N + C.
  [[nodiscard]] SWITCHYARD_HD constexpr index_t non_ffn() const {
    return identity + zero + constant;
  }
  //! The kind of a valid id (in [0, total())).
  [[nodiscard]] SWITCHYARD_HD constexpr expert_kind kind(index_t id) const {
    if (id < ffn) return expert_kind::ffn;
    if (id < ffn + identity) return expert_kind::identity;
    if (id < ffn + identity + zero) return expert_kind::zero;
    return expert_kind::constant;
  }
  //! The constant expert c of a constant id.
  [[nodiscard]] SWITCHYARD_HD constexpr index_t constant_index(index_t id) const {
    return id - ffn - identity - zero;
  }
};

//! A constant expert's mixing coefficients for token row x: z_k = ⟨gate_c[k], x⟩ (float,
//! column order), [α1, α2] = softmax(z) (max-subtracted).
template <ElementType T, ElementType P>
SWITCHYARD_HD inline void constant_alphas(const tensor_view<const P, 3>& gate, index_t c,
                                          const matrix_view<const T>& x, index_t t, index_t d,
                                          float& a1, float& a2) {
  float z0 = 0.0f, z1 = 0.0f;
  for (index_t i = 0; i < d; ++i) {
    const float xi = to_float(x(t, i));
    z0 += to_float(gate(c, 0, i)) * xi;
    z1 += to_float(gate(c, 1, i)) * xi;
  }
  const float m = z0 > z1 ? z0 : z1;
  const float e0 = expf(z0 - m), e1 = expf(z1 - m);
  const float s = e0 + e1;
  a1 = e0 / s;
  a2 = e1 / s;
}

//! The FFN slots of token t (ids < E) in slot order, padded with -1 / 0: the plan the expert
//! phase runs when the layer has non-FFN experts. Writes ids, weights [T, width] and counts [T]
//! of the compacted plan.
template <class Id, class W>
struct compact_ffn_slots {
  matrix_view<Id> expert_ids;   //!< [T, width] the routed plan's ids
  matrix_view<W> weights;       //!< [T, width] its combine weights
  vector_view<Id> counts;       //!< [T] its used slots
  index_t width = 0;            //!< slots per token
  index_t experts = 0;          //!< E: ids >= E are not FFN experts
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

//! out[t, :] = (in[t, :] when `in` is non-null, else 0), then, slot by slot in slot order, each
//! non-FFN slot's term added: identity w_tj · x_t, zero nothing, constant
//! w_tj · (α1 · x_t + α2 · v_c). `out` may be `in` (each element is read before it is written).
template <ElementType T, ElementType P, class Id, class W>
struct expert_kind_rows {
  matrix_view<Id> expert_ids;        //!< [T, width] the routed plan's ids
  matrix_view<W> weights;            //!< [T, width] its combine weights
  vector_view<Id> counts;            //!< [T] its used slots
  expert_ranges kinds;               //!< the id ranges
  matrix_view<const T> x;            //!< [T, d] tokens
  matrix_view<const P> v;            //!< [C, d] constant vectors (empty when C = 0)
  tensor_view<const P, 3> gate;      //!< [C, 2, d] constant gates (empty when C = 0)
  index_t d = 0;                     //!< model width
  const float* in = nullptr;         //!< [T, d] term to add to, or null
  float* out;                        //!< [T, d] output

  SWITCHYARD_HD void operator()(index_t t) const {
    float* o = out + t * d;
    for (index_t i = 0; i < d; ++i) o[i] = in != nullptr ? in[t * d + i] : 0.0f;
    const index_t c = counts(t);
    for (index_t j = 0; j < c; ++j) {
      const index_t id = expert_ids(t, j);
      const float w = static_cast<float>(weights(t, j));
      switch (kinds.kind(id)) {
        case expert_kind::identity:
          for (index_t i = 0; i < d; ++i) o[i] += w * to_float(x(t, i));
          break;
        case expert_kind::constant: {
          const index_t k = kinds.constant_index(id);
          float a1 = 0.0f, a2 = 0.0f;
          constant_alphas<T, P>(gate, k, x, t, d, a1, a2);
          for (index_t i = 0; i < d; ++i)
            o[i] += w * (a1 * to_float(x(t, i)) + a2 * to_float(v(k, i)));
          break;
        }
        default:  // ffn (the routed phase's) and zero: no term
          break;
      }
    }
  }
};

//! Backward of the non-FFN slots and of the compaction for token t:
//! d_weights[t, j] = the compacted d_weights of the FFN slot's compacted position for an FFN
//! slot, ⟨dy_t, x_t⟩ for identity, 0 for zero and unused slots, α1⟨dy_t, x_t⟩ + α2⟨dy_t, v_c⟩
//! for constant (dots in float, column order). When `has_dx`, slot by slot in slot order:
//! identity dx_t += w · dy_t; constant dx_t += α1 · w · dy_t + dz1 · gate_c[0] + dz2 · gate_c[1]
//! with dα = w · (⟨dy, x⟩, ⟨dy, v_c⟩) and dz_k = α_k (dα_k − Σ_i α_i dα_i). When `coef` is
//! non-null each constant slot's (α2 · w, dz1, dz2) is written to coef[(t·width + j)·3 + 0..2]
//! for `constant_param_grads`.
template <ElementType T, ElementType P, class Id, class W>
struct expert_kind_backward_rows {
  matrix_view<Id> expert_ids;      //!< [T, width] the routed plan's ids
  matrix_view<W> weights;          //!< [T, width] its combine weights
  vector_view<Id> counts;          //!< [T] its used slots
  index_t width = 0;               //!< slots per token
  expert_ranges kinds;             //!< the id ranges
  matrix_view<const T> x;          //!< [T, d] tokens
  matrix_view<const T> dy;         //!< [T, d] output cotangent
  matrix_view<const P> v;          //!< [C, d] constant vectors
  tensor_view<const P, 3> gate;    //!< [C, 2, d] constant gates
  index_t d = 0;                   //!< model width
  const float* compact_d_weights;  //!< [T·width] d_weights of the compacted plan
  float* d_weights;                //!< [T·width] d_weights in the routed plan's slot order
  matrix_view<float> dx;           //!< [T, d] accumulated into when `has_dx`
  bool has_dx = false;             //!< dx is present
  float* coef = nullptr;           //!< [T·width·3] constant slots' coefficients, or null

  SWITCHYARD_HD void operator()(index_t t) const {
    const index_t c = counts(t);
    index_t n = 0;  // FFN slots so far: the compacted position of the next one
    for (index_t j = 0; j < width; ++j) {
      float dw = 0.0f;
      if (j < c) {
        const index_t id = expert_ids(t, j);
        const float w = static_cast<float>(weights(t, j));
        switch (kinds.kind(id)) {
          case expert_kind::ffn:
            dw = compact_d_weights[t * width + n++];
            break;
          case expert_kind::identity:
            dw = dot_x(t);
            if (has_dx)
              for (index_t i = 0; i < d; ++i) dx(t, i) += w * to_float(dy(t, i));
            break;
          case expert_kind::zero:
            break;
          case expert_kind::constant:
            dw = constant_slot(t, j, kinds.constant_index(id), w);
            break;
        }
      }
      d_weights[t * width + j] = dw;
    }
  }

  //! ⟨dy_t, x_t⟩ summed in column order in float.
  SWITCHYARD_HD float dot_x(index_t t) const {
    float s = 0.0f;
    for (index_t i = 0; i < d; ++i) s += to_float(dy(t, i)) * to_float(x(t, i));
    return s;
  }

  //! A constant slot's backward (dx, coef); returns its d_weights.
  SWITCHYARD_HD float constant_slot(index_t t, index_t j, index_t k, float w) const {
    float a1 = 0.0f, a2 = 0.0f;
    constant_alphas<T, P>(gate, k, x, t, d, a1, a2);
    float dyx = 0.0f, dyv = 0.0f;
    for (index_t i = 0; i < d; ++i) {
      const float g = to_float(dy(t, i));
      dyx += g * to_float(x(t, i));
      dyv += g * to_float(v(k, i));
    }
    const float da1 = w * dyx, da2 = w * dyv;
    const float s = a1 * da1 + a2 * da2;
    const float dz1 = a1 * (da1 - s), dz2 = a2 * (da2 - s);
    if (has_dx) {
      for (index_t i = 0; i < d; ++i) {
        dx(t, i) += a1 * w * to_float(dy(t, i)) + dz1 * to_float(gate(k, 0, i)) +
                    dz2 * to_float(gate(k, 1, i));
      }
    }
    if (coef != nullptr) {
      float* q = coef + (t * width + j) * 3;
      q[0] = a2 * w;
      q[1] = dz1;
      q[2] = dz2;
    }
    return a1 * dyx + a2 * dyv;
  }
};

//! Groups the used slots naming constant experts by expert, in pair order (token, then slot):
//! `pairs[offsets[c] .. offsets[c + 1])` are the pair indices t·width + j of constant expert c.
//! One thread (a counting sort over the plan); `offsets` has C + 1 entries.
template <class Id>
SWITCHYARD_HD inline void group_constant_pairs(const matrix_view<Id>& expert_ids,
                                               const vector_view<Id>& counts, index_t tokens,
                                               index_t width, const expert_ranges& kinds,
                                               index_t* pairs, index_t* offsets) {
  const index_t first = kinds.ffn + kinds.identity + kinds.zero;
  for (index_t c = 0; c <= kinds.constant; ++c) offsets[c] = 0;
  for (index_t t = 0; t < tokens; ++t)
    for (index_t j = 0; j < static_cast<index_t>(counts(t)); ++j) {
      const index_t id = expert_ids(t, j);
      if (id >= first) ++offsets[id - first + 1];
    }
  for (index_t c = 0; c < kinds.constant; ++c) offsets[c + 1] += offsets[c];
  for (index_t t = 0; t < tokens; ++t)
    for (index_t j = 0; j < static_cast<index_t>(counts(t)); ++j) {
      const index_t id = expert_ids(t, j);
      if (id >= first) pairs[offsets[id - first]++] = t * width + j;
    }
  for (index_t c = kinds.constant; c > 0; --c) offsets[c] = offsets[c - 1];  // back to starts
  offsets[0] = 0;
}

//! The constant experts' parameter gradients for one element r of [0, C·d) (c = r / d,
//! i = r % d), summed over expert c's pairs in pair order (`group_constant_pairs`) from `coef`
//! (expert_kind_backward_rows): dv[c, i] += Σ α2·w · dy[t, i], dgate[c, k, i] += Σ dz_k ·
//! x[t, i]. Empty gradient views are skipped.
template <ElementType T>
struct constant_param_grads {
  const index_t* pairs;          //!< constant pairs grouped by expert
  const index_t* offsets;        //!< [C + 1] expert c's pairs: [offsets[c], offsets[c + 1])
  index_t width = 0;             //!< slots per token
  matrix_view<const T> x;        //!< [T, d] tokens
  matrix_view<const T> dy;       //!< [T, d] output cotangent
  index_t d = 0;                 //!< model width
  const float* coef;             //!< [T·width·3] from expert_kind_backward_rows
  matrix_view<float> dv;         //!< [C, d] or empty
  tensor_view<float, 3> dgate;   //!< [C, 2, d] or empty

  SWITCHYARD_HD void operator()(index_t r) const {
    const index_t c = r / d, i = r % d;
    float sv = 0.0f, s0 = 0.0f, s1 = 0.0f;
    for (index_t n = offsets[c]; n < offsets[c + 1]; ++n) {
      const index_t p = pairs[n], t = p / width;
      const float* q = coef + p * 3;
      sv += q[0] * to_float(dy(t, i));
      const float xi = to_float(x(t, i));
      s0 += q[1] * xi;
      s1 += q[2] * xi;
    }
    if (detail::present(dv)) dv(c, i) += sv;
    if (detail::present(dgate)) {
      dgate(c, 0, i) += s0;
      dgate(c, 1, i) += s1;
    }
  }
};

//! The compaction under its issue #12 name.
template <class Id, class W>
using compact_identity_slots = compact_ffn_slots<Id, W>;

}  // namespace switchyard::ops
