#pragma once
//! \file hypermoe.cuh
//! PLACEHOLDER (contract only): the device route of the hypermoe work of issue #11.

#include "switchyard/backend/cuda/addon.cuh"
#include "switchyard/backend/cuda/router.cuh"
