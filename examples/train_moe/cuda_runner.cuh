// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file cuda_runner.cuh
//! The GPU layer runner of `examples/train_moe` (trainer.hpp's runner seam): every MoE
//! layer's forward and backward run on the CUDA backend, while the rest of the model (the
//! embedding, the head, the optimizer) stays on the host. It keeps `host_runner`'s contract:
//! the trainer hands it HOST views, and it
//! - forward: uploads x and the layer's current parameters (they change every optimizer
//!   step), runs `MoELayer::forward` on its stream into a device state (plan, losses,
//!   dropped), downloads y, and downloads the plan and the losses into a host copy that
//!   `plan(state)` / `losses(state)` return;
//! - backward: uploads x, the parameters and dy, zeroes its device gradient buffers, runs
//!   `MoELayer::backward` on the device state of the forward, downloads dx and every
//!   gradient and ADDS them (+=) into the host views, as the contract says.
//! Each layer's device buffers and its two workspaces (`workspace_size`,
//! `backward_workspace_size`) are allocated on first use and grown, never shrunk.
//!
//! Routers: those whose parameters mirror as plain arrays — TopK, TopP and AdaptiveGating
//! (`routing::linear_router_params`) and DynMoE (`routing::dynmoe_params`), without an
//! add-on. Any other layer is a compile-time error (`cuda_runner::supports<Layer>` says which
//! are run; `train_cuda` dispatches a config by router name over them).
//!
//! Determinism: the CUDA backend is bitwise reproducible run to run on one GPU (docs/cuda.md),
//! and so is a training run through this runner; it is not bitwise the host's run (cuBLAS
//! sums in its own order), see tests/cuda/test_training.cu for the tolerance.

#include <switchyard/backend/cuda.cuh>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "trainer.hpp"

namespace train_moe {

namespace cuda_detail {

//! A device buffer that grows to the largest size asked for and keeps its allocation.
template <class T>
struct device_buffer {
  sy::cuda::device_array<T> array;
  std::size_t used = 0;  //!< elements of the current use

  //! At least `n` elements (contents undefined); returns the device pointer.
  T* reserve(std::size_t n, cudaStream_t stream) {
    if (array.size() < n || array.data() == nullptr)
      array = sy::cuda::device_array<T>(std::max<std::size_t>(n, 1), stream);
    used = n;
    return array.data();
  }
  //! Copies `n` elements from host memory (stream-ordered; pageable sources are staged).
  T* upload(const T* host, std::size_t n, cudaStream_t stream) {
    T* p = reserve(n, stream);
    if (n != 0)
      sy::cuda::check(cudaMemcpyAsync(p, host, n * sizeof(T), cudaMemcpyHostToDevice, stream),
                      "cudaMemcpyAsync(cuda_runner upload)");
    return p;
  }
  //! `n` zero elements.
  T* zeros(std::size_t n, cudaStream_t stream) {
    T* p = reserve(n, stream);
    if (n != 0)
      sy::cuda::check(cudaMemsetAsync(p, 0, n * sizeof(T), stream), "cudaMemsetAsync(cuda_runner)");
    return p;
  }
  //! Enqueues a copy of the first `used` elements into `host` (synchronise before reading).
  void download(T* host, cudaStream_t stream) const {
    if (used != 0)
      sy::cuda::check(cudaMemcpyAsync(host, array.data(), used * sizeof(T), cudaMemcpyDeviceToHost, stream),
                      "cudaMemcpyAsync(cuda_runner download)");
  }
  [[nodiscard]] sy::span<T> span() const { return {array.data(), used}; }
};

//! Elements a view spans (0 for an absent view).
template <class V>
std::size_t span_size(const V& v) {
  return sy::detail::present(v) ? static_cast<std::size_t>(v.mapping().required_span_size()) : 0;
}

//! The runner adds gradients back element by element over the view's span: the host views
//! must cover it exactly (the trainer's are contiguous).
template <class V>
void require_exhaustive(const V& v, const char* what) {
  if (sy::detail::present(v) && !v.mapping().is_exhaustive())
    throw std::invalid_argument(std::string("train_moe::cuda_runner: ") + what +
                                ": the host view must be contiguous (exhaustive)");
}

//! A device copy of the host view `v` in `buf`: same extents and strides; absent stays absent.
template <class T, class Ext, class Acc>
::cuda::std::mdspan<T, Ext, ::cuda::std::layout_stride, Acc> upload(
    device_buffer<std::remove_const_t<T>>& buf,
    const ::cuda::std::mdspan<T, Ext, ::cuda::std::layout_stride, Acc>& v, cudaStream_t stream) {
  using M = ::cuda::std::mdspan<T, Ext, ::cuda::std::layout_stride, Acc>;
  if (!sy::detail::present(v)) return v;
  return M(buf.upload(v.data_handle(), span_size(v), stream), v.mapping());
}

//! A zeroed device gradient buffer shaped like the host view `v` (absent stays absent).
template <class Ext, class Acc>
::cuda::std::mdspan<float, Ext, ::cuda::std::layout_stride, Acc> zeroed(
    device_buffer<float>& buf, const ::cuda::std::mdspan<float, Ext, ::cuda::std::layout_stride, Acc>& v,
    cudaStream_t stream, const char* what) {
  using M = ::cuda::std::mdspan<float, Ext, ::cuda::std::layout_stride, Acc>;
  if (!sy::detail::present(v)) {
    buf.used = 0;
    return v;
  }
  require_exhaustive(v, what);
  return M(buf.zeros(span_size(v), stream), v.mapping());
}

//! Adds the downloaded gradient `from` into the host view `v` (+=, the contract).
template <class Ext, class Acc>
void add_into(const ::cuda::std::mdspan<float, Ext, ::cuda::std::layout_stride, Acc>& v,
              const std::vector<float>& from) {
  if (!sy::detail::present(v)) return;
  float* p = v.data_handle();
  for (std::size_t i = 0; i < from.size(); ++i) p[i] += from[i];
}

//! TopK, TopP, AdaptiveGating: `w` [E, d] and the optional per-token knobs.
template <class Layer>
inline constexpr bool linear_routed =
    std::is_same_v<typename Layer::router_type, sy::routers::TopK> ||
    std::is_same_v<typename Layer::router_type, sy::routers::TopP> ||
    std::is_same_v<typename Layer::router_type, sy::routers::AdaptiveGating>;
//! DynMoE: `w_gate` [d, E_max], thresholds, the mask.
template <class Layer>
inline constexpr bool dynmoe_routed = std::is_same_v<typename Layer::router_type, sy::routers::DynMoE>;

}  // namespace cuda_detail

//! What `cuda_runner` keeps per MoE layer: the stream it allocated on (kept alive by the
//! shared context), device copies of the inputs, parameters and gradients, the device
//! forward state and its host copy.
template <class Layer>
struct cuda_layer_state {
  static_assert((cuda_detail::linear_routed<Layer> || cuda_detail::dynmoe_routed<Layer>) &&
                    !Layer::has_addon,
                "train_moe::cuda_runner runs TopK, TopP, AdaptiveGating (linear_router_params) "
                "and DynMoE layers without an add-on; run this router with train_moe::host_runner");
  using losses_type = typename Layer::losses_type;
  template <class T>
  using buffer = cuda_detail::device_buffer<T>;

  std::shared_ptr<sy::cuda::stream_context> gpu;  //!< the stream the buffers live on (first member)
  buffer<float> x, y, dy, dx;
  buffer<float> w[4], gw[4];                      //!< w1, b1, w2, b2 and their gradients
  buffer<float> rp[2], rg[2];                     //!< router params (w / w_gate, thresholds or token_threshold), grads
  buffer<std::int32_t> rp_int;                    //!< token_max_k / experts_mask
  // the device forward state
  buffer<std::int32_t> ids, counts;
  buffer<float> weights, logits, probs;
  buffer<losses_type> losses;
  buffer<sy::index_t> dropped;
  buffer<std::byte> forward_ws, backward_ws;
  //! The last forward's plan, losses and drop counts, downloaded.
  sy::moe_result<losses_type> host;

  // `gpu` is the first member: destroyed last, the stream outlives every buffer freed on it.
};

//! Runs each MoE layer on the GPU (file comment). Copyable: copies share one
//! `cuda::stream_context` (its stream, cuBLAS handle and pinned scratch), made on the first
//! forward, so a runner can be built on a machine without a GPU.
struct cuda_runner {
  template <class Layer>
  using state = cuda_layer_state<Layer>;

  //! Whether this runner runs `Layer` (false: `state<Layer>` is a compile-time error).
  template <class Layer>
  static constexpr bool supports =
      (cuda_detail::linear_routed<Layer> || cuda_detail::dynmoe_routed<Layer>) && !Layer::has_addon;

  std::shared_ptr<sy::cuda::stream_context> gpu;

  //! The shared stream context (created on first use).
  sy::cuda::stream_context& context() {
    if (!gpu) gpu = std::make_shared<sy::cuda::stream_context>();
    return *gpu;
  }

  template <class Layer>
  void forward(const Layer& layer, state<Layer>& s, sy::matrix_view<const float> x,
               const typename Layer::router_params& rp, const sy::expert_weights<float>& w,
               sy::matrix_view<float> y, const typename Layer::addon_params& ap) {
    bind(s);
    const cudaStream_t st = s.gpu->stream();
    const sy::index_t T = x.extent(0), d = x.extent(1);
    cuda_detail::require_exhaustive(y, "y");
    const auto xd = cuda_detail::upload(s.x, x, st);
    const auto rpd = upload_params(s, rp);
    const auto wd = upload_weights(s, w);
    const auto yd = sy::make_view(s.y.reserve(static_cast<std::size_t>(T * d), st), T, d);
    const sy::index_t width = layer.router.width(rp), E = layer.routed_experts(w);
    const auto n = sy::routing::plan_ref::required(T, width, E);
    const sy::routing::plan_ref plan{T,
                                     width,
                                     E,
                                     span_of(s.ids, n.slots, st),
                                     span_of(s.weights, n.slots, st),
                                     span_of(s.counts, n.tokens, st),
                                     span_of(s.logits, n.scores, st),
                                     span_of(s.probs, n.scores, st)};
    s.losses.reserve(1, st);
    const typename Layer::state_type state{plan, s.losses.array.data(), span_of(s.dropped, static_cast<sy::index_t>(w.num_experts()), st)};
    const std::size_t bytes = layer.workspace_size(s.gpu->get(), T, rpd, wd, ap);
    if (s.forward_ws.array.size() < bytes) s.forward_ws.reserve(bytes, st);
    const sy::span<std::byte> ws{s.forward_ws.array.data(), s.forward_ws.array.size()};
    layer.forward(s.gpu->get(), xd, rpd, wd, yd, state, ws, ap);
    sy::cuda::check_status(s.gpu->get(), ws);
    // y and the state back to the host
    s.host.resize(T, width, E);  // no expert kinds: E = w.num_experts() = dropped's size
    s.y.download(y.data_handle(), st);
    s.ids.download(s.host.plan.expert_ids.data(), st);
    s.weights.download(s.host.plan.weights.data(), st);
    s.counts.download(s.host.plan.counts.data(), st);
    s.logits.download(s.host.plan.logits.data(), st);
    s.probs.download(s.host.plan.probs.data(), st);
    s.losses.download(&s.host.losses, st);
    s.dropped.download(s.host.dropped.data(), st);
    s.gpu->synchronize();
  }

  template <class Layer>
  sy::routing::plan_ref plan(state<Layer>& s) const {
    return s.host.plan.ref();
  }
  template <class Layer>
  const typename Layer::losses_type& losses(const state<Layer>& s) const {
    return s.host.losses;
  }

  template <class Layer>
  void backward(const Layer& layer, state<Layer>& s, sy::matrix_view<const float> x,
                const typename Layer::router_params& rp, const sy::expert_weights<float>& w,
                sy::matrix_view<const float> dy, const typename Layer::losses_type& coeffs,
                sy::matrix_view<float> dx, const sy::expert_grads& grads,
                const typename Layer::router_grads& rgrads,
                const typename Layer::addon_params& ap, const typename Layer::addon_grads& ag) {
    if (!s.gpu || s.host.plan.num_tokens != x.extent(0))
      throw std::logic_error("train_moe::cuda_runner: backward without its forward on this state");
    const cudaStream_t st = s.gpu->stream();
    const sy::index_t T = x.extent(0);
    const auto xd = cuda_detail::upload(s.x, x, st);
    const auto dyd = cuda_detail::upload(s.dy, dy, st);
    const auto rpd = upload_params(s, rp);
    const auto wd = upload_weights(s, w);
    const auto dxd = cuda_detail::zeroed(s.dx, dx, st, "dx");
    const sy::expert_grads gd{cuda_detail::zeroed(s.gw[0], grads.w1, st, "grads.w1"),
                              cuda_detail::zeroed(s.gw[1], grads.b1, st, "grads.b1"),
                              cuda_detail::zeroed(s.gw[2], grads.w2, st, "grads.w2"),
                              cuda_detail::zeroed(s.gw[3], grads.b2, st, "grads.b2")};
    if (sy::detail::present(grads.shared.w1) || sy::detail::present(grads.constant.v))
      throw std::invalid_argument("train_moe::cuda_runner: shared and constant experts are not mirrored");
    typename Layer::router_grads rgd{};
    if constexpr (cuda_detail::linear_routed<Layer>) {
      rgd.w = cuda_detail::zeroed(s.rg[0], rgrads.w, st, "rgrads.w");
    } else {
      rgd.w_gate = cuda_detail::zeroed(s.rg[0], rgrads.w_gate, st, "rgrads.w_gate");
      rgd.thresholds = cuda_detail::zeroed(s.rg[1], rgrads.thresholds, st, "rgrads.thresholds");
    }
    const typename Layer::state_type state{
        sy::routing::plan_ref{T, s.host.plan.width, s.host.plan.num_experts, s.ids.span(),
                              s.weights.span(), s.counts.span(), s.logits.span(), s.probs.span()},
        s.losses.array.data(), s.dropped.span()};
    const std::size_t bytes = layer.backward_workspace_size(s.gpu->get(), T, rpd, wd, ap);
    if (s.backward_ws.array.size() < bytes) s.backward_ws.reserve(bytes, st);
    const sy::span<std::byte> ws{s.backward_ws.array.data(), s.backward_ws.array.size()};
    layer.backward(s.gpu->get(), xd, rpd, wd, state, dyd, coeffs, dxd, gd, rgd, ws, ap, ag);
    sy::cuda::check_status(s.gpu->get(), ws);
    // download every gradient, then add it into the host views
    std::vector<std::vector<float>> got;
    auto fetch = [&](cuda_detail::device_buffer<float>& b) {
      got.emplace_back(b.used);
      b.download(got.back().data(), st);
    };
    fetch(s.dx);
    for (auto& b : s.gw) fetch(b);
    fetch(s.rg[0]);
    fetch(s.rg[1]);
    s.gpu->synchronize();
    cuda_detail::add_into(dx, got[0]);
    cuda_detail::add_into(grads.w1, got[1]);
    cuda_detail::add_into(grads.b1, got[2]);
    cuda_detail::add_into(grads.w2, got[3]);
    cuda_detail::add_into(grads.b2, got[4]);
    if constexpr (cuda_detail::linear_routed<Layer>) {
      cuda_detail::add_into(rgrads.w, got[5]);
    } else {
      cuda_detail::add_into(rgrads.w_gate, got[5]);
      cuda_detail::add_into(rgrads.thresholds, got[6]);
    }
    (void)ag;  // no add-on (static_assert in the state)
  }

 private:
  template <class Layer>
  void bind(state<Layer>& s) {
    if (s.gpu) return;
    context();
    s.gpu = gpu;
  }

  template <class T>
  static sy::span<T> span_of(cuda_detail::device_buffer<T>& b, sy::index_t n, cudaStream_t st) {
    return {b.reserve(static_cast<std::size_t>(n), st), static_cast<std::size_t>(n)};
  }

  template <class Layer>
  static typename Layer::router_params upload_params(state<Layer>& s, const typename Layer::router_params& rp) {
    const cudaStream_t st = s.gpu->stream();
    typename Layer::router_params d = rp;
    if constexpr (cuda_detail::linear_routed<Layer>) {
      d.w = cuda_detail::upload(s.rp[0], rp.w, st);
      d.token_threshold = cuda_detail::upload(s.rp[1], rp.token_threshold, st);
      d.token_max_k = cuda_detail::upload(s.rp_int, rp.token_max_k, st);
    } else {
      d.w_gate = cuda_detail::upload(s.rp[0], rp.w_gate, st);
      d.thresholds = cuda_detail::upload(s.rp[1], rp.thresholds, st);
      d.experts_mask = cuda_detail::upload(s.rp_int, rp.experts_mask, st);
    }
    return d;
  }

  template <class Layer>
  static sy::expert_weights<float> upload_weights(state<Layer>& s, const sy::expert_weights<float>& w) {
    if (sy::detail::present(w.shared.w1) || sy::detail::present(w.constant.v))
      throw std::invalid_argument("train_moe::cuda_runner: shared and constant experts are not mirrored");
    const cudaStream_t st = s.gpu->stream();
    return {cuda_detail::upload(s.w[0], w.w1, st), cuda_detail::upload(s.w[1], w.b1, st),
            cuda_detail::upload(s.w[2], w.w2, st), cuda_detail::upload(s.w[3], w.b2, st)};
  }
};

//! Trains `cfg.router` with every MoE layer on the GPU (`runner` shares its stream context
//! with its copies): topk, topp, adaptive, dynmoe. Throws std::invalid_argument for a router
//! the runner does not run (train_moe::train runs every router on the host).
inline run_result train_cuda(const config& cfg, cuda_runner runner = {}) {
  const std::string& r = cfg.router;
  if (r == "topk") return trainer<topk_layer, cuda_runner>(cfg, runner).run();
  if (r == "topp") return trainer<topp_layer, cuda_runner>(cfg, runner).run();
  if (r == "adaptive") return trainer<adaptive_layer, cuda_runner>(cfg, runner).run();
  if (r == "dynmoe") return trainer<dynmoe_layer, cuda_runner>(cfg, runner).run();
  throw std::invalid_argument("train_moe::train_cuda: router '" + r +
                              "' does not run on the GPU runner (topk, topp, adaptive, dynmoe)");
}

//! The routers `train_cuda` runs, in the example's order.
inline const std::vector<std::string>& cuda_router_names() {
  static const std::vector<std::string> names{"topk", "topp", "dynmoe", "adaptive"};
  return names;
}

}  // namespace train_moe
