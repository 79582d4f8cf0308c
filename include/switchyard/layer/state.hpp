// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file state.hpp
//! What a layer's forward leaves for its backward, in caller memory: the routing plan (ids,
//! weights, counts, logits, probs), the router's auxiliary losses and the pairs each expert
//! dropped for lack of capacity. `moe_state` is the view every backend takes (host or device
//! memory alike); `moe_result` is the host convenience that owns the arrays.

#include <cstddef>
#include <vector>

#include "switchyard/core/config.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/routing/plan.hpp"

namespace switchyard {

//! Forward state in caller memory (non-owning; the memory of the context's device).
template <class Losses>
struct moe_state {
  routing::plan_ref plan;       //!< sized T × width × E (routing::plan_ref::required)
  Losses* losses = nullptr;     //!< one struct: the router's auxiliary losses
  span<index_t> dropped;        //!< [E] (token, slot) pairs dropped per expert
  //! Optional, host memory (whatever the context): set false by `MoELayer::forward` once its
  //! argument checks have passed, before it writes anything, and true when it returns, so a
  //! forward that threw leaves it false; `MoELayer::backward` rejects a state whose flag is
  //! false (its plan may be half written). Null: not tracked (the caller's responsibility).
  bool* complete = nullptr;
};

//! Host-owning forward state: what `forward` fills when given one (sized on the way in;
//! arrays reallocate only when they grow), and what backward reads.
template <class Losses>
struct moe_result {
  routing::routing_plan plan;    //!< ids, weights, counts, logits, probs
  Losses losses{};               //!< the router's auxiliary losses
  std::vector<index_t> dropped;  //!< [E] (token, slot) pairs dropped per expert
  //! False from the moment a forward starts writing into this result until it returns, so
  //! after a forward that threw backward refuses the result (`invalid_argument` naming
  //! "state") instead of reading half a plan. True otherwise (also for a result filled by
  //! hand, e.g. a recorded plan to replay).
  bool complete = true;

  //! Sizes every array for T tokens, `width` slots and E experts.
  void resize(index_t tokens, index_t width, index_t experts) {
    plan.resize(tokens, width, experts);
    dropped.assign(static_cast<std::size_t>(experts), 0);
  }
  //! The arrays as the state view backends take.
  [[nodiscard]] moe_state<Losses> state() {
    return {plan.ref(), &losses, {dropped.data(), dropped.size()}, &complete};
  }
  //! Read-only use (backward): nothing is written through the view.
  [[nodiscard]] moe_state<Losses> state() const { return const_cast<moe_result*>(this)->state(); }
  //! Σ_e dropped[e].
  [[nodiscard]] index_t total_dropped() const {
    index_t n = 0;
    for (auto v : dropped) n += v;
    return n;
  }
};

}  // namespace switchyard
