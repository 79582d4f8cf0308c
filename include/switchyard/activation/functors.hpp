// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file functors.hpp
//! The expert FFN's activations as `__host__ __device__` functors, each with its derivative
//! next to it. Plain activations map one pre-activation to one value: `f(h)`,
//! `f.derivative(h)`. Gated ones (SwiGLU, GeGLU) map a (gate, up) pair from the fused
//! `[gate | up]` projection to `act(gate) · up` and give both partial derivatives through
//! `f.backward(gate, up, d_out, d_gate, d_up)`; the clamped ones (DeepSeek-V4, gpt-oss) carry
//! their limit as a member. Whether an activation is gated is a trait,
//! `activation_traits<F>::is_gated` (outside the functor, as Eigen's `functor_traits`).
//!
//! All math is float; erf/tanh/exp are the C library's (CUDA's device versions on the GPU).

#include <cmath>

#include "switchyard/core/config.hpp"
#include "switchyard/routing/concepts.hpp"

namespace switchyard::detail {

//! min(v, hi) as PyTorch's `clamp(max=hi)`: a NaN v stays NaN.
SWITCHYARD_HD inline float clip_above(float v, float hi) { return v > hi ? hi : v; }
//! clamp(v, lo, hi) as PyTorch's: a NaN v stays NaN.
SWITCHYARD_HD inline float clip(float v, float lo, float hi) {
  return v > hi ? hi : (v < lo ? lo : v);
}

}  // namespace switchyard::detail

namespace switchyard::activation {

//! ReLU: max(h, 0); derivative 1 for h > 0, else 0 (the subgradient at 0 is 0, as PyTorch).
struct relu {
  using policy_kind = activation_tag;
  //! Activation value.
  SWITCHYARD_HD float operator()(float h) const { return h > 0.0f ? h : 0.0f; }
  //! d relu / dh.
  SWITCHYARD_HD float derivative(float h) const { return h > 0.0f ? 1.0f : 0.0f; }
};

//! GELU, exact erf form: h · Φ(h) = ½ h (1 + erf(h / √2)) (PyTorch's default `gelu`).
struct gelu {
  using policy_kind = activation_tag;
  //! Activation value.
  SWITCHYARD_HD float operator()(float h) const {
    return 0.5f * h * (1.0f + erff(h * 0.70710678118654752f));
  }
  //! Φ(h) + h · φ(h).
  SWITCHYARD_HD float derivative(float h) const {
    const float cdf = 0.5f * (1.0f + erff(h * 0.70710678118654752f));
    const float pdf = 0.39894228040143268f * expf(-0.5f * h * h);
    return cdf + h * pdf;
  }
};

//! GELU, tanh approximation: ½ h (1 + tanh(√(2/π) (h + 0.044715 h³))) (`approximate="tanh"`,
//! GPT-2's `gelu_new`).
struct gelu_tanh {
  using policy_kind = activation_tag;
  //! Activation value.
  SWITCHYARD_HD float operator()(float h) const {
    const float u = 0.79788456080286536f * (h + 0.044715f * h * h * h);
    return 0.5f * h * (1.0f + tanhf(u));
  }
  //! ½(1 + tanh u) + ½ h (1 − tanh² u) · √(2/π)(1 + 3·0.044715 h²).
  SWITCHYARD_HD float derivative(float h) const {
    const float u = 0.79788456080286536f * (h + 0.044715f * h * h * h);
    const float th = tanhf(u);
    const float du = 0.79788456080286536f * (1.0f + 0.134145f * h * h);
    return 0.5f * (1.0f + th) + 0.5f * h * (1.0f - th * th) * du;
  }
};

//! SiLU (swish): h · σ(h).
struct silu {
  using policy_kind = activation_tag;
  //! Activation value.
  SWITCHYARD_HD float operator()(float h) const { return h / (1.0f + expf(-h)); }
  //! σ(h) (1 + h (1 − σ(h))).
  SWITCHYARD_HD float derivative(float h) const {
    const float s = 1.0f / (1.0f + expf(-h));
    return s * (1.0f + h * (1.0f - s));
  }
};

//! Gated FFN activation act(gate) · up over the fused `[gate | up]` projection.
template <class Act>
struct gated {
  using policy_kind = activation_tag;
  Act act{};  //!< the activation applied to the gate half

  //! act(gate) · up.
  SWITCHYARD_HD float operator()(float gate, float up) const { return act(gate) * up; }
  //! d_gate = d_out · up · act'(gate), d_up = d_out · act(gate).
  SWITCHYARD_HD void backward(float gate, float up, float d_out, float& d_gate,
                              float& d_up) const {
    d_gate = d_out * up * act.derivative(gate);
    d_up = d_out * act(gate);
  }
};

//! SwiGLU (LLaMA, Mixtral, Qwen-MoE): silu(gate) · up.
struct swiglu : gated<silu> {};
//! GeGLU (Shazeer 2020): gelu(gate) · up with the exact erf GELU.
struct geglu : gated<gelu> {};

//! Clamped SwiGLU (DeepSeek-V4): `silu(min(gate, limit)) · clamp(up, −limit, limit)`.
//! The clamps pass no gradient where they clip, as PyTorch's clamp: d_gate flows where
//! gate <= limit, d_up where −limit <= up <= limit (both bounds inclusive). NaN propagates.
struct clamped_swiglu {
  using policy_kind = activation_tag;
  float limit = 7.0f;  //!< clamp bound (> 0)

  //! silu(min(gate, limit)) · clamp(up, −limit, limit).
  SWITCHYARD_HD float operator()(float gate, float up) const {
    return silu{}(detail::clip_above(gate, limit)) * detail::clip(up, -limit, limit);
  }
  //! d_gate = d_out · u · silu'(g) where gate <= limit (else 0), d_up = d_out · silu(g) where
  //! −limit <= up <= limit (else 0), with g, u the clamped values.
  SWITCHYARD_HD void backward(float gate, float up, float d_out, float& d_gate,
                              float& d_up) const {
    const float g = detail::clip_above(gate, limit), u = detail::clip(up, -limit, limit);
    d_gate = gate <= limit ? d_out * u * silu{}.derivative(g) : 0.0f;
    d_up = (up >= -limit && up <= limit) ? d_out * silu{}(g) : 0.0f;
  }
};

//! gpt-oss's SwiGLU: `g = min(gate, limit)`, `u = clamp(up, −limit, limit)`,
//! `(u + 1) · g · σ(alpha · g)`. The clamps pass no gradient where they clip (as
//! clamped_swiglu).
struct gpt_oss_swiglu {
  using policy_kind = activation_tag;
  float limit = 7.0f;   //!< clamp bound (> 0)
  float alpha = 1.702f;  //!< sigmoid slope

  //! (u + 1) · g · σ(alpha · g).
  SWITCHYARD_HD float operator()(float gate, float up) const {
    const float g = detail::clip_above(gate, limit), u = detail::clip(up, -limit, limit);
    return (u + 1.0f) * (g / (1.0f + expf(-alpha * g)));
  }
  //! d_gate = d_out · (u + 1) · σ(αg) (1 + αg (1 − σ(αg))) where gate <= limit (else 0),
  //! d_up = d_out · g · σ(αg) where −limit <= up <= limit (else 0).
  SWITCHYARD_HD void backward(float gate, float up, float d_out, float& d_gate,
                              float& d_up) const {
    const float g = detail::clip_above(gate, limit), u = detail::clip(up, -limit, limit);
    const float s = 1.0f / (1.0f + expf(-alpha * g));
    d_gate = gate <= limit ? d_out * (u + 1.0f) * s * (1.0f + alpha * g * (1.0f - s)) : 0.0f;
    d_up = (up >= -limit && up <= limit) ? d_out * g * s : 0.0f;
  }
};

}  // namespace switchyard::activation

namespace switchyard {

//! Properties of an activation that the expert FFN needs. Specialise it for a user-defined
//! gated activation (or give the functor `static constexpr bool is_gated = true;`).
template <class F>
struct activation_traits {
  //! True when the FFN's first projection is the fused `[gate | up]` of width 2·d_ff.
  static constexpr bool is_gated = [] {
    if constexpr (requires { F::is_gated; }) return static_cast<bool>(F::is_gated);
    else return false;
  }();
};

template <class Act>
struct activation_traits<activation::gated<Act>> {
  static constexpr bool is_gated = true;  //!< act(gate) · up
};
template <>
struct activation_traits<activation::swiglu> {
  static constexpr bool is_gated = true;  //!< silu(gate) · up
};
template <>
struct activation_traits<activation::geglu> {
  static constexpr bool is_gated = true;  //!< gelu(gate) · up
};
template <>
struct activation_traits<activation::clamped_swiglu> {
  static constexpr bool is_gated = true;  //!< silu(min(gate, limit)) · clamp(up, ±limit)
};
template <>
struct activation_traits<activation::gpt_oss_swiglu> {
  static constexpr bool is_gated = true;  //!< (u + 1) · g · σ(alpha · g)
};

}  // namespace switchyard
