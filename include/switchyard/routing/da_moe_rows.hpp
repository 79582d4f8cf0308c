// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file da_moe_rows.hpp
//! DA-MoE's token importance as per-token functors, for a backend whose params live where the
//! host cannot read them (device memory): the importance policies of routers/da_moe.hpp
//! (`col_mean`, `cls_row`, `precomputed`) one token per call with the host's float/double
//! arithmetic in the host's order, the input checks as per-row scans that record the first
//! bad element instead of throwing, the peak max I as an integer max over the bits of the
//! non-negative floats (exact, so any arrival order gives the same peak), and the per-token
//! rule `da_moe_checked_rules` built on the relative importance in that memory.
//!
//! Bad input (attention that is not finite, negative or whose row does not sum to 1, an
//! importance that is not finite or negative), which the host rejects with a typed exception,
//! makes every token of the batch route to no expert here (count 0); `importance_flags`
//! keeps the first bad flat index of each kind, reported to the route's faults sink.

#include <climits>
#include <cstdint>

#include <cuda/std/cmath>
#include <cuda/std/limits>

#include "switchyard/core/config.hpp"
#include "switchyard/core/element_type.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/routing/routers/da_moe.hpp"
#include "switchyard/routing/selection/topk.hpp"

namespace switchyard::routing {

//! What the importance pass found, and the peak importance (in the workspace).
struct importance_flags {
  static constexpr unsigned long long none = ULLONG_MAX;
  unsigned long long bad_attention;   //!< first bad attention element h·T·T + i·T + j, or none
  unsigned long long bad_importance;  //!< first token with a non-finite or negative I, or none
  std::uint32_t peak_bits;            //!< bits of max I over the valid I > 0 (0: none)
};

}  // namespace switchyard::routing

namespace switchyard::detail {
using namespace ::switchyard::routing;  // this block's helpers use switchyard::routing's names

//! Keeps the smallest index in *slot (an integer atomicMin on the device).
SWITCHYARD_HD inline void keep_first(unsigned long long* slot, index_t index) {
  const auto v = static_cast<unsigned long long>(index);
#if defined(__CUDA_ARCH__)
  atomicMin(slot, v);
#else
  if (v < *slot) *slot = v;
#endif
}

//! Stores I[j] = v and folds it into the flags: a bad value is recorded, a positive one
//! raises the peak (the bits of non-negative floats order as the floats do).
SWITCHYARD_HD inline void note_importance(index_t j, float v, float* out, importance_flags* flags) {
  out[j] = v;
  if (!::cuda::std::isfinite(v) || v < 0.0f) {
    keep_first(&flags->bad_importance, j);
    return;
  }
  if (!(v > 0.0f)) return;  // 0 and -0 leave the peak (0 bits: "no positive value")
  const std::uint32_t bits = float_bits(v);
#if defined(__CUDA_ARCH__)
  atomicMax(&flags->peak_bits, bits);
#else
  if (bits > flags->peak_bits) flags->peak_bits = bits;
#endif
}

}  // namespace switchyard::detail

namespace switchyard::routing {

//! Sets the flags to "nothing found, no peak" (one item).
struct reset_importance_flags {
  importance_flags* flags = nullptr;
  SWITCHYARD_HD void operator()(index_t) const {
    flags->bad_attention = importance_flags::none;
    flags->bad_importance = importance_flags::none;
    flags->peak_bits = 0u;
  }
};

//! The host's `check_attention` for one row (h, i) = r / T, r % T: each element finite and
//! >= 0, the row's double sum within `attention_row_tolerance` of 1. Records the first bad
//! element's flat index (the last element of the row for a bad sum).
struct attention_row_check {
  tensor_view<const float, 3> attention;  //!< [H, T, T]
  importance_flags* flags = nullptr;

  SWITCHYARD_HD void operator()(index_t r) const {
    const index_t tokens = attention.extent(1);
    const index_t h = r / tokens, i = r % tokens;
    const index_t base = (h * tokens + i) * tokens;
    double s = 0.0;
    for (index_t j = 0; j < tokens; ++j) {
      const float v = attention(h, i, j);
      if (!::cuda::std::isfinite(v) || v < 0.0f) {
        detail::keep_first(&flags->bad_attention, base + j);
        return;
      }
      s += v;
    }
    const double off = s - 1.0;
    if (!(off <= attention_row_tolerance && -off <= attention_row_tolerance))
      detail::keep_first(&flags->bad_attention, base + tokens - 1);
  }
};

//! `importance::col_mean` of token j: I_j = Σ_h Σ_i A[h, i, j] / (H·T) in double, h then i
//! in order.
struct col_mean_importance {
  tensor_view<const float, 3> attention;  //!< [H, T, T]
  float* importance = nullptr;            //!< [T] output
  importance_flags* flags = nullptr;

  SWITCHYARD_HD void operator()(index_t j) const {
    const index_t heads = attention.extent(0), tokens = attention.extent(1);
    double s = 0.0;
    for (index_t h = 0; h < heads; ++h)
      for (index_t i = 0; i < tokens; ++i) s += attention(h, i, j);
    detail::note_importance(j, static_cast<float>(s / (static_cast<double>(heads) * tokens)),
                            importance, flags);
  }
};

//! `importance::cls_row` of token j: I_j = Σ_h A[h, 0, j] / H in double, h in order.
struct cls_row_importance {
  tensor_view<const float, 3> attention;  //!< [H, T, T]
  float* importance = nullptr;            //!< [T] output
  importance_flags* flags = nullptr;

  SWITCHYARD_HD void operator()(index_t j) const {
    const index_t heads = attention.extent(0);
    double s = 0.0;
    for (index_t h = 0; h < heads; ++h) s += attention(h, 0, j);
    detail::note_importance(j, static_cast<float>(s / static_cast<double>(heads)), importance,
                            flags);
  }
};

//! `importance::precomputed` of token j: I_j = params.importance[j].
struct precomputed_importance {
  vector_view<const float> given;  //!< [T]
  float* importance = nullptr;     //!< [T] output
  importance_flags* flags = nullptr;

  SWITCHYARD_HD void operator()(index_t j) const {
    detail::note_importance(j, given(j), importance, flags);
  }
};

//! r_j = I_j / max I (1 when max I = 0, as the host), or NaN for every token when the pass
//! found bad input (the rules then give those tokens no expert).
struct relative_importance {
  const float* importance = nullptr;  //!< [T]
  float* relative = nullptr;          //!< [T] output
  const importance_flags* flags = nullptr;

  SWITCHYARD_HD void operator()(index_t j) const {
    if (flags->bad_attention != importance_flags::none ||
        flags->bad_importance != importance_flags::none) {
      relative[j] = ::cuda::std::numeric_limits<float>::quiet_NaN();
      return;
    }
    const float peak = detail::bits_float(flags->peak_bits);
    relative[j] = peak > 0.0f ? importance[j] / peak : 1.0f;
  }
};

//! Reports what the importance pass found to a faults sink (ops/route_steps.hpp): the first
//! bad attention element and the first bad importance (one item).
template <class Faults>
struct report_importance_faults {
  const importance_flags* flags = nullptr;
  Faults faults;

  SWITCHYARD_HD void operator()(index_t) const {
    if (flags->bad_attention != importance_flags::none)
      faults.bad_attention(static_cast<index_t>(flags->bad_attention));
    if (flags->bad_importance != importance_flags::none)
      faults.bad_importance(static_cast<index_t>(flags->bad_importance));
  }
};

//! DA-MoE's per-token rules over a relative importance in the executing side's memory:
//! `da_moe_rules::rule(t)`, or top-0 (no expert) for a token whose relative importance is not
//! in [0, 1] (bad input, see the file comment).
template <class KRule>
struct da_moe_checked_rules {
  da_moe_rules<KRule> rules;

  [[nodiscard]] SWITCHYARD_HD topk_rule rule(index_t t) const {
    const float r = rules.relative[t];
    if (!(r >= 0.0f && r <= 1.0f)) return {0, rules.renormalize};
    return rules.rule(t);
  }
};

template <class Importance>
inline constexpr bool no_importance_rows_for = false;

//! How a backend runs importance policy `Importance` one token at a time:
//! `check(params, T)` (the host's data-free checks: shapes), `reads_attention` /
//! `reads_importance` (which params arrays it reads) and `launch_rows(launch, params, T,
//! importance, flags)` (launches through a launcher, see ops/route_steps.hpp).
template <class Importance>
struct importance_rows {
  static_assert(no_importance_rows_for<Importance>,
                "switchyard: this DA-MoE importance policy has no per-token version: specialise "
                "switchyard::routing::importance_rows<Importance> (routing/da_moe_rows.hpp) to "
                "run it where the params are not host memory");
};

}  // namespace switchyard::routing

namespace switchyard::detail {
using namespace ::switchyard::routing;  // this block's helpers use switchyard::routing's names
//! The shape part of `check_attention` (the same errors; the values are checked per row).
inline void check_attention_shape(const tensor_view<const float, 3>& a, index_t tokens) {
  check_view("params.attention", a, {-1, tokens, tokens}, "[H, T, T] with T = x.extent(0)");
  if (tokens > 0 && a.extent(0) < 1) {
    throw shape_error("params.attention",
                      detail::concat("params.attention: expected at least one head "
                                     "(extent 0 = H >= 1), got ",
                                     a.extent(0)));
  }
}
}  // namespace switchyard::detail

namespace switchyard::routing {

//! The mean attention each token receives.
template <>
struct importance_rows<importance::col_mean> {
  static constexpr bool reads_attention = true;
  static constexpr bool reads_importance = false;
  static void check(const da_moe_params& p, index_t tokens) {
    detail::check_attention_shape(p.attention, tokens);
  }
  template <class Launcher>
  static void launch_rows(const Launcher& launch, const da_moe_params& p, index_t tokens,
                          float* importance, importance_flags* flags) {
    launch.tokens(p.attention.extent(0) * tokens, attention_row_check{p.attention, flags},
                  "switchyard::routing::attention_row_check");
    launch.tokens(tokens, col_mean_importance{p.attention, importance, flags},
                  "switchyard::routing::col_mean_importance");
  }
};

//! The attention of the first token.
template <>
struct importance_rows<importance::cls_row> {
  static constexpr bool reads_attention = true;
  static constexpr bool reads_importance = false;
  static void check(const da_moe_params& p, index_t tokens) {
    detail::check_attention_shape(p.attention, tokens);
  }
  template <class Launcher>
  static void launch_rows(const Launcher& launch, const da_moe_params& p, index_t tokens,
                          float* importance, importance_flags* flags) {
    launch.tokens(p.attention.extent(0) * tokens, attention_row_check{p.attention, flags},
                  "switchyard::routing::attention_row_check");
    launch.tokens(tokens, cls_row_importance{p.attention, importance, flags},
                  "switchyard::routing::cls_row_importance");
  }
};

//! The caller's importance.
template <>
struct importance_rows<importance::precomputed> {
  static constexpr bool reads_attention = false;
  static constexpr bool reads_importance = true;
  static void check(const da_moe_params& p, index_t tokens) {
    check_view("params.importance", p.importance, {tokens}, "[T] with T = x.extent(0)");
  }
  template <class Launcher>
  static void launch_rows(const Launcher& launch, const da_moe_params& p, index_t tokens,
                          float* importance, importance_flags* flags) {
    launch.tokens(tokens, precomputed_importance{p.importance, importance, flags},
                  "switchyard::routing::precomputed_importance");
  }
};

//! DA-MoE's rules where the params are not host memory: scratch carved from an arena
//! (`carve`), the data-free checks (`check`), and `make` (launches the importance pass,
//! reports bad input to `faults`, and returns the per-token rules over the relative
//! importance it wrote).
template <class Importance, class KRule>
struct da_moe_device_rules {
  using router_type = routers::DAMoE<Importance, KRule>;
  using rows = importance_rows<Importance>;
  static constexpr bool reads_attention = rows::reads_attention;    //!< params.attention is read
  static constexpr bool reads_importance = rows::reads_importance;  //!< params.importance is read
  struct scratch {
    float* importance;        //!< [T] I
    float* relative;          //!< [T] r
    importance_flags* flags;  //!< what the pass found
  };
  static scratch carve(workspace_arena& ws, index_t tokens) {
    float* imp = ws.take<float>(tokens);
    float* rel = ws.take<float>(tokens);
    return {imp, rel, ws.take<importance_flags>(1)};
  }
  static void check(const router_type&, const da_moe_params& p, index_t tokens) {
    rows::check(p, tokens);
  }
  template <class Launcher, class Faults>
  static da_moe_checked_rules<KRule> make(const Launcher& launch, const router_type& r,
                                          const da_moe_params& p, index_t tokens, const scratch& s,
                                          const Faults& faults) {
    launch.elements(1, reset_importance_flags{s.flags},
                    "switchyard::routing::reset_importance_flags");
    rows::launch_rows(launch, p, tokens, s.importance, s.flags);
    launch.tokens(tokens, relative_importance{s.importance, s.relative, s.flags},
                  "switchyard::routing::relative_importance");
    launch.elements(1, report_importance_faults<Faults>{s.flags, faults},
                    "switchyard::routing::report_importance_faults");
    return {{r.k_rule, r.renormalize, s.relative}};
  }
};

}  // namespace switchyard::routing
