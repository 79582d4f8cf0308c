// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file error.hpp
//! Typed exceptions. Every message names the argument, what was expected and what was received.

#include <cmath>
#include <initializer_list>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>

#include "switchyard/core/config.hpp"

namespace switchyard {

//! Base of every bad-input error: carries the name of the offending argument.
class invalid_argument : public std::invalid_argument {
 public:
  invalid_argument(std::string argument, const std::string& message)
      : std::invalid_argument(message), argument_(std::move(argument)) {}
  //! Name of the argument that was rejected (e.g. "x", "k", "params.p").
  [[nodiscard]] const std::string& argument() const noexcept { return argument_; }

 private:
  std::string argument_;
};

//! An extent or rank does not match what the other arguments imply.
class shape_error : public invalid_argument {
  using invalid_argument::invalid_argument;
};

//! A scalar parameter lies outside its documented range.
class range_error : public invalid_argument {
  using invalid_argument::invalid_argument;
};

//! Input data contains NaN or Inf where the policy forbids it.
class non_finite_error : public invalid_argument {
  using invalid_argument::invalid_argument;
};

//! A data pointer is null while its extents are non-zero.
class null_pointer_error : public invalid_argument {
  using invalid_argument::invalid_argument;
};

//! A pointer is not in the memory the execution context reads: a host pointer given to the
//! CUDA backend, memory of another device than the stream's, a misaligned array.
class memory_space_error : public invalid_argument {
  using invalid_argument::invalid_argument;
};

//! An output view overlaps an input view (or another output) in memory, e.g. `y` over `x`:
//! the layer reads its inputs while it writes its outputs, so it never computes in place.
//! `argument()` names the output, `other_argument()` the view it overlaps.
class aliasing_error : public invalid_argument {
 public:
  aliasing_error(std::string argument, std::string other, const std::string& message)
      : invalid_argument(std::move(argument), message), other_(std::move(other)) {}
  //! Name of the other argument (the input or output the first one overlaps).
  [[nodiscard]] const std::string& other_argument() const noexcept { return other_; }

 private:
  std::string other_;
};

//! A requested combination (method, parameter, dtype) is not implemented.
class unsupported_error : public std::logic_error {
  using std::logic_error::logic_error;
};

//! A CUDA runtime or library call failed.
class cuda_error : public std::runtime_error {
 public:
  cuda_error(int code, const std::string& message) : std::runtime_error(message), code_(code) {}
  //! The status code returned by the failing call (cudaError_t or cublasStatus_t value).
  [[nodiscard]] int code() const noexcept { return code_; }

 private:
  int code_;
};

//! A communication engine's call failed (MPI, NCCL), or a peer rank of a collective call
//! rejected its arguments (the engines' error agreement, parallel/comm.hpp).
class comm_error : public std::runtime_error {
 public:
  comm_error(int code, const std::string& message) : std::runtime_error(message), code_(code) {}
  //! The engine's status code (an MPI error code or an ncclResult_t value; 0 when none).
  [[nodiscard]] int code() const noexcept { return code_; }

 private:
  int code_;
};

namespace detail {

template <class... Parts>
std::string concat(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  return os.str();
}

inline std::string shape_string(std::initializer_list<index_t> dims) {
  std::ostringstream os;
  os << '[';
  bool first = true;
  for (index_t d : dims) {
    os << (first ? "" : ", ") << d;
    first = false;
  }
  os << ']';
  return os.str();
}

//! Throws shape_error unless `got == expected` for extent `dim` of `argument`.
inline void require_extent(std::string_view argument, int dim, index_t got, index_t expected,
                           std::string_view meaning = {}) {
  if (got != expected) {
    throw shape_error(std::string(argument),
                      concat(argument, ": extent ", dim, " must be ", expected,
                             meaning.empty() ? "" : " (", meaning, meaning.empty() ? "" : ")",
                             ", got ", got));
  }
}

//! Throws range_error unless lo <= value <= hi.
template <class V>
void require_in_range(std::string_view argument, V value, V lo, V hi) {
  if (!(value >= lo && value <= hi)) {
    throw range_error(std::string(argument),
                      concat(argument, " must be in [", lo, ", ", hi, "], got ", value));
  }
}

//! Throws null_pointer_error when `p` is null but the view holds elements.
inline void require_data(std::string_view argument, const void* p, index_t size) {
  if (p == nullptr && size != 0) {
    throw null_pointer_error(std::string(argument),
                             concat(argument, ": data pointer is null but the view has ", size,
                                    " elements"));
  }
}

}  // namespace detail
}  // namespace switchyard
