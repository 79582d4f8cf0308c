#pragma once
//! \file moe_layer.hpp
//! `switchyard::MoELayer<Router, Activation, Dispatch, AddOn>` on the host backend: routes
//! `x [T, d]` with any router of the contract in docs/design.md, runs the expert FFNs through
//! the dispatch policy and combines `y_t = Σ_j w_tj · FFN_{e_tj}(x_t)` (+ the add-on's term);
//! backward gives dx, the expert-weight gradients, the router's gradients and those of the
//! aux losses with caller-chosen coefficients. See docs/layer.md.
//!
//! NaN policy: a NaN or Inf anywhere in x throws `non_finite_error` naming the element
//! (checked before routing, so the error does not depend on the router). Expert weights are
//! not scanned: a non-finite weight propagates to the outputs of the tokens routed to it.

#include <cmath>
#include <cstddef>
#include <type_traits>
#include <utility>
#include <vector>

#include <cuda/std/span>

#include "switchyard/activation/concepts.hpp"
#include "switchyard/backend/host/experts.hpp"
#include "switchyard/core/workspace.hpp"
#include "switchyard/core/element_type.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/dispatch/concepts.hpp"
#include "switchyard/dispatch/sorted_grouped.hpp"
#include "switchyard/layer/addon.hpp"
#include "switchyard/layer/expert_weights.hpp"
#include "switchyard/routing/concepts.hpp"
#include "switchyard/routing/plan.hpp"

namespace switchyard {

//! What one forward returns besides y: the plan (backward needs it), the aux losses and the
//! pairs each expert dropped for lack of capacity.
template <class Losses>
struct moe_result {
  routing::routing_plan plan;   //!< ids, weights, counts, logits, probs
  Losses losses{};              //!< the router's auxiliary losses
  std::vector<index_t> dropped;  //!< [E] (token, slot) pairs dropped per expert
  //! Σ_e dropped[e].
  [[nodiscard]] index_t total_dropped() const {
    index_t n = 0;
    for (auto v : dropped) n += v;
    return n;
  }
};

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
        "x", concat("x: every element must be finite, got ", to_float(x(first / d, first % d)),
                    " at x[", first / d, ", ", first % d,
                    "] (Switchyard refuses non-finite tokens; see docs/layer.md, NaN policy)"));
  }
}

template <class R, class T>
concept router_forward_for = requires(const R& r, const matrix_view<const T>& x,
                                      const typename R::params_type& p,
                                      routing::routing_plan& plan, typename R::losses_type& l) {
  r.forward(x, p, plan, l);
};

template <class R, class T>
concept router_backward_for = requires(const R& r, const matrix_view<const T>& x,
                                       const typename R::params_type& p,
                                       const routing::routing_plan& plan, const float* dw,
                                       const typename R::losses_type& c,
                                       const matrix_view<float>& dx,
                                       const typename R::grads_type& g) {
  r.backward(x, p, plan, dw, c, dx, g);
};

}  // namespace detail

//! A Mixture-of-Experts layer: `Router` × `Activation` × `Dispatch` (+ an `AddOn` module
//! applied after routing). An aggregate of its four policies: configure them by member,
//! e.g. `MoELayer<routers::TopK, activation::swiglu>{.router = {.k = 2}}`.
template <class Router, class Activation, class Dispatch = dispatch::sorted_grouped,
          class AddOn = no_addon>
struct MoELayer {
  static_assert(check_router<Router>(), "switchyard: MoELayer's first parameter must be a router");
  static_assert(detail::router_forward_for<Router, float>,
                "switchyard: MoELayer needs the router's `template <ElementType T> void "
                "forward(const matrix_view<const T>& x, const params_type&, "
                "routing::routing_plan&, losses_type&) const`");
  static_assert(detail::router_backward_for<Router, float>,
                "switchyard: MoELayer needs the router's `template <ElementType T> void "
                "backward(x, params, plan, const float* d_weights, const losses_type& coeffs, "
                "const matrix_view<float>& dx, const grads_type&) const`");
  static_assert(check_activation<Activation>(),
                "switchyard: MoELayer's second parameter must be an activation");
  static_assert(check_dispatch<Dispatch>(),
                "switchyard: MoELayer's third parameter must be a dispatch policy");
  static_assert(AddOnModule<AddOn>,
                "switchyard: MoELayer's fourth parameter must be `no_addon` or a module "
                "declaring `using policy_kind = switchyard::addon_tag;` with params_type, "
                "grads_type, forward and backward (see layer/addon.hpp)");

  using router_type = Router;                                   //!< the router policy
  using activation_type = Activation;                           //!< the activation policy
  using dispatch_type = Dispatch;                               //!< the dispatch policy
  using addon_type = AddOn;                                     //!< the add-on module
  using router_params = typename Router::params_type;           //!< router parameter views
  using router_grads = typename Router::grads_type;             //!< router gradient views
  using losses_type = typename Router::losses_type;             //!< aux losses / coefficients
  using addon_params = typename AddOn::params_type;             //!< add-on parameters
  using addon_grads = typename AddOn::grads_type;               //!< add-on gradients
  using result_type = moe_result<losses_type>;                  //!< what forward returns
  //! Whether the experts' first projection is the fused [gate | up].
  static constexpr bool gated = activation_traits<Activation>::is_gated;
  //! Whether an add-on module contributes a term (false for `no_addon`).
  static constexpr bool has_addon = !std::is_same_v<AddOn, no_addon>;

  Router router{};          //!< routing policy and its hyperparameters
  Activation activation{};  //!< expert activation
  Dispatch dispatch{};      //!< how (token, slot) pairs reach the experts
  AddOn addon{};            //!< module applied after routing
  //! Promise a token the same output and dx bits whatever other tokens share its batch
  //! (T = 1 or 1000, any neighbours, any order) and on any CPU: the token-row GEMMs run on
  //! fixed-order kernels instead of the BLAS (slower; docs/design.md, "Same bits on any
  //! machine"). Results never depend on the thread count, with or without it.
  bool batch_invariant = false;

  //! Bytes of workspace `forward` needs for T tokens (router params give E and the width).
  template <ElementType T>
  [[nodiscard]] std::size_t workspace_size(index_t tokens, const router_params& rp,
                                           const expert_weights<T>& w) const {
    return experts_workspace_size(tokens, router.width(rp), w);
  }

  //! Bytes of workspace `forward_experts` needs for a plan of T tokens and `width` slots.
  template <ElementType T>
  [[nodiscard]] std::size_t experts_workspace_size(index_t tokens, index_t width,
                                                   const expert_weights<T>& w) const {
    workspace_arena ws;
    run_forward<T>({}, {}, w, {}, dims(tokens, width, w), {}, ws);
    return ws.required();
  }

  //! Bytes of workspace `backward` needs (the same arguments as workspace_size).
  template <ElementType T>
  [[nodiscard]] std::size_t backward_workspace_size(index_t tokens, const router_params& rp,
                                                    const expert_weights<T>& w) const {
    return experts_backward_workspace_size(tokens, router.width(rp), w);
  }

  //! Bytes of workspace `backward_experts` needs.
  template <ElementType T>
  [[nodiscard]] std::size_t experts_backward_workspace_size(index_t tokens, index_t width,
                                                            const expert_weights<T>& w) const {
    workspace_arena ws;
    run_backward<T>({}, {}, w, {}, {}, {}, nullptr, dims(tokens, width, w), ws, {}, {});
    return ws.required();
  }

  //! Forward: routes x [T, d], runs the experts, writes y [T, d] and `result` (plan, losses,
  //! dropped per expert). With a workspace of at least `workspace_size(...)` bytes and a
  //! reused `result`, the layer itself does not allocate (the router may, for its losses).
  //! Throws shape_error / range_error / non_finite_error naming the offending argument.
  template <ElementType T>
  void forward(std::type_identity_t<matrix_view<const T>> x, const router_params& rp,
               const expert_weights<T>& w, const matrix_view<T>& y, result_type& result,
               ::cuda::std::span<std::byte> workspace = {}, const addon_params& ap = {}) const {
    check_view("x", x, {-1, -1}, "[T, d]");
    validate_expert_weights(w, x.extent(1), gated);
    const index_t experts = router.num_experts(rp);
    if (experts != w.num_experts()) {
      throw shape_error("weights.w1",
                        detail::concat("weights.w1: extent 0 must be the router's expert count E = ",
                                       experts, ", got ", w.num_experts()));
    }
    if constexpr (requires { router.validate(experts); }) router.validate(experts);
    dispatch.validate();
    check_view("y", y, {x.extent(0), x.extent(1)}, "[T, d] like x");
    detail::require_finite_tokens<T>(x);
    router.forward(x, rp, result.plan, result.losses);
    result.dropped.resize(static_cast<std::size_t>(experts));
    forward_experts<T>(x, std::as_const(result.plan).view(), w, y,
                       {result.dropped.data(), result.dropped.size()}, workspace, ap);
  }

  //! The experts and the combine for a given plan (no routing): y [T, d] = Σ_j w_tj ·
  //! FFN_{e_tj}(x_t) (+ add-on term); `dropped` [E] receives the per-expert drop counts.
  //! Use it with a plan made elsewhere (a DynMoE plan, a token routed to no expert).
  template <ElementType T>
  void forward_experts(std::type_identity_t<matrix_view<const T>> x,
                       const routing::plan_view<const std::int32_t, const float>& plan,
                       const expert_weights<T>& w, const matrix_view<T>& y,
                       ::cuda::std::span<index_t> dropped,
                       ::cuda::std::span<std::byte> workspace = {},
                       const addon_params& ap = {}) const {
    check_view("x", x, {-1, -1}, "[T, d]");
    validate_expert_weights(w, x.extent(1), gated);
    check_plan(plan, x.extent(0), w.num_experts());
    check_view("y", y, {x.extent(0), x.extent(1)}, "[T, d] like x");
    if (static_cast<index_t>(dropped.size()) != w.num_experts()) {
      throw shape_error("dropped", detail::concat("dropped: expected E = ", w.num_experts(),
                                                  " elements, got ", dropped.size()));
    }
    dispatch.validate();
    const host::expert_dims dm = dims(x.extent(0), plan.width(), w);
    std::vector<std::byte> owned;
    if (workspace.empty()) {
      owned.resize(experts_workspace_size(dm.tokens, dm.width, w));
      workspace = {owned.data(), owned.size()};
    }
    workspace_arena ws(workspace);
    run_forward<T>(x, plan, w, y, dm, dropped, ws, ap);
  }

  //! Backward of `forward`: given `fwd` (its result) and dy [T, d], accumulates (+=) dx
  //! [T, d], the expert-weight gradients and the router's gradients, the aux losses weighted
  //! by `coeffs` (the router's losses_type used as coefficients; zero = not trained). Empty
  //! gradient views are skipped. Recomputes the expert activations (nothing is kept from
  //! forward besides `fwd`).
  template <ElementType T>
  void backward(std::type_identity_t<matrix_view<const T>> x, const router_params& rp,
                const expert_weights<T>& w, const result_type& fwd,
                std::type_identity_t<matrix_view<const T>> dy, const losses_type& coeffs,
                const matrix_view<float>& dx, const expert_grads& grads,
                const router_grads& rgrads, ::cuda::std::span<std::byte> workspace = {},
                const addon_params& ap = {}, const addon_grads& ag = {}) const {
    const index_t tokens = fwd.plan.num_tokens, width = fwd.plan.width;
    check_view("x", x, {tokens, -1}, "[T, d] with T from the forward's plan");
    std::vector<float> d_weights(static_cast<std::size_t>(tokens * width));
    backward_experts<T>(x, fwd.plan.view(), w, dy, dx, grads, {d_weights.data(), d_weights.size()},
                        workspace, ap, ag);
    router.backward(x, rp, fwd.plan, d_weights.data(), coeffs, dx, rgrads);
  }

  //! Backward of `forward_experts`: dx (+=), expert grads (+=) and `d_weights` [T·width] (=)
  //! the cotangent of the plan's combine weights, in slot order.
  template <ElementType T>
  void backward_experts(std::type_identity_t<matrix_view<const T>> x,
                        const routing::plan_view<const std::int32_t, const float>& plan,
                        const expert_weights<T>& w, std::type_identity_t<matrix_view<const T>> dy,
                        const matrix_view<float>& dx, const expert_grads& grads,
                        ::cuda::std::span<float> d_weights,
                        ::cuda::std::span<std::byte> workspace = {}, const addon_params& ap = {},
                        const addon_grads& ag = {}) const {
    check_view("x", x, {-1, -1}, "[T, d]");
    validate_expert_weights(w, x.extent(1), gated);
    check_plan(plan, x.extent(0), w.num_experts());
    check_view("dy", dy, {x.extent(0), x.extent(1)}, "[T, d] like x");
    if (detail::present(dx)) check_view("dx", dx, {x.extent(0), x.extent(1)}, "[T, d] like x");
    validate_expert_grads(grads, w);
    if (static_cast<index_t>(d_weights.size()) != plan.num_tokens() * plan.width()) {
      throw shape_error("d_weights", detail::concat("d_weights: expected T·width = ",
                                                    plan.num_tokens() * plan.width(),
                                                    " elements, got ", d_weights.size()));
    }
    dispatch.validate();
    const host::expert_dims dm = dims(x.extent(0), plan.width(), w);
    std::vector<std::byte> owned;
    if (workspace.empty()) {
      owned.resize(experts_backward_workspace_size(dm.tokens, dm.width, w));
      workspace = {owned.data(), owned.size()};
    }
    workspace_arena ws(workspace);
    run_backward<T>(x, plan, w, dy, dx, grads, d_weights.data(), dm, ws, ap, ag);
  }

 private:
  template <ElementType T>
  host::expert_dims dims(index_t tokens, index_t width, const expert_weights<T>& w) const {
    host::expert_dims dm;
    dm.tokens = tokens;
    dm.width = width;
    dm.experts = w.num_experts();
    dm.d = w.d_model();
    dm.d_ff = w.d_ff();
    dm.p = w.projection_width();
    dm.max_rows = dispatch.max_rows(tokens, width, dm.experts);
    dm.batch_invariant = batch_invariant;
    return dm;
  }

  static void check_plan(const routing::plan_view<const std::int32_t, const float>& plan,
                         index_t tokens, index_t experts) {
    if (plan.num_experts != experts) {
      throw shape_error("plan", detail::concat("plan: num_experts must match weights (E = ",
                                               experts, "), got ", plan.num_experts));
    }
    routing::validate_plan("plan", plan, tokens, experts);
  }

  template <ElementType T>
  void run_forward(const matrix_view<const T>& x,
                   const routing::plan_view<const std::int32_t, const float>& plan,
                   const expert_weights<T>& w, const matrix_view<T>& y,
                   const host::expert_dims& dm, ::cuda::std::span<index_t> dropped,
                   workspace_arena& ws, const addon_params& ap = {}) const {
    float* extra = has_addon ? ws.take<float>(dm.tokens * dm.d) : nullptr;  // [T, d]
    if constexpr (has_addon) {
      if (ws.carving()) addon.forward(x, plan, ap, make_view(extra, dm.tokens, dm.d));
    }
    host::experts_forward(dispatch, activation, dm, x, plan, w, extra, y, dropped, ws);
  }

  template <ElementType T>
  void run_backward(const matrix_view<const T>& x,
                    const routing::plan_view<const std::int32_t, const float>& plan,
                    const expert_weights<T>& w, const matrix_view<const T>& dy,
                    const matrix_view<float>& dx, const expert_grads& grads, float* d_weights,
                    const host::expert_dims& dm, workspace_arena& ws,
                    const addon_params& ap, const addon_grads& ag) const {
    host::experts_backward(dispatch, activation, dm, x, plan, w, dy, dx, grads, d_weights, ws);
    if constexpr (has_addon) {
      float* dybuf = ws.take<float>(dm.tokens * dm.d);  // [T, d] dy as float
      if (!ws.carving()) return;
      for (index_t t = 0; t < dm.tokens; ++t)
        for (index_t i = 0; i < dm.d; ++i) dybuf[t * dm.d + i] = to_float(dy(t, i));
      addon.backward(x, plan, ap, matrix_view<const float>(make_view<const float>(dybuf, dm.tokens, dm.d)),
                     dx, ag, d_weights);
    }
  }
};

}  // namespace switchyard
