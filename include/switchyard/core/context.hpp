#pragma once
//! \file context.hpp
//! Execution contexts and the seam between a layer and its backends.
//!
//! A layer (`MoELayer`) says *what* is computed; an execution context says *where* and a
//! backend says *how*. Every entry point of the layer takes a context first; the context's
//! type selects `backend::executor<Context>`, a class template each backend specialises in
//! its own header:
//!
//! | context                      | header of its executor                 | compiler      |
//! |------------------------------|----------------------------------------|---------------|
//! | `switchyard::host_context`   | `switchyard/backend/host.hpp`          | any C++20     |
//! | `switchyard::cuda::context`  | `switchyard/backend/cuda/layer.cuh`    | nvcc (C++20)  |
//!
//! (`switchyard/switchyard.hpp` includes the host backend.) Headers under core/, routing/,
//! dispatch/, activation/ and layer/ never include a backend: the dependency points from the
//! backends to the policies, never back.

namespace switchyard {

//! The host execution context: plain C++20, OpenMP threads and (when linked) a CBLAS. It
//! holds nothing; the thread count is OpenMP's and never changes a result's bits.
struct host_context {};

namespace backend {

template <class Context>
inline constexpr bool no_executor_for = false;

//! The backend that runs a layer under `Context`. Each backend specialises it:
//! `template <> struct executor<host_context>` lives in backend/host/layer.hpp. This primary
//! template is what a context without an included backend reaches.
template <class Context>
struct executor {
  static_assert(no_executor_for<Context>,
                "switchyard: no backend executes this execution context: include "
                "\"switchyard/backend/host.hpp\" (or switchyard/switchyard.hpp) for "
                "switchyard::host_context, or \"switchyard/backend/cuda/layer.cuh\" from a .cu "
                "file for switchyard::cuda::context");
};

//! True when Context has a backend included in this translation unit.
template <class Context>
concept has_executor = requires { executor<Context>::is_backend; };

}  // namespace backend
}  // namespace switchyard
