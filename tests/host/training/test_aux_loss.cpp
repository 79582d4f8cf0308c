// SPDX-License-Identifier: Apache-2.0
// training/aux_loss.hpp and the routers' coefficient_fields() (routing/loss_fields.hpp):
// - every router's losses type lists its coefficient fields; the list agrees with the
//   router's loss_terms() (a term with a gradient ↔ a listed field) and with its backward
//   through a real layer (dy = 0): each listed field alone moves a gradient, the unlisted
//   diagnostics move none (bitwise);
// - aux_loss_schedule's values at chosen steps; at(step) scales the coefficient fields only;
// - linearity: backward with at(step) = scale(step) · backward with the full coefficients;
// - set / parse / describe, and their typed errors naming the argument.
#include <boost/mp11/algorithm.hpp>
#include <boost/mp11/list.hpp>
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <cstring>
#include <limits>
#include <numbers>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include <switchyard/switchyard.hpp>

#include "host/layer/layer_reference.hpp"
#include "support/random.hpp"

namespace sy = switchyard;
namespace tr = switchyard::training;
using sy::index_t;

namespace {

// Every router of include/switchyard/routing/routers/*.hpp (DA-MoE with the importance the
// layer tests use; presets.hpp configures these same routers).
using all_routers =
    boost::mp11::mp_list<sy::routers::TopK, sy::routers::TopP, sy::routers::AdaptiveGating,
                         sy::routers::DAMoE<sy::routing::importance::precomputed>,
                         sy::routers::ScoredTopK, sy::routers::ExpertChoice, sy::routers::ReMoE,
                         sy::routers::DynMoE>;

template <class R>
struct every_losses_type_has_fields {
  static_assert(sy::routing::has_coefficient_fields<typename R::losses_type>,
                "a router's losses_type lacks coefficient_fields()");
  static_assert(tr::coefficient_set<typename R::losses_type>);
  static constexpr bool value = true;
};
static_assert(boost::mp11::mp_all_of<all_routers, every_losses_type_has_fields>::value);
static_assert(sy::routing::coefficient_count<sy::routing::softmax_router_losses> == 3);
static_assert(sy::routing::coefficient_count<sy::routing::adaptive_gating_losses> == 2);
static_assert(sy::routing::coefficient_count<sy::routing::remoe_losses> == 2);
static_assert(sy::routing::coefficient_count<sy::routing::dynmoe_losses> == 4);
static_assert(sy::routing::coefficient_count<sy::routing::expert_choice_losses> == 0);

template <class L>
std::vector<std::string> names() {
  std::vector<std::string> out;
  std::apply([&](const auto&... f) { (out.emplace_back(f.name), ...); }, L::coefficient_fields());
  return out;
}

//! Whether `Field` (a member pointer) is one of L's coefficient fields.
template <class L, auto Field>
bool listed() {
  bool found = false;
  std::apply(
      [&](const auto&... f) {
        ((found =
              found ||
              [&] {
                if constexpr (std::is_same_v<std::remove_cv_t<decltype(f.member)>, decltype(Field)>)
                  return f.member == Field;
                else
                  return false;
              }()),
         ...);
      },
      L::coefficient_fields());
  return found;
}

template <class R>
R make_router() {
  if constexpr (std::is_same_v<R, sy::routers::TopK>)
    return {.k = 2};
  else if constexpr (std::is_same_v<R, sy::routers::TopP>)
    return {.p = 0.6f};
  else if constexpr (std::is_same_v<R, sy::routers::AdaptiveGating>)
    return {.threshold = 0.2f};
  else if constexpr (std::is_same_v<R, sy::routers::ScoredTopK>)
    return {.k = 2};
  else if constexpr (std::is_same_v<R, sy::routers::ReMoE>)
    return {.max_k = 3};
  else
    return R{};
}

BOOST_AUTO_TEST_CASE_TEMPLATE(fields_are_named_uniquely_and_match_the_loss_terms, R, all_routers) {
  using L = typename R::losses_type;
  const auto n = names<L>();
  const std::set<std::string> unique(n.begin(), n.end());
  BOOST_TEST(unique.size() == n.size());
  for (const auto& s : n) {
    BOOST_TEST(!s.empty());
    BOOST_TEST(s.find_first_of(" =,") == std::string::npos);
    // Each name reaches its field: set it by name, read it back by name, the others stay 0.
    L c{};
    tr::set_coefficient(c, s, 0.25f);
    for (const auto& other : n)
      BOOST_TEST(tr::get_coefficient(c, other) == (other == s ? 0.25f : 0.0f));
  }
  // Composed routers: a bound term with a gradient ↔ a listed field.
  if constexpr (requires(const R& r) { r.loss_terms(); }) {
    const R r = make_router<R>();
    std::apply(
        [&](const auto&... bound) {
          (([&] {
             using B = std::decay_t<decltype(bound)>;
             constexpr bool trained =
                 std::decay_t<decltype(bound.term)>::target != sy::routing::loss_target::none;
             BOOST_TEST((listed<L, B::field>() == trained),
                        "a loss term's field is " << (trained ? "not " : "") << "listed");
           }()),
           ...);
        },
        r.loss_terms());
  }
}

// ---- through the layer's backward (dy = 0: only the aux losses give gradients) -----------

template <class R>
struct router_grads_storage {
  std::vector<float> w;
  router_grads_storage(index_t e, index_t d) : w(static_cast<std::size_t>(e * d)) {}
  typename R::grads_type view(index_t e, index_t d) { return {sy::make_view(w.data(), e, d)}; }
  std::vector<float> flat() const { return w; }
};
template <>
struct router_grads_storage<sy::routers::DynMoE> {
  std::vector<float> w, th;
  router_grads_storage(index_t e, index_t d)
      : w(static_cast<std::size_t>(e * d)), th(static_cast<std::size_t>(e)) {}
  sy::routing::dynmoe_grads view(index_t e, index_t d) {
    return {sy::make_view(w.data(), d, e), sy::make_view(th.data(), e)};
  }
  std::vector<float> flat() const {
    std::vector<float> v = w;
    v.insert(v.end(), th.begin(), th.end());
    return v;
  }
};

//! The known diagnostics of a losses struct set to values far from 0 (backward must ignore them).
template <class L>
L with_diagnostics(L c) {
  if constexpr (std::is_same_v<L, sy::routing::adaptive_gating_losses>)
    c.top2_fraction = 0.7f;
  else if constexpr (std::is_same_v<L, sy::routing::remoe_losses>) {
    c.scored_pairs = 300;
    c.active_pairs = 120;
    c.capped_pairs = 7;
    c.capped_tokens = 5;
    c.sparsity = 0.6f;
  } else if constexpr (std::is_same_v<L, sy::routing::expert_choice_losses>) {
    c.capacity = 9;
    c.routed_pairs = 54;
    c.unrouted_tokens = 3;
  }
  return c;
}

template <class R>
struct aux_problem {
  static constexpr index_t tokens = 40, d = 12, f = 16, experts = 6;
  sy::test::layer_data<float> L;
  sy::test::router_setup<R> rs;
  sy::MoELayer<R, sy::activation::swiglu, sy::dispatch::sorted_grouped> layer;
  typename decltype(layer)::result_type fwd;
  std::vector<float> y, dy;

  explicit aux_problem(std::mt19937_64& g)
      : L(g, tokens, d, f, experts, true, true),
        rs(g, make_router<R>(), tokens, d, experts),
        layer{.router = rs.router},
        y(static_cast<std::size_t>(tokens * d)),
        dy(y.size(), 0.0f) {
    layer.template forward<float>(sy::host_context{}, L.xv(), rs.params(d), L.weights(),
                                  sy::make_view(y.data(), tokens, d), fwd);
  }

  //! dx and the router's gradients (flattened) of a backward with dy = 0 and coefficients c.
  std::vector<float> grads(const typename R::losses_type& c) const {
    std::vector<float> dx(static_cast<std::size_t>(tokens * d)), dw1(L.w1.size()), db1(L.b1.size()),
        dw2(L.w2.size()), db2(L.b2.size());
    router_grads_storage<R> rg(experts, d);
    layer.template backward<float>(
        sy::host_context{}, L.xv(), rs.params(d), L.weights(), fwd,
        sy::make_view<const float>(dy.data(), tokens, d), c, sy::make_view(dx.data(), tokens, d),
        {sy::make_view(dw1.data(), experts, L.p, d), sy::make_view(db1.data(), experts, L.p),
         sy::make_view(dw2.data(), experts, d, f), sy::make_view(db2.data(), experts, d)},
        rg.view(experts, d));
    auto out = rg.flat();
    out.insert(out.end(), dx.begin(), dx.end());
    return out;
  }
};

bool any_nonzero(const std::vector<float>& v) {
  for (float x : v)
    if (x != 0.0f) return true;
  return false;
}

BOOST_AUTO_TEST_CASE_TEMPLATE(backward_reads_the_listed_fields_and_only_those, R, all_routers) {
  using L = typename R::losses_type;
  std::mt19937_64 g(sy::test::base_seed() + 1601);
  const aux_problem<R> pb(g);
  const auto zero = pb.grads(L{});
  BOOST_TEST(!any_nonzero(zero), "dy = 0 and no coefficient, yet a gradient");
  // The diagnostics are not coefficients: the same bits with them set.
  const auto diag = pb.grads(with_diagnostics(L{}));
  BOOST_TEST((std::memcmp(diag.data(), zero.data(), zero.size() * sizeof(float)) == 0));
  // Each listed coefficient alone gives a gradient.
  for (const auto& name : names<L>()) {
    L c{};
    tr::set_coefficient(c, name, 0.5f);
    BOOST_TEST(any_nonzero(pb.grads(c)), name << " alone gives no gradient");
  }
}

//! Every coefficient field set to a distinct value (0.01, 0.02, …), the diagnostics too.
template <class L>
L distinct_coefficients() {
  L c = with_diagnostics(L{});
  float v = 0.01f;
  std::apply([&](const auto&... f) { ((f.of(c) = v, v += 0.01f), ...); }, L::coefficient_fields());
  return c;
}

// Backward is linear in the coefficients: with at(step) = c · s it is s · (backward with c),
// within float rounding. Tolerance, normwise: |g_s − s·g| <= n·u·s·max|g|, u = 2⁻²⁴,
// n = T + E + d + 8 (the token sums of dW, the expert sums of d_logits, the d-long rows, and
// the roundings of c·s, the terms' scalings and the final one); cancellations in the token sums
// make an elementwise relative bound meaningless.
BOOST_AUTO_TEST_CASE_TEMPLATE(backward_is_linear_in_the_schedule_scale, R, all_routers) {
  using L = typename R::losses_type;
  if constexpr (sy::routing::coefficient_count < L >> 0) {
    std::mt19937_64 g(sy::test::base_seed() + 1602);
    const aux_problem<R> pb(g);
    const tr::aux_loss_schedule<L> sched{.coefficients = distinct_coefficients<L>(),
                                         .warmup_steps = 10,
                                         .decay_start = 20,
                                         .decay_steps = 10,
                                         .final_scale = 0.1f};
    const auto full = pb.grads(sched.coefficients);
    double top = 0.0;
    for (float v : full) top = std::max(top, static_cast<double>(std::abs(v)));
    BOOST_TEST(top > 0.0);
    constexpr double u = 1.0 / (1 << 24);
    const double n = static_cast<double>(aux_problem<R>::tokens + aux_problem<R>::experts +
                                         aux_problem<R>::d + 8);
    for (index_t step : {0, 4, 15, 23, 40}) {
      const double s = sched.scale(step);
      const auto got = pb.grads(sched.at(step));
      double worst = 0.0;
      for (std::size_t i = 0; i < full.size(); ++i)
        worst = std::max(worst, std::abs(static_cast<double>(got[i]) - s * full[i]));
      const double bound = n * u * s * top;
      BOOST_TEST_MESSAGE("step " << step << ": scale " << s << ", max |g_s − s·g| = "
                                 << worst / (u * s * top) << " u·s·max|g|");
      BOOST_TEST(worst <= bound, "step " << step << ": " << worst << " > " << bound);
    }
  } else {
    // No coefficient (expert choice): at(step) copies the diagnostics, whatever the scale.
    const tr::aux_loss_schedule<L> sched{.coefficients = with_diagnostics(L{}), .warmup_steps = 4};
    const L got = sched.at(0), want = with_diagnostics(L{});
    BOOST_TEST((std::memcmp(&got, &want, sizeof got) == 0));
  }
}

// ---- the schedule ------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(schedule_values_at_chosen_steps) {
  using L = sy::routing::topp_losses;
  const tr::aux_loss_schedule<L> warm{.coefficients = {}, .warmup_steps = 4};
  BOOST_TEST(warm.scale(0) == 0.25f);
  BOOST_TEST(warm.scale(1) == 0.5f);
  BOOST_TEST(warm.scale(2) == 0.75f);
  BOOST_TEST(warm.scale(3) == 1.0f);
  BOOST_TEST(warm.scale(1000) == 1.0f);
  const tr::aux_loss_schedule<L> none{};
  BOOST_TEST(none.scale(0) == 1.0f);
  BOOST_TEST(none.scale(123456) == 1.0f);

  const tr::aux_loss_schedule<L> decay{
      .coefficients = {}, .decay_start = 10, .decay_steps = 4, .final_scale = 0.2f};
  BOOST_TEST(decay.scale(9) == 1.0f);
  BOOST_TEST(decay.scale(10) == 1.0f);
  auto cosine = [](double fin, double u) {
    return static_cast<float>(fin + (1.0 - fin) * 0.5 * (1.0 + std::cos(std::numbers::pi * u)));
  };
  BOOST_TEST(decay.scale(11) == cosine(0.2f, 0.25));
  BOOST_TEST(decay.scale(12) == cosine(0.2f, 0.5));
  BOOST_TEST(std::abs(decay.scale(12) - 0.6f) <= 1e-7f);
  BOOST_TEST(decay.scale(14) == 0.2f);
  BOOST_TEST(decay.scale(1000) == 0.2f);

  const tr::aux_loss_schedule<L> jump{.coefficients = {}, .decay_start = 5, .final_scale = 0.0f};
  BOOST_TEST(jump.scale(4) == 1.0f);
  BOOST_TEST(jump.scale(5) == 0.0f);

  // Overlapping warmup and decay multiply.
  const tr::aux_loss_schedule<L> both{.coefficients = {},
                                      .warmup_steps = 10,
                                      .decay_start = 5,
                                      .decay_steps = 10,
                                      .final_scale = 0.5f};
  BOOST_TEST(both.scale(7) == static_cast<float>(0.8 * static_cast<double>(cosine(0.5f, 0.2))),
             boost::test_tools::tolerance(1e-6f));
}

BOOST_AUTO_TEST_CASE(at_scales_the_coefficient_fields_only) {
  const tr::aux_loss_schedule<sy::routing::adaptive_gating_losses> ag{
      .coefficients = {.lb_loss = 0.01f, .z_loss = 0.002f, .top2_fraction = 0.7f},
      .warmup_steps = 4};
  const auto c = ag.at(1);
  BOOST_TEST(c.lb_loss == 0.01f * 0.5f);
  BOOST_TEST(c.z_loss == 0.002f * 0.5f);
  BOOST_TEST(c.top2_fraction == 0.7f);  // a diagnostic, copied

  tr::aux_loss_schedule<sy::routing::remoe_losses> re{.warmup_steps = 2};
  re.coefficients = with_diagnostics(sy::routing::remoe_losses{.l1 = 1e-3f, .l1_balanced = 2e-3f});
  const auto r = re.at(0);
  BOOST_TEST(r.l1 == 1e-3f * 0.5f);
  BOOST_TEST(r.l1_balanced == 2e-3f * 0.5f);
  BOOST_TEST(r.sparsity == 0.6f);
  BOOST_TEST(r.scored_pairs == 300);
  BOOST_TEST(r.capped_tokens == 5);

  const auto d = tr::scale_coefficients(sy::routing::dynmoe_losses::deepspeed(), 0.5f);
  BOOST_TEST(d.sim_loss == 0.005f);
  BOOST_TEST(d.efficiency_loss == 0.005f);
  const sy::routing::expert_choice_losses ec =
      with_diagnostics(sy::routing::expert_choice_losses{});
  BOOST_TEST(tr::scale_coefficients(ec, 0.0f).capacity == 9);
}

template <class F>
std::string range_error_argument(F&& f, std::string* message = nullptr) {
  try {
    f();
  } catch (const sy::range_error& e) {
    if (message) *message = e.what();
    return e.argument();
  }
  return "(no range_error)";
}

BOOST_AUTO_TEST_CASE(schedule_errors_name_the_field) {
  using L = sy::routing::topp_losses;
  using S = tr::aux_loss_schedule<L>;
  std::string msg;
  BOOST_TEST(range_error_argument([] { S{.coefficients = {.lb_loss = -0.1f}}.validate(); }, &msg) ==
             "lb_loss");
  BOOST_TEST(msg.find("-0.1") != std::string::npos);
  BOOST_TEST(range_error_argument([] {
               S{.coefficients = {.z_loss = std::numeric_limits<float>::infinity()}}.validate();
             }) == "z_loss");
  BOOST_TEST(
      range_error_argument([] {
        S{.coefficients = {.dynamic_loss = std::numeric_limits<float>::quiet_NaN()}}.validate();
      }) == "dynamic_loss");
  BOOST_TEST(range_error_argument([] { S{.warmup_steps = -1}.validate(); }) == "warmup_steps");
  BOOST_TEST(range_error_argument([] { S{.decay_start = -2}.validate(); }) == "decay_start");
  BOOST_TEST(range_error_argument([] { S{.decay_steps = -3}.validate(); }) == "decay_steps");
  BOOST_TEST(range_error_argument([] { S{.final_scale = 1.5f}.validate(); }) == "final_scale");
  BOOST_TEST(range_error_argument([] { S{.final_scale = -0.1f}.validate(); }) == "final_scale");
  BOOST_TEST(range_error_argument([] { (void)S{}.scale(-1); }) == "step");
  BOOST_TEST(range_error_argument([] { (void)S{.warmup_steps = -1}.at(3); }) == "warmup_steps");
  BOOST_TEST(range_error_argument([] { (void)tr::scale_coefficients(L{}, -1.0f); }) == "s");
}

// ---- set / parse / describe ---------------------------------------------------------------

BOOST_AUTO_TEST_CASE(parse_and_describe_round_trip) {
  using L = sy::routing::topp_losses;
  const auto c = tr::parse_coefficients<L>("lb_loss=0.01,z_loss=1e-3");
  BOOST_TEST(c.lb_loss == 0.01f);
  BOOST_TEST(c.z_loss == 1e-3f);
  BOOST_TEST(c.dynamic_loss == 0.0f);
  BOOST_TEST(tr::describe_coefficients(c) == "dynamic_loss=0 lb_loss=0.01 z_loss=0.001");
  // describe's output parses back to the same bits; blanks and commas both separate.
  const auto back = tr::parse_coefficients<L>(tr::describe_coefficients(c));
  BOOST_TEST((std::memcmp(&back, &c, sizeof c) == 0));
  const auto spaced = tr::parse_coefficients<L>("  dynamic_loss=0.5 ,, lb_loss=2e-2\t");
  BOOST_TEST(spaced.dynamic_loss == 0.5f);
  BOOST_TEST(spaced.lb_loss == 0.02f);
  // A base is kept where the spec says nothing; a later item wins.
  const auto over = tr::parse_coefficients<L>("z_loss=1,z_loss=3", L{.dynamic_loss = 0.25f});
  BOOST_TEST(over.dynamic_loss == 0.25f);
  BOOST_TEST(over.z_loss == 3.0f);
  BOOST_TEST(tr::parse_coefficients<L>("", L{.lb_loss = 0.5f}).lb_loss == 0.5f);
  // Shortest round-trip text.
  sy::routing::remoe_losses r{};
  r.l1 = 1e-8f;
  BOOST_TEST(tr::describe_coefficients(r) == "l1=1e-08 l1_balanced=0");
  BOOST_TEST(tr::describe_coefficients(sy::routing::expert_choice_losses{}).empty());
  BOOST_TEST(tr::describe_coefficients(sy::routing::dynmoe_losses::deepspeed()) ==
             "sim_loss=0.01 simple_loss=0.01 load_balance_loss=0.01 efficiency_loss=0.01");
}

BOOST_AUTO_TEST_CASE(set_and_parse_errors_name_the_argument) {
  using L = sy::routing::topp_losses;
  std::string msg;
  L c{};
  BOOST_TEST(range_error_argument([&] { tr::set_coefficient(c, "lb", 0.1f); }, &msg) == "lb");
  BOOST_TEST(msg.find("dynamic_loss, lb_loss, z_loss") != std::string::npos, msg);
  BOOST_TEST(range_error_argument([&] { tr::set_coefficient(c, "z_loss", -1.0f); }, &msg) ==
             "z_loss");
  BOOST_TEST(range_error_argument([&] {
               tr::set_coefficient(c, "z_loss", std::numeric_limits<float>::infinity());
             }) == "z_loss");
  BOOST_TEST(c.z_loss == 0.0f);  // unchanged after the errors
  BOOST_TEST(range_error_argument([&] { (void)tr::get_coefficient(c, "top2_fraction"); }) ==
             "top2_fraction");
  // A diagnostic is not settable by name.
  sy::routing::adaptive_gating_losses ag{};
  BOOST_TEST(range_error_argument([&] { tr::set_coefficient(ag, "top2_fraction", 0.5f); }, &msg) ==
             "top2_fraction");
  BOOST_TEST(msg.find("lb_loss, z_loss") != std::string::npos, msg);
  sy::routing::expert_choice_losses ec{};
  BOOST_TEST(range_error_argument([&] { tr::set_coefficient(ec, "capacity", 1.0f); }, &msg) ==
             "capacity");
  BOOST_TEST(msg.find("(none)") != std::string::npos, msg);

  BOOST_TEST(range_error_argument([] { (void)tr::parse_coefficients<L>("lb_loss"); }, &msg) ==
             "spec");
  BOOST_TEST(msg.find("'lb_loss'") != std::string::npos, msg);
  BOOST_TEST(range_error_argument([] { (void)tr::parse_coefficients<L>("=0.1"); }, &msg) == "spec");
  BOOST_TEST(msg.find("'=0.1'") != std::string::npos, msg);
  BOOST_TEST(range_error_argument([] { (void)tr::parse_coefficients<L>("lb_loss=0.1x"); }, &msg) ==
             "lb_loss");
  BOOST_TEST(msg.find("'0.1x'") != std::string::npos, msg);
  BOOST_TEST(range_error_argument([] { (void)tr::parse_coefficients<L>("lb_loss="); }, &msg) ==
             "lb_loss");
  BOOST_TEST(range_error_argument([] { (void)tr::parse_coefficients<L>("z_loss=0.1,lbloss=1"); },
                                  &msg) == "lbloss");
  BOOST_TEST(range_error_argument([] { (void)tr::parse_coefficients<L>("z_loss=-1e-3"); }, &msg) ==
             "z_loss");
  BOOST_TEST(msg.find("-0.001") != std::string::npos, msg);
  BOOST_TEST(range_error_argument([] { (void)tr::parse_coefficients<L>("z_loss=nan"); }) ==
             "z_loss");
  BOOST_TEST(range_error_argument([] { (void)tr::parse_coefficients<L>("z_loss=1e99"); }) ==
             "z_loss");
}

}  // namespace
