// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file activate.hpp
//! The activation of the expert FFN over one row, forward and backward, as per-row functors
//! (backend-neutral; see gather.hpp for the convention). Plain activations map d_ff columns;
//! gated ones read the `[gate | up]` halves of a 2·d_ff row.

#include "switchyard/activation/concepts.hpp"
#include "switchyard/core/config.hpp"

namespace switchyard::ops {

//! A = act(H) for one row: out[r, c] = act(in[r, c]) (plain) or act(in[r, c], in[r, d_ff + c])
//! (gated), c < d_ff. `out` may be `in` (same leading dimension): each column is read before
//! it is written.
template <class Act>
struct activate_rows {
  Act act{};              //!< the activation
  const float* in;        //!< [rows, ld_in] pre-activation H
  index_t ld_in = 0;      //!< P (d_ff or 2·d_ff)
  float* out;             //!< [rows, ld_out] activation A
  index_t ld_out = 0;     //!< leading dimension of A
  index_t d_ff = 0;       //!< columns of A

  SWITCHYARD_HD void operator()(index_t r) const {
    const float* h = in + r * ld_in;
    float* a = out + r * ld_out;
    for (index_t c = 0; c < d_ff; ++c) {
      if constexpr (activation_traits<Act>::is_gated) a[c] = act(h[c], h[d_ff + c]);
      else a[c] = act(h[c]);
    }
  }
};

//! dH from dA through the activation, in place over H for one row: plain
//! h[c] = da[c] · act'(h[c]); gated (d_gate, d_up) over the two halves.
template <class Act>
struct activate_backward_rows {
  Act act{};             //!< the activation
  float* h;              //!< [rows, ld_h] pre-activation H, overwritten with dH
  index_t ld_h = 0;      //!< P
  const float* da;       //!< [rows, ld_da] dA
  index_t ld_da = 0;     //!< leading dimension of dA
  index_t d_ff = 0;      //!< columns of A

  SWITCHYARD_HD void operator()(index_t r) const {
    float* hr = h + r * ld_h;
    const float* dar = da + r * ld_da;
    for (index_t c = 0; c < d_ff; ++c) {
      if constexpr (activation_traits<Act>::is_gated) {
        float dg, du;
        act.backward(hr[c], hr[d_ff + c], dar[c], dg, du);
        hr[c] = dg;
        hr[d_ff + c] = du;
      } else {
        hr[c] = dar[c] * act.derivative(hr[c]);
      }
    }
  }
};

}  // namespace switchyard::ops
