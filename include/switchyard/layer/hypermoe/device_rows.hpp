// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file device_rows.hpp
//! `layer::hypermoe_module` (module.hpp) in a backend-neutral form the CUDA backend runs
//! (backend/cuda/hypermoe.cuh) and the host tests run on the host against the module, bit for
//! bit:
//!
//! - **Grouping by selection set without a host synchronisation.** Per token: its set sorted
//!   ascending and a 64-bit key (the set's bit mask when E <= 64, else a hash); a stable sort
//!   of (key, token); runs of equal keys *and* equal sets; the groups numbered in order of
//!   first use by an exclusive sum over "token t leads its run" in token order — the host's
//!   group order (a hash collision between different sets can only split a run: such a set
//!   then forms two groups, which changes nothing in forward and, in backward, the order in
//!   which two partial sums reach the float gradients). The number of groups stays on the
//!   device: the kernels read it.
//! - **Group programs.** Forward and backward of one group are written once as a sequence of
//!   *phases*: `run(n, f)` calls f(i) for i in [0, n) and then waits for all of them (a block
//!   loop and `__syncthreads` on the device, a plain loop on the host). Each f(i) computes one
//!   output element with the host's expressions in the host's order (double accumulation);
//!   every accumulation over tokens or groups is owned by one index and runs in token / group
//!   order: deterministic, no atomics.
//! - Forward: group g runs on block g mod S (S = min(group_slots, T) blocks, each with one
//!   generated adapter in the workspace, as the host's work slots). Backward: one block walks
//!   the groups in order, as the host does (the shared gradients accumulate per group in
//!   float, so the group order is part of the result).
//!
//! Plans are read memory-safely whatever they hold (a count is clamped to [0, width], an id
//! outside [0, E) is skipped): invalid plans are the dispatch's to report (status word).

#include <cstddef>
#include <cstdint>

#include "switchyard/core/config.hpp"
#include "switchyard/core/element_type.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/core/workspace.hpp"
#include "switchyard/layer/hypermoe/kernels.hpp"
#include "switchyard/layer/hypermoe/params.hpp"
#include "switchyard/routing/plan.hpp"

namespace switchyard::ops {

//! Tokens of a group that one pass of the token phases covers (scratch: this many [a] rows).
inline constexpr index_t hyper_tokens_per_pass = 8;

// ---- grouping -----------------------------------------------------------------------------

//! The grouping arrays (device or host memory). Group g (g < *count, first-use order) has the
//! tokens order[begin[g] .. begin[g] + size[g]) in token order and the set of token first[g].
struct hyper_groups {
  std::int32_t* sets = nullptr;          //!< [T, width] each token's experts, ascending
  std::int32_t* set_size = nullptr;      //!< [T]
  std::uint64_t* keys = nullptr;         //!< [T] per token
  std::uint64_t* keys_sorted = nullptr;  //!< [T]
  std::int32_t* tokens_in = nullptr;     //!< [T] 0, 1, ..., T-1 (the sort's values)
  std::int32_t* order = nullptr;         //!< [T] tokens sorted by (key, token)
  std::int32_t* flag = nullptr;          //!< [T] sorted position i starts a run
  std::int32_t* leader = nullptr;        //!< [T] token t starts its run
  std::int32_t* rank = nullptr;          //!< [T] exclusive sum of leader (token order)
  std::int32_t* run_id = nullptr;        //!< [T] exclusive sum of flag (sorted order)
  std::int32_t* run_begin = nullptr;     //!< [T] sorted position where run r starts
  std::int32_t* begin = nullptr;         //!< [T] per group: first sorted position
  std::int32_t* size = nullptr;          //!< [T] per group: tokens
  std::int32_t* first = nullptr;         //!< [T] per group: first token
  index_t* count = nullptr;              //!< [1] number of groups
  index_t tokens = 0, width = 0;

  [[nodiscard]] SWITCHYARD_HD const std::int32_t* set(index_t g) const {
    return sets + static_cast<index_t>(first[g]) * width;
  }
  [[nodiscard]] SWITCHYARD_HD index_t set_length(index_t g) const { return set_size[first[g]]; }
  [[nodiscard]] SWITCHYARD_HD const std::int32_t* group_tokens(index_t g) const {
    return order + begin[g];
  }
  [[nodiscard]] SWITCHYARD_HD index_t group_size(index_t g) const { return size[g]; }

  //! Takes the arrays for T tokens and `width` slots (null while measuring).
  static hyper_groups take(workspace_arena& ws, index_t tokens, index_t width) {
    hyper_groups g;
    g.tokens = tokens;
    g.width = width;
    g.sets = ws.take<std::int32_t>(tokens * width);
    g.set_size = ws.take<std::int32_t>(tokens);
    g.keys = ws.take<std::uint64_t>(tokens);
    g.keys_sorted = ws.take<std::uint64_t>(tokens);
    g.tokens_in = ws.take<std::int32_t>(tokens);
    g.order = ws.take<std::int32_t>(tokens);
    g.flag = ws.take<std::int32_t>(tokens);
    g.leader = ws.take<std::int32_t>(tokens);
    g.rank = ws.take<std::int32_t>(tokens);
    g.run_id = ws.take<std::int32_t>(tokens);
    g.run_begin = ws.take<std::int32_t>(tokens);
    g.begin = ws.take<std::int32_t>(tokens);
    g.size = ws.take<std::int32_t>(tokens);
    g.first = ws.take<std::int32_t>(tokens);
    g.count = ws.take<index_t>(1);
    return g;
  }
};

//! Bits of the sort key: the set's bit mask uses E bits when E <= 64; a hash uses 64.
[[nodiscard]] inline int hyper_key_bits(index_t experts) {
  return experts <= 64 ? static_cast<int>(experts < 1 ? 1 : experts) : 64;
}

//! Token t's set, ascending (the host's insertion sort), its size, its key and its own index.
template <class Id, class W>
struct hyper_token_set {
  routing::plan_view<Id, W> plan;
  index_t experts;
  hyper_groups g;

  SWITCHYARD_HD void operator()(index_t t) const {
    std::int32_t* row = g.sets + t * g.width;
    index_t c = static_cast<index_t>(plan.counts(t));
    c = c < 0 ? 0 : (c > g.width ? g.width : c);
    index_t n = 0;
    for (index_t j = 0; j < c; ++j) {
      const auto v = static_cast<std::int32_t>(plan.expert_ids(t, j));
      if (v < 0 || v >= experts) continue;  // invalid: reported by the dispatch's checks
      index_t k = n;
      for (; k > 0 && row[k - 1] > v; --k) row[k] = row[k - 1];
      row[k] = v;
      ++n;
    }
    g.set_size[t] = static_cast<std::int32_t>(n);
    std::uint64_t key = 0;
    if (experts <= 64) {
      for (index_t k = 0; k < n; ++k) key |= std::uint64_t{1} << row[k];
    } else {  // FNV-1a over the length and the ids
      key = 1469598103934665603ull;
      auto mix = [&key](std::uint64_t v) {
        for (int b = 0; b < 4; ++b) {
          key ^= (v >> (8 * b)) & 0xFFu;
          key *= 1099511628211ull;
        }
      };
      mix(static_cast<std::uint64_t>(n));
      for (index_t k = 0; k < n; ++k) mix(static_cast<std::uint64_t>(row[k]));
    }
    g.keys[t] = key;
    g.tokens_in[t] = static_cast<std::int32_t>(t);
  }
};

//! Sorted position i starts a run when its key or its set differs from position i − 1's;
//! the token there is then its run's leader (its smallest token: the sort is stable).
struct hyper_run_flags {
  hyper_groups g;

  SWITCHYARD_HD static bool same_set(const hyper_groups& g, index_t a, index_t b) {
    const index_t na = g.set_size[a], nb = g.set_size[b];
    if (na != nb) return false;
    for (index_t k = 0; k < na; ++k)
      if (g.sets[a * g.width + k] != g.sets[b * g.width + k]) return false;
    return true;
  }
  SWITCHYARD_HD void operator()(index_t i) const {
    const bool starts = i == 0 || g.keys_sorted[i] != g.keys_sorted[i - 1] ||
                        !same_set(g, g.order[i], g.order[i - 1]);
    g.flag[i] = starts ? 1 : 0;
    g.leader[g.order[i]] = starts ? 1 : 0;
  }
};

//! run_begin[run_id[i]] = i for every run start i; index 0 also writes the group count.
struct hyper_run_starts {
  hyper_groups g;
  SWITCHYARD_HD void operator()(index_t i) const {
    if (g.flag[i] != 0) g.run_begin[g.run_id[i]] = static_cast<std::int32_t>(i);
    if (i == 0) {
      const index_t last = g.tokens - 1;
      *g.count = static_cast<index_t>(g.run_id[last]) + g.flag[last];
    }
  }
};

//! For run r < count: its group number (the rank of its leader), first position, size and
//! first token.
struct hyper_group_bounds {
  hyper_groups g;
  SWITCHYARD_HD void operator()(index_t r) const {
    const index_t runs = *g.count;
    if (r >= runs) return;
    const index_t b = g.run_begin[r];
    const index_t e = r + 1 < runs ? static_cast<index_t>(g.run_begin[r + 1]) : g.tokens;
    const std::int32_t lead = g.order[b];
    const std::int32_t gi = g.rank[lead];
    g.begin[gi] = static_cast<std::int32_t>(b);
    g.size[gi] = static_cast<std::int32_t>(e - b);
    g.first[gi] = lead;
  }
};

//! all[i] = Σ_e emb[e, i] in double (embedding_total's order).
struct hyper_embedding_total {
  matrix_view<const float> emb;  //!< [E, d_emb]
  double* all;                   //!< [d_emb] out
  SWITCHYARD_HD void operator()(index_t i) const {
    double acc = 0.0;
    for (index_t e = 0; e < emb.extent(0); ++e) acc += emb(e, i);
    all[i] = acc;
  }
};

// ---- element functions --------------------------------------------------------------------

//! y[o] of y = w·x + b (hyper_affine's order).
SWITCHYARD_HD inline double hyper_affine_entry(const layer::hyper_linear_params& l, const double* x,
                                               index_t o) {
  double acc = l.b(o);
  for (index_t i = 0; i < l.w.extent(1); ++i) acc += static_cast<double>(l.w(o, i)) * x[i];
  return acc;
}

//! acc + Σ_o w[o, i]·dy[o] over the non-zero dy (hyper_affine_backward's dx order).
SWITCHYARD_HD inline double hyper_affine_dx_entry(const layer::hyper_linear_params& l,
                                                  const double* dy, index_t i, double acc) {
  for (index_t o = 0; o < l.w.extent(0); ++o) {
    if (dy[o] == 0.0) continue;
    acc += static_cast<double>(l.w(o, i)) * dy[o];
  }
  return acc;
}

//! Items of hyper_affine_grad_entry: out·in weights then out biases.
SWITCHYARD_HD inline index_t hyper_affine_grad_items(const layer::hyper_linear_params& l) {
  return l.w.extent(0) * l.w.extent(1) + l.w.extent(0);
}

//! One gradient element: g.w(o, i) += dy[o]·x[i] (idx = o·in + i) or g.b(o) += dy[o].
SWITCHYARD_HD inline void hyper_affine_grad_entry(const layer::hyper_linear_params& l,
                                                  const layer::hyper_linear_grads& g,
                                                  const double* x, const double* dy, index_t idx) {
  const index_t out = l.w.extent(0), in = l.w.extent(1);
  if (idx < out * in) {
    if (detail::present(g.w)) {
      const index_t o = idx / in, i = idx % in;
      g.w(o, i) += static_cast<float>(dy[o] * x[i]);
    }
  } else if (detail::present(g.b)) {
    const index_t o = idx - out * in;
    g.b(o) += static_cast<float>(dy[o]);
  }
}

// ---- group programs -----------------------------------------------------------------------

//! What the group programs read.
template <ElementType T>
struct hyper_program {
  matrix_view<const T> x;  //!< [T, d]
  layer::hypermoe_params p;
  layer::hypermoe_dims s;
  index_t layer = 0;  //!< ℓ
  hyper_groups groups;
  const double* all = nullptr;  //!< [d_emb]
};

//! The hypernetwork of one selection set (generate_adapter, with unselected_sum first).
template <class Phases>
SWITCHYARD_HD void hyper_generate(const Phases& run, const layer::hypermoe_params& p,
                                  const layer::hypermoe_dims& s, index_t layer, const double* all,
                                  const std::int32_t* set, index_t set_n,
                                  const detail::generated_adapter& g) {
  run(s.emb_dim, [&](index_t i) {
    double u = all[i];
    for (index_t k = 0; k < set_n; ++k) u -= p.expert_emb(set[k], i);
    g.u[i] = u;
  });
  run(s.process_dim, [&](index_t o) {
    const double v = hyper_affine_entry(p.process1, g.u, o);
    g.a1[o] = v;
    g.r1[o] = detail::relu(v);
  });
  run(s.hyper_in + s.layer_emb, [&](index_t o) {
    if (o < s.hyper_in) {
      const double z = hyper_affine_entry(p.process2, g.r1, o);
      g.z[o] = z;
      g.c[o] = z;
    } else {
      g.c[o] = p.generator.layer_embed(layer, o - s.hyper_in);
    }
  });
  run(s.bottleneck, [&](index_t o) {
    const double v = hyper_affine_entry(p.generator.linear1, g.c, o);
    g.a2[o] = v;
    g.h[o] = detail::relu(v);
  });
  const index_t da = s.model * s.adapter;
  run(2 * da + s.model + s.adapter, [&](index_t o) {
    if (o < da) {
      g.w_down[o] = hyper_affine_entry(p.generator.weight_down, g.h, o);
    } else if (o < 2 * da) {
      g.w_up[o - da] = hyper_affine_entry(p.generator.weight_up, g.h, o - da);
    } else if (o < 2 * da + s.model) {
      g.b_up[o - 2 * da] = hyper_affine_entry(p.generator.bias_up, g.h, o - 2 * da);
    } else {
      g.b_down[o - 2 * da - s.model] =
          hyper_affine_entry(p.generator.bias_down, g.h, o - 2 * da - s.model);
    }
  });
}

//! m[k, j] = x_t·W_down[:, j] + b_down[j] for the pass's tokens (adapter_down's order).
template <ElementType T, class Phases>
SWITCHYARD_HD void hyper_adapter_down_pass(const Phases& run, const matrix_view<const T>& x,
                                           const std::int32_t* tok, index_t nc,
                                           const detail::generated_adapter& g, index_t d, index_t a,
                                           double* m) {
  run(nc * a, [&](index_t idx) {
    const index_t k = idx / a, j = idx % a;
    const index_t t = tok[k];
    double acc = g.b_down[j];
    for (index_t i = 0; i < d; ++i) {
      const double xi = to_float(x(t, i));
      acc += xi * g.w_down[i * a + j];
    }
    m[idx] = acc;
  });
}

//! Forward of group `gi` into `out` (adapter storage `slot`: generated_adapter::doubles(s)
//! doubles, then hyper_tokens_per_pass·a for m).
template <ElementType T, class Phases>
SWITCHYARD_HD void hyper_group_forward(const Phases& run, const hyper_program<T>& pr, index_t gi,
                                       double* slot, const matrix_view<float>& out) {
  const layer::hypermoe_dims& s = pr.s;
  const auto g = detail::generated_adapter::bind(slot, s);
  double* m = slot + detail::generated_adapter::doubles(s);
  hyper_generate(run, pr.p, s, pr.layer, pr.all, pr.groups.set(gi), pr.groups.set_length(gi), g);
  const std::int32_t* tok = pr.groups.group_tokens(gi);
  const index_t n = pr.groups.group_size(gi), d = s.model, a = s.adapter;
  for (index_t c0 = 0; c0 < n; c0 += hyper_tokens_per_pass) {
    const index_t nc = n - c0 < hyper_tokens_per_pass ? n - c0 : hyper_tokens_per_pass;
    hyper_adapter_down_pass(run, pr.x, tok + c0, nc, g, d, a, m);
    run(nc * d, [&](index_t idx) {  // adapter_token_forward's y
      const index_t k = idx / d, o = idx % d;
      const index_t t = tok[c0 + k];
      double y = g.b_up[o];
      for (index_t j = 0; j < a; ++j) {
        const double r = detail::relu(m[k * a + j]);
        if (r == 0.0) continue;
        y += r * g.w_up[j * d + o];
      }
      out(t, o) = static_cast<float>(y);
    });
  }
}

//! Doubles of one forward slot.
SWITCHYARD_HD inline index_t hyper_forward_slot_doubles(const layer::hypermoe_dims& s) {
  return detail::generated_adapter::doubles(s) + hyper_tokens_per_pass * s.adapter;
}

//! Forward of the groups block `block` of `blocks` owns (g = block, block + blocks, ...).
template <ElementType T, class Phases>
SWITCHYARD_HD void hyper_forward_block(const Phases& run, const hyper_program<T>& pr, index_t block,
                                       index_t blocks, double* slots,
                                       const matrix_view<float>& out) {
  double* slot = slots + block * hyper_forward_slot_doubles(pr.s);
  const index_t count = *pr.groups.count;
  for (index_t gi = block; gi < count; gi += blocks) hyper_group_forward(run, pr, gi, slot, out);
}

//! Backward's scratch: the host's hyper_backward_scratch (one adapter, its cotangents, the
//! sums over groups) plus m and dm for a pass of tokens.
struct hyper_device_backward_scratch {
  detail::hyper_backward_scratch b{};
  double* m = nullptr;   //!< [hyper_tokens_per_pass, a]
  double* dm = nullptr;  //!< [hyper_tokens_per_pass, a]

  static hyper_device_backward_scratch take(workspace_arena& ws, const layer::hypermoe_dims& s) {
    hyper_device_backward_scratch w;
    w.b = detail::hyper_backward_scratch::take(ws, s);
    w.m = ws.take<double>(hyper_tokens_per_pass * s.adapter);
    w.dm = ws.take<double>(hyper_tokens_per_pass * s.adapter);
    return w;
  }
};

//! Backward of group `gi` (module.hpp's loop body): dx += the adapter path, grads += the
//! hypernetwork's, and the group's du into the sums over groups.
template <ElementType T, class Phases>
SWITCHYARD_HD void hyper_group_backward(const Phases& run, const hyper_program<T>& pr, index_t gi,
                                        const matrix_view<const float>& dy,
                                        const matrix_view<float>& dx,
                                        const layer::hypermoe_grads& grads,
                                        const hyper_device_backward_scratch& w) {
  const layer::hypermoe_dims& s = pr.s;
  const layer::hypermoe_params& p = pr.p;
  const detail::hyper_backward_scratch& b = w.b;
  const detail::generated_adapter& g = b.g;
  const std::int32_t* set = pr.groups.set(gi);
  const index_t set_n = pr.groups.set_length(gi);
  hyper_generate(run, p, s, pr.layer, pr.all, set, set_n, g);
  const index_t d = s.model, a = s.adapter, da = d * a;
  run(2 * da + d + a, [&](index_t i) {
    if (i < da)
      b.d_w_down[i] = 0.0;
    else if (i < 2 * da)
      b.d_w_up[i - da] = 0.0;
    else if (i < 2 * da + d)
      b.d_b_up[i - 2 * da] = 0.0;
    else
      b.d_b_down[i - 2 * da - d] = 0.0;
  });
  const bool want_dx = detail::present(dx);
  const std::int32_t* tok = pr.groups.group_tokens(gi);
  const index_t n = pr.groups.group_size(gi);
  for (index_t c0 = 0; c0 < n; c0 += hyper_tokens_per_pass) {
    const index_t nc = n - c0 < hyper_tokens_per_pass ? n - c0 : hyper_tokens_per_pass;
    const std::int32_t* tk = tok + c0;
    hyper_adapter_down_pass(run, pr.x, tk, nc, g, d, a, w.m);
    // y = r·W_up + b_up, r = ReLU(m): dm, d_b_down (per j), d_b_up (per o), d_W_up (per j, o)
    run(a + d + a * d, [&](index_t idx) {
      if (idx < a) {
        const index_t j = idx;
        const double* wrow = g.w_up + j * d;
        for (index_t k = 0; k < nc; ++k) {
          const index_t t = tk[k];
          double dr = 0.0;
          for (index_t o = 0; o < d; ++o) {
            const double dyo = dy(t, o);
            dr += wrow[o] * dyo;
          }
          const double mv = w.m[k * a + j];
          w.dm[k * a + j] = mv > 0.0 ? dr : 0.0;
          b.d_b_down[j] += w.dm[k * a + j];
        }
      } else if (idx < a + d) {
        const index_t o = idx - a;
        for (index_t k = 0; k < nc; ++k) b.d_b_up[o] += dy(tk[k], o);
      } else {
        const index_t jo = idx - a - d, j = jo / d, o = jo % d;
        for (index_t k = 0; k < nc; ++k) {
          const double r = detail::relu(w.m[k * a + j]);
          if (r != 0.0) b.d_w_up[j * d + o] += r * static_cast<double>(dy(tk[k], o));
        }
      }
    });
    // m = x·W_down + b_down: dx (per token, i), d_W_down (per i, j)
    run(nc * d + d * a, [&](index_t idx) {
      if (idx < nc * d) {
        const index_t k = idx / d, i = idx % d;
        if (!want_dx) return;
        const double* wrow = g.w_down + i * a;
        double acc = 0.0;
        for (index_t j = 0; j < a; ++j) acc += wrow[j] * w.dm[k * a + j];
        dx(tk[k], i) += static_cast<float>(acc);
      } else {
        const index_t ij = idx - nc * d, i = ij / a, j = ij % a;
        for (index_t k = 0; k < nc; ++k) {
          const double xi = to_float(pr.x(tk[k], i));
          b.d_w_down[i * a + j] += xi * w.dm[k * a + j];
        }
      }
    });
  }
  // Generator heads -> h (dh in head order) and the heads' gradients.
  const auto& gp = p.generator;
  const auto& gg = grads.generator;
  const index_t n_wd = hyper_affine_grad_items(gp.weight_down);
  const index_t n_wu = hyper_affine_grad_items(gp.weight_up);
  const index_t n_bu = hyper_affine_grad_items(gp.bias_up);
  const index_t n_bd = hyper_affine_grad_items(gp.bias_down);
  run(s.bottleneck + n_wd + n_wu + n_bu + n_bd, [&](index_t idx) {
    if (idx < s.bottleneck) {
      double acc = 0.0;
      acc = hyper_affine_dx_entry(gp.weight_down, b.d_w_down, idx, acc);
      acc = hyper_affine_dx_entry(gp.weight_up, b.d_w_up, idx, acc);
      acc = hyper_affine_dx_entry(gp.bias_up, b.d_b_up, idx, acc);
      acc = hyper_affine_dx_entry(gp.bias_down, b.d_b_down, idx, acc);
      b.dh[idx] = acc;
      return;
    }
    index_t r = idx - s.bottleneck;
    if (r < n_wd)
      return hyper_affine_grad_entry(gp.weight_down, gg.weight_down, g.h, b.d_w_down, r);
    r -= n_wd;
    if (r < n_wu) return hyper_affine_grad_entry(gp.weight_up, gg.weight_up, g.h, b.d_w_up, r);
    r -= n_wu;
    if (r < n_bu) return hyper_affine_grad_entry(gp.bias_up, gg.bias_up, g.h, b.d_b_up, r);
    r -= n_bu;
    hyper_affine_grad_entry(gp.bias_down, gg.bias_down, g.h, b.d_b_down, r);
  });
  // h = ReLU(linear1(c)), c = [z ; layer_embed[ℓ]].
  run(s.bottleneck, [&](index_t i) { b.da2[i] = g.a2[i] > 0.0 ? b.dh[i] : 0.0; });
  const index_t n_c = s.hyper_in + s.layer_emb;
  run(n_c + hyper_affine_grad_items(gp.linear1), [&](index_t idx) {
    if (idx < n_c) {
      b.dc[idx] = hyper_affine_dx_entry(gp.linear1, b.da2, idx, 0.0);
    } else {
      hyper_affine_grad_entry(gp.linear1, gg.linear1, g.c, b.da2, idx - n_c);
    }
  });
  // z = process2(ReLU(process1(u))), dz = dc[0, h_in); d_layer_embed += dc[h_in, ...).
  run(s.hyper_in, [&](index_t i) { b.dz[i] = b.dc[i]; });
  run(s.process_dim + hyper_affine_grad_items(p.process2) + s.layer_emb, [&](index_t idx) {
    const index_t n_p2 = hyper_affine_grad_items(p.process2);
    if (idx < s.process_dim) {
      b.dr1[idx] = hyper_affine_dx_entry(p.process2, b.dz, idx, 0.0);
    } else if (idx < s.process_dim + n_p2) {
      hyper_affine_grad_entry(p.process2, grads.process2, g.r1, b.dz, idx - s.process_dim);
    } else {
      const index_t i = idx - s.process_dim - n_p2;
      b.d_layer_embed[i] += b.dc[s.hyper_in + i];
    }
  });
  run(s.process_dim, [&](index_t i) { b.da1[i] = g.a1[i] > 0.0 ? b.dr1[i] : 0.0; });
  run(s.emb_dim + hyper_affine_grad_items(p.process1), [&](index_t idx) {
    if (idx < s.emb_dim) {
      b.du[idx] = hyper_affine_dx_entry(p.process1, b.da1, idx, 0.0);
    } else {
      hyper_affine_grad_entry(p.process1, grads.process1, g.u, b.da1, idx - s.emb_dim);
    }
  });
  run(s.emb_dim, [&](index_t i) {
    b.du_all[i] += b.du[i];
    for (index_t k = 0; k < set_n; ++k) b.du_sel[set[k] * s.emb_dim + i] += b.du[i];
  });
}

//! The whole backward on one block: zero the sums, every group in order, then the
//! embedding gradients (module.hpp's backward after the grouping).
template <ElementType T, class Phases>
SWITCHYARD_HD void hyper_backward_block(const Phases& run, const hyper_program<T>& pr,
                                        const matrix_view<const float>& dy,
                                        const matrix_view<float>& dx,
                                        const layer::hypermoe_grads& grads,
                                        const hyper_device_backward_scratch& w) {
  const layer::hypermoe_dims& s = pr.s;
  const detail::hyper_backward_scratch& b = w.b;
  const index_t n_sel = s.experts * s.emb_dim;
  run(s.emb_dim + n_sel + s.layer_emb, [&](index_t i) {
    if (i < s.emb_dim)
      b.du_all[i] = 0.0;
    else if (i < s.emb_dim + n_sel)
      b.du_sel[i - s.emb_dim] = 0.0;
    else
      b.d_layer_embed[i - s.emb_dim - n_sel] = 0.0;
  });
  const index_t count = *pr.groups.count;
  for (index_t gi = 0; gi < count; ++gi) hyper_group_backward(run, pr, gi, dy, dx, grads, w);
  const bool want_le = detail::present(grads.generator.layer_embed);
  const bool want_emb = detail::present(grads.expert_emb);
  run(s.layer_emb + n_sel, [&](index_t i) {
    if (i < s.layer_emb) {
      if (want_le)
        grads.generator.layer_embed(pr.layer, i) += static_cast<float>(b.d_layer_embed[i]);
    } else if (want_emb) {
      const index_t ei = i - s.layer_emb, e = ei / s.emb_dim, k = ei % s.emb_dim;
      grads.expert_emb(e, k) += static_cast<float>(b.du_all[k] - b.du_sel[ei]);
    }
  });
}

}  // namespace switchyard::ops

// No using-directive for switchyard::ops here (docs/design.md: detail blocks of the two
// backends share one namespace): the functors are named ops::.
namespace switchyard::detail {

//! The device add-on's arrays (null while measuring): the grouping, Σ_e emb[e], the sort and
//! scan scratch of `temp_bytes` (the backend's), then forward's slots or backward's scratch.
struct hyper_device_scratch {
  ops::hyper_groups groups;
  double* all = nullptr;
  std::byte* temp = nullptr;
  std::size_t temp_bytes = 0;
  double* slots = nullptr;  //!< forward: [blocks, hyper_forward_slot_doubles]
  ops::hyper_device_backward_scratch bwd;

  static hyper_device_scratch take(workspace_arena& ws, const layer::hypermoe_dims& s,
                                   index_t tokens, index_t width, std::size_t temp_bytes,
                                   index_t forward_blocks, bool backward) {
    hyper_device_scratch w;
    w.groups = ops::hyper_groups::take(ws, tokens, width);
    w.all = ws.take<double>(s.emb_dim);
    w.temp_bytes = temp_bytes;
    w.temp = ws.take<std::byte>(static_cast<index_t>(temp_bytes));
    if (backward) {
      w.bwd = ops::hyper_device_backward_scratch::take(ws, s);
    } else {
      w.slots = ws.take<double>(forward_blocks * ops::hyper_forward_slot_doubles(s));
    }
    return w;
  }
};

//! Groups the plan's tokens by selection set (ops::hyper_groups) with a backend `be` that
//! has `run(n, f, name)`, `sort_pairs(keys_in, keys_out, vals_in, vals_out, n, end_bit,
//! temp, temp_bytes)` (stable, ascending) and `exclusive_sum(in, out, n, temp, temp_bytes)`;
//! T > 0. Nothing waits: the group count stays in `*groups.count`.
template <class Backend, class Id, class W>
void hyper_group_pipeline(const Backend& be, const routing::plan_view<Id, W>& plan, index_t experts,
                          const hyper_device_scratch& w) {
  const ops::hyper_groups& g = w.groups;
  const index_t tokens = g.tokens;
  be.run(tokens, ops::hyper_token_set<Id, W>{plan, experts, g}, "switchyard::ops::hyper_token_set");
  be.sort_pairs(g.keys, g.keys_sorted, g.tokens_in, g.order, tokens, ops::hyper_key_bits(experts),
                w.temp, w.temp_bytes);
  be.run(tokens, ops::hyper_run_flags{g}, "switchyard::ops::hyper_run_flags");
  be.exclusive_sum(g.leader, g.rank, tokens, w.temp, w.temp_bytes);
  be.exclusive_sum(g.flag, g.run_id, tokens, w.temp, w.temp_bytes);
  be.run(tokens, ops::hyper_run_starts{g}, "switchyard::ops::hyper_run_starts");
  be.run(tokens, ops::hyper_group_bounds{g}, "switchyard::ops::hyper_group_bounds");
}

}  // namespace switchyard::detail
