// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file element_type.hpp
//! Storage element types: float, half (IEEE binary16) and bfloat16. All math runs in float;
//! these types only store. They are bit-compatible with CUDA's `__half` and `__nv_bfloat16`
//! (same size, same bits), so device buffers of either can be viewed as Switchyard types,
//! and they need no CUDA header, so the host backend compiles with plain g++ or clang++.

#include <bit>
#include <cstdint>
#include <type_traits>

#include "switchyard/core/config.hpp"

namespace switchyard {

namespace detail {

SWITCHYARD_HD SWITCHYARD_FORCEINLINE std::uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  return std::bit_cast<std::uint32_t>(f);
#endif
}

SWITCHYARD_HD SWITCHYARD_FORCEINLINE float bits_float(std::uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  return std::bit_cast<float>(u);
#endif
}

//! float -> binary16 bits, round to nearest even, overflow to Inf, NaN kept quiet.
SWITCHYARD_HD inline std::uint16_t float_to_half_bits(float f) {
  const std::uint32_t x = float_bits(f);
  const std::uint32_t sign = (x >> 16) & 0x8000u;
  const std::uint32_t exp = (x >> 23) & 0xffu;
  std::uint32_t mant = x & 0x7fffffu;
  if (exp == 0xffu) {  // Inf or NaN
    return static_cast<std::uint16_t>(sign | 0x7c00u | (mant ? 0x200u | (mant >> 13) : 0u));
  }
  const int e = static_cast<int>(exp) - 127 + 15;
  if (e >= 31) return static_cast<std::uint16_t>(sign | 0x7c00u);  // overflow -> Inf
  if (e <= 0) {                                                     // subnormal or zero
    if (e < -10) return static_cast<std::uint16_t>(sign);
    mant |= 0x800000u;
    const int shift = 14 - e;
    std::uint32_t half_mant = mant >> shift;
    const std::uint32_t rem = mant & ((1u << shift) - 1u);
    const std::uint32_t halfway = 1u << (shift - 1);
    if (rem > halfway || (rem == halfway && (half_mant & 1u))) ++half_mant;
    return static_cast<std::uint16_t>(sign | half_mant);
  }
  std::uint32_t h = sign | (static_cast<std::uint32_t>(e) << 10) | (mant >> 13);
  const std::uint32_t rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // may carry into the exponent: correct
  return static_cast<std::uint16_t>(h);
}

//! binary16 bits -> float (exact).
SWITCHYARD_HD inline float half_bits_to_float(std::uint16_t h) {
  const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  std::uint32_t mant = h & 0x3ffu;
  if (exp == 0x1fu) return bits_float(sign | 0x7f800000u | (mant << 13));
  if (exp == 0) {
    if (mant == 0) return bits_float(sign);
    int e = -1;
    do {
      ++e;
      mant <<= 1;
    } while ((mant & 0x400u) == 0);
    return bits_float(sign | (static_cast<std::uint32_t>(127 - 15 - e) << 23) |
                      ((mant & 0x3ffu) << 13));
  }
  return bits_float(sign | ((exp + 127 - 15) << 23) | (mant << 13));
}

//! float -> bfloat16 bits, round to nearest even, NaN kept quiet.
SWITCHYARD_HD inline std::uint16_t float_to_bfloat16_bits(float f) {
  const std::uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((x >> 16) | 0x40u);
  const std::uint32_t rounding = 0x7fffu + ((x >> 16) & 1u);
  return static_cast<std::uint16_t>((x + rounding) >> 16);
}

SWITCHYARD_HD SWITCHYARD_FORCEINLINE float bfloat16_bits_to_float(std::uint16_t b) {
  return bits_float(static_cast<std::uint32_t>(b) << 16);
}

}  // namespace detail

//! IEEE binary16 storage type; converts to and from float with round-to-nearest-even.
struct half {
  std::uint16_t bits = 0;
  half() = default;
  SWITCHYARD_HD explicit half(float f) : bits(detail::float_to_half_bits(f)) {}
  SWITCHYARD_HD explicit operator float() const { return detail::half_bits_to_float(bits); }
  SWITCHYARD_HD static half from_bits(std::uint16_t b) {
    half h;
    h.bits = b;
    return h;
  }
};

//! bfloat16 storage type; converts to and from float with round-to-nearest-even.
struct bfloat16 {
  std::uint16_t bits = 0;
  bfloat16() = default;
  SWITCHYARD_HD explicit bfloat16(float f) : bits(detail::float_to_bfloat16_bits(f)) {}
  SWITCHYARD_HD explicit operator float() const { return detail::bfloat16_bits_to_float(bits); }
  SWITCHYARD_HD static bfloat16 from_bits(std::uint16_t b) {
    bfloat16 h;
    h.bits = b;
    return h;
  }
};

static_assert(sizeof(half) == 2 && std::is_trivially_copyable_v<half>);
static_assert(sizeof(bfloat16) == 2 && std::is_trivially_copyable_v<bfloat16>);

//! The element types a layer may store tokens and weights in.
template <class T>
concept ElementType =
    std::is_same_v<T, float> || std::is_same_v<T, half> || std::is_same_v<T, bfloat16>;

//! Loads a stored element as float (the accumulation type).
template <ElementType T>
SWITCHYARD_HD SWITCHYARD_FORCEINLINE float to_float(T v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return static_cast<float>(v);
  }
}

//! Rounds a float to a storage element type.
template <ElementType T>
SWITCHYARD_HD SWITCHYARD_FORCEINLINE T from_float(float v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    return T(v);
  }
}

//! Human-readable name of an element type (for messages and test names).
template <ElementType T>
constexpr const char* element_type_name() {
  if constexpr (std::is_same_v<T, float>) return "float";
  else if constexpr (std::is_same_v<T, half>) return "half";
  else return "bfloat16";
}

//! Unit roundoff of an element type (2^-p): tests scale tolerances by it.
template <ElementType T>
constexpr double unit_roundoff() {
  if constexpr (std::is_same_v<T, float>) return 0x1p-24;
  else if constexpr (std::is_same_v<T, half>) return 0x1p-11;
  else return 0x1p-8;
}

}  // namespace switchyard
