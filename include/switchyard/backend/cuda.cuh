// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file cuda.cuh
//! The CUDA backend (compile with nvcc as C++20, link switchyard::cuda): `cuda::context`,
//! `cuda::stream_context`, `cuda::device_array`, and the executor that runs `MoELayer` under a
//! `cuda::context` (docs/cuda.md).

#include "switchyard/backend/cuda/context.hpp"
#include "switchyard/backend/cuda/dynmoe.cuh"
#include "switchyard/backend/cuda/hypermoe.cuh"
#include "switchyard/backend/cuda/layer.cuh"
#include "switchyard/backend/cuda/memory.hpp"
