// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file identity_experts.hpp
//! Identity (zero-computation) experts, LongCat-Flash: since issue #13 one of the non-FFN
//! expert kinds of ops/expert_kinds.hpp (identity, zero, constant), which holds their functors
//! (`compact_ffn_slots`, also named `compact_identity_slots`, `expert_kind_rows`,
//! `expert_kind_backward_rows`). Kept so that existing includes still compile.

#include "switchyard/ops/expert_kinds.hpp"
