// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file curriculum.hpp
//! Adaptive Gating's curriculum ordering (spec §5, Li et al., EMNLP 2023 §3.2): each sample's
//! complexity vector C_d[l] = (#top-2 tokens in MoE layer l) / (sequence length); the sample
//! with the fewest top-2 tokens is the reference; samples are ordered by decreasing cosine
//! similarity to it (simplest first).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

#include "switchyard/core/error.hpp"
#include "switchyard/core/view.hpp"

namespace switchyard::training {

//! Result of `curriculum_order`.
struct curriculum_result {
  std::vector<std::int32_t> order;  //!< [N] sample indices, most similar to the reference first
  std::vector<float> cosine_to_reference;  //!< [N] cos(C_d, C_ref), indexed by sample
  std::vector<float> complexity;  //!< [N, L] C_d[l] = top2_counts[d, l] / seq_len[d] (float32)
  index_t reference = -1;         //!< sample with the fewest top-2 tokens (-1 when N = 0)
};

//! Orders N samples by the cosine similarity of their complexity vectors to the reference
//! sample's. `top2_counts [N, L]`: top-2-routed tokens per sample and MoE layer (>= 0);
//! `seq_len [N]`: tokens per sample (>= 1). Choices (spec §5): reference = smallest total count
//! over layers, ties -> lower index; similarity ties -> lower index; cos(0, 0) = 1,
//! cos(0, v != 0) = 0. Throws shape_error / range_error naming the argument.
inline curriculum_result curriculum_order(const matrix_view<const std::int32_t>& top2_counts,
                                          const vector_view<const std::int32_t>& seq_len) {
  check_view("top2_counts", top2_counts, {-1, -1}, "[N, L]");
  const index_t n = top2_counts.extent(0), layers = top2_counts.extent(1);
  check_view("seq_len", seq_len, {n}, "[N] with N = top2_counts.extent(0)");
  for (index_t d = 0; d < n; ++d) {
    if (seq_len(d) < 1) {
      throw range_error("seq_len", detail::concat(
                                       "seq_len[", d, "] must be >= 1, got ", seq_len(d)));
    }
    for (index_t l = 0; l < layers; ++l) {
      if (top2_counts(d, l) < 0) {
        throw range_error("top2_counts",
                          detail::concat("top2_counts[", d, ", ", l,
                                                       "] must be >= 0, got ", top2_counts(d, l)));
      }
    }
  }
  curriculum_result r;
  r.complexity.resize(static_cast<std::size_t>(n * layers));
  r.cosine_to_reference.assign(static_cast<std::size_t>(n), 0.0f);
  r.order.resize(static_cast<std::size_t>(n));
  if (n == 0) return r;
  std::int64_t best_total = -1;
  for (index_t d = 0; d < n; ++d) {
    std::int64_t total = 0;
    for (index_t l = 0; l < layers; ++l) {
      total += top2_counts(d, l);
      r.complexity[d * layers + l] =
          static_cast<float>(top2_counts(d, l)) / static_cast<float>(seq_len(d));
    }
    if (best_total < 0 || total < best_total) {
      best_total = total;
      r.reference = d;
    }
  }
  const float* ref = r.complexity.data() + r.reference * layers;
  double ref_sq = 0.0;
  for (index_t l = 0; l < layers; ++l) ref_sq += static_cast<double>(ref[l]) * ref[l];
  for (index_t d = 0; d < n; ++d) {
    const float* c = r.complexity.data() + d * layers;
    double dot = 0.0, sq = 0.0;
    for (index_t l = 0; l < layers; ++l) {
      dot += static_cast<double>(c[l]) * ref[l];
      sq += static_cast<double>(c[l]) * c[l];
    }
    double cosine;
    if (sq == 0.0 && ref_sq == 0.0) {
      cosine = 1.0;
    } else if (sq == 0.0 || ref_sq == 0.0) {
      cosine = 0.0;
    } else {
      cosine = std::min(1.0, dot / (std::sqrt(sq) * std::sqrt(ref_sq)));
    }
    r.cosine_to_reference[d] = static_cast<float>(cosine);
  }
  std::iota(r.order.begin(), r.order.end(), 0);
  std::stable_sort(r.order.begin(), r.order.end(), [&](std::int32_t a, std::int32_t b) {
    return r.cosine_to_reference[a] > r.cosine_to_reference[b];
  });
  return r;
}

}  // namespace switchyard::training
