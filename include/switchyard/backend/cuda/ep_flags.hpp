// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file ep_flags.hpp
//! What a rank's kernels find wrong in the data before an expert-parallel exchange under
//! `static_bound` (backend/cuda/expert_parallel.cuh): the smallest non-finite x element and
//! the smallest faulty plan token. With the local `sorted_grouped` they are read back at its
//! one wait and agreed on the host; with the local `padded_capacity` nothing waits: every
//! rank's flags are gathered on the device (one fixed-size all_to_all) and folded into the
//! rank's status word (status.hpp), so `check_status` throws on every rank. Host-testable
//! (`__host__ __device__`, no CUDA header).

#include "switchyard/backend/cuda/status.hpp"
#include "switchyard/core/config.hpp"

namespace switchyard::detail {

//! What a rank's kernels found wrong before the exchange, read back at the one wait.
struct cuda_ep_flags {
  unsigned long long first_non_finite;  //!< smallest flat index of a non-finite x element
  unsigned long long first_bad_token;   //!< smallest token of a faulty plan row
};

//! Sets both fields of the flags to "nothing found".
struct cuda_ep_reset_flags {
  cuda_ep_flags* flags;
  SWITCHYARD_HD void operator()(index_t) const {
    flags->first_non_finite = ~0ULL;
    flags->first_bad_token = ~0ULL;
  }
};

//! Copies this rank's flags into each of the N blocks of the flags' all_to_all (a device-side
//! all_gather: block s goes to rank s).
struct cuda_ep_spread_flags {
  const cuda_ep_flags* flags;
  cuda_ep_flags* out;  //!< [N]
  SWITCHYARD_HD void operator()(index_t s) const { out[s] = *flags; }
};

//! Folds every rank's flags (gathered: [N], entry s = rank s's) into this rank's status word:
//! its own non-finite x element as `non_finite_x`, a peer's faults as `peer_bad_plan` /
//! `peer_non_finite` (index: the rank). Its own plan faults were recorded where they were found.
struct cuda_ep_fold_flags {
  const cuda_ep_flags* all;  //!< [N]
  index_t rank = 0;
  cuda::device_status* status;
  SWITCHYARD_HD void operator()(index_t s) const {
    const cuda_ep_flags f = all[s];
    if (s == rank) {
      if (f.first_non_finite != ~0ULL) {
        status->record(cuda::status_kind::non_finite_x, static_cast<index_t>(f.first_non_finite));
      }
      return;
    }
    if (f.first_bad_token != ~0ULL) status->record(cuda::status_kind::peer_bad_plan, s);
    if (f.first_non_finite != ~0ULL) status->record(cuda::status_kind::peer_non_finite, s);
  }
};

}  // namespace switchyard::detail
