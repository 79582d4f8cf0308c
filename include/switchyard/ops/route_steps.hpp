// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file route_steps.hpp
//! The generic route of a composed router (routing::ComposedRouter) as a sequence of
//! per-row launches, for a backend that runs functors rather than loops over whole plans:
//! after the logits, the per-token rules (a fixed rule, or DA-MoE's from its importance),
//! softmax and selection per token, then each loss term in the router's order; in backward,
//! the loss terms' preparations, then the fused per-token d_logits. The CUDA backend runs
//! these steps with a launcher of kernels (backend/cuda/router.cuh); the host tests run them
//! with `sequential_launcher` and compare with host::route bit for bit.
//!
//! A launcher has `tokens(n, f, name)` and `elements(n, f, name)`, both calling f(i) for every
//! i in [0, n) (the CUDA one picks the block size of per-token or per-element work).
//!
//! What only the data can show (the host throws for it) goes to a faults sink, a trivially
//! copyable value with `__host__ __device__` members called on the executing side:
//! `non_finite_logit(t·E + e)`, and for DA-MoE `bad_attention(h·T·T + i·T + j)` and
//! `bad_importance(j)` (the first of each, once per forward). The tokens concerned route to
//! no expert (DA-MoE: every token, as the host rejects the whole batch).
//!
//! Two-phase like every workspace user: `forward_route<R>` / `backward_route<R>` carve their
//! scratch when constructed (a measuring arena only counts it), and `run` launches.

#include <array>
#include <cstddef>
#include <tuple>
#include <type_traits>
#include <utility>

#include "switchyard/core/config.hpp"
#include "switchyard/core/error.hpp"
#include "switchyard/core/view.hpp"
#include "switchyard/core/workspace.hpp"
#include "switchyard/ops/route_losses.hpp"
#include "switchyard/ops/route_rows.hpp"
#include "switchyard/routing/composition.hpp"
#include "switchyard/routing/da_moe_rows.hpp"
#include "switchyard/routing/plan.hpp"

namespace switchyard::ops {

//! The launcher of host tests and references: plain loops, in index order.
struct sequential_launcher {
  template <class F>
  void tokens(index_t n, const F& f, const char* /*name*/) const {
    for (index_t i = 0; i < n; ++i) f(i);
  }
  template <class F>
  void elements(index_t n, const F& f, const char* /*name*/) const {
    for (index_t i = 0; i < n; ++i) f(i);
  }
};

template <class R>
inline constexpr bool no_device_token_rules_for = false;

//! The per-token rules of composed router R where its params are not host memory:
//! `carve(ws, T)`, `check(r, params, T)` (data-free) and `make(launch, r, params, T,
//! scratch, faults)` -> an object whose `rule(t)` is `__host__ __device__`. A router with one rule
//! for every token needs nothing; DA-MoE has its importance pass; a user's router with its
//! own `token_rules` specialises this.
template <class R>
struct device_token_rules {
  static_assert(no_device_token_rules_for<R>,
                "switchyard: this router's token_rules read its params on the host: specialise "
                "switchyard::ops::device_token_rules<R> (ops/route_steps.hpp) to build its "
                "per-token rules from device memory");
};

//! A router with one rule for every token.
template <class R>
requires detail::has_fixed_rule<R>
struct device_token_rules<R> {
  struct scratch {};
  static scratch carve(workspace_arena&, index_t) { return {}; }
  //! The per-token compute knob (params.token_max_k / token_threshold) is host-only for now:
  //! refused here rather than ignored.
  static void check(const R&, const typename R::params_type& p, index_t) {
    const auto refuse = [](const char* name) {
      throw unsupported_error(detail::concat("switchyard: params.", name,
                                             " (the per-token compute knob) runs on the host "
                                             "backend only for now"));
    };
    if constexpr (requires { p.token_max_k; }) {
      if (detail::present(p.token_max_k)) refuse("token_max_k");
    }
    if constexpr (requires { p.token_threshold; }) {
      if (detail::present(p.token_threshold)) refuse("token_threshold");
    }
  }
  template <class Launcher, class Faults>
  static auto make(const Launcher&, const R& r, const typename R::params_type&, index_t,
                   const scratch&, const Faults&) {
    return routing::same_rule<decltype(r.rule())>{r.rule()};
  }
};

//! DA-MoE: K_t from the importance pass (routing/da_moe_rows.hpp).
template <class Importance, class KRule>
struct device_token_rules<routers::DAMoE<Importance, KRule>>
    : routing::da_moe_device_rules<Importance, KRule> {};

//! Address of the float field `Field` of the losses struct at `losses` (which may be memory
//! the host cannot read: only the offset is computed, from a host probe).
template <auto Field, class Losses>
float* field_address(Losses* losses) {
  static_assert(
      std::is_same_v<std::remove_cvref_t<decltype(std::declval<Losses&>().*Field)>, float>,
      "switchyard: a loss term's field must be a float member of the losses struct");
  const Losses probe{};
  const auto offset = reinterpret_cast<const std::byte*>(&(probe.*Field)) -
                      reinterpret_cast<const std::byte*>(&probe);
  return reinterpret_cast<float*>(reinterpret_cast<std::byte*>(losses) + offset);
}

//! The term type of a bound loss.
template <class Bound>
using term_of = std::remove_cvref_t<decltype(std::declval<const Bound&>().term)>;

//! The terms of router R, as a tuple type.
template <class R>
using terms_of = std::remove_cvref_t<decltype(std::declval<const R&>().loss_terms())>;

}  // namespace switchyard::ops

namespace switchyard::detail {

//! Forward scratch of every term, carved in the router's order (braced: evaluated in order).
template <class Terms, std::size_t... I>
auto carve_forward_terms(workspace_arena& ws, index_t tokens, index_t experts,
                         std::index_sequence<I...>) {
  return std::tuple{
      ops::device_loss_term<ops::term_of<std::tuple_element_t<I, Terms>>>::carve_forward(
          ws, tokens, experts)...};
}
template <class Terms, std::size_t... I>
auto carve_backward_terms(workspace_arena& ws, index_t tokens, index_t experts,
                          std::index_sequence<I...>) {
  return std::tuple{
      ops::device_loss_term<ops::term_of<std::tuple_element_t<I, Terms>>>::carve_backward(
          ws, tokens, experts)...};
}

}  // namespace switchyard::detail

namespace switchyard::ops {

//! Forward of a composed router after its logits (see the file comment).
template <routing::ComposedRouter R>
class forward_route {
 public:
  using rules_type = device_token_rules<R>;
  using terms_type = terms_of<R>;
  static constexpr std::size_t term_count = std::tuple_size_v<terms_type>;

  //! Carves the rules' and the terms' scratch for T tokens and E experts.
  forward_route(index_t tokens, index_t experts, workspace_arena& ws)
      : rules_(rules_type::carve(ws, tokens)),
        terms_(detail::carve_forward_terms<terms_type>(ws, tokens, experts,
                                                       std::make_index_sequence<term_count>{})) {}

  //! With `plan.logits` written: the per-token rules, softmax and selection of every token
  //! (bad data goes to `faults`, see the file comment), then each loss term's value to its
  //! field of `*losses`. Every launch goes through `launch`.
  template <class Launcher, class Faults>
  void run(const Launcher& launch, const R& r, const typename R::params_type& p,
           const routing::plan_ref& plan, typename R::losses_type* losses,
           const Faults& faults) const {
    const index_t tokens = plan.num_tokens;
    const auto rules = rules_type::make(launch, r, p, tokens, rules_, faults);
    using rules_t = std::remove_cvref_t<decltype(rules)>;
    launch.tokens(tokens,
                  route_token_recorded<rules_t, Faults>{
                      {rules, plan.logits.data(), plan.probs.data(), plan.expert_ids.data(),
                       plan.weights.data(), plan.counts.data(), plan.num_experts, plan.width},
                      faults},
                  "switchyard::ops::route_token");
    run_terms(launch, r.loss_terms(), plan, losses, std::make_index_sequence<term_count>{});
  }

 private:
  template <class Launcher, std::size_t... I>
  void run_terms(const Launcher& launch, const terms_type& terms, const routing::plan_ref& plan,
                 typename R::losses_type* losses, std::index_sequence<I...>) const {
    (run_term(launch, std::get<I>(terms), plan, losses, std::get<I>(terms_)), ...);
  }
  template <class Launcher, class Bound, class Scratch>
  static void run_term(const Launcher& launch, const Bound& b, const routing::plan_ref& plan,
                       typename R::losses_type* losses, const Scratch& s) {
    device_loss_term<term_of<Bound>>::forward(launch, b.term, plan, s,
                                              field_address<Bound::field>(losses));
  }

  typename rules_type::scratch rules_;
  decltype(detail::carve_forward_terms<terms_type>(std::declval<workspace_arena&>(), 0, 0,
                                                   std::make_index_sequence<term_count>{})) terms_;
};

//! d_logits of a composed router (the host's `composed_backward_logits`; see the file
//! comment).
template <routing::ComposedRouter R>
class backward_route {
 public:
  using terms_type = terms_of<R>;
  static constexpr std::size_t term_count = std::tuple_size_v<terms_type>;

  //! Carves d_probs [T, E] and the terms' scratch.
  backward_route(index_t tokens, index_t experts, workspace_arena& ws)
      : d_probs_(ws.take<float>(tokens * experts)),
        terms_(detail::carve_backward_terms<terms_type>(ws, tokens, experts,
                                                        std::make_index_sequence<term_count>{})) {}

  //! d_logits [T, E] (overwritten) from `plan`, d_weights [T, width] and the coefficients.
  template <class Launcher>
  void run(const Launcher& launch, const R& r, const routing::plan_ref& plan,
           const float* d_weights, const typename R::losses_type& coeff, float* d_logits) const {
    const auto terms = r.loss_terms();
    const auto rows = prepare(launch, terms, plan, coeff, std::make_index_sequence<term_count>{});
    const auto list = std::apply([](const auto&... row) { return make_row_list(row...); }, rows);
    launch.tokens(plan.num_tokens,
                  router_d_logits<std::remove_cvref_t<decltype(list)>>{
                      plan.logits.data(), plan.probs.data(), plan.expert_ids.data(),
                      plan.weights.data(), plan.counts.data(), d_weights, plan.num_experts,
                      plan.width, r.renormalized(), list, d_probs_, d_logits},
                  "switchyard::ops::router_d_logits");
  }

 private:
  //! Each term's preparation launches, in the router's order (braced: evaluated in order).
  template <class Launcher, std::size_t... I>
  auto prepare(const Launcher& launch, const terms_type& terms, const routing::plan_ref& plan,
               const typename R::losses_type& coeff, std::index_sequence<I...>) const {
    return std::tuple{device_loss_term<term_of<std::tuple_element_t<I, terms_type>>>::backward(
        launch, std::get<I>(terms).term, plan, coeff.*(std::tuple_element_t<I, terms_type>::field),
        std::get<I>(terms_))...};
  }

  float* d_probs_;
  decltype(detail::carve_backward_terms<terms_type>(std::declval<workspace_arena&>(), 0, 0,
                                                    std::make_index_sequence<term_count>{})) terms_;
};

}  // namespace switchyard::ops
