// SPDX-License-Identifier: Apache-2.0
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
//! | `switchyard::cuda::context`  | `switchyard/backend/cuda.cuh`          | nvcc (C++20)  |
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
                "switchyard: no backend executes this execution context in this translation "
                "unit: include \"switchyard/backend/host.hpp\" (or switchyard/switchyard.hpp) "
                "for switchyard::host_context; another context needs its backend's header, "
                "which specialises switchyard::backend::executor (docs/design.md, "
                "execution-context seam)");
  // Stand-ins so that the sentence above is the only diagnostic (never run).
  template <class... A> static void forward(const A&...) {}
  template <class... A> static void backward(const A&...) {}
  template <class... A> static void forward_experts(const A&...) {}
  template <class... A> static void backward_experts(const A&...) {}
  template <class... A> static unsigned long forward_workspace_size(const A&...) { return 0; }
  template <class... A> static unsigned long backward_workspace_size(const A&...) { return 0; }
  template <class... A> static unsigned long experts_workspace_size(const A&...) { return 0; }
  template <class... A> static unsigned long experts_backward_workspace_size(const A&...) { return 0; }
};

//! True when Context has a backend included in this translation unit.
template <class Context>
concept has_executor = requires { executor<Context>::is_backend; };

}  // namespace backend
}  // namespace switchyard
