#pragma once
//! \file switchyard.hpp
//! Umbrella header: everything that compiles with a plain C++20 host compiler.
//! CUDA backend headers (`switchyard/backend/cuda/...`) are included separately by .cu files.

#include "switchyard/core/config.hpp"
#include "switchyard/core/element_type.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/core/workspace.hpp"
#include "switchyard/routing/concepts.hpp"
#include "switchyard/routing/linear_softmax.hpp"
#include "switchyard/routing/plan.hpp"
#include "switchyard/routing/ranking.hpp"
#include "switchyard/routing/routers/topk.hpp"
#include "switchyard/routing/selection/topk.hpp"
#include "switchyard/routing/softmax.hpp"
#include "switchyard/routing/routers/dynmoe.hpp"
#include "switchyard/routing/selection/topany.hpp"
#include "switchyard/training/dynmoe_update.hpp"
#include "switchyard/routing/selection/topp.hpp"
#include "switchyard/routing/routers/topp.hpp"
#include "switchyard/routing/selection/adaptive.hpp"
#include "switchyard/routing/routers/adaptive_gating.hpp"
#include "switchyard/routing/routers/da_moe.hpp"
#include "switchyard/training/curriculum.hpp"
#include "switchyard/layer/hypermoe.hpp"
