// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file drops.hpp
//! Drop accounting of the expert phase as a per-expert functor (backend-neutral; see
//! gather.hpp for the convention).

#include "switchyard/core/config.hpp"

namespace switchyard::ops {

//! dropped[e] = the dispatch's drop count of expert e (pairs routed to e past its capacity).
struct report_drops {
  const index_t* planned;  //!< [E] `expert_groups::dropped`
  index_t* dropped;        //!< [E] the caller's per-expert counts

  SWITCHYARD_HD void operator()(index_t e) const { dropped[e] = planned[e]; }
};

}  // namespace switchyard::ops
