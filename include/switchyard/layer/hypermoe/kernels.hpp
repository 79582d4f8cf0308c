// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file kernels.hpp
//! The pieces `hypermoe_module` (module.hpp) is built from: the hypernetwork's affine maps,
//! the grouping of tokens by selection set and the scratch layouts, all over caller memory
//! (a `workspace_arena`), so that forward and backward given a workspace do not allocate.
//!
//! Per-row work a CUDA backend would reuse (the unselected sum, one token's adapter) is
//! SWITCHYARD_HD over raw pointers and views.

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "switchyard/core/config.hpp"
#include "switchyard/core/element_type.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/core/workspace.hpp"
#include "switchyard/layer/hypermoe/params.hpp"
#include "switchyard/routing/plan.hpp"

namespace switchyard::detail {
using namespace ::switchyard::layer;  // this block's helpers use switchyard::layer's names

//! max(0, v) with std::max(0.0, v)'s result for every input (NaN and -0 give +0).
SWITCHYARD_HD SWITCHYARD_FORCEINLINE double relu(double v) { return 0.0 < v ? v : 0.0; }

//! y[o] = Σ_i w[o, i]·x[i] + b[o] (double accumulation).
inline void hyper_affine(const hyper_linear_params& l, const double* x, double* y) {
  const index_t out = l.w.extent(0), in = l.w.extent(1);
  for (index_t o = 0; o < out; ++o) {
    double acc = l.b(o);
    for (index_t i = 0; i < in; ++i) acc += static_cast<double>(l.w(o, i)) * x[i];
    y[o] = acc;
  }
}

//! dx[i] += Σ_o w[o, i]·dy[o]; grads.w[o, i] += dy[o]·x[i]; grads.b[o] += dy[o].
inline void hyper_affine_backward(const hyper_linear_params& l, const hyper_linear_grads& g,
                                  const double* x, const double* dy, double* dx) {
  const index_t out = l.w.extent(0), in = l.w.extent(1);
  if (dx != nullptr) {
    for (index_t o = 0; o < out; ++o) {
      if (dy[o] == 0.0) continue;
      for (index_t i = 0; i < in; ++i) dx[i] += static_cast<double>(l.w(o, i)) * dy[o];
    }
  }
  if (present(g.w)) {
    for (index_t o = 0; o < out; ++o)
      for (index_t i = 0; i < in; ++i) g.w(o, i) += static_cast<float>(dy[o] * x[i]);
  }
  if (present(g.b)) {
    for (index_t o = 0; o < out; ++o) g.b(o) += static_cast<float>(dy[o]);
  }
}

//! `base` + `suffix` in a fixed buffer (argument names built without allocating; a longer
//! name is cut at 95 characters).
struct joined_name {
  char buf[96];
  std::size_t n = 0;
  joined_name(std::string_view base, std::string_view suffix) {
    for (char ch : base)
      if (n + 1 < sizeof buf) buf[n++] = ch;
    for (char ch : suffix)
      if (n + 1 < sizeof buf) buf[n++] = ch;
  }
  [[nodiscard]] std::string_view view() const { return {buf, n}; }
};

inline void check_linear(std::string_view name, const hyper_linear_params& l, index_t out,
                         index_t in, std::string_view meaning) {
  check_view(joined_name(name, ".w").view(), l.w, {out, in}, meaning);
  check_view(joined_name(name, ".b").view(), l.b, {l.w.extent(0)}, "[out]");
}

inline void check_linear_grads(std::string_view name, const hyper_linear_grads& g, index_t out,
                               index_t in) {
  if (present(g.w)) check_view(joined_name(name, ".w").view(), g.w, {out, in});
  if (present(g.b)) check_view(joined_name(name, ".b").view(), g.b, {out});
}

// ---- grouping by selection set ---------------------------------------------------------

//! Tokens grouped by their (unordered) set of selected experts, in workspace memory. Groups
//! are numbered in order of first use (their first token's order); a group's tokens are in
//! token order. Built by sorting the token indices by (sorted set, token): no map, no
//! allocation, the same groups whatever the thread count.
struct selection_groups {
  std::int32_t* sets = nullptr;      //!< [T, width]: token t's experts, ascending (set_size[t] used)
  std::int32_t* set_size = nullptr;  //!< [T]
  index_t* order = nullptr;          //!< [T] tokens sorted by (set, token): each group is a run
  index_t* run_begin = nullptr;      //!< [T] for a group's first token: where its run starts
  index_t* run_length = nullptr;     //!< [T] for a group's first token: its run's length; else 0
  index_t* first = nullptr;          //!< [T] first token of group g, g < count (first-use order)
  index_t width = 0;
  index_t count = 0;  //!< number of groups G (<= T)

  //! Experts of group g, ascending.
  [[nodiscard]] const std::int32_t* set(index_t g) const { return sets + first[g] * width; }
  [[nodiscard]] index_t set_length(index_t g) const { return set_size[first[g]]; }
  //! Tokens of group g (token order) and their number.
  [[nodiscard]] const index_t* tokens(index_t g) const { return order + run_begin[first[g]]; }
  [[nodiscard]] index_t size(index_t g) const { return run_length[first[g]]; }
};

//! Takes the grouping arrays for T tokens and `width` slots (null pointers while measuring).
inline selection_groups take_selection_groups(workspace_arena& ws, index_t tokens, index_t width) {
  selection_groups g;
  g.width = width;
  g.sets = ws.take<std::int32_t>(tokens * width);
  g.set_size = ws.take<std::int32_t>(tokens);
  g.order = ws.take<index_t>(tokens);
  g.run_begin = ws.take<index_t>(tokens);
  g.run_length = ws.take<index_t>(tokens);
  g.first = ws.take<index_t>(tokens);
  return g;
}

//! Fills `g` (taken for this plan's T and width) from a validated plan.
template <class Id, class W>
void group_by_selection(const routing::plan_view<Id, W>& plan, selection_groups& g) {
  const index_t tokens = plan.num_tokens(), width = g.width;
  for (index_t t = 0; t < tokens; ++t) {  // each token's set, insertion-sorted (k <= width)
    std::int32_t* row = g.sets + t * width;
    const auto c = static_cast<index_t>(plan.counts(t));
    for (index_t j = 0; j < c; ++j) {
      const auto v = static_cast<std::int32_t>(plan.expert_ids(t, j));
      index_t k = j;
      for (; k > 0 && row[k - 1] > v; --k) row[k] = row[k - 1];
      row[k] = v;
    }
    g.set_size[t] = static_cast<std::int32_t>(c);
    g.order[t] = t;
    g.run_length[t] = 0;
  }
  // -1 / 0 / 1 comparison of two tokens' sets (lexicographic, a prefix first).
  const auto compare = [&](index_t a, index_t b) {
    const std::int32_t *ka = g.sets + a * width, *kb = g.sets + b * width;
    const index_t na = g.set_size[a], nb = g.set_size[b];
    for (index_t j = 0; j < na && j < nb; ++j)
      if (ka[j] != kb[j]) return ka[j] < kb[j] ? -1 : 1;
    return na == nb ? 0 : (na < nb ? -1 : 1);
  };
  std::sort(g.order, g.order + tokens, [&](index_t a, index_t b) {
    const int c = compare(a, b);
    return c != 0 ? c < 0 : a < b;
  });
  for (index_t i = 0; i < tokens;) {  // runs of equal sets; the run's first entry is its first token
    index_t n = 1;
    while (i + n < tokens && compare(g.order[i], g.order[i + n]) == 0) ++n;
    g.run_begin[g.order[i]] = i;
    g.run_length[g.order[i]] = n;
    i += n;
  }
  g.count = 0;
  for (index_t t = 0; t < tokens; ++t)
    if (g.run_length[t] > 0) g.first[g.count++] = t;
}

// ---- selection embedding and the generated adapter --------------------------------------

//! all[i] = Σ_e emb[e, i] in double.
inline void embedding_total(const matrix_view<const float>& emb, double* all) {
  for (index_t i = 0; i < emb.extent(1); ++i) all[i] = 0.0;
  for (index_t e = 0; e < emb.extent(0); ++e)
    for (index_t i = 0; i < emb.extent(1); ++i) all[i] += emb(e, i);
}

//! u = Σ_all − Σ_{e ∈ set} emb[e] (double), set[0..n) in the order given.
SWITCHYARD_HD inline void unselected_sum(const matrix_view<const float>& emb, const double* all,
                                         const std::int32_t* set, index_t n, double* u) {
  for (index_t i = 0; i < emb.extent(1); ++i) u[i] = all[i];
  for (index_t k = 0; k < n; ++k)
    for (index_t i = 0; i < emb.extent(1); ++i) u[i] -= emb(set[k], i);
}

//! Hypernetwork activations of one selection set, over caller memory.
struct generated_adapter {
  double *u, *a1, *r1, *z, *c, *a2, *h;  // embedding_process and generator activations
  double* w_down;                        // [d, a] row-major
  double* w_up;                          // [a, d] row-major
  double* b_up;                          // [d]
  double* b_down;                        // [a]

  //! Doubles one adapter occupies.
  SWITCHYARD_HD static index_t doubles(const hypermoe_dims& s) {
    return s.emb_dim + 2 * s.process_dim + s.hyper_in + (s.hyper_in + s.layer_emb) +
           2 * s.bottleneck + 2 * s.model * s.adapter + s.model + s.adapter;
  }
  //! The arrays laid out one after another from `p` (doubles(s) of them).
  SWITCHYARD_HD static generated_adapter bind(double* p, const hypermoe_dims& s) {
    generated_adapter g{};
    auto next = [&p](index_t n) {
      double* q = p;
      // p is the cursor the lambda captured by reference: advancing it is the point.
      // cppcheck-suppress uselessAssignmentPtrArg
      p += n;
      return q;
    };
    g.u = next(s.emb_dim);
    g.a1 = next(s.process_dim);
    g.r1 = next(s.process_dim);
    g.z = next(s.hyper_in);
    g.c = next(s.hyper_in + s.layer_emb);
    g.a2 = next(s.bottleneck);
    g.h = next(s.bottleneck);
    g.w_down = next(s.model * s.adapter);
    g.w_up = next(s.adapter * s.model);
    g.b_up = next(s.model);
    g.b_down = next(s.adapter);
    return g;
  }
};

//! Runs embedding_process and the generator for one selection set (u already in g.u).
inline void generate_adapter(const hypermoe_params& p, const hypermoe_dims& s, index_t layer,
                             const generated_adapter& g) {
  hyper_affine(p.process1, g.u, g.a1);
  for (index_t i = 0; i < s.process_dim; ++i) g.r1[i] = relu(g.a1[i]);
  hyper_affine(p.process2, g.r1, g.z);
  for (index_t i = 0; i < s.hyper_in; ++i) g.c[i] = g.z[i];
  for (index_t i = 0; i < s.layer_emb; ++i) g.c[s.hyper_in + i] = p.generator.layer_embed(layer, i);
  hyper_affine(p.generator.linear1, g.c, g.a2);
  for (index_t i = 0; i < s.bottleneck; ++i) g.h[i] = relu(g.a2[i]);
  hyper_affine(p.generator.weight_down, g.h, g.w_down);
  hyper_affine(p.generator.weight_up, g.h, g.w_up);
  hyper_affine(p.generator.bias_up, g.h, g.b_up);
  hyper_affine(p.generator.bias_down, g.h, g.b_down);
}

//! m = x·W_down + b_down (pre-activation of the adapter bottleneck), one token.
template <ElementType T>
SWITCHYARD_HD void adapter_down(const matrix_view<const T>& x, index_t t, const double* w_down,
                                const double* b_down, index_t d, index_t a, double* m) {
  for (index_t j = 0; j < a; ++j) m[j] = b_down[j];
  for (index_t i = 0; i < d; ++i) {
    const double xi = to_float(x(t, i));
    const double* row = w_down + i * a;
    for (index_t j = 0; j < a; ++j) m[j] += xi * row[j];
  }
}

//! out[t, :] = ReLU(x_t·W_down + b_down)·W_up + b_up for one token (scratch m [a], y [d]).
template <ElementType T>
SWITCHYARD_HD void adapter_token_forward(const matrix_view<const T>& x, index_t t,
                                         const double* w_down, const double* b_down,
                                         const double* w_up, const double* b_up, index_t d,
                                         index_t a, double* m, double* y,
                                         const matrix_view<float>& out) {
  adapter_down(x, t, w_down, b_down, d, a, m);
  for (index_t o = 0; o < d; ++o) y[o] = b_up[o];
  for (index_t j = 0; j < a; ++j) {
    const double r = relu(m[j]);
    if (r == 0.0) continue;
    const double* row = w_up + j * d;
    for (index_t o = 0; o < d; ++o) y[o] += r * row[o];
  }
  for (index_t o = 0; o < d; ++o) out(t, o) = static_cast<float>(y[o]);
}

//! Backward's scratch beyond the grouping: one adapter and every cotangent of its chain.
struct hyper_backward_scratch {
  generated_adapter g{};
  double *d_w_down, *d_w_up, *d_b_up, *d_b_down;  // cotangents of the generated adapter
  double *dh, *da2, *dc, *dz, *dr1, *da1, *du;     // ... of the hypernetwork activations
  double *m, *dm, *dxt;                            // one token's adapter pass
  double *du_all, *du_sel, *d_layer_embed;         // sums over groups ([d_emb], [E, d_emb], [d_le])

  static hyper_backward_scratch take(workspace_arena& ws, const hypermoe_dims& s) {
    const index_t a = s.adapter, d = s.model;
    const index_t n = generated_adapter::doubles(s) + 2 * d * a + d + a + 2 * s.bottleneck +
                      (s.hyper_in + s.layer_emb) + s.hyper_in + 2 * s.process_dim + s.emb_dim +
                      2 * a + d + s.emb_dim + s.experts * s.emb_dim + s.layer_emb;
    double* p = ws.take<double>(n);
    hyper_backward_scratch b{};
    if (p == nullptr) return b;  // measuring
    b.g = generated_adapter::bind(p, s);
    p += generated_adapter::doubles(s);
    auto next = [&p](index_t k) {
      double* q = p;
      p += k;
      return q;
    };
    b.d_w_down = next(d * a);
    b.d_w_up = next(a * d);
    b.d_b_up = next(d);
    b.d_b_down = next(a);
    b.dh = next(s.bottleneck);
    b.da2 = next(s.bottleneck);
    b.dc = next(s.hyper_in + s.layer_emb);
    b.dz = next(s.hyper_in);
    b.dr1 = next(s.process_dim);
    b.da1 = next(s.process_dim);
    b.du = next(s.emb_dim);
    b.m = next(a);
    b.dm = next(a);
    b.dxt = next(d);
    b.du_all = next(s.emb_dim);
    b.du_sel = next(s.experts * s.emb_dim);
    b.d_layer_embed = next(s.layer_emb);
    return b;
  }
};

}  // namespace switchyard::detail
