// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file layer.hpp
//! The host backend's executor: `backend::executor<host_context>`, what `MoELayer`'s entry
//! points call under a `host_context` once the shared shape checks have passed. It reads the
//! data (non-finite tokens, plan contents), runs the router (backend/host/route.hpp), the
//! add-on, the shared experts (backend/host/shared_experts.hpp), the non-FFN expert kinds
//! (identity, zero, constant: ops/expert_kinds.hpp) and the routed experts
//! (backend/host/experts.hpp), and carves
//! every scratch array from the caller's workspace: with one of the queried size nothing here
//! allocates.
//!
//! Workspace layout (each block 64-byte aligned, sizes measured by the same carving code;
//! [bracketed] blocks only when the layer has the feature):
//! forward  = [router scratch][add-on term [T, d] + add-on scratch][compacted plan]
//!            [term [T, d]][phase region]
//! backward = [d_weights [T·width]][router scratch][compacted plan + its d_weights]
//!            [constant coefficients [T·width·3], pairs [T·width], offsets [C + 1]]
//!            [phase region][add-on dy [T, d] + scratch]
//! The compacted plan (the FFN slots of a plan with non-FFN experts) exists when the layer has
//! identity, zero or constant experts, the constant coefficients when it has constant experts,
//! the float term [T, d] (shared + add-on terms, then the non-FFN slots' terms in slot order,
//! added by the routed phase before y is rounded) when there are shared or non-FFN experts. The
//! phase
//! region holds the routed experts' scratch; with shared experts it is the larger of the
//! routed and the shared phase's, which run one after the other in it.

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <vector>

#include "switchyard/backend/host/blas_info.hpp"
#include "switchyard/backend/host/experts.hpp"
#include "switchyard/backend/host/route.hpp"
#include "switchyard/backend/host/shared_experts.hpp"
#include "switchyard/core/context.hpp"
#include "switchyard/core/element_type.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/core/workspace.hpp"
#include "switchyard/layer/expert_weights.hpp"
#include "switchyard/layer/state.hpp"
#include "switchyard/backend/host/dispatch_plan.hpp"
#include "switchyard/dispatch/groups.hpp"
#include "switchyard/ops/expert_kinds.hpp"
#include "switchyard/routing/plan.hpp"

namespace switchyard {
namespace detail {

//! Throws non_finite_error naming the first (in row-major order) non-finite element of x.
template <ElementType T>
void require_finite_tokens(const matrix_view<const T>& x) {
  const index_t tokens = x.extent(0), d = x.extent(1);
  index_t first = tokens * d;
#pragma omp parallel for schedule(static) reduction(min : first) if (tokens * d > (1 << 16))
  for (index_t t = 0; t < tokens; ++t)
    for (index_t i = 0; i < d; ++i)
      if (!std::isfinite(to_float(x(t, i)))) first = std::min(first, t * d + i);
  if (first < tokens * d) {
    throw non_finite_error(
        "x", detail::concat(
                 "x: every element must be finite, got ", to_float(x(first / d, first % d)),
                 " at x[", first / d, ", ", first % d,
                 "] (Switchyard refuses non-finite tokens; see docs/layer.md, NaN policy)"));
  }
}

//! Throws shape_error("workspace") when a caller's workspace (non-empty) is smaller than
//! `required` bytes: checked before anything is written, so a too small workspace never
//! leaves a half-done result (or half-accumulated gradients).
inline void require_workspace(span<std::byte> workspace, std::size_t required) {
  if (!workspace.empty() && workspace.size() < required) {
    throw shape_error("workspace", concat("workspace: expected at least ", required,
                                          " bytes (see workspace_size), got ", workspace.size()));
  }
}

//! Bytes the add-on takes from its workspace (0 when it declares none).
template <class A>
std::size_t addon_workspace_size(const A& a, index_t tokens, index_t d, index_t width,
                                 index_t experts, const typename A::params_type& p) {
  if constexpr (requires { a.workspace_size(tokens, d, width, experts, p); }) {
    return a.workspace_size(tokens, d, width, experts, p);
  } else {
    return 0;
  }
}

//! A sub-arena of `bytes` bytes carved from `ws` (measuring while `ws` measures).
inline workspace_arena sub_arena(workspace_arena& ws, std::size_t bytes) {
  std::byte* p = ws.take<std::byte>(static_cast<index_t>(bytes));
  return ws.carving() ? workspace_arena({p, bytes}) : workspace_arena();
}

//! Bytes `phase(arena)` takes, measured over a fresh measuring arena.
template <class F>
std::size_t measured_bytes(const F& phase) {
  workspace_arena m;
  phase(m);
  return m.required();
}

//! The plan the routed expert phase runs: the caller's plan, or (non-FFN experts) its FFN
//! slots compacted into workspace arrays, ids in [0, E).
struct compacted_plan {
  std::int32_t* ids = nullptr;     //!< [T·width]
  float* weights = nullptr;        //!< [T·width]
  std::int32_t* counts = nullptr;  //!< [T]

  //! Carves the arrays when `identity` (the layer has non-FFN experts; nothing otherwise).
  static compacted_plan carve(workspace_arena& ws, bool identity, index_t tokens, index_t width) {
    compacted_plan c;
    if (!identity) return c;
    c.ids = ws.take<std::int32_t>(tokens * width);
    c.weights = ws.take<float>(tokens * width);
    c.counts = ws.take<std::int32_t>(tokens);
    return c;
  }

  //! The plan to run: `plan` itself without non-FFN experts, else (carving) its compaction
  //! over `experts` = E FFN experts, filled here.
  template <class Id, class W>
  routing::plan_view<Id, W> make(const routing::plan_view<Id, W>& plan, bool identity,
                                 bool carving, index_t tokens, index_t width,
                                 index_t experts) const {
    if (!identity || !carving) return plan;
    run_static(tokens, tokens * width > (1 << 15),
               ops::compact_ffn_slots<Id, W>{plan.expert_ids, plan.weights, plan.counts,
                                                  width, experts, ids, weights, counts});
    return {make_view<Id>(ids, tokens, width), make_view<W>(weights, tokens, width),
            make_view<Id>(counts, tokens), experts};
  }
};

}  // namespace detail

namespace host {

//! What the routed expert phase was handed and computed, summed over the phases run on this
//! thread while an `expert_rows_probe` is installed.
struct expert_rows_stats {
  index_t phases = 0;   //!< routed expert phases run (forward and backward each count one)
  index_t experts = 0;  //!< the expert count the last phase ran with (E: FFN experts only)
  index_t pairs = 0;    //!< used slots of the plans the phases ran (their FFN pairs)
  index_t max_id = -1;  //!< largest expert id in those plans (< experts)
  //! Token rows the phases' GEMMs computed, before the row-panel padding: grouped dispatches
  //! Σ_e rows kept by expert e; dense T per expert with at least one pair.
  index_t rows = 0;
};

//! A test/diagnostic hook: while one is alive on a thread, the host executor records in
//! `stats` what every routed expert phase on that thread received (the compacted plan when the
//! layer has non-FFN experts) and the GEMM rows it computed, planned by the same
//! `host::plan_groups` the phase runs. It proves that identity, zero and constant slots cost no
//! GEMM row. Recording allocates (index arrays per phase): never install one where the
//! no-allocation promise matters. Probes do not nest (the newest one records).
class expert_rows_probe {
 public:
  expert_rows_stats stats{};  //!< what was recorded so far

  expert_rows_probe() : previous_(slot()) { slot() = this; }
  ~expert_rows_probe() { slot() = previous_; }
  expert_rows_probe(const expert_rows_probe&) = delete;
  expert_rows_probe& operator=(const expert_rows_probe&) = delete;

  //! The probe installed on this thread, or null.
  static expert_rows_probe* current() { return slot(); }

  //! Records one phase over `plan` (ids in [0, experts)) under `dispatch`.
  template <class DispatchPolicy, class Id, class W>
  void record(const DispatchPolicy& dispatch, const routing::plan_view<Id, W>& plan,
              index_t experts) {
    const index_t tokens = plan.num_tokens(), width = plan.width();
    ++stats.phases;
    stats.experts = experts;
    for (index_t t = 0; t < tokens; ++t) {
      const index_t c = plan.counts(t);
      stats.pairs += c;
      for (index_t j = 0; j < c; ++j)
        stats.max_id = std::max<index_t>(stats.max_id, plan.expert_ids(t, j));
    }
    const std::size_t e = static_cast<std::size_t>(experts), pairs =
        static_cast<std::size_t>(tokens * width);
    std::vector<index_t> begin(e), count(e), dropped(e), pair_row(pairs),
        row_pair(std::max<std::size_t>(
            pairs, static_cast<std::size_t>(dispatch.max_rows(tokens, width, experts))));
    dispatch::expert_groups g;
    g.row_begin = {begin.data(), e};
    g.row_count = {count.data(), e};
    g.dropped = {dropped.data(), e};
    g.pair_row = {pair_row.data(), pairs};
    g.row_pair = {row_pair.data(), row_pair.size()};
    host::plan_groups(dispatch, plan, g);
    const bool grouped = DispatchPolicy::layout == dispatch::dispatch_layout::grouped_rows;
    for (std::size_t k = 0; k < e; ++k) {
      if (grouped) stats.rows += count[k];
      else if (count[k] > 0) stats.rows += tokens;
    }
  }

 private:
  expert_rows_probe* previous_;
  static expert_rows_probe*& slot() {
    thread_local expert_rows_probe* p = nullptr;
    return p;
  }
};

}  // namespace host

namespace backend {

//! The host backend (plain C++20 + OpenMP + an optional CBLAS).
template <>
struct executor<host_context> {
  static constexpr bool is_backend = true;

  //! The sizes of one expert phase.
  template <class Layer, ElementType T>
  static host::expert_dims dims(const Layer& layer, index_t tokens, index_t width,
                                const expert_weights<T>& w) {
    host::expert_dims dm;
    dm.tokens = tokens;
    dm.width = width;
    dm.experts = layer.ffn_experts(w);  // E (global under ExpertParallel; w holds E/N)
    dm.d = w.d_model();
    dm.d_ff = w.d_ff();
    dm.p = w.projection_width();
    dm.max_rows = layer.dispatch.max_rows(tokens, width, dm.experts);
    dm.batch_invariant = layer.batch_invariant;
    dm.weight_on_input = layer.router_weight_on_input;
    return dm;
  }

  // ---- workspace queries (the measuring pass of the same carving code) -------------------

  template <class Layer, ElementType T>
  static std::size_t experts_workspace_size(const host_context&, const Layer& layer,
                                            index_t tokens, index_t width,
                                            const expert_weights<T>& w,
                                            const typename Layer::addon_params& ap) {
    workspace_arena ws;
    run_forward<T>(layer, {}, {}, w, {}, dims(layer, tokens, width, w), {}, ws, ap);
    return ws.required();
  }

  template <class Layer, ElementType T>
  static std::size_t experts_backward_workspace_size(const host_context&, const Layer& layer,
                                                     index_t tokens, index_t width,
                                                     const expert_weights<T>& w,
                                                     const typename Layer::addon_params& ap) {
    workspace_arena ws;
    run_backward<T>(layer, {}, {}, w, {}, {}, {}, nullptr, dims(layer, tokens, width, w), ws, ap,
                    {});
    return ws.required();
  }

  template <class Layer, ElementType T>
  static std::size_t forward_workspace_size(const host_context&, const Layer& layer,
                                            index_t tokens, const typename Layer::router_params& rp,
                                            const expert_weights<T>& w,
                                            const typename Layer::addon_params& ap) {
    workspace_arena ws;
    (void)detail::sub_arena(ws, host::router_workspace_size(layer.router, tokens, rp));
    run_forward<T>(layer, {}, {}, w, {}, dims(layer, tokens, layer.router.width(rp), w), {}, ws,
                   ap);
    return ws.required();
  }

  template <class Layer, ElementType T>
  static std::size_t backward_workspace_size(const host_context&, const Layer& layer,
                                             index_t tokens,
                                             const typename Layer::router_params& rp,
                                             const expert_weights<T>& w,
                                             const typename Layer::addon_params& ap) {
    workspace_arena ws;
    const index_t width = layer.router.width(rp);
    (void)ws.take<float>(tokens * width);
    (void)detail::sub_arena(ws, host::router_workspace_size(layer.router, tokens, rp));
    run_backward<T>(layer, {}, {}, w, {}, {}, {}, nullptr, dims(layer, tokens, width, w), ws, ap,
                    {});
    return ws.required();
  }

  // ---- entry points -------------------------------------------------------------------------

  template <class Layer, ElementType T>
  static void forward(const host_context& ctx, const Layer& layer, const matrix_view<const T>& x,
                      const typename Layer::router_params& rp, const expert_weights<T>& w,
                      const matrix_view<T>& y, const typename Layer::state_type& state,
                      span<std::byte> workspace, const typename Layer::addon_params& ap) {
    host::warn_if_generic_blas();  // once per process: a BLAS on generic kernels is slow
    agreed_check(layer, [&] { detail::require_finite_tokens<T>(x); });
    const index_t tokens = x.extent(0);
    const std::size_t need = forward_workspace_size(ctx, layer, tokens, rp, w, ap);
    detail::require_workspace(workspace, need);
    std::vector<std::byte> owned;
    if (workspace.empty()) {
      owned.resize(need);
      workspace = {owned.data(), owned.size()};
    }
    workspace_arena ws(workspace);
    workspace_arena rws =
        detail::sub_arena(ws, host::router_workspace_size(layer.router, tokens, rp));
    host::router_forward(layer.router, x, rp, state.plan, *state.losses, rws);
    const auto plan = state.plan.const_view();
    routing::validate_plan("plan", plan, tokens, layer.routed_experts(w));
    run_forward<T>(layer, x, plan, w, y, dims(layer, tokens, plan.width(), w), state.dropped, ws,
                   ap);
  }

  template <class Layer, ElementType T>
  static void forward_experts(const host_context& ctx, const Layer& layer,
                              const matrix_view<const T>& x,
                              const typename Layer::plan_type& plan, const expert_weights<T>& w,
                              const matrix_view<T>& y, span<index_t> dropped,
                              span<std::byte> workspace, const typename Layer::addon_params& ap) {
    agreed_check(layer,
                 [&] { routing::validate_plan("plan", plan, x.extent(0), layer.routed_experts(w)); });
    const host::expert_dims dm = dims(layer, x.extent(0), plan.width(), w);
    const std::size_t need = experts_workspace_size(ctx, layer, dm.tokens, dm.width, w, ap);
    detail::require_workspace(workspace, need);
    std::vector<std::byte> owned;
    if (workspace.empty()) {
      owned.resize(need);
      workspace = {owned.data(), owned.size()};
    }
    workspace_arena ws(workspace);
    run_forward<T>(layer, x, plan, w, y, dm, dropped, ws, ap);
  }

  template <class Layer, ElementType T>
  static void backward(const host_context& ctx, const Layer& layer, const matrix_view<const T>& x,
                       const typename Layer::router_params& rp, const expert_weights<T>& w,
                       const typename Layer::state_type& state, const matrix_view<const T>& dy,
                       const typename Layer::losses_type& coeffs, const matrix_view<float>& dx,
                       const expert_grads& grads, const typename Layer::router_grads& rgrads,
                       span<std::byte> workspace, const typename Layer::addon_params& ap,
                       const typename Layer::addon_grads& ag) {
    host::warn_if_generic_blas();  // once per process: a BLAS on generic kernels is slow
    const auto plan = state.plan.const_view();
    agreed_check(layer,
                 [&] { routing::validate_plan("plan", plan, x.extent(0), layer.routed_experts(w)); });
    const index_t tokens = state.plan.num_tokens, width = state.plan.width;
    const std::size_t need = backward_workspace_size(ctx, layer, tokens, rp, w, ap);
    detail::require_workspace(workspace, need);
    std::vector<std::byte> owned;
    if (workspace.empty()) {
      owned.resize(need);
      workspace = {owned.data(), owned.size()};
    }
    workspace_arena ws(workspace);
    float* d_weights = ws.take<float>(tokens * width);
    workspace_arena rws =
        detail::sub_arena(ws, host::router_workspace_size(layer.router, tokens, rp));
    run_backward<T>(layer, x, plan, w, dy, dx, grads, d_weights, dims(layer, tokens, width, w), ws,
                    ap, ag);
    host::router_backward(layer.router, x, rp, state.plan, d_weights, coeffs, dx, rgrads, rws);
  }

  template <class Layer, ElementType T>
  static void backward_experts(const host_context& ctx, const Layer& layer,
                               const matrix_view<const T>& x,
                               const typename Layer::plan_type& plan, const expert_weights<T>& w,
                               const matrix_view<const T>& dy, const matrix_view<float>& dx,
                               const expert_grads& grads, span<float> d_weights,
                               span<std::byte> workspace, const typename Layer::addon_params& ap,
                               const typename Layer::addon_grads& ag) {
    agreed_check(layer,
                 [&] { routing::validate_plan("plan", plan, x.extent(0), layer.routed_experts(w)); });
    const host::expert_dims dm = dims(layer, x.extent(0), plan.width(), w);
    const std::size_t need = experts_backward_workspace_size(ctx, layer, dm.tokens, dm.width, w, ap);
    detail::require_workspace(workspace, need);
    std::vector<std::byte> owned;
    if (workspace.empty()) {
      owned.resize(need);
      workspace = {owned.data(), owned.size()};
    }
    workspace_arena ws(workspace);
    run_backward<T>(layer, x, plan, w, dy, dx, grads, d_weights.data(), dm, ws, ap, ag);
  }

  private:
  //! Runs a check of the data (finite tokens, a caller's plan). Under expert parallelism
  //! (`parallel::ExpertParallel`) every rank first learns whether all ranks' checks passed,
  //! so all throw the same typed error or none (no rank waits in an exchange for one that
  //! threw).
  template <class Layer, class F>
  static void agreed_check(const Layer& layer, const F& check) {
    if constexpr (Layer::expert_parallel) {
      (void)layer.dispatch.agree_on([&] {
        check();
        return std::array<index_t, 4>{};
      });
    } else {
      check();
    }
  }

  //! The add-on's term, the shared experts' and the non-FFN slots' (when the layer has them,
  //! summed in that order into one float term), then the routed experts and the combine.
  template <ElementType T, class Layer>
  static void run_forward(const Layer& layer, const matrix_view<const T>& x,
                          const typename Layer::plan_type& plan, const expert_weights<T>& w,
                          const matrix_view<T>& y, const host::expert_dims& dm,
                          span<index_t> dropped, workspace_arena& ws,
                          const typename Layer::addon_params& ap) {
    const bool shared = w.shared.present(), kinds = layer.has_expert_kinds();
    float* extra = nullptr;
    if constexpr (Layer::has_addon) {
      extra = ws.take<float>(dm.tokens * dm.d);  // [T, d]
      workspace_arena aws = detail::sub_arena(
          ws, detail::addon_workspace_size(layer.addon, dm.tokens, dm.d, dm.width, dm.experts, ap));
      if (ws.carving()) layer.addon.forward(x, plan, ap, make_view(extra, dm.tokens, dm.d), aws);
    }
    const detail::compacted_plan cp =
        detail::compacted_plan::carve(ws, kinds, dm.tokens, dm.width);
    const auto run_plan = cp.make(plan, kinds, ws.carving(), dm.tokens, dm.width, dm.experts);
    float* term = (shared || kinds) ? ws.take<float>(dm.tokens * dm.d) : nullptr;  // [T, d]
    // The routed phase (its `extra`: the term when there is one, else the add-on's).
    const float* routed_extra = term != nullptr ? term : extra;
    auto routed = [&](workspace_arena& a) {
      if (a.carving()) record_phase(layer, run_plan, dm.experts);
      host::experts_forward(layer.dispatch, layer.activation, dm, x, run_plan, w, routed_extra, y,
                            dropped, a);
    };
    auto shared_phase = [&](workspace_arena& a) {
      host::shared_experts_forward(layer.activation, dm.tokens, dm.d, layer.batch_invariant, x,
                                   w.shared, extra, term, a);
    };
    auto kind_terms = [&](const float* in) {
      detail::run_static(dm.tokens, dm.tokens * dm.width * dm.d > (1 << 15),
                         ops::expert_kind_rows<T, T, const std::int32_t, const float>{
                             plan.expert_ids, plan.weights, plan.counts, layer.expert_kinds(w), x,
                             w.constant.v, w.constant.gate, dm.d, in, term});
    };
    if (!shared) {
      if (kinds && ws.carving()) kind_terms(extra);
      routed(ws);
      zero_identity_drops(dropped, dm.experts, ws.carving());
      return;
    }
    // Shared experts: both phases run in one region, the larger of their scratch sizes.
    const std::size_t bytes =
        std::max(detail::measured_bytes(shared_phase), detail::measured_bytes(routed));
    std::byte* region = ws.take<std::byte>(static_cast<index_t>(bytes));
    if (!ws.carving()) return;
    workspace_arena first({region, bytes});
    shared_phase(first);  // term = shared (+ add-on)
    if (kinds) kind_terms(term);
    workspace_arena second({region, bytes});
    routed(second);
    zero_identity_drops(dropped, dm.experts, true);
  }

  //! Tells an installed `host::expert_rows_probe` what the routed phase runs.
  template <class Layer, class Id, class W>
  static void record_phase(const Layer& layer, const routing::plan_view<Id, W>& plan,
                           index_t experts) {
    if (host::expert_rows_probe* p = host::expert_rows_probe::current()) {
      p->record(layer.dispatch, plan, experts);
    }
  }

  //! The non-FFN experts' drop counts (past the E FFN experts) are 0.
  static void zero_identity_drops(span<index_t> dropped, index_t experts, bool carving) {
    if (!carving) return;
    for (std::size_t e = static_cast<std::size_t>(experts); e < dropped.size(); ++e) dropped[e] = 0;
  }

  //! The routed experts' backward (over the compacted plan with non-FFN experts, whose
  //! d_weights are then scattered back to slot order with the non-FFN slots', the constant
  //! experts' parameter gradients after), the shared experts', then the add-on's (its dy
  //! converted to float rows).
  template <ElementType T, class Layer>
  static void run_backward(const Layer& layer, const matrix_view<const T>& x,
                           const typename Layer::plan_type& plan, const expert_weights<T>& w,
                           const matrix_view<const T>& dy, const matrix_view<float>& dx,
                           const expert_grads& grads, float* d_weights, const host::expert_dims& dm,
                           workspace_arena& ws, const typename Layer::addon_params& ap,
                           const typename Layer::addon_grads& ag) {
    const bool shared = w.shared.present(), kinds = layer.has_expert_kinds();
    const bool constant = layer.constant_experts > 0;
    const detail::compacted_plan cp =
        detail::compacted_plan::carve(ws, kinds, dm.tokens, dm.width);
    float* compact_dw = kinds ? ws.take<float>(dm.tokens * dm.width) : nullptr;
    float* coef = constant ? ws.take<float>(dm.tokens * dm.width * 3) : nullptr;
    index_t* cpairs = constant ? ws.take<index_t>(dm.tokens * dm.width) : nullptr;
    index_t* coffsets = constant ? ws.take<index_t>(layer.constant_experts + 1) : nullptr;
    const auto run_plan = cp.make(plan, kinds, ws.carving(), dm.tokens, dm.width, dm.experts);
    auto routed = [&](workspace_arena& a) {
      if (a.carving()) record_phase(layer, run_plan, dm.experts);
      host::experts_backward(layer.dispatch, layer.activation, dm, x, run_plan, w, dy, dx, grads,
                             kinds ? compact_dw : d_weights, a);
    };
    auto shared_phase = [&](workspace_arena& a) {
      host::shared_experts_backward(layer.activation, dm.tokens, dm.d, layer.batch_invariant, x,
                                    w.shared, dy, dx, grads.shared, a);
    };
    std::byte* region = nullptr;
    std::size_t bytes = 0;
    if (shared) {
      bytes = std::max(detail::measured_bytes(shared_phase), detail::measured_bytes(routed));
      region = ws.take<std::byte>(static_cast<index_t>(bytes));
    } else {
      routed(ws);  // measuring: takes its scratch; carving: runs
    }
    float* dybuf = nullptr;
    workspace_arena aws;
    if constexpr (Layer::has_addon) {
      dybuf = ws.take<float>(dm.tokens * dm.d);  // [T, d] dy as float
      aws = detail::sub_arena(
          ws, detail::addon_workspace_size(layer.addon, dm.tokens, dm.d, dm.width, dm.experts, ap));
    }
    if (!ws.carving()) return;
    if (shared) {
      workspace_arena first({region, bytes});
      routed(first);
    }
    if (kinds) {
      const ops::expert_ranges r = layer.expert_kinds(w);
      detail::run_static(dm.tokens, dm.tokens * dm.width * dm.d > (1 << 15),
                         ops::expert_kind_backward_rows<T, T, const std::int32_t, const float>{
                             plan.expert_ids, plan.weights, plan.counts, dm.width, r, x, dy,
                             w.constant.v, w.constant.gate, dm.d, compact_dw, d_weights, dx,
                             detail::present(dx), coef});
      if (constant && (detail::present(grads.constant.v) || detail::present(grads.constant.gate))) {
        ops::group_constant_pairs(plan.expert_ids, plan.counts, dm.tokens, dm.width, r, cpairs,
                                  coffsets);
        detail::run_static(layer.constant_experts * dm.d, coffsets[r.constant] * dm.d > (1 << 15),
                           ops::constant_param_grads<T>{cpairs, coffsets, dm.width, x, dy, dm.d,
                                                        coef, grads.constant.v,
                                                        grads.constant.gate});
      }
    }
    if (shared) {
      workspace_arena second({region, bytes});
      shared_phase(second);
    }
    if constexpr (Layer::has_addon) {
      for (index_t t = 0; t < dm.tokens; ++t)
        for (index_t i = 0; i < dm.d; ++i) dybuf[t * dm.d + i] = to_float(dy(t, i));
      layer.addon.backward(x, plan, ap,
                           matrix_view<const float>(make_view<const float>(dybuf, dm.tokens, dm.d)),
                           dx, ag, d_weights, aws);
    }
  }
};

}  // namespace backend
}  // namespace switchyard
