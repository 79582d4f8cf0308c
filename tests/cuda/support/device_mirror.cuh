// SPDX-License-Identifier: Apache-2.0
#pragma once
// Device copies of host test data for the GPU layer tests: `device_mirror` uploads any host
// view (same extents and strides, device pointer) and keeps the copies alive;
// `device_output` is a poisoned device buffer with a view and a download; `device_state` is
// a layer's forward state (plan, losses, dropped) in device memory that downloads into a
// host `moe_result`, so the host layer's backward can run on the very plan the device made.
//
// Host code only (no kernels): every copy goes through switchyard::cuda::check.
#include <cstddef>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include <switchyard/backend/cuda.cuh>
#include <switchyard/switchyard.hpp>

namespace switchyard::test::gpu {

namespace sy = ::switchyard;

//! Uploads host views to the device; the copies live as long as the mirror (a list of
//! arrays: `std::vector` moves device_array handles, never the device memory).
class device_mirror {
 public:
  explicit device_mirror(cudaStream_t stream) : stream_(stream) {}

  //! A view of a device copy of `v` (same extents and strides). An absent view stays absent.
  template <class T, class Ext, class Acc>
  [[nodiscard]] ::cuda::std::mdspan<T, Ext, ::cuda::std::layout_stride, Acc> operator()(
      const ::cuda::std::mdspan<T, Ext, ::cuda::std::layout_stride, Acc>& v) const {
    using M = ::cuda::std::mdspan<T, Ext, ::cuda::std::layout_stride, Acc>;
    if (!sy::detail::present(v)) return v;
    const std::size_t n = static_cast<std::size_t>(v.mapping().required_span_size());
    T* p = static_cast<T*>(upload(v.data_handle(), n * sizeof(T)));
    return M(p, v.mapping());
  }

  //! A device copy of `n` elements at `host` (synchronous: `host` may die afterwards).
  template <class T>
  [[nodiscard]] T* copy(const T* host, std::size_t n) const {
    return static_cast<T*>(upload(host, n * sizeof(T)));
  }

 private:
  void* upload(const void* host, std::size_t bytes) const {
    blocks_.emplace_back(bytes == 0 ? 1 : bytes, stream_);
    auto& b = blocks_.back();
    if (bytes != 0) {
      sy::cuda::check(cudaMemcpyAsync(b.data(), host, bytes, cudaMemcpyHostToDevice, stream_),
                      "cudaMemcpyAsync(upload)");
    }
    sy::cuda::check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize(upload)");
    return b.data();
  }
  cudaStream_t stream_;
  // const uploads (layer_data::weights takes the map by const reference) still own copies
  mutable std::vector<sy::cuda::device_array<std::byte>> blocks_;
};

//! A device array of `n` elements, poisoned with 0xFF bytes (NaN for floats, -1 for ints).
template <class T>
struct device_output {
  sy::cuda::device_array<T> a;
  device_output(std::size_t n, cudaStream_t s) : a(n, s) { poison(); }
  void poison() { a.fill_bytes(0xFF); }
  //! Uploads `host` (same size) over the array.
  void set(const std::vector<T>& host) { a.copy_from(host); }
  [[nodiscard]] std::vector<T> download() const { return a.to_host(); }
  template <class... I>
  [[nodiscard]] sy::tensor_view<T, sizeof...(I)> view(I... dims) const {
    return sy::make_view(a.data(), dims...);
  }
  [[nodiscard]] sy::span<T> span() const { return {a.data(), a.size()}; }
};

//! A layer's forward state in device memory.
template <class Losses>
struct device_state {
  index_t tokens, width, experts;
  device_output<std::int32_t> ids, counts;
  device_output<float> weights, logits, probs;
  device_output<Losses> losses;
  device_output<index_t> dropped;

  device_state(index_t t, index_t w, index_t e, cudaStream_t s)
      : tokens(t), width(w), experts(e),
        ids(static_cast<std::size_t>(t * w), s), counts(static_cast<std::size_t>(t), s),
        weights(static_cast<std::size_t>(t * w), s), logits(static_cast<std::size_t>(t * e), s),
        probs(static_cast<std::size_t>(t * e), s), losses(1, s),
        dropped(static_cast<std::size_t>(e), s) {}

  //! Every array back to 0xFF bytes.
  void poison() {
    ids.poison();
    counts.poison();
    weights.poison();
    logits.poison();
    probs.poison();
    losses.poison();
    dropped.poison();
  }
  [[nodiscard]] sy::routing::plan_ref plan() const {
    return {tokens, width, experts, ids.span(), weights.span(), counts.span(), logits.span(),
            probs.span()};
  }
  [[nodiscard]] sy::moe_state<Losses> view() const {
    return {plan(), losses.a.data(), dropped.span()};
  }
  //! The state as a host result (what the host layer's backward takes).
  [[nodiscard]] sy::moe_result<Losses> download() const {
    sy::moe_result<Losses> r;
    r.plan.num_tokens = tokens;
    r.plan.width = width;
    r.plan.num_experts = experts;
    r.plan.expert_ids = ids.download();
    r.plan.weights = weights.download();
    r.plan.counts = counts.download();
    r.plan.logits = logits.download();
    r.plan.probs = probs.download();
    r.losses = losses.download().at(0);
    r.dropped = dropped.download();
    return r;
  }
};

//! A host plan as device arrays (forward_experts / backward_experts inputs).
struct device_plan {
  sy::cuda::device_array<std::int32_t> ids, counts;
  sy::cuda::device_array<float> weights;
  index_t tokens, width, experts;
  device_plan(const sy::routing::routing_plan& p, cudaStream_t s)
      : ids(p.expert_ids, s), counts(p.counts, s), weights(p.weights, s),
        tokens(p.num_tokens), width(p.width), experts(p.num_experts) {
    sy::cuda::check(cudaStreamSynchronize(s), "cudaStreamSynchronize(device_plan)");
  }
  [[nodiscard]] sy::routing::plan_view<const std::int32_t, const float> view() const {
    return {sy::make_view<const std::int32_t>(ids.data(), tokens, width),
            sy::make_view<const float>(weights.data(), tokens, width),
            sy::make_view<const std::int32_t>(counts.data(), tokens), experts};
  }
};

//! Expert gradients [E, P, d], [E, P], [E, d, d_ff], [E, d] in device memory, set to
//! `start` (non-zero: backward accumulates, so a missing += shows).
struct device_expert_grads {
  index_t e, p, d, f;
  device_output<float> w1, b1, w2, b2;
  device_expert_grads(index_t e_, index_t p_, index_t d_, index_t f_, cudaStream_t s)
      : e(e_), p(p_), d(d_), f(f_),
        w1(static_cast<std::size_t>(e * p * d), s), b1(static_cast<std::size_t>(e * p), s),
        w2(static_cast<std::size_t>(e * d * f), s), b2(static_cast<std::size_t>(e * d), s) {}
  [[nodiscard]] sy::expert_grads view() const {
    return {w1.view(e, p, d), b1.view(e, p), w2.view(e, d, f), b2.view(e, d)};
  }
};

}  // namespace switchyard::test::gpu
