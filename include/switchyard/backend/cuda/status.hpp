// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file status.hpp
//! The device status word: what the kernels found wrong in the *data* (a non-finite token or
//! logit, an invalid plan entry), recorded on the device and thrown on the host as the same
//! typed exception the host backend throws, at the one synchronisation point of
//! `sorted_grouped` or at an explicit `cuda::check_status` on the sync-free paths
//! (docs/cuda.md). Kernels stay memory safe on bad data: a flagged token routes to no expert.
//!
//! Each kind keeps the smallest flat index it was seen at (row-major, so x[t, i] is t·d + i,
//! the element the host names first). Host-testable: `record` is `__host__ __device__`.

#include <climits>
#include <cstdint>
#include <string>
#include <type_traits>

#include "switchyard/core/config.hpp"
#include "switchyard/core/error.hpp"

namespace switchyard::cuda {

//! What the device status word can hold.
enum class status_kind : int {
  non_finite_x = 0,       //!< x[t, i] is NaN or Inf (index t·d + i)
  non_finite_logits = 1,  //!< the router's logit [t, e] is NaN or Inf (index t·E + e)
  invalid_counts = 2,     //!< plan.counts[t] outside [0, width] (index t)
  invalid_ids = 3,        //!< plan.expert_ids[t, j] outside [0, E), repeated, or not -1 when unused (index t·width + j)
  bad_attention = 4,      //!< DA-MoE params.attention[h, i, j] not finite, negative, or ending a row that does not sum to 1 (index h·T·T + i·T + j)
  bad_importance = 5,     //!< DA-MoE params.importance[j] (or token j's computed importance) not finite or negative (index j)
  bad_router_params = 6,  //!< a router parameter the host validates by value (DynMoE: a non-finite threshold, a mask entry not 0 or 1) (index: the expert)
  peer_bad_plan = 7,      //!< expert parallelism: another rank's plan is malformed (index: that rank)
  peer_non_finite = 8,    //!< expert parallelism: another rank's x holds a NaN / Inf (index: that rank)
};
inline constexpr int status_kinds = 9;

//! The sizes the messages need to turn flat indices into coordinates.
struct status_shape {
  index_t d = 0;        //!< columns of x
  index_t experts = 0;  //!< E
  index_t width = 0;    //!< plan slots per token
  const char* plan_argument = "plan";  //!< "state.plan" (routed) or "plan" (forward_experts)
  index_t tokens = 0;   //!< T
};

//! The status word, in device memory (the first bytes of the workspace). `first[k] == none`
//! (all bits set) means "nothing recorded" for kind k.
struct device_status {
  unsigned long long first[status_kinds];  //!< smallest flat index per kind, or ULLONG_MAX

  static constexpr unsigned long long none = ULLONG_MAX;

  // The sizes the messages need, written with the word's reset, so that an explicit
  // `check_status` names the same element as the synchronisation point does.
  // (No default member initialisers: the word stays a trivial type, set by `reset` on the
  // device or by memset/value-initialisation on the host.)
  index_t d;        //!< columns of x
  index_t experts;  //!< E
  index_t width;    //!< plan slots per token
  index_t tokens;   //!< T
  int routed;       //!< 1: the layer routed (plan errors name state.plan), 0: forward_experts
  int reserved;     //!< 0; names the 4 bytes that would be padding, so the whole word is written
                    //!< before it is copied (compute-sanitizer initcheck reads every byte)

  //! Clears every kind and records the sizes (what the executor's reset kernel runs).
  SWITCHYARD_HD void reset(index_t d_, index_t experts_, index_t width_, index_t tokens_,
                           bool routed_) {
    for (int k = 0; k < status_kinds; ++k) first[k] = none;
    d = d_;
    experts = experts_;
    width = width_;
    tokens = tokens_;
    routed = routed_ ? 1 : 0;
    reserved = 0;
  }
  //! The sizes recorded by `reset`.
  [[nodiscard]] status_shape shape() const {
    return {d, experts, width, routed != 0 ? "state.plan" : "plan", tokens};
  }

  //! Records `index` for `kind` (the smallest index wins; atomic on the device).
  SWITCHYARD_HD void record(status_kind kind, index_t index) {
    unsigned long long* slot = &first[static_cast<int>(kind)];
    const auto v = static_cast<unsigned long long>(index);
#if defined(__CUDA_ARCH__)
    atomicMin(slot, v);
#else
    if (v < *slot) *slot = v;
#endif
  }
  //! Whether anything was recorded.
  [[nodiscard]] SWITCHYARD_HD bool ok() const {
    for (int k = 0; k < status_kinds; ++k)
      if (first[k] != none) return false;
    return true;
  }
};


static_assert(std::has_unique_object_representations_v<device_status>,
              "device_status: no padding bytes (every byte is written before the copy to the host)");
static_assert(std::is_trivial_v<device_status>,
              "the status word is reset by a kernel and copied byte-wise: keep it trivial");

//! Throws the typed exception for the first recorded kind (in enum order); nothing when ok.
inline void throw_status(const device_status& s, const status_shape& shape) {
  if (s.ok()) return;
  const auto at = [&](status_kind k) { return static_cast<index_t>(s.first[static_cast<int>(k)]); };
  if (s.first[0] != device_status::none) {
    const index_t i = at(status_kind::non_finite_x);
    const index_t d = shape.d > 0 ? shape.d : 1;
    throw non_finite_error(
        "x", detail::concat("x: every element must be finite, got a non-finite value at x[", i / d,
                            ", ", i % d,
                            "] (found on the device; Switchyard refuses non-finite tokens, see "
                            "docs/layer.md, NaN policy)"));
  }
  if (s.first[1] != device_status::none) {
    const index_t i = at(status_kind::non_finite_logits);
    const index_t e = shape.experts > 0 ? shape.experts : 1;
    throw non_finite_error(
        "logits", detail::concat("logits: the router's logit [", i / e, ", ", i % e,
                                 "] is not finite (found on the device; check the router weights)"));
  }
  if (s.first[4] != device_status::none) {
    const index_t i = at(status_kind::bad_attention);
    const index_t t = shape.tokens > 0 ? shape.tokens : 1;
    throw range_error("params.attention",
                      detail::concat("params.attention[", i / (t * t), ", ", (i / t) % t, ", ", i % t,
                                     "] must be finite and >= 0, and each row must sum to 1 "
                                     "(found on the device)"));
  }
  if (s.first[5] != device_status::none) {
    throw range_error("params.importance",
                      detail::concat("params.importance[", at(status_kind::bad_importance),
                                     "] (token importance) must be finite and >= 0 (found on the "
                                     "device)"));
  }
  if (s.first[6] != device_status::none) {
    throw range_error("params", detail::concat("params: the router's parameters of expert ",
                                               at(status_kind::bad_router_params),
                                               " are out of range (DynMoE: a non-finite threshold "
                                               "or an experts_mask entry other than 0 or 1; found "
                                               "on the device)"));
  }
  if (s.first[2] != device_status::none) {
    const std::string arg = detail::concat(shape.plan_argument, ".counts");
    throw range_error(arg, detail::concat(arg, "[", at(status_kind::invalid_counts),
                                          "] must be in [0, ", shape.width,
                                          "] (found on the device)"));
  }
  if (s.first[3] != device_status::none) {
    const index_t i = at(status_kind::invalid_ids);
    const index_t w = shape.width > 0 ? shape.width : 1;
    const std::string arg = detail::concat(shape.plan_argument, ".expert_ids");
    throw range_error(arg, detail::concat(arg, "[", i / w, ", ", i % w, "] must be in [0, ",
                                          shape.experts,
                                          ") and distinct among the token's used slots, and -1 "
                                          "when unused (found on the device)"));
  }
  // Expert parallelism without a wait (ExpertParallel<C, static_bound, padded_capacity>): the
  // ranks' findings are gathered on the device, so every rank reports a peer's fault too.
  if (s.first[7] != device_status::none) {
    const index_t r = at(status_kind::peer_bad_plan);
    throw range_error(detail::concat("rank ", r),
                      detail::concat("switchyard: ExpertParallel: rank ", r,
                                     " holds a malformed plan (its own check_status names the "
                                     "token; found on the device)"));
  }
  if (s.first[8] != device_status::none) {
    const index_t r = at(status_kind::peer_non_finite);
    throw non_finite_error(detail::concat("rank ", r),
                           detail::concat("switchyard: ExpertParallel: rank ", r,
                                          " holds a non-finite token (its own check_status names "
                                          "it; found on the device)"));
  }
}

}  // namespace switchyard::cuda
