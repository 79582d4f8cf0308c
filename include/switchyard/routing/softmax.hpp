// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file softmax.hpp
//! Per-token (one row of E scores) softmax, logsumexp and the Jacobian products of the softmax
//! routers, `__host__ __device__`: the host route runs them in loops, a CUDA kernel per thread.

#include <cmath>
#include <cstdint>

#include <cuda/std/span>

#include "switchyard/core/span.hpp"
#include "switchyard/core/config.hpp"

namespace switchyard::routing {

//! probs = softmax(logits) in float32 (max-shifted `expf`, float sum, one division each).
SWITCHYARD_HD inline void softmax(span<const float> logits, span<float> probs) {
  const int n = static_cast<int>(logits.size());
  float m = logits[0];
  for (int e = 1; e < n; ++e) m = logits[e] > m ? logits[e] : m;
  float s = 0.0f;
  for (int e = 0; e < n; ++e) {
    probs[e] = expf(logits[e] - m);
    s += probs[e];
  }
  for (int e = 0; e < n; ++e) probs[e] /= s;
}

//! logsumexp(logits) in double: m = the float maximum (first on ties), then
//! m + log Σ_e exp(double(logits_e − m)) with each difference taken in float. The one
//! logsumexp of the library (z-loss, entropy and their backward rows use it).
SWITCHYARD_HD inline double logsumexp(span<const float> logits) {
  const int n = static_cast<int>(logits.size());
  float m = logits[0];
  for (int e = 1; e < n; ++e) m = m < logits[e] ? logits[e] : m;  // std::max(m, logits[e])
  double z = 0.0;
  for (int e = 0; e < n; ++e) z += ::exp(static_cast<double>(logits[e] - m));
  // z >= 1: the maximum's own term is exp(0) (cppcheck cannot see that n >= 1 terms run).
  // cppcheck-suppress invalidFunctionArg
  return m + ::log(z);
}

//! d_logits = J_softmaxᵀ d_probs = P ⊙ (d_probs − ⟨P, d_probs⟩), accumulated into d_logits.
SWITCHYARD_HD inline void softmax_backward_accumulate(span<const float> probs,
                                                      span<const float> d_probs,
                                                      span<float> d_logits) {
  const int n = static_cast<int>(probs.size());
  float dot = 0.0f;
  for (int e = 0; e < n; ++e) dot += probs[e] * d_probs[e];
  for (int e = 0; e < n; ++e) d_logits[e] += probs[e] * (d_probs[e] - dot);
}

//! Gradient of the combine weights w.r.t. the selected probabilities, scattered to a dense
//! d_probs [E]: raw weights pass d_w through; renormalised w_j = P_j/S give
//! dP_{e_j} = (d_w_j − Σ_i d_w_i w_i) / S. Accumulates into d_probs.
SWITCHYARD_HD inline void combine_weights_backward_accumulate(
    span<const float> probs, span<const std::int32_t> ids,
    span<const float> weights, span<const float> d_weights, int count,
    bool renormalized, span<float> d_probs) {
  if (!renormalized) {
    for (int j = 0; j < count; ++j) d_probs[ids[j]] += d_weights[j];
    return;
  }
  float s = 0.0f, dot = 0.0f;
  for (int j = 0; j < count; ++j) {
    s += probs[ids[j]];
    dot += d_weights[j] * weights[j];
  }
  if (!(s > 0.0f)) return;
  for (int j = 0; j < count; ++j) d_probs[ids[j]] += (d_weights[j] - dot) / s;
}

}  // namespace switchyard::routing
