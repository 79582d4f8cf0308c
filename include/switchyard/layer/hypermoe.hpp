#pragma once
//! \file hypermoe.hpp
//! HyperMoE (Zhao et al., ACL 2024; spec `routing-algorithms.md` §4): a module the layer
//! applies *after* routing. From the plan's unselected experts it builds a selection
//! embedding, feeds it through a hypernetwork shared by all layers, and applies the
//! generated per-token bottleneck adapter to the token:
//!
//!     u      = Σ_{e ∉ S(t)} emb[e]            = Σ_all emb − Σ_{e ∈ S(t)} emb   (O(k·d_emb))
//!     z      = W₂·ReLU(W₁·u + b₁) + b₂                                 (embedding_process)
//!     h      = ReLU(G₁·[z ; layer_embed[ℓ]] + g₁)                       (ParameterGenerator)
//!     W_down = reshape(H_d·h + c_d, [d, a])   (row-major, input-dim major)
//!     W_up   = reshape(H_u·h + c_u, [a, d]),  b_down = B_d·h + c_bd,  b_up = B_u·h + c_bu
//!     hyper(x) = ReLU(x·W_down + b_down)·W_up + b_up
//!
//! The layer output is `Σ_j w_j·Expert_j(x) + hyper(x)`; this header computes `hyper(x)`
//! and its backward. It also carries the pieces of the two upstream variants that are not
//! plain top-k routing: Switch capacity in token order with HF's load-balance quirk, and
//! the GPT-2 variant's cv² loss (see docs/routers/hypermoe.md).
//!
//! Host implementation: float32 storage, float64 accumulation. Tokens that selected the same
//! expert set share u, z, h and the generated adapter, so the hypernetwork runs once per
//! distinct selection set (at most E sets for top-1), not once per token.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "switchyard/core/element_type.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/routing/plan.hpp"

namespace switchyard::layer {

//! An `nn.Linear` of the hypernetwork: `w [out, in]`, `b [out]` (y = w·x + b).
struct hyper_linear_params {
  matrix_view<const float> w;  //!< [out, in]
  vector_view<const float> b;  //!< [out]
};

//! Gradients of one `nn.Linear`, accumulated (+=); an empty view skips that gradient.
struct hyper_linear_grads {
  matrix_view<float> w;  //!< [out, in]
  vector_view<float> b;  //!< [out]
};

//! The ParameterGenerator shared by every layer of a stack (`HM-sw: adapter_generators.py`).
//! `b` = hypernetwork_bottleneck, `h_in` = hypernet_input, `d_le` = layer_emb_dim,
//! `a` = adapter_dim, `d` = model width.
struct hypernet_generator_params {
  matrix_view<const float> layer_embed;  //!< [L, d_le]
  hyper_linear_params linear1;           //!< [b, h_in + d_le] — input is [z ; layer_embed[ℓ]]
  hyper_linear_params weight_up;         //!< [a·d, b] — generates W_up [a, d], row-major
  hyper_linear_params weight_down;       //!< [d·a, b] — generates W_down [d, a], row-major
  hyper_linear_params bias_up;           //!< [d, b]   — generates b_up [d]
  hyper_linear_params bias_down;         //!< [a, b]   — generates b_down [a]
};

//! Gradients of the shared generator (accumulated; empty views skipped).
struct hypernet_generator_grads {
  matrix_view<float> layer_embed;  //!< [L, d_le]; only row ℓ = layer_idx receives gradient
  hyper_linear_grads linear1;      //!< [b, h_in + d_le]
  hyper_linear_grads weight_up;    //!< [a·d, b]
  hyper_linear_grads weight_down;  //!< [d·a, b]
  hyper_linear_grads bias_up;      //!< [d, b]
  hyper_linear_grads bias_down;    //!< [a, b]
};

//! Everything `hypermoe_module` reads: the layer's expert embeddings and
//! `embedding_process`, and a view of the stack's shared generator.
struct hypermoe_params {
  matrix_view<const float> expert_emb;  //!< [E, d_emb] (`n_experts_embedding`)
  hyper_linear_params process1;         //!< [p, d_emb] — embedding_process Linear 1 (then ReLU)
  hyper_linear_params process2;         //!< [h_in, p]  — embedding_process Linear 2
  hypernet_generator_params generator;  //!< shared by all layers
};

//! Gradients mirroring `hypermoe_params` (accumulated with +=; an empty view skips it).
struct hypermoe_grads {
  matrix_view<float> expert_emb;       //!< [E, d_emb]
  hyper_linear_grads process1;         //!< [p, d_emb]
  hyper_linear_grads process2;         //!< [h_in, p]
  hypernet_generator_grads generator;  //!< shared: several layers accumulate into it
};

//! The sizes `hypermoe_params` imply (filled by `hypermoe_module::validate`).
struct hypermoe_dims {
  index_t experts = 0;     //!< E
  index_t emb_dim = 0;     //!< d_emb (experts_embedding_dim)
  index_t process_dim = 0; //!< p
  index_t hyper_in = 0;    //!< h_in (hypernet_input)
  index_t layers = 0;      //!< L (rows of layer_embed)
  index_t layer_emb = 0;   //!< d_le (layer_emb_dim)
  index_t bottleneck = 0;  //!< b (hypernetwork_bottleneck)
  index_t model = 0;       //!< d
  index_t adapter = 0;     //!< a (adapter_dim)
};

//! Bound of the upstream "hyperfanin" uniform init of a generator head:
//! `1e-3·sqrt(3/(hypernet_in·mainnet_in))` (weight_up: mainnet_in = a, weight_down:
//! mainnet_in = d; bias heads: mainnet_in = 1). Biases start at 0, so the generated adapter,
//! and with it `hyper(x)`, starts ≈ 0: HyperMoE starts as the plain MoE.
inline double hyperfanin_bound(index_t hypernet_in, index_t mainnet_in) {
  return 1e-3 * std::sqrt(3.0 / (static_cast<double>(hypernet_in) * static_cast<double>(mainnet_in)));
}

namespace detail {

template <class V>
bool present(const V& v) {
  return v.data_handle() != nullptr;
}

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

inline void check_linear(std::string_view name, const hyper_linear_params& l, index_t out,
                         index_t in, std::string_view meaning) {
  check_view(::switchyard::detail::concat(name, ".w"), l.w, {out, in}, meaning);
  check_view(::switchyard::detail::concat(name, ".b"), l.b, {l.w.extent(0)}, "[out]");
}

inline void check_linear_grads(std::string_view name, const hyper_linear_grads& g, index_t out,
                               index_t in) {
  if (present(g.w)) check_view(::switchyard::detail::concat(name, ".w"), g.w, {out, in});
  if (present(g.b)) check_view(::switchyard::detail::concat(name, ".b"), g.b, {out});
}

//! One distinct selection set and the tokens that chose it.
struct selection_group {
  std::vector<std::int32_t> experts;  //!< sorted, unique
  std::vector<index_t> tokens;        //!< in token order
};

//! Groups tokens by their (unordered) set of selected experts; groups in order of first use.
template <class Id, class W>
std::vector<selection_group> group_by_selection(const routing::plan_view<Id, W>& plan) {
  std::vector<selection_group> groups;
  std::map<std::vector<std::int32_t>, std::size_t> index;
  std::vector<std::int32_t> key;
  for (index_t t = 0; t < plan.num_tokens(); ++t) {
    key.clear();
    for (index_t j = 0; j < static_cast<index_t>(plan.counts(t)); ++j)
      key.push_back(static_cast<std::int32_t>(plan.expert_ids(t, j)));
    std::sort(key.begin(), key.end());
    key.erase(std::unique(key.begin(), key.end()), key.end());
    auto [it, inserted] = index.try_emplace(key, groups.size());
    if (inserted) groups.push_back({key, {}});
    groups[it->second].tokens.push_back(t);
  }
  return groups;
}

//! Σ_e emb[e] in double.
inline std::vector<double> embedding_total(const matrix_view<const float>& emb) {
  std::vector<double> all(static_cast<std::size_t>(emb.extent(1)), 0.0);
  for (index_t e = 0; e < emb.extent(0); ++e)
    for (index_t i = 0; i < emb.extent(1); ++i) all[i] += emb(e, i);
  return all;
}

//! u = Σ_all − Σ_{e ∈ set} emb[e] (double).
inline void unselected_sum(const matrix_view<const float>& emb, const std::vector<double>& all,
                           const std::vector<std::int32_t>& set, double* u) {
  for (index_t i = 0; i < emb.extent(1); ++i) u[i] = all[i];
  for (auto e : set)
    for (index_t i = 0; i < emb.extent(1); ++i) u[i] -= emb(e, i);
}

//! Hypernetwork activations of one selection set.
struct generated_adapter {
  std::vector<double> u, a1, r1, z, c, a2, h;  // embedding_process and generator activations
  std::vector<double> w_down;                  // [d, a] row-major
  std::vector<double> w_up;                    // [a, d] row-major
  std::vector<double> b_up;                    // [d]
  std::vector<double> b_down;                  // [a]

  void resize(const hypermoe_dims& s) {
    u.resize(s.emb_dim);
    a1.resize(s.process_dim);
    r1.resize(s.process_dim);
    z.resize(s.hyper_in);
    c.resize(s.hyper_in + s.layer_emb);
    a2.resize(s.bottleneck);
    h.resize(s.bottleneck);
    w_down.resize(s.model * s.adapter);
    w_up.resize(s.adapter * s.model);
    b_up.resize(s.model);
    b_down.resize(s.adapter);
  }
};

//! Runs embedding_process and the generator for one selection set (u already in g.u).
inline void generate_adapter(const hypermoe_params& p, const hypermoe_dims& s, index_t layer,
                             generated_adapter& g) {
  hyper_affine(p.process1, g.u.data(), g.a1.data());
  for (index_t i = 0; i < s.process_dim; ++i) g.r1[i] = std::max(0.0, g.a1[i]);
  hyper_affine(p.process2, g.r1.data(), g.z.data());
  for (index_t i = 0; i < s.hyper_in; ++i) g.c[i] = g.z[i];
  for (index_t i = 0; i < s.layer_emb; ++i) g.c[s.hyper_in + i] = p.generator.layer_embed(layer, i);
  hyper_affine(p.generator.linear1, g.c.data(), g.a2.data());
  for (index_t i = 0; i < s.bottleneck; ++i) g.h[i] = std::max(0.0, g.a2[i]);
  hyper_affine(p.generator.weight_down, g.h.data(), g.w_down.data());
  hyper_affine(p.generator.weight_up, g.h.data(), g.w_up.data());
  hyper_affine(p.generator.bias_up, g.h.data(), g.b_up.data());
  hyper_affine(p.generator.bias_down, g.h.data(), g.b_down.data());
}

//! m = x·W_down + b_down (pre-activation of the adapter bottleneck), one token.
template <ElementType T>
void adapter_down(const matrix_view<const T>& x, index_t t, const generated_adapter& g,
                  const hypermoe_dims& s, double* m) {
  for (index_t j = 0; j < s.adapter; ++j) m[j] = g.b_down[j];
  for (index_t i = 0; i < s.model; ++i) {
    const double xi = to_float(x(t, i));
    const double* row = g.w_down.data() + i * s.adapter;
    for (index_t j = 0; j < s.adapter; ++j) m[j] += xi * row[j];
  }
}

//! Validates an owning plan passed to a public function: T, width and E non-negative, the
//! arrays the function reads sized for them (shape_error naming "plan.<array>"), then
//! routing::validate_plan (range_error on "plan.counts" / "plan.expert_ids" for a count
//! outside [0, width], an id outside [0, E) or a repeated expert).
inline void validate_owned_plan(const routing::routing_plan& plan) {
  ::switchyard::detail::require_in_range<index_t>("plan.num_tokens", plan.num_tokens, 0,
                                                  std::numeric_limits<index_t>::max());
  ::switchyard::detail::require_in_range<index_t>("plan.width", plan.width, 0,
                                                  std::numeric_limits<index_t>::max());
  ::switchyard::detail::require_in_range<index_t>("plan.num_experts", plan.num_experts, 0,
                                                  std::numeric_limits<index_t>::max());
  const auto slots = static_cast<std::size_t>(plan.num_tokens * plan.width);
  const auto require_size = [](const char* name, std::size_t got, std::size_t want,
                               const char* meaning) {
    if (got != want) {
      throw shape_error(name, ::switchyard::detail::concat(name, ": expected ", want,
                                                           " elements ", meaning, ", got ", got));
    }
  };
  require_size("plan.expert_ids", plan.expert_ids.size(), slots, "[T·width]");
  require_size("plan.weights", plan.weights.size(), slots, "[T·width]");
  require_size("plan.counts", plan.counts.size(), static_cast<std::size_t>(plan.num_tokens), "[T]");
  routing::validate_plan("plan", plan.view(), plan.num_tokens, plan.num_experts);
}

}  // namespace detail

//! The HyperMoE module of one layer: applies the adapter generated from the plan's
//! unselected experts. Stateless: `backward` recomputes the (cheap, per selection set)
//! hypernetwork activations instead of caching per-token adapters.
struct hypermoe_module {
  int layer_idx = 0;    //!< ℓ: row of the shared `layer_embed`, in [0, L)
  int adapter_dim = 64; //!< a: bottleneck width of the generated adapter, >= 1

  //! Checks every parameter view against the others and against the model width `d`;
  //! throws shape_error (naming the argument, the expected shape and the one received) or
  //! range_error (`layer_idx` outside [0, L), `adapter_dim` < 1). Returns the sizes.
  [[nodiscard]] hypermoe_dims validate(const hypermoe_params& p, index_t d) const {
    if (adapter_dim < 1) {
      throw range_error("adapter_dim", ::switchyard::detail::concat(
                                           "adapter_dim must be >= 1, got ", adapter_dim));
    }
    hypermoe_dims s;
    check_view("params.expert_emb", p.expert_emb, {-1, -1}, "[E, d_emb]");
    s.experts = p.expert_emb.extent(0);
    s.emb_dim = p.expert_emb.extent(1);
    check_view("params.generator.layer_embed", p.generator.layer_embed, {-1, -1}, "[L, d_le]");
    s.layers = p.generator.layer_embed.extent(0);
    s.layer_emb = p.generator.layer_embed.extent(1);
    if (layer_idx < 0 || layer_idx >= s.layers) {
      throw range_error("layer_idx",
                        ::switchyard::detail::concat(
                            "layer_idx must be in [0, L) = [0, ", s.layers,
                            ") (L = params.generator.layer_embed.extent(0)), got ", layer_idx));
    }
    s.model = d;
    s.adapter = adapter_dim;
    detail::check_linear("params.process1", p.process1, -1, s.emb_dim, "[p, d_emb]");
    s.process_dim = p.process1.w.extent(0);
    detail::check_linear("params.process2", p.process2, -1, s.process_dim, "[h_in, p]");
    s.hyper_in = p.process2.w.extent(0);
    detail::check_linear("params.generator.linear1", p.generator.linear1, -1,
                         s.hyper_in + s.layer_emb, "[b, h_in + d_le]");
    s.bottleneck = p.generator.linear1.w.extent(0);
    detail::check_linear("params.generator.weight_up", p.generator.weight_up, s.adapter * s.model,
                         s.bottleneck, "[adapter_dim·d, b]");
    detail::check_linear("params.generator.weight_down", p.generator.weight_down,
                         s.model * s.adapter, s.bottleneck, "[d·adapter_dim, b]");
    detail::check_linear("params.generator.bias_up", p.generator.bias_up, s.model, s.bottleneck,
                         "[d, b]");
    detail::check_linear("params.generator.bias_down", p.generator.bias_down, s.adapter,
                         s.bottleneck, "[adapter_dim, b]");
    return s;
  }

  //! Selection embedding of every token, `u [T, d_emb]` = Σ of the embeddings of the experts
  //! the plan did *not* select (computed as Σ_all − Σ_selected; the plan is validated, so a
  //! token's used slots name distinct experts: a repeated id is rejected with range_error).
  template <class Id, class W>
  void selection_embedding(const routing::plan_view<Id, W>& plan,
                           const matrix_view<const float>& expert_emb,
                           const matrix_view<float>& u) const {
    check_view("expert_emb", expert_emb, {-1, -1}, "[E, d_emb]");
    routing::validate_plan("plan", plan, plan.num_tokens(), expert_emb.extent(0));
    check_view("u", u, {plan.num_tokens(), expert_emb.extent(1)}, "[T, d_emb]");
    const auto all = detail::embedding_total(expert_emb);
    std::vector<double> tmp(static_cast<std::size_t>(expert_emb.extent(1)));
    for (const auto& grp : detail::group_by_selection(plan)) {
      detail::unselected_sum(expert_emb, all, grp.experts, tmp.data());
      for (index_t t : grp.tokens)
        for (index_t i = 0; i < expert_emb.extent(1); ++i) u(t, i) = static_cast<float>(tmp[i]);
    }
  }

  //! hyper_out [T, d] = hyper(x) (overwritten) for x [T, d] routed by `plan` (only its
  //! ids and counts are read; the plan's E must equal params.expert_emb.extent(0)).
  template <ElementType T, class Id, class W>
  void forward(const matrix_view<const T>& x, const routing::plan_view<Id, W>& plan,
               const hypermoe_params& p, const matrix_view<float>& hyper_out) const {
    const auto s = check_inputs(x, plan, p);
    check_view("hyper_out", hyper_out, {x.extent(0), s.model}, "[T, d]");
    const auto groups = detail::group_by_selection(plan);
    const auto all = detail::embedding_total(p.expert_emb);
    const auto n_groups = static_cast<std::int64_t>(groups.size());
#pragma omp parallel
    {
      detail::generated_adapter g;
      g.resize(s);
      std::vector<double> m(s.adapter), y(s.model);
#pragma omp for schedule(dynamic)
      for (std::int64_t gi = 0; gi < n_groups; ++gi) {
        const auto& grp = groups[gi];
        detail::unselected_sum(p.expert_emb, all, grp.experts, g.u.data());
        detail::generate_adapter(p, s, layer_idx, g);
        for (index_t t : grp.tokens) {
          detail::adapter_down(x, t, g, s, m.data());
          for (index_t o = 0; o < s.model; ++o) y[o] = g.b_up[o];
          for (index_t j = 0; j < s.adapter; ++j) {
            const double r = std::max(0.0, m[j]);
            if (r == 0.0) continue;
            const double* row = g.w_up.data() + j * s.model;
            for (index_t o = 0; o < s.model; ++o) y[o] += r * row[o];
          }
          for (index_t o = 0; o < s.model; ++o) hyper_out(t, o) = static_cast<float>(y[o]);
        }
      }
    }
  }

  //! Backward of `hyper_out = hyper(x)` given its cotangent `dy [T, d]`: dx [T, d] += ∂/∂x
  //! (the adapter path only), and every hypernetwork / embedding gradient in `grads` +=.
  //! Any output may be an empty view (skipped). The selection is not differentiable.
  template <ElementType T, class Id, class W>
  void backward(const matrix_view<const T>& x, const routing::plan_view<Id, W>& plan,
                const hypermoe_params& p, const matrix_view<const float>& dy,
                const matrix_view<float>& dx, const hypermoe_grads& grads) const {
    const auto s = check_inputs(x, plan, p);
    const index_t tokens = x.extent(0);
    check_view("dy", dy, {tokens, s.model}, "[T, d]");
    if (detail::present(dx)) check_view("dx", dx, {tokens, s.model}, "[T, d]");
    check_grads(grads, s);

    const auto groups = detail::group_by_selection(plan);
    const auto all = detail::embedding_total(p.expert_emb);
    detail::generated_adapter g;
    g.resize(s);
    std::vector<double> m(s.adapter), dm(s.adapter), dxt(s.model);
    std::vector<double> d_w_down, d_w_up, d_b_up, d_b_down, dh, da2, dc, dz, dr1, da1, du;
    // Σ over groups of du (for every expert) and, per expert, Σ of du over the groups that
    // selected it: grad emb[e] = du_all − du_sel[e] (O(k·d_emb) per group).
    std::vector<double> du_all(s.emb_dim, 0.0), du_sel(s.experts * s.emb_dim, 0.0);
    std::vector<double> d_layer_embed(s.layer_emb, 0.0);

    for (const auto& grp : groups) {
      detail::unselected_sum(p.expert_emb, all, grp.experts, g.u.data());
      detail::generate_adapter(p, s, layer_idx, g);
      d_w_down.assign(s.model * s.adapter, 0.0);
      d_w_up.assign(s.adapter * s.model, 0.0);
      d_b_up.assign(s.model, 0.0);
      d_b_down.assign(s.adapter, 0.0);
      for (index_t t : grp.tokens) {
        detail::adapter_down(x, t, g, s, m.data());
        // y = r·W_up + b_up, r = ReLU(m)
        for (index_t o = 0; o < s.model; ++o) d_b_up[o] += dy(t, o);
        for (index_t j = 0; j < s.adapter; ++j) {
          const double r = std::max(0.0, m[j]);
          const double* wrow = g.w_up.data() + j * s.model;
          double* dwrow = d_w_up.data() + j * s.model;
          double dr = 0.0;
          for (index_t o = 0; o < s.model; ++o) {
            const double dyo = dy(t, o);
            dr += wrow[o] * dyo;
            if (r != 0.0) dwrow[o] += r * dyo;
          }
          dm[j] = m[j] > 0.0 ? dr : 0.0;
          d_b_down[j] += dm[j];
        }
        // m = x·W_down + b_down
        for (index_t i = 0; i < s.model; ++i) {
          const double xi = to_float(x(t, i));
          const double* wrow = g.w_down.data() + i * s.adapter;
          double* dwrow = d_w_down.data() + i * s.adapter;
          double acc = 0.0;
          for (index_t j = 0; j < s.adapter; ++j) {
            acc += wrow[j] * dm[j];
            dwrow[j] += xi * dm[j];
          }
          dxt[i] = acc;
        }
        if (detail::present(dx))
          for (index_t i = 0; i < s.model; ++i) dx(t, i) += static_cast<float>(dxt[i]);
      }
      // Generator heads -> h.
      dh.assign(s.bottleneck, 0.0);
      const auto& gp = p.generator;
      const auto& gg = grads.generator;
      detail::hyper_affine_backward(gp.weight_down, gg.weight_down, g.h.data(), d_w_down.data(),
                                    dh.data());
      detail::hyper_affine_backward(gp.weight_up, gg.weight_up, g.h.data(), d_w_up.data(),
                                    dh.data());
      detail::hyper_affine_backward(gp.bias_up, gg.bias_up, g.h.data(), d_b_up.data(), dh.data());
      detail::hyper_affine_backward(gp.bias_down, gg.bias_down, g.h.data(), d_b_down.data(),
                                    dh.data());
      // h = ReLU(linear1(c)), c = [z ; layer_embed[ℓ]].
      da2.resize(s.bottleneck);
      for (index_t i = 0; i < s.bottleneck; ++i) da2[i] = g.a2[i] > 0.0 ? dh[i] : 0.0;
      dc.assign(s.hyper_in + s.layer_emb, 0.0);
      detail::hyper_affine_backward(gp.linear1, gg.linear1, g.c.data(), da2.data(), dc.data());
      for (index_t i = 0; i < s.layer_emb; ++i) d_layer_embed[i] += dc[s.hyper_in + i];
      // z = process2(ReLU(process1(u))).
      dz.assign(dc.begin(), dc.begin() + s.hyper_in);
      dr1.assign(s.process_dim, 0.0);
      detail::hyper_affine_backward(p.process2, grads.process2, g.r1.data(), dz.data(),
                                    dr1.data());
      da1.resize(s.process_dim);
      for (index_t i = 0; i < s.process_dim; ++i) da1[i] = g.a1[i] > 0.0 ? dr1[i] : 0.0;
      du.assign(s.emb_dim, 0.0);
      detail::hyper_affine_backward(p.process1, grads.process1, g.u.data(), da1.data(), du.data());
      for (index_t i = 0; i < s.emb_dim; ++i) du_all[i] += du[i];
      for (auto e : grp.experts)
        for (index_t i = 0; i < s.emb_dim; ++i) du_sel[e * s.emb_dim + i] += du[i];
    }
    if (detail::present(grads.generator.layer_embed)) {
      for (index_t i = 0; i < s.layer_emb; ++i)
        grads.generator.layer_embed(layer_idx, i) += static_cast<float>(d_layer_embed[i]);
    }
    if (detail::present(grads.expert_emb)) {
      for (index_t e = 0; e < s.experts; ++e)
        for (index_t i = 0; i < s.emb_dim; ++i)
          grads.expert_emb(e, i) += static_cast<float>(du_all[i] - du_sel[e * s.emb_dim + i]);
    }
  }

  //! Convenience overloads taking an owning `routing_plan`.
  template <ElementType T>
  void forward(const matrix_view<const T>& x, const routing::routing_plan& plan,
               const hypermoe_params& p, const matrix_view<float>& hyper_out) const {
    forward(x, plan.view(), p, hyper_out);
  }
  //! \copydoc forward
  template <ElementType T>
  void backward(const matrix_view<const T>& x, const routing::routing_plan& plan,
                const hypermoe_params& p, const matrix_view<const float>& dy,
                const matrix_view<float>& dx, const hypermoe_grads& grads) const {
    backward(x, plan.view(), p, dy, dx, grads);
  }

 private:
  template <ElementType T, class Id, class W>
  hypermoe_dims check_inputs(const matrix_view<const T>& x, const routing::plan_view<Id, W>& plan,
                             const hypermoe_params& p) const {
    check_view("x", x, {-1, -1}, "[T, d]");
    const auto s = validate(p, x.extent(1));
    if (plan.num_experts != s.experts) {
      throw shape_error("plan", ::switchyard::detail::concat(
                                    "plan: num_experts must equal params.expert_emb.extent(0) = ",
                                    s.experts, ", got ", plan.num_experts));
    }
    routing::validate_plan("plan", plan, x.extent(0), s.experts);
    return s;
  }

  static void check_grads(const hypermoe_grads& g, const hypermoe_dims& s) {
    if (detail::present(g.expert_emb))
      check_view("grads.expert_emb", g.expert_emb, {s.experts, s.emb_dim}, "[E, d_emb]");
    detail::check_linear_grads("grads.process1", g.process1, s.process_dim, s.emb_dim);
    detail::check_linear_grads("grads.process2", g.process2, s.hyper_in, s.process_dim);
    if (detail::present(g.generator.layer_embed))
      check_view("grads.generator.layer_embed", g.generator.layer_embed, {s.layers, s.layer_emb},
                 "[L, d_le]");
    detail::check_linear_grads("grads.generator.linear1", g.generator.linear1, s.bottleneck,
                               s.hyper_in + s.layer_emb);
    detail::check_linear_grads("grads.generator.weight_up", g.generator.weight_up,
                               s.adapter * s.model, s.bottleneck);
    detail::check_linear_grads("grads.generator.weight_down", g.generator.weight_down,
                               s.model * s.adapter, s.bottleneck);
    detail::check_linear_grads("grads.generator.bias_up", g.generator.bias_up, s.model,
                               s.bottleneck);
    detail::check_linear_grads("grads.generator.bias_down", g.generator.bias_down, s.adapter,
                               s.bottleneck);
  }
};

// ---------------------------------------------------------------------------------------
// Switch-Transformer variant (spec §4.1): top-1 routing = routers::TopK{.k = 1,
// .renormalize = false}; capacity and the HF load-balance quirk below.

//! HF Switch capacity in token order: for every used slot, in token order, the slot is
//! dropped once its expert already holds `expert_capacity` tokens. `dropped [T·width]`
//! (slot order, 0/1) is written; returns the number of dropped slots. A dropped Switch token
//! contributes `p*·x` (the layer passes the token through) instead of `p*·Expert(x)`; the plan
//! itself (ids, weights, counts) is left as the router made it. Throws range_error for a
//! negative capacity or a plan that fails routing::validate_plan, shape_error for `dropped`.
inline index_t switch_capacity_drop(const routing::routing_plan& plan, index_t expert_capacity,
                                    ::cuda::std::span<std::int32_t> dropped) {
  if (expert_capacity < 0) {
    throw range_error("expert_capacity", ::switchyard::detail::concat(
                                             "expert_capacity must be >= 0, got ", expert_capacity));
  }
  const auto need = static_cast<std::size_t>(plan.num_tokens * plan.width);
  if (dropped.size() != need) {
    throw shape_error("dropped", ::switchyard::detail::concat("dropped: expected ", need,
                                                              " elements [T·width], got ",
                                                              dropped.size()));
  }
  detail::validate_owned_plan(plan);
  std::vector<index_t> load(static_cast<std::size_t>(plan.num_experts), 0);
  index_t n = 0;
  for (index_t t = 0; t < plan.num_tokens; ++t) {
    for (index_t j = 0; j < plan.width; ++j) {
      const auto slot = static_cast<std::size_t>(t * plan.width + j);
      dropped[slot] = 0;
      if (j >= plan.counts[t]) continue;
      const auto e = plan.expert_ids[slot];
      if (load[e] >= expert_capacity) {
        dropped[slot] = 1;
        ++n;
      } else {
        ++load[e];
      }
    }
  }
  return n;
}

//! HF Switch load-balance loss `E·Σ_e f_e·P̄_e` as `HM-sw` computes it: `f` from the
//! capacity-masked top-1 one-hot through `argmax`, so a token whose slot 0 was dropped counts
//! as expert 0 (upstream quirk, reproduced). `dropped` as from `switch_capacity_drop`.
//! 0 for an empty batch. Throws shape_error when plan.probs is not [T·E] or `dropped` not
//! [T·width], range_error when the plan fails routing::validate_plan.
inline float switch_hf_load_balance_loss(const routing::routing_plan& plan,
                                         ::cuda::std::span<const std::int32_t> dropped) {
  detail::validate_owned_plan(plan);
  const index_t tokens = plan.num_tokens, e_count = plan.num_experts;
  const auto probs_need = static_cast<std::size_t>(tokens * e_count);
  if (plan.probs.size() != probs_need) {
    throw shape_error("plan.probs", ::switchyard::detail::concat(
                                        "plan.probs: expected ", probs_need,
                                        " elements [T·E], got ", plan.probs.size()));
  }
  const auto dropped_need = static_cast<std::size_t>(tokens * plan.width);
  if (dropped.size() != dropped_need) {
    throw shape_error("dropped", ::switchyard::detail::concat("dropped: expected ", dropped_need,
                                                              " elements [T·width], got ",
                                                              dropped.size()));
  }
  if (tokens == 0) return 0.0f;
  if (e_count == 0) {  // f[0] below needs an expert 0
    throw range_error("plan.num_experts",
                      "plan.num_experts must be >= 1 for a non-empty batch, got 0");
  }
  std::vector<double> f(static_cast<std::size_t>(e_count), 0.0), pbar(f);
  for (index_t t = 0; t < tokens; ++t) {
    const bool kept = plan.counts[t] > 0 && dropped[static_cast<std::size_t>(t * plan.width)] == 0;
    f[kept ? plan.id(t, 0) : 0] += 1.0;
    for (index_t e = 0; e < e_count; ++e) pbar[e] += plan.probs[t * e_count + e];
  }
  double s = 0.0;
  for (index_t e = 0; e < e_count; ++e) s += (f[e] / tokens) * (pbar[e] / tokens);
  return static_cast<float>(s * e_count);
}

//! Router jitter of HF Switch, `x ← x ⊙ U(1−ε, 1+ε)`, applied to the *router's copy* of the
//! input only and only when training [Switchyard choice; upstream HM-sw applies it in eval
//! too and in place, so experts and adapter see the jittered x]. No-op for ε = 0.
template <class Rng>
void switch_router_jitter(const matrix_view<float>& x_router_copy, float epsilon, Rng& rng) {
  if (!(epsilon >= 0.0f)) {
    throw range_error("epsilon", ::switchyard::detail::concat("epsilon must be >= 0, got ", epsilon));
  }
  if (epsilon == 0.0f) return;
  std::uniform_real_distribution<float> u(1.0f - epsilon, 1.0f + epsilon);
  for (index_t t = 0; t < x_router_copy.extent(0); ++t)
    for (index_t i = 0; i < x_router_copy.extent(1); ++i) x_router_copy(t, i) *= u(rng);
}

// ---------------------------------------------------------------------------------------
// GPT-2 variant (spec §4.2): logits = x·w_gate with w_gate [d, E] — pass
// `make_strided_view(w_gate, {E, d}, {1, E})` to routers::TopK{.k = k, .renormalize = true}.

//! `cv²(v) = var(v)/(mean(v)² + 1e-10)` with the unbiased variance; 0 when v has < 2 entries
//! (upstream's `x.shape[0] == 1` guard).
inline double cv_squared(::cuda::std::span<const double> v) {
  const auto n = static_cast<index_t>(v.size());
  if (n < 2) return 0.0;
  double mean = 0.0;
  for (double a : v) mean += a;
  mean /= static_cast<double>(n);
  double var = 0.0;
  for (double a : v) var += (a - mean) * (a - mean);
  var /= static_cast<double>(n - 1);
  return var / (mean * mean + 1e-10);
}

//! Eval-mode balance loss of the GPT-2 variant (Shazeer): `coef·(cv²(importance) +
//! cv²(load))`, importance_e = Σ_t gate_{t,e} (the plan's combine weights), load_e = number of
//! tokens with gate_{t,e} > 0. `coef` is upstream's `loss_coef` (0.01). The training-mode
//! smooth load estimate (`_prob_in_top_k`) is not implemented. Throws range_error when the
//! plan fails routing::validate_plan.
inline float gpt2_cv_loss_eval(const routing::routing_plan& plan, double coef = 0.01) {
  detail::validate_owned_plan(plan);
  const index_t e_count = plan.num_experts;
  std::vector<double> importance(static_cast<std::size_t>(e_count), 0.0), load(importance);
  for (index_t t = 0; t < plan.num_tokens; ++t) {
    for (index_t j = 0; j < plan.counts[t]; ++j) {
      const auto e = plan.id(t, j);
      const float w = plan.weight(t, j);
      importance[e] += w;
      if (w > 0.0f) load[e] += 1.0;
    }
  }
  return static_cast<float>(coef * (cv_squared({importance.data(), importance.size()}) +
                                    cv_squared({load.data(), load.size()})));
}

}  // namespace switchyard::layer
