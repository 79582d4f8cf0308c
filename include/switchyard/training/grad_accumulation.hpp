// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file grad_accumulation.hpp
//! Gradient accumulation over micro-batches with deterministic results: `micro_batches` splits
//! a batch of T tokens into contiguous ranges, `gradient_accumulator` sums the float gradient
//! buffers of each micro-batch's backward into float64 with a weight, in a fixed order, and
//! writes the sum back into the buffers.
//!
//!     training::micro_batches mb{.tokens = T, .count = 4};
//!     training::gradient_accumulator acc({dw1, db1, dw2, db2, drouter});  // span<float>s
//!     acc.begin_step();
//!     for (index_t i = 0; i < mb.count; ++i) {
//!       acc.zero_buffers();                    // backward accumulates (+=)
//!       // forward + backward of tokens [mb.begin(i), mb.begin(i) + mb.size(i)), with dy the
//!       // gradient of the micro-batch's *mean* loss and unscaled aux coefficients
//!       acc.add(mb.weight(i));                 // sums += size(i)/T · buffers
//!     }
//!     acc.finish();                            // buffers = float(sums)
//!
//! What is equal to what (docs/training.md, "Micro-batches and determinism"):
//! - the result is deterministic: the same bits run to run and for any thread count, given
//!   the split (each element's sum runs over the micro-batches in order, in double);
//! - for a loss that is a mean over tokens, it equals the full-batch gradient up to float
//!   rounding: each micro-batch's gradient is a float result, summed in float64 and rounded
//!   once to float;
//! - the batch-level aux losses (load balance, z, entropy, DynMoE's, ReMoE's L1 …) are computed
//!   per micro-batch (as Megatron-LM and Hugging Face do), so their gradients differ from the
//!   full batch's by design: the weighted sum of per-micro-batch balance losses is not the
//!   balance loss of the whole batch.
//! Gradient buffers are float (every gradient view of the layer is float). Host memory.

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <utility>
#include <vector>

#include "switchyard/core/config.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/parallel.hpp"
#include "switchyard/core/span.hpp"

namespace switchyard::training {

//! A batch of `tokens` tokens split into `count` contiguous micro-batches whose sizes differ
//! by at most one: the first `tokens % count` are one token larger. Aggregate:
//! `{.tokens = 1000, .count = 3}` → sizes 334, 333, 333.
struct micro_batches {
  index_t tokens = 0;  //!< T >= 0
  index_t count = 1;   //!< >= 1, and <= T when T > 0 (no empty micro-batch)

  //! range_error naming "tokens" (negative) or "count" (< 1, or > tokens when tokens > 0).
  void validate() const {
    if (tokens < 0) {
      throw range_error("tokens", detail::concat("tokens must be >= 0, got ", tokens));
    }
    if (count < 1) {
      throw range_error("count", detail::concat("count must be >= 1, got ", count));
    }
    if (tokens > 0 && count > tokens) {
      throw range_error("count", detail::concat("count must be in [1, tokens] = [1, ", tokens,
                                                "] (no empty micro-batch), got ", count));
    }
  }

  //! First token of micro-batch i (range_error naming "i" unless 0 <= i < count).
  [[nodiscard]] index_t begin(index_t i) const {
    check_index(i);
    const index_t base = tokens / count, extra = tokens % count;
    return i * base + (i < extra ? i : extra);
  }

  //! Tokens of micro-batch i: tokens / count, plus one for the first tokens % count.
  [[nodiscard]] index_t size(index_t i) const {
    check_index(i);
    return tokens / count + (i < tokens % count ? 1 : 0);
  }

  //! size(i) / tokens: the weight of micro-batch i's mean-loss gradient in the batch mean
  //! (0 when tokens = 0).
  [[nodiscard]] double weight(index_t i) const {
    const index_t n = size(i);
    return tokens == 0 ? 0.0 : static_cast<double>(n) / static_cast<double>(tokens);
  }

 private:
  void check_index(index_t i) const {
    validate();
    if (i < 0 || i >= count) {
      throw range_error("i", detail::concat("i must be in [0, count) = [0, ", count, "), got ", i));
    }
  }
};

//! Float64 sums over the caller's float gradient buffers (any parameter kind: expert weights
//! and biases, the router's gate, DynMoE thresholds, add-on parameters, parameters outside the
//! layer). The buffers must stay valid while the accumulator is used; it owns only the sums.
class gradient_accumulator {
 public:
  //! One sum array per buffer (empty spans are allowed and ignored). null_pointer_error naming
  //! "buffers[i]" when a non-empty span has a null data pointer.
  explicit gradient_accumulator(std::vector<span<float>> buffers) : buffers_(std::move(buffers)) {
    sums_.resize(buffers_.size());
    for (std::size_t b = 0; b < buffers_.size(); ++b) {
      if (!buffers_[b].empty() && buffers_[b].data() == nullptr) {
        throw null_pointer_error(
            detail::concat("buffers[", b, "]"),
            detail::concat("buffers[", b, "]: data pointer is null but the span has ",
                           buffers_[b].size(), " elements"));
      }
      sums_[b].assign(buffers_[b].size(), 0.0);
      for (std::size_t lo = 0; lo < buffers_[b].size(); lo += chunk) items_.emplace_back(b, lo);
    }
  }

  //! Starts a step: every float64 sum = 0, no micro-batch added.
  void begin_step() {
    for (auto& s : sums_) std::fill(s.begin(), s.end(), 0.0);
    added_ = 0;
  }

  //! Sets the caller's float buffers to 0 (call before each micro-batch's backward, which
  //! accumulates into them).
  void zero_buffers() {
    for_each_chunk([](span<float> buf, double*, std::size_t lo, std::size_t hi) {
      for (std::size_t j = lo; j < hi; ++j) buf[j] = 0.0f;
    });
  }

  //! sums += weight · buffers, element by element in double (weight finite, else range_error
  //! naming "weight"). Each element's sum adds the micro-batches in the order of the calls, so
  //! the result does not depend on the thread count.
  void add(double weight = 1.0) {
    if (!std::isfinite(weight)) {
      throw range_error("weight", detail::concat("weight must be finite, got ", weight));
    }
    for_each_chunk([weight](span<float> buf, double* sum, std::size_t lo, std::size_t hi) {
      for (std::size_t j = lo; j < hi; ++j) sum[j] += weight * static_cast<double>(buf[j]);
    });
    ++added_;
  }

  //! buffers = float(sums): the accumulated gradient, rounded once to float.
  void finish() {
    for_each_chunk([](span<float> buf, double* sum, std::size_t lo, std::size_t hi) {
      for (std::size_t j = lo; j < hi; ++j) buf[j] = static_cast<float>(sum[j]);
    });
  }

  //! Calls of add() since begin_step() (or construction).
  [[nodiscard]] index_t micro_batches_added() const { return added_; }

  //! The buffers, as given.
  [[nodiscard]] const std::vector<span<float>>& buffers() const { return buffers_; }

  //! The float64 sums of buffer b (its size), read only.
  [[nodiscard]] span<const double> sums(std::size_t b) const {
    if (b >= sums_.size()) {
      throw range_error("b", detail::concat("b must be in [0, ", sums_.size(), "), got ", b));
    }
    return {sums_[b].data(), sums_[b].size()};
  }

 private:
  //! Elements per work item of the element-wise passes.
  static constexpr std::size_t chunk = 1 << 14;

  //! body(buffer, sums, lo, hi) over fixed chunks of every buffer, on OpenMP threads when
  //! available; element-wise, so the thread count changes no bit.
  template <class Body>
  void for_each_chunk(Body&& body) {
    const bool parallel = items_.size() > 1 && detail::openmp_parallel_available();
    detail::parallel_for(static_cast<index_t>(items_.size()), parallel, [&](index_t k) {
      const auto [b, lo] = items_[static_cast<std::size_t>(k)];
      const std::size_t hi = std::min(lo + chunk, buffers_[b].size());
      body(buffers_[b], sums_[b].data(), lo, hi);
    });
  }

  std::vector<span<float>> buffers_;
  std::vector<std::vector<double>> sums_;
  std::vector<std::pair<std::size_t, std::size_t>> items_;  //!< (buffer, chunk start)
  index_t added_ = 0;
};

}  // namespace switchyard::training
