// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file concepts.hpp
//! What an activation policy must provide, as a concept, and `check_activation<F>()`, which
//! states each missing piece in one sentence.

#include <concepts>
#include <type_traits>

#include "switchyard/activation/functors.hpp"
#include "switchyard/routing/concepts.hpp"

namespace switchyard {

namespace detail {
template <class F>
concept plain_activation_ops = requires(const F& f, float h) {
  { f(h) } -> std::convertible_to<float>;
  { f.derivative(h) } -> std::convertible_to<float>;
};

template <class F>
concept gated_activation_ops = requires(const F& f, float g, float u, float& dg, float& du) {
  { f(g, u) } -> std::convertible_to<float>;
  f.backward(g, u, g, dg, du);
};

template <class F>
concept activation_ops = (activation_traits<F>::is_gated && gated_activation_ops<F>) ||
                         (!activation_traits<F>::is_gated && plain_activation_ops<F>);
}  // namespace detail

//! An expert-FFN activation: declares `policy_kind = activation_tag`; plain ones have
//! `float operator()(float)` and `float derivative(float)`, gated ones (per
//! `activation_traits<F>::is_gated`) `float operator()(float gate, float up)` and
//! `void backward(gate, up, d_out, float& d_gate, float& d_up)`; trivially copyable.
template <class F>
concept Activation = detail::declares_kind<F, activation_tag> && detail::activation_ops<F> &&
                     std::is_trivially_copyable_v<F>;

//! One readable sentence per missing requirement of an activation.
template <class F>
consteval bool check_activation() {
  static_assert(detail::declares_kind<F, activation_tag>,
                "switchyard: an activation must declare "
                "`using policy_kind = switchyard::activation_tag;`");
  if constexpr (activation_traits<F>::is_gated) {
    static_assert(detail::gated_activation_ops<F>,
                  "switchyard: a gated activation must have `SWITCHYARD_HD float operator()("
                  "float gate, float up) const` and `SWITCHYARD_HD void backward(float gate, "
                  "float up, float d_out, float& d_gate, float& d_up) const`");
  } else {
    static_assert(detail::plain_activation_ops<F>,
                  "switchyard: an activation must have `SWITCHYARD_HD float operator()(float) "
                  "const` and `SWITCHYARD_HD float derivative(float) const`");
  }
  static_assert(std::is_trivially_copyable_v<F>,
                "switchyard: an activation must be trivially copyable (it is passed to CUDA "
                "kernels by value)");
  return true;
}

static_assert(check_activation<activation::relu>());
static_assert(check_activation<activation::gelu>());
static_assert(check_activation<activation::gelu_tanh>());
static_assert(check_activation<activation::silu>());
static_assert(check_activation<activation::swiglu>());
static_assert(check_activation<activation::geglu>());
static_assert(check_activation<activation::clamped_swiglu>());
static_assert(check_activation<activation::gpt_oss_swiglu>());

}  // namespace switchyard
