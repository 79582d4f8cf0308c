// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file moe_layer.hpp
//! `switchyard::MoELayer<Router, Activation, Dispatch, AddOn>`: routes `x [T, d]` with any
//! router of the contract in docs/design.md, runs the expert FFNs through the dispatch policy
//! and combines `y_t = Σ_j w_tj · FFN_{e_tj}(x_t)` (+ the add-on's term); backward gives dx,
//! the expert-weight gradients, the router's gradients and those of the aux losses with
//! caller-chosen coefficients. See docs/layer.md.
//!
//! The layer is backend neutral: every entry point takes an execution context first
//! (`host_context`, `cuda::context`), checks the shapes and the policies' hyperparameters
//! (shared by every backend), and hands the work to `backend::executor<Context>`
//! (core/context.hpp). This header includes no backend.
//!
//! NaN policy: a NaN or Inf anywhere in x throws `non_finite_error` naming the element
//! (checked by the backend before routing, so the error does not depend on the router).
//! Expert weights are not scanned: a non-finite weight propagates to the outputs of the
//! tokens routed to it. dy is not scanned either (a scan would cost a pass over [T, d] per
//! backward, and loss scaling relies on seeing an overflow in the gradients): a non-finite
//! dy_t propagates, like any float, to dx_t and to the gradients of the experts and router
//! parameters token t reaches; the other tokens' dx rows are unchanged. docs/errors.md.
//!
//! Failure policy (docs/errors.md): every entry point checks all its arguments (shapes,
//! ranges, sizes whose products must fit in 64 bits, outputs overlapping inputs, the
//! workspace's size, the gradient views) before it writes anything, so after a typed error
//! from the checks no output, gradient or state has changed. A forward marks its state
//! incomplete (`moe_state::complete`) as it starts writing and complete when it returns;
//! backward rejects an incomplete state.

#include <array>
#include <cstddef>
#include <cstdint>
#include <iterator>
#include <limits>
#include <type_traits>
#include <utility>

#include "switchyard/activation/concepts.hpp"
#include "switchyard/core/checked.hpp"
#include "switchyard/core/context.hpp"
#include "switchyard/core/element_type.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/dispatch/concepts.hpp"
#include "switchyard/dispatch/sorted_grouped.hpp"
#include "switchyard/layer/addon.hpp"
#include "switchyard/layer/expert_weights.hpp"
#include "switchyard/layer/state.hpp"
#include "switchyard/ops/expert_kinds.hpp"
#include "switchyard/routing/concepts.hpp"
#include "switchyard/routing/plan.hpp"

namespace switchyard {

//! Used slots of a plan (Σ_t counts[t]); the plan's arrays in host memory.
template <class Id, class W>
[[nodiscard]] index_t used_pairs(const routing::plan_view<Id, W>& plan) {
  index_t n = 0;
  for (index_t t = 0; t < plan.num_tokens(); ++t) n += static_cast<index_t>(plan.counts(t));
  return n;
}

//! FFN pairs of a plan: used slots whose id names one of the `experts` = E FFN experts (ids
//! >= E are identity, zero or constant experts, which run no GEMM). Host memory.
template <class Id, class W>
[[nodiscard]] index_t ffn_pairs(const routing::plan_view<Id, W>& plan, index_t experts) {
  index_t n = 0;
  for (index_t t = 0; t < plan.num_tokens(); ++t) {
    const index_t c = plan.counts(t);
    for (index_t j = 0; j < c; ++j) n += static_cast<index_t>(plan.expert_ids(t, j)) < experts;
  }
  return n;
}

//! What `MoELayer::compute(w, plan)` reports: the FLOP accounting of the FFN slots only.
struct expert_compute {
  index_t ffn_pairs = 0;      //!< used slots naming an FFN expert
  index_t non_ffn_pairs = 0;  //!< used slots naming an identity, zero or constant expert
  double ffn_flops = 0.0;     //!< 2 · ffn_pairs · (P + d_ff) · d: the FFN GEMMs' forward FLOPs
};

//! A Mixture-of-Experts layer: `RouterPolicy` × `ActivationPolicy` × `DispatchPolicy` (+ an
//! `AddOnPolicy` module applied after routing). An aggregate of its four policies: configure
//! them by member, e.g. `MoELayer<routers::TopK, activation::swiglu>{.router = {.k = 2}}`.
template <class RouterPolicy, class ActivationPolicy,
          class DispatchPolicy = dispatch::sorted_grouped, class AddOnPolicy = no_addon>
struct MoELayer {
  static_assert(check_router<RouterPolicy>(),
                "switchyard: MoELayer's first parameter must be a router");
  static_assert(check_activation<ActivationPolicy>(),
                "switchyard: MoELayer's second parameter must be an activation");
  static_assert(check_dispatch<DispatchPolicy>(),
                "switchyard: MoELayer's third parameter must be a dispatch policy");
  static_assert(AddOnModule<AddOnPolicy>,
                "switchyard: MoELayer's fourth parameter must be `no_addon` or a module "
                "declaring `using policy_kind = switchyard::addon_tag;` with params_type, "
                "grads_type, forward and backward (see layer/addon.hpp)");

  using router_type = RouterPolicy;                             //!< the router policy
  using activation_type = ActivationPolicy;                     //!< the activation policy
  using dispatch_type = DispatchPolicy;                         //!< the dispatch policy
  using addon_type = AddOnPolicy;                               //!< the add-on module
  using router_params = typename RouterPolicy::params_type;     //!< router parameter views
  using router_grads = typename RouterPolicy::grads_type;       //!< router gradient views
  using losses_type = typename RouterPolicy::losses_type;       //!< aux losses / coefficients
  using addon_params = typename AddOnPolicy::params_type;       //!< add-on parameters
  using addon_grads = typename AddOnPolicy::grads_type;         //!< add-on gradients
  using state_type = moe_state<losses_type>;                    //!< forward state (views)
  using result_type = moe_result<losses_type>;                  //!< forward state (host owner)
  using plan_type = routing::plan_view<const std::int32_t, const float>;  //!< a plan to run
  //! Whether the experts' first projection is the fused [gate | up].
  static constexpr bool gated = activation_traits<ActivationPolicy>::is_gated;
  //! Whether an add-on module contributes a term (false for `no_addon`).
  static constexpr bool has_addon = !std::is_same_v<AddOnPolicy, no_addon>;

  RouterPolicy router{};          //!< routing policy and its hyperparameters
  ActivationPolicy activation{};  //!< expert activation
  DispatchPolicy dispatch{};      //!< how (token, slot) pairs reach the experts
  AddOnPolicy addon{};            //!< module applied after routing
  //! Promise a token the same output and dx bits whatever other tokens share its batch
  //! (T = 1 or 1000, any neighbours, any order) and on any CPU: the token-row GEMMs run on
  //! fixed-order kernels instead of the BLAS (slower; docs/design.md, "Same bits on any
  //! machine"). Results never depend on the thread count, with or without it.
  bool batch_invariant = false;
  //! Llama-4: the combine weight scales the expert's input instead of its output,
  //! `y_t = Σ_j FFN_{e_tj}(w_tj · x_t)` (and d_weights is ∂/∂w of that). Host backend.
  bool router_weight_on_input = false;
  //! Non-FFN expert kinds (docs/layer.md, "Shared experts and expert kinds"). The router and
  //! the plan count `routed_experts(w)` = E + identity_experts + zero_experts +
  //! constant_experts experts (E = weights.num_experts()), ids in the order FFN [0, E),
  //! identity, zero, constant. Their slots never reach the expert GEMMs: the combine adds their
  //! terms. Host backend.
  //!
  //! LongCat-Flash zero-computation experts: ids in `[E, E + identity_experts)` output their
  //! input, contributing `w_tj · x_t`.
  index_t identity_experts = 0;
  //! AdaMoE null experts: the next `zero_experts` ids output 0 (no term; their d_weights is 0).
  index_t zero_experts = 0;
  //! MoE++ constant experts: the last `constant_experts` ids; expert c contributes
  //! `w_tj · (α1 · x_t + α2 · v_c)` with `[α1, α2] = softmax(gate_c · x_t)`, parameters in
  //! `weights.constant` (`v [C, d]`, `gate [C, 2, d]`), gradients in `grads.constant`.
  index_t constant_experts = 0;

  //! Whether the dispatch shards the FFN experts over ranks (`parallel::ExpertParallel`):
  //! `w` then holds this rank's E/N experts and the router scores all E.
  static constexpr bool expert_parallel =
      requires(const DispatchPolicy& d, index_t n) { d.global_experts(n); d.ranks(); };

  //! The E FFN experts the router and the plan count: `w.num_experts()`, or under expert
  //! parallelism the global count `dispatch.global_experts(w.num_experts())` (E/N per rank).
  template <ElementType T>
  [[nodiscard]] index_t ffn_experts(const expert_weights<T>& w) const {
    if constexpr (expert_parallel) return dispatch.global_experts(w.num_experts());
    else return w.num_experts();
  }

  //! Experts the router and the plan count: the E FFN experts plus the non-FFN ones.
  template <ElementType T>
  [[nodiscard]] index_t routed_experts(const expert_weights<T>& w) const {
    return ffn_experts(w) + identity_experts + zero_experts + constant_experts;
  }

  //! The id ranges of the layer's expert kinds for weights `w`.
  template <ElementType T>
  [[nodiscard]] ops::expert_ranges expert_kinds(const expert_weights<T>& w) const {
    return {ffn_experts(w), identity_experts, zero_experts, constant_experts};
  }

  //! True when the layer has non-FFN experts (identity, zero or constant).
  [[nodiscard]] bool has_expert_kinds() const {
    return identity_experts != 0 || zero_experts != 0 || constant_experts != 0;
  }

  //! FLOP accounting of a plan (host memory): the FFN pairs (slots with id < E), the non-FFN
  //! pairs, and the forward FLOPs of the FFN slots' GEMMs, `2 · ffn_pairs · (P + d_ff) · d`
  //! (P = w1.extent(1)); non-FFN slots count no GEMM FLOP. Capacity drops are not subtracted.
  template <ElementType T>
  [[nodiscard]] expert_compute compute(const expert_weights<T>& w, const plan_type& plan) const {
    expert_compute r;
    r.ffn_pairs = ffn_pairs(plan, ffn_experts(w));
    r.non_ffn_pairs = used_pairs(plan) - r.ffn_pairs;
    r.ffn_flops = 2.0 * static_cast<double>(r.ffn_pairs) *
                  static_cast<double>(w.projection_width() + w.d_ff()) *
                  static_cast<double>(w.d_model());
    return r;
  }

  // ---- workspace queries ----------------------------------------------------------------
  // With an add-on, pass its params too: its scratch may depend on them (HyperMoE's does).

  //! Bytes of workspace `forward` needs for T tokens (router params give E and the width).
  template <ElementType T, class Context>
  [[nodiscard]] std::size_t workspace_size(const Context& ctx, index_t tokens,
                                           const router_params& rp, const expert_weights<T>& w,
                                           const addon_params& ap = {}) const {
    dispatch.validate();  // capacity fields first: the backend's sizing reads them
    check_sizes(tokens, router.width(rp), router.num_experts(rp), w);
    return backend::executor<Context>::forward_workspace_size(ctx, *this, tokens, rp, w, ap);
  }

  //! Bytes of workspace `forward_experts` needs for a plan of T tokens and `width` slots.
  template <ElementType T, class Context>
  [[nodiscard]] std::size_t experts_workspace_size(const Context& ctx, index_t tokens,
                                                   index_t width, const expert_weights<T>& w,
                                                   const addon_params& ap = {}) const {
    dispatch.validate();  // capacity fields first: the backend's sizing reads them
    check_sizes(tokens, width, routed_experts(w), w);
    return backend::executor<Context>::experts_workspace_size(ctx, *this, tokens, width, w, ap);
  }

  //! Bytes of workspace `backward` needs (the same arguments as workspace_size).
  template <ElementType T, class Context>
  [[nodiscard]] std::size_t backward_workspace_size(const Context& ctx, index_t tokens,
                                                    const router_params& rp,
                                                    const expert_weights<T>& w,
                                                    const addon_params& ap = {}) const {
    dispatch.validate();  // capacity fields first: the backend's sizing reads them
    check_sizes(tokens, router.width(rp), router.num_experts(rp), w);
    return backend::executor<Context>::backward_workspace_size(ctx, *this, tokens, rp, w, ap);
  }

  //! Bytes of workspace `backward_experts` needs.
  template <ElementType T, class Context>
  [[nodiscard]] std::size_t experts_backward_workspace_size(const Context& ctx, index_t tokens,
                                                            index_t width,
                                                            const expert_weights<T>& w,
                                                            const addon_params& ap = {}) const {
    dispatch.validate();  // capacity fields first: the backend's sizing reads them
    check_sizes(tokens, width, routed_experts(w), w);
    return backend::executor<Context>::experts_backward_workspace_size(ctx, *this, tokens, width,
                                                                       w, ap);
  }

  // ---- forward ----------------------------------------------------------------------------

  //! Forward: routes x [T, d], runs the experts, writes y [T, d] and `state` (plan, losses,
  //! dropped per expert) in caller memory. With a workspace of at least
  //! `workspace_size(ctx, ...)` bytes neither the layer nor its policies allocate; an empty
  //! workspace makes the backend allocate one. Throws shape_error / range_error /
  //! non_finite_error naming the offending argument.
  template <ElementType T, class Context>
  void forward(const Context& ctx, std::type_identity_t<matrix_view<const T>> x,
               const router_params& rp, const expert_weights<T>& w, const matrix_view<T>& y,
               const state_type& state, span<std::byte> workspace = {},
               const addon_params& ap = {}) const {
    agreed(w, [&] {
      const index_t experts = check_forward(x, rp, w, y);
      check_state("state", state, x.extent(0), router.width(rp), experts);
      check_forward_aliasing(x, w, y, state);
      return experts;
    });
    // Incomplete from the first write until the backend returns (a throw leaves it so).
    if (state.complete != nullptr) *state.complete = false;
    backend::executor<Context>::forward(ctx, *this, x, rp, w, y, state, workspace, ap);
    if (state.complete != nullptr) *state.complete = true;
  }

  //! Forward into a host-owned result (sized here; it reallocates only when it grows).
  template <ElementType T, class Context>
  void forward(const Context& ctx, std::type_identity_t<matrix_view<const T>> x,
               const router_params& rp, const expert_weights<T>& w, const matrix_view<T>& y,
               result_type& result, span<std::byte> workspace = {},
               const addon_params& ap = {}) const {
    const index_t experts = agreed(w, [&] { return check_forward(x, rp, w, y); });
    result.complete = false;  // resize may move the arrays: the old result is gone
    result.resize(x.extent(0), router.width(rp), experts);
    const state_type state = result.state();
    forward<T>(ctx, x, rp, w, y, state, workspace, ap);
  }

  //! The experts and the combine for a given plan (no routing): y [T, d] = Σ_j w_tj ·
  //! FFN_{e_tj}(x_t) (+ add-on term); `dropped` [E] receives the per-expert drop counts.
  //! Use it with a plan made elsewhere (a DynMoE plan, a token routed to no expert).
  template <ElementType T, class Context>
  void forward_experts(const Context& ctx, std::type_identity_t<matrix_view<const T>> x,
                       const plan_type& plan, const expert_weights<T>& w,
                       const matrix_view<T>& y, span<index_t> dropped,
                       span<std::byte> workspace = {}, const addon_params& ap = {}) const {
    agreed(w, [&] {
      check_experts(x, plan, w);
      check_view("y", y, {x.extent(0), x.extent(1)}, "[T, d] like x");
      if (static_cast<index_t>(dropped.size()) != ffn_experts(w)) {
        throw shape_error("dropped", detail::concat("dropped: expected E = ", ffn_experts(w),
                                                    " elements, got ", dropped.size()));
      }
      check_forward_aliasing(x, w, y, state_type{});
      const detail::byte_range yb = detail::bytes_of(y), db = detail::bytes_of(dropped);
      detail::require_disjoint("dropped", db, "y", yb);
      detail::require_disjoint("dropped", db, "x", detail::bytes_of(x));
      require_plan_disjoint("y", yb, plan);
      require_plan_disjoint("dropped", db, plan);
      return plan.num_experts;
    });
    backend::executor<Context>::forward_experts(ctx, *this, x, plan, w, y, dropped, workspace, ap);
  }

  // ---- backward ---------------------------------------------------------------------------

  //! Backward of `forward`: given its `state` and dy [T, d], accumulates (+=) dx [T, d], the
  //! expert-weight gradients and the router's gradients, the aux losses weighted by `coeffs`
  //! (the router's losses_type used as coefficients; zero = not trained). Empty gradient
  //! views are skipped. Recomputes the expert activations (nothing is kept from forward
  //! besides `state`). With a workspace of `backward_workspace_size(ctx, ...)` bytes nothing
  //! allocates.
  template <ElementType T, class Context>
  void backward(const Context& ctx, std::type_identity_t<matrix_view<const T>> x,
                const router_params& rp, const expert_weights<T>& w, const state_type& state,
                std::type_identity_t<matrix_view<const T>> dy, const losses_type& coeffs,
                const matrix_view<float>& dx, const expert_grads& grads,
                const router_grads& rgrads, span<std::byte> workspace = {},
                const addon_params& ap = {}, const addon_grads& ag = {}) const {
    agreed(w, [&] {
      const index_t tokens = state.plan.num_tokens;
      check_view("x", x, {tokens, -1}, "[T, d] with T from the forward's plan");
      check_state("state", state, tokens, state.plan.width, state.plan.num_experts);
      if (state.complete != nullptr && !*state.complete) {
        throw invalid_argument(
            "state", "state: the forward that wrote it did not complete (it threw): its plan "
                     "may be half written; run forward again before backward");
      }
      check_backward(x, state.plan.const_view(), w, dy, dx, grads);
      check_router_grads(x, dy, dx, rp, rgrads);
      const detail::byte_range dxb = detail::bytes_of(dx);
      for (const auto& [name, range] : state_ranges(state))
        detail::require_disjoint("dx", dxb, name, range);
      return state.plan.num_experts;
    });
    backend::executor<Context>::backward(ctx, *this, x, rp, w, state, dy, coeffs, dx, grads,
                                         rgrads, workspace, ap, ag);
  }

  //! Backward from a host-owned forward result.
  template <ElementType T, class Context>
  void backward(const Context& ctx, std::type_identity_t<matrix_view<const T>> x,
                const router_params& rp, const expert_weights<T>& w, const result_type& fwd,
                std::type_identity_t<matrix_view<const T>> dy, const losses_type& coeffs,
                const matrix_view<float>& dx, const expert_grads& grads,
                const router_grads& rgrads, span<std::byte> workspace = {},
                const addon_params& ap = {}, const addon_grads& ag = {}) const {
    const state_type state = fwd.state();
    backward<T>(ctx, x, rp, w, state, dy, coeffs, dx, grads, rgrads, workspace, ap, ag);
  }

  //! Backward of `forward_experts`: dx (+=), expert grads (+=) and `d_weights` [T·width] (=)
  //! the cotangent of the plan's combine weights, in slot order.
  template <ElementType T, class Context>
  void backward_experts(const Context& ctx, std::type_identity_t<matrix_view<const T>> x,
                        const plan_type& plan, const expert_weights<T>& w,
                        std::type_identity_t<matrix_view<const T>> dy,
                        const matrix_view<float>& dx, const expert_grads& grads,
                        span<float> d_weights, span<std::byte> workspace = {},
                        const addon_params& ap = {}, const addon_grads& ag = {}) const {
    agreed(w, [&] {
      check_backward(x, plan, w, dy, dx, grads);
      if (static_cast<index_t>(d_weights.size()) != plan.num_tokens() * plan.width()) {
        throw shape_error("d_weights", detail::concat("d_weights: expected T·width = ",
                                                      plan.num_tokens() * plan.width(),
                                                      " elements, got ", d_weights.size()));
      }
      const detail::byte_range dwb = detail::bytes_of(d_weights);
      detail::require_disjoint("d_weights", dwb, "dx", detail::bytes_of(dx));
      detail::require_disjoint("d_weights", dwb, "x", detail::bytes_of(x));
      detail::require_disjoint("d_weights", dwb, "dy", detail::bytes_of(dy));
      require_plan_disjoint("d_weights", dwb, plan);
      require_plan_disjoint("dx", detail::bytes_of(dx), plan);
      return plan.num_experts;
    });
    backend::executor<Context>::backward_experts(ctx, *this, x, plan, w, dy, dx, grads,
                                                 d_weights, workspace, ap, ag);
  }

  // ---- the shape checks every backend shares ------------------------------------------------

  //! Runs `check` (the shape checks of an entry point; returns the router's or the plan's
  //! expert count). Under expert parallelism every rank first learns whether every other
  //! rank's check passed and whether their shapes agree (`dispatch.agree_on`): all ranks
  //! throw the same typed error, or none, so no rank waits in an exchange for one that threw.
  template <ElementType T, class F>
  index_t agreed(const expert_weights<T>& w, const F& check) const {
    if constexpr (expert_parallel) {
      return dispatch.agree_on([&] {
        if constexpr (has_addon) {
          throw unsupported_error("switchyard: MoELayer with an add-on module under "
                                  "ExpertParallel is not supported (the add-on reads every "
                                  "expert's parameters on every rank)");
        }
        if (router_weight_on_input) {
          throw unsupported_error("switchyard: MoELayer::router_weight_on_input under "
                                  "ExpertParallel is not supported (the expert rows would "
                                  "travel as float w·x)");
        }
        const index_t experts = check();
        return std::array<index_t, 4>{experts, w.d_model(), w.d_ff(), ffn_experts(w)};
      })[0];
    } else {
      return check();
    }
  }

  //! x, the weights, the router's expert count and hyperparameters, the dispatch, y; returns E.
  template <ElementType T>
  index_t check_forward(const matrix_view<const T>& x, const router_params& rp,
                        const expert_weights<T>& w, const matrix_view<T>& y) const {
    check_view("x", x, {-1, -1}, "[T, d]");
    validate_expert_weights(w, x.extent(1), gated);
    check_expert_kinds(w, x.extent(1));
    const index_t experts = router.num_experts(rp);
    if (experts != routed_experts(w)) {
      if constexpr (expert_parallel) {
        const index_t ffn = experts - identity_experts - zero_experts - constant_experts;
        const index_t n = dispatch.ranks();
        throw shape_error(
            "weights.w1",
            detail::concat("weights.w1: extent 0 must be this rank's shard of the router's FFN "
                           "experts, E / N = ", ffn, " / ", n,
                           ffn % n != 0 ? " (not a multiple: ExpertParallel shards the E FFN "
                                          "experts evenly, E must be divisible by the rank "
                                          "count N)"
                                        : "",
                           " with E = the router's expert count ", experts,
                           " minus the non-FFN experts (identity + zero + constant = ",
                           identity_experts + zero_experts + constant_experts, "), got ",
                           w.num_experts()));
      }
      if (!has_expert_kinds()) {
        throw shape_error("weights.w1",
                          detail::concat("weights.w1: extent 0 must be the router's expert count E = ",
                                         experts, ", got ", w.num_experts()));
      }
      throw shape_error("weights.w1",
                        detail::concat("weights.w1: extent 0 must be the router's expert count "
                                       "minus the non-FFN experts (identity + zero + constant) = ",
                                       experts, " - ", identity_experts, " - ", zero_experts,
                                       " - ", constant_experts, ", got ", w.num_experts()));
    }
    dispatch.validate();
    check_sizes(x.extent(0), router.width(rp), experts, w);
    if constexpr (requires { router.validate(experts); }) router.validate(experts);
    check_view("y", y, {x.extent(0), x.extent(1)}, "[T, d] like x");
    return experts;
  }

  //! The expert-kind counts are >= 0; none beside an add-on (an add-on reads the plan's ids as
  //! FFN experts: HyperMoE's embeddings have E rows); no constant experts with
  //! router_weight_on_input; weights.constant is [C, d] / [C, 2, d] when C > 0, empty otherwise.
  template <ElementType T>
  void check_expert_kinds(const expert_weights<T>& w, index_t d) const {
    const auto non_negative = [](const char* name, index_t n) {
      if (n < 0) throw range_error(name, detail::concat(name, " must be >= 0, got ", n));
    };
    non_negative("identity_experts", identity_experts);
    non_negative("zero_experts", zero_experts);
    non_negative("constant_experts", constant_experts);
    if (has_addon && has_expert_kinds()) {
      throw unsupported_error(detail::concat(
          "switchyard: MoELayer non-FFN experts (identity_experts = ", identity_experts,
          ", zero_experts = ", zero_experts, ", constant_experts = ", constant_experts,
          ") with an add-on module are not supported (the add-on reads the plan's ids as FFN "
          "experts)"));
    }
    if (router_weight_on_input && constant_experts != 0) {
      throw unsupported_error(detail::concat(
          "switchyard: MoELayer::constant_experts = ", constant_experts,
          " with router_weight_on_input is not supported (a constant expert is not linear in "
          "its input)"));
    }
    const constant_expert_weights<T>& c = w.constant;
    if (constant_experts == 0) {
      if (c.present()) {
        throw shape_error("weights.constant",
                          "weights.constant: given, but MoELayer::constant_experts is 0");
      }
      return;
    }
    check_view("weights.constant.v", c.v, {constant_experts, d},
               "[C, d] with C = MoELayer::constant_experts and d = x.extent(1)");
    check_view("weights.constant.gate", c.gate, {constant_experts, 2, d},
               "[C, 2, d] with C = MoELayer::constant_experts and d = x.extent(1)");
  }

  //! The constant experts' gradient views that are present: [C, d] and [C, 2, d].
  void check_constant_grads(const constant_expert_grads& g, index_t d) const {
    if (constant_experts == 0) {
      if (detail::present(g.v) || detail::present(g.gate)) {
        throw shape_error("grads.constant",
                          "grads.constant: given, but MoELayer::constant_experts is 0");
      }
      return;
    }
    if (detail::present(g.v)) {
      check_view("grads.constant.v", g.v, {constant_experts, d}, "(same as weights.constant.v)");
    }
    if (detail::present(g.gate)) {
      check_view("grads.constant.gate", g.gate, {constant_experts, 2, d},
                 "(same as weights.constant.gate)");
    }
  }

  //! The state's arrays hold T tokens, `width` slots and E experts; losses are given.
  static void check_state(std::string_view argument, const state_type& s, index_t tokens,
                          index_t width, index_t experts) {
    if (s.plan.num_tokens != tokens || s.plan.width != width || s.plan.num_experts != experts) {
      throw shape_error(detail::concat(argument, ".plan"),
                        detail::concat(argument, ".plan: expected T = ", tokens, ", width = ", width,
                                       ", E = ", experts, ", got T = ", s.plan.num_tokens,
                                       ", width = ", s.plan.width, ", E = ", s.plan.num_experts));
    }
    if (argument == "state") s.plan.check("state.plan");  // no allocation on success
    else s.plan.check(detail::concat(argument, ".plan"));
    if (s.losses == nullptr) {
      throw null_pointer_error(detail::concat(argument, ".losses"),
                               detail::concat(argument, ".losses: pointer is null"));
    }
    if (static_cast<index_t>(s.dropped.size()) != experts) {
      throw shape_error(detail::concat(argument, ".dropped"),
                        detail::concat(argument, ".dropped: expected E = ", experts,
                                       " elements, got ", s.dropped.size()));
    }
    if (s.dropped.data() == nullptr && experts != 0) {
      detail::require_data(detail::concat(argument, ".dropped"), s.dropped.data(), experts);
    }
  }

  //! x, the weights and the plan's extents (its contents are the backend's to check).
  template <ElementType T>
  void check_experts(const matrix_view<const T>& x, const plan_type& plan,
                     const expert_weights<T>& w) const {
    check_view("x", x, {-1, -1}, "[T, d]");
    validate_expert_weights(w, x.extent(1), gated);
    check_expert_kinds(w, x.extent(1));
    if (plan.num_experts != routed_experts(w)) {
      throw shape_error("plan", !has_expert_kinds()
                                    ? detail::concat("plan: num_experts must match weights (E = ",
                                                     ffn_experts(w), "), got ", plan.num_experts)
                                    : detail::concat("plan: num_experts must match weights (E = ",
                                                     ffn_experts(w), " FFN experts + ",
                                                     identity_experts, " identity + ",
                                                     zero_experts, " zero + ", constant_experts,
                                                     " constant experts), got ",
                                                     plan.num_experts));
    }
    check_view("plan.expert_ids", plan.expert_ids, {x.extent(0), -1});
    check_view("plan.weights", plan.weights, {x.extent(0), plan.width()});
    check_view("plan.counts", plan.counts, {x.extent(0)});
    dispatch.validate();
    check_sizes(x.extent(0), plan.width(), plan.num_experts, w);
  }

  //! check_experts plus dy, dx and the gradient views.
  template <ElementType T>
  void check_backward(const matrix_view<const T>& x, const plan_type& plan,
                      const expert_weights<T>& w, const matrix_view<const T>& dy,
                      const matrix_view<float>& dx, const expert_grads& grads) const {
    check_experts(x, plan, w);
    check_view("dy", dy, {x.extent(0), x.extent(1)}, "[T, d] like x");
    if (detail::present(dx)) check_view("dx", dx, {x.extent(0), x.extent(1)}, "[T, d] like x");
    validate_expert_grads(grads, w);
    check_constant_grads(grads.constant, x.extent(1));
    check_backward_aliasing(x, plan, w, dy, dx, grads);
  }

  // ---- the size, aliasing and gradient-view checks every backend shares ------------------

  //! Sizes the backends multiply: E fits the plan's int32 ids (with the sentinel E), and the
  //! largest buffer a backend sizes from T, width, E, d, P and d_ff (expert rows × their
  //! widths, bytes) fits in index_t, so no later product overflows. Throws range_error naming
  //! "tokens", "E" or "width".
  template <ElementType T>
  void check_sizes(index_t tokens, index_t width, index_t experts,
                   const expert_weights<T>& w) const {
    if (tokens < 0) {
      throw range_error("tokens", detail::concat("tokens: T must be >= 0, got ", tokens));
    }
    if (width < 0) {
      throw range_error("width", detail::concat("width: must be >= 0, got ", width));
    }
    constexpr index_t max_experts = std::numeric_limits<std::int32_t>::max() - 1;
    if (experts < 0 || experts > max_experts) {
      throw range_error("E", detail::concat("E: the routed expert count must be in [0, ",
                                            max_experts, "] (plan ids are 32-bit), got ",
                                            experts));
    }
    // Rows any dispatch may address: T·width pairs plus E capacity blocks of at most
    // T + 2^16 rows (padded_capacity's bound); each row holds d + P + d_ff floats in a few
    // buffers (16 bytes per element is generous).
    const index_t widths = detail::checked_add(
        "tokens", detail::checked_add("tokens", w.d_model(), w.projection_width()), w.d_ff());
    const index_t rows = detail::checked_add(
        "tokens", detail::checked_mul("tokens", tokens, width),
        detail::checked_mul("tokens", experts,
                            detail::checked_add("tokens", tokens, index_t{1} << 16)));
    (void)detail::checked_product("tokens", {rows, widths + 1, 16});
    (void)detail::checked_product("tokens", {tokens, experts + 1, 16});  // logits, probs
  }

  //! y, the state's arrays: none overlaps x, the weights or another output.
  template <ElementType T>
  static void check_forward_aliasing(const matrix_view<const T>& x, const expert_weights<T>& w,
                                     const matrix_view<T>& y, const state_type& state) {
    const detail::byte_range yb = detail::bytes_of(y), xb = detail::bytes_of(x);
    detail::require_disjoint("y", yb, "x", xb);
    for (const auto& [name, range] : weight_ranges(w)) detail::require_disjoint("y", yb, name, range);
    const auto st = state_ranges(state);
    for (std::size_t i = 0; i < st.size(); ++i) {
      detail::require_disjoint(st[i].first, st[i].second, "x", xb);
      detail::require_disjoint(st[i].first, st[i].second, "y", yb);
      for (std::size_t j = 0; j < i; ++j)
        detail::require_disjoint(st[i].first, st[i].second, st[j].first, st[j].second);
    }
  }

  //! dx and every present gradient view: none overlaps x, dy, the weights, the plan or another.
  template <ElementType T>
  static void check_backward_aliasing(const matrix_view<const T>& x, const plan_type& plan,
                                      const expert_weights<T>& w, const matrix_view<const T>& dy,
                                      const matrix_view<float>& dx, const expert_grads& g) {
    const std::pair<const char*, detail::byte_range> outputs[] = {
        {"dx", detail::bytes_of(dx)},
        {"grads.w1", detail::bytes_of(g.w1)},
        {"grads.b1", detail::bytes_of(g.b1)},
        {"grads.w2", detail::bytes_of(g.w2)},
        {"grads.b2", detail::bytes_of(g.b2)},
        {"grads.shared.w1", detail::bytes_of(g.shared.w1)},
        {"grads.shared.b1", detail::bytes_of(g.shared.b1)},
        {"grads.shared.w2", detail::bytes_of(g.shared.w2)},
        {"grads.shared.b2", detail::bytes_of(g.shared.b2)},
        {"grads.shared.gate", detail::bytes_of(g.shared.gate)},
        {"grads.constant.v", detail::bytes_of(g.constant.v)},
        {"grads.constant.gate", detail::bytes_of(g.constant.gate)},
    };
    const auto weights = weight_ranges(w);
    const detail::byte_range xb = detail::bytes_of(x), dyb = detail::bytes_of(dy);
    for (std::size_t i = 0; i < std::size(outputs); ++i) {
      const auto& [name, range] = outputs[i];
      if (range.empty()) continue;
      detail::require_disjoint(name, range, "x", xb);
      detail::require_disjoint(name, range, "dy", dyb);
      for (const auto& [wname, wrange] : weights) detail::require_disjoint(name, range, wname, wrange);
      require_plan_disjoint(name, range, plan);
      for (std::size_t j = 0; j < i; ++j)
        detail::require_disjoint(name, range, outputs[j].first, outputs[j].second);
    }
  }

  //! Throws aliasing_error when `range` (output `name`) overlaps one of the plan's arrays.
  static void require_plan_disjoint(const char* name, const detail::byte_range& range,
                                    const plan_type& plan) {
    detail::require_disjoint(name, range, "plan.expert_ids", detail::bytes_of(plan.expert_ids));
    detail::require_disjoint(name, range, "plan.weights", detail::bytes_of(plan.weights));
    detail::require_disjoint(name, range, "plan.counts", detail::bytes_of(plan.counts));
  }

  //! The byte ranges of the weights' views, named.
  template <ElementType T>
  static std::array<std::pair<const char*, detail::byte_range>, 11> weight_ranges(
      const expert_weights<T>& w) {
    return {{{"weights.w1", detail::bytes_of(w.w1)},
             {"weights.b1", detail::bytes_of(w.b1)},
             {"weights.w2", detail::bytes_of(w.w2)},
             {"weights.b2", detail::bytes_of(w.b2)},
             {"weights.shared.w1", detail::bytes_of(w.shared.w1)},
             {"weights.shared.b1", detail::bytes_of(w.shared.b1)},
             {"weights.shared.w2", detail::bytes_of(w.shared.w2)},
             {"weights.shared.b2", detail::bytes_of(w.shared.b2)},
             {"weights.shared.gate", detail::bytes_of(w.shared.gate)},
             {"weights.constant.v", detail::bytes_of(w.constant.v)},
             {"weights.constant.gate", detail::bytes_of(w.constant.gate)}}};
  }

  //! The byte ranges of a state's arrays, named.
  static std::array<std::pair<const char*, detail::byte_range>, 6> state_ranges(
      const state_type& s) {
    return {{{"state.plan.expert_ids", detail::bytes_of(s.plan.expert_ids)},
             {"state.plan.weights", detail::bytes_of(s.plan.weights)},
             {"state.plan.counts", detail::bytes_of(s.plan.counts)},
             {"state.plan.logits", detail::bytes_of(s.plan.logits)},
             {"state.plan.probs", detail::bytes_of(s.plan.probs)},
             {"state.dropped", detail::bytes_of(s.dropped)}}};
  }

  //! The router's gradient views that are present, checked before anything is written (the
  //! router checks them again when it writes them): a view named like a parameter view
  //! (w, b, residual_w, prev_logits, w_gate, thresholds) must have that view's extents and
  //! must not overlap it, x, dy or dx; a gating-residual gradient needs the residual in the
  //! params. A router's scoring part with a `check_grads(x, params, dx, grads)` (the check its
  //! backward runs before writing: routing::scored_linear) has it run first. Names
  //! "grads.<member>".
  template <ElementType T>
  void check_router_grads(const matrix_view<const T>& x, const matrix_view<const T>& dy,
                          const matrix_view<float>& dx, const router_params& rp,
                          const router_grads& g) const {
    const detail::byte_range xb = detail::bytes_of(x), dyb = detail::bytes_of(dy),
                             dxb = detail::bytes_of(dx);
    const auto disjoint = [&](const char* name, const detail::byte_range& r) {
      detail::require_disjoint(name, r, "x", xb);
      detail::require_disjoint(name, r, "dy", dyb);
      detail::require_disjoint(name, r, "dx", dxb);
    };
    // A router whose scoring part states its own gradient views (scored_linear::check_grads)
    // has them checked first, in its words; the matching below adds the aliasing checks.
    const auto own_checks = [&](const auto& scoring) {
      if constexpr (requires { scoring.check_grads(x, scoring.params(rp), dx, g); })
        scoring.check_grads(x, scoring.params(rp), dx, g);
    };
    if constexpr (requires { router.scoring_part(); }) {
      own_checks(router.scoring_part());
    } else if constexpr (requires { router.scoring(); }) {
      own_checks(router.scoring());
    }
    // (No allocation unless it throws: the names and meanings are literals.)
    const auto same_as = [&](const char* name, const auto& grad, const auto& param,
                             const char* param_name, const char* meaning) {
      if (!detail::present(grad)) return;
      if (!detail::present(param)) {
        throw shape_error(name, detail::concat(name, ": given, but ", param_name,
                                               " is absent from the router's params"));
      }
      ::cuda::std::array<index_t, std::remove_cvref_t<decltype(grad)>::rank()> want{};
      for (std::size_t r = 0; r < want.size(); ++r) want[r] = param.extent(r);
      check_view(name, grad, want, meaning);
      const detail::byte_range gb = detail::bytes_of(grad);
      detail::require_disjoint(name, gb, param_name, detail::bytes_of(param));
      disjoint(name, gb);
    };
    if constexpr (requires { g.w; rp.w; }) same_as("grads.w", g.w, rp.w, "params.w", "(same as params.w)");
    if constexpr (requires { g.w_gate; rp.w_gate; }) {
      same_as("grads.w_gate", g.w_gate, rp.w_gate, "params.w_gate", "(same as params.w_gate)");
    }
    if constexpr (requires { g.thresholds; rp.thresholds; }) {
      same_as("grads.thresholds", g.thresholds, rp.thresholds, "params.thresholds",
              "(same as params.thresholds)");
    }
    if constexpr (requires { g.residual_w; rp.residual_w; }) {
      same_as("grads.residual_w", g.residual_w, rp.residual_w, "params.residual_w",
              "(same as params.residual_w)");
    }
    if constexpr (requires { g.prev_logits; rp.prev_logits; }) {
      same_as("grads.prev_logits", g.prev_logits, rp.prev_logits, "params.prev_logits",
              "(same as params.prev_logits)");
    }
    if constexpr (requires { g.b; }) {
      if (detail::present(g.b)) {
        check_view("grads.b", g.b, {router.num_experts(rp)}, "[E]");
        disjoint("grads.b", detail::bytes_of(g.b));
      }
    }
  }
};

}  // namespace switchyard
