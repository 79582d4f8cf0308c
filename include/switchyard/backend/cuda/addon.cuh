// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file addon.cuh
//! How the CUDA backend runs an add-on module (layer/addon.hpp): through `device_addon<A>`,
//! which a backend file specialises (HyperMoE: backend/cuda/hypermoe.cuh).
//!
//! Specialisations have
//! - `static std::size_t workspace_size(const A&, index_t T, index_t d, index_t width,
//!   index_t E, const params_type&)`: device bytes forward and backward each take at most;
//! - `static void forward(const context&, const A&, const matrix_view<const T>& x,
//!   const routing::plan_view<const std::int32_t, const float>& plan, const params_type&,
//!   const matrix_view<float>& out, workspace_arena&)`: overwrites out [T, d] (device);
//! - `static void backward(const context&, const A&, x, plan, params,
//!   const matrix_view<const float>& dy, const matrix_view<float>& dx, const grads_type&,
//!   float* d_weights, workspace_arena&)`.
//! All memory is device memory; stream-ordered on ctx.stream.

#include "switchyard/backend/cuda/context.hpp"

namespace switchyard::cuda {

template <class A>
inline constexpr bool no_device_addon_for = false;

//! The device implementation of add-on A (see the file comment).
template <class A>
struct device_addon {
  static_assert(no_device_addon_for<A>,
                "switchyard: the CUDA backend has no device implementation of this add-on: "
                "specialise switchyard::cuda::device_addon<A> (docs/cuda.md, add-ons)");
};

}  // namespace switchyard::cuda
