// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file host.hpp
//! The host backend: include it (or switchyard/switchyard.hpp) to run a layer under
//! `switchyard::host_context`. Plain C++20; OpenMP and a CBLAS when linked
//! (`switchyard::host_blas` in CMake).

#include "switchyard/backend/host/experts.hpp"
#include "switchyard/backend/host/gemm.hpp"
#include "switchyard/backend/host/layer.hpp"
#include "switchyard/backend/host/route.hpp"
#include "switchyard/core/context.hpp"
