// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file ranking.hpp
//! Walks one token's scores in stable descending order (ties -> lower expert index), the
//! order torch's CPU `sort` produces and the golden files pin. O(E) per step, no allocation,
//! so selection rules run unchanged on host and device.

#include <cuda/std/span>

#include "switchyard/core/span.hpp"
#include "switchyard/core/config.hpp"

namespace switchyard::routing {

//! True when (va, a) ranks before (vb, b): larger score first, then lower index.
SWITCHYARD_HD SWITCHYARD_FORCEINLINE bool ranks_before(float va, int a, float vb, int b) {
  return va > vb || (va == vb && a < b);
}

//! Yields expert indices of `scores` in stable descending order, one per `next()`.
class ranked_cursor {
 public:
  SWITCHYARD_HD explicit ranked_cursor(span<const float> scores) : scores_(scores) {}

  //! The next expert in order, or -1 when all have been yielded.
  SWITCHYARD_HD int next() {
    int best = -1;
    float best_v = 0.0f;
    const int n = static_cast<int>(scores_.size());
    for (int e = 0; e < n; ++e) {
      const float v = scores_[e];
      if (last_ >= 0 && !ranks_before(last_v_, last_, v, e)) continue;  // already yielded
      if (best < 0 || ranks_before(v, e, best_v, best)) {
        best = e;
        best_v = v;
      }
    }
    if (best >= 0) {
      last_ = best;
      last_v_ = best_v;
    }
    return best;
  }

 private:
  span<const float> scores_;
  int last_ = -1;
  float last_v_ = 0.0f;
};

}  // namespace switchyard::routing
