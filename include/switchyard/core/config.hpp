// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file config.hpp
//! Compiler requirements, the host/device annotation and the library version.

#if !defined(__cplusplus) || __cplusplus < 202002L
#  error "Switchyard requires C++20 (host and CUDA translation units alike). With CMake < 3.25.2, CUDA is silently compiled as C++17: link switchyard::switchyard or pass -std=c++20 to nvcc."
#endif

#include <cstdint>

//! Marks functions that both backends run: the host reference and the CUDA kernels.
#if defined(__CUDACC__)
#  define SWITCHYARD_HD __host__ __device__
#else
#  define SWITCHYARD_HD
#endif

//! Inline-everywhere hint for tiny per-element helpers.
#if defined(__CUDACC__)
#  define SWITCHYARD_FORCEINLINE __forceinline__
#elif defined(__GNUC__)
#  define SWITCHYARD_FORCEINLINE inline __attribute__((always_inline))
#else
#  define SWITCHYARD_FORCEINLINE inline
#endif

#define SWITCHYARD_VERSION_MAJOR 0
#define SWITCHYARD_VERSION_MINOR 1
#define SWITCHYARD_VERSION_PATCH 0

namespace switchyard {

//! The library version as a value.
struct version_info {
  int major, minor, patch;
};

//! The version of the headers being compiled.
inline constexpr version_info version{SWITCHYARD_VERSION_MAJOR, SWITCHYARD_VERSION_MINOR,
                                      SWITCHYARD_VERSION_PATCH};

//! Index type of every extent and offset: T·k·d passes 2^31 in real models.
using index_t = std::int64_t;

}  // namespace switchyard
