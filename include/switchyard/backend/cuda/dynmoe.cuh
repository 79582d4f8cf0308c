#pragma once
//! \file dynmoe.cuh
//! PLACEHOLDER (contract only): the device route of the dynmoe work of issue #11.

#include "switchyard/backend/cuda/addon.cuh"
#include "switchyard/backend/cuda/router.cuh"
