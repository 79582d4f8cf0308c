// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file experts.hpp
//! Host execution of the expert FFNs for a routing plan: dispatch planning (any policy from
//! `switchyard/dispatch/`, planned by `host::plan_groups`), gather into float rows laid out in
//! row panels, one GEMM pair per work item with the activation between, and a combine that
//! gathers each token's slots in slot order. This header gathers the parts:
//! - `expert_phase.hpp`: `expert_dims`, `panels_for`, the padded row layout and the gather;
//! - `gemm_rows.hpp`: weight panels and the per-call GEMM choice;
//! - `expert_forward.hpp`: `experts_forward`; `expert_backward.hpp`: `experts_backward`;
//! - `dispatch_plan.hpp`: `plan_groups` per policy; `blas_probe.hpp`: `blas_batch_invariant`;
//! - `run_ops.hpp`: how the element-wise functors of `switchyard/ops/` run on the host;
//! - `expert_parallel.hpp`: the overloads for `parallel::ExpertParallel` (experts sharded over
//!   ranks), declared here so the executor's calls find them.
//!
//! Same bits on any machine (docs/design.md): every BLAS call is single-threaded and its row
//! count follows the row-panel rule (`row_panels.hpp`), so a token's output and dx do not
//! depend on the OpenMP/BLAS thread count nor on the other tokens of the batch. Parallelism
//! comes from OpenMP over work items fixed by the data alone: (expert, block of rows) in
//! forward, experts in backward. No loop reduces across threads.
//!
//! Element types: half/bfloat16 tokens and weights are converted to float panels; every
//! product and sum is float; only y is rounded to the storage type. Experts whose weights need
//! a conversion panel (non-float storage or a layout BLAS cannot read) run one after another
//! on the calling thread (one panel buffer); float weights run in parallel.

#include "switchyard/backend/host/blas_probe.hpp"
#include "switchyard/backend/host/dispatch_plan.hpp"
#include "switchyard/backend/host/expert_backward.hpp"
#include "switchyard/backend/host/expert_forward.hpp"
#include "switchyard/backend/host/expert_parallel.hpp"
#include "switchyard/backend/host/expert_phase.hpp"
#include "switchyard/backend/host/gemm_rows.hpp"
