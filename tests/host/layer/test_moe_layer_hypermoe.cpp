// SPDX-License-Identifier: Apache-2.0
// HyperMoE composed into MoELayer through the add-on hook: y = Σ_j w_j·Expert_j(x) + hyper(x)
// and the gradients are the plain layer's plus the module's own.
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <vector>

#include <switchyard/layer/hypermoe_addon.hpp>
#include <switchyard/switchyard.hpp>

#include "host/layer/layer_reference.hpp"
#include "support/random.hpp"

namespace sy = switchyard;
using namespace switchyard;

namespace {

// HyperMoE parameters: {rows, cols} of each tensor (cols 0 = vector), random values, views.
struct hyper_parameters {
  std::vector<std::array<index_t, 2>> shape;
  std::vector<std::vector<float>> val;
  hyper_parameters(std::mt19937_64& g, index_t experts, index_t d, index_t d_emb, index_t p,
                   index_t h_in, index_t L, index_t d_le, index_t b, index_t a)
      : shape{{experts, d_emb}, {p, d_emb}, {p, 0}, {h_in, p}, {h_in, 0}, {L, d_le},
              {b, h_in + d_le}, {b, 0}, {a * d, b}, {a * d, 0}, {d * a, b}, {d * a, 0},
              {d, b}, {d, 0}, {a, b}, {a, 0}} {
    for (const auto& s : shape)
      val.push_back(test::normal(g, static_cast<std::size_t>(s[0] * std::max<index_t>(1, s[1])), 0.5f));
  }
  layer::hypermoe_params params() const {
    auto m = [&](int i) { return make_view<const float>(val[i].data(), shape[i][0], shape[i][1]); };
    auto v = [&](int i) { return make_view<const float>(val[i].data(), shape[i][0]); };
    layer::hypermoe_params hp;
    hp.expert_emb = m(0);
    hp.process1 = {m(1), v(2)};
    hp.process2 = {m(3), v(4)};
    hp.generator.layer_embed = m(5);
    hp.generator.linear1 = {m(6), v(7)};
    hp.generator.weight_up = {m(8), v(9)};
    hp.generator.weight_down = {m(10), v(11)};
    hp.generator.bias_up = {m(12), v(13)};
    hp.generator.bias_down = {m(14), v(15)};
    return hp;
  }
};

}  // namespace

BOOST_AUTO_TEST_CASE(hypermoe_addon_adds_the_module_term_and_gradients) {
  std::mt19937_64 g(test::base_seed() + 201);
  constexpr index_t tokens = 14, d = 6, f = 5, experts = 5;
  constexpr index_t d_emb = 4, p = 7, h_in = 3, L = 2, d_le = 2, b = 5, a = 3;
  test::layer_data<float> D(g, tokens, d, f, experts, true, true);
  test::router_setup<routers::TopK> rs(g, {.k = 2}, tokens, d, experts);

  hyper_parameters P(g, experts, d, d_emb, p, h_in, L, d_le, b, a);
  auto& val = P.val;
  auto& shape = P.shape;
  std::vector<std::vector<float>> grd;
  for (const auto& s : shape) grd.emplace_back(static_cast<std::size_t>(s[0] * std::max<index_t>(1, s[1])), 0.0f);
  for (auto& v : val[2]) v = 0.5f + std::abs(v);  // keep ReLU units alive
  for (auto& v : val[7]) v = 0.5f + std::abs(v);
  const layer::hypermoe_params hp = P.params();
  auto gm = [&](std::vector<std::vector<float>>& s, int i) { return make_view(s[i].data(), shape[i][0], shape[i][1]); };
  auto gv = [&](std::vector<std::vector<float>>& s, int i) { return make_view(s[i].data(), shape[i][0]); };
  auto grads_of = [&](std::vector<std::vector<float>>& s) {
    layer::hypermoe_grads hg;
    hg.expert_emb = gm(s, 0);
    hg.process1 = {gm(s, 1), gv(s, 2)};
    hg.process2 = {gm(s, 3), gv(s, 4)};
    hg.generator.layer_embed = gm(s, 5);
    hg.generator.linear1 = {gm(s, 6), gv(s, 7)};
    hg.generator.weight_up = {gm(s, 8), gv(s, 9)};
    hg.generator.weight_down = {gm(s, 10), gv(s, 11)};
    hg.generator.bias_up = {gm(s, 12), gv(s, 13)};
    hg.generator.bias_down = {gm(s, 14), gv(s, 15)};
    return hg;
  };

  const layer::hypermoe_addon addon{.hyper = {.layer_idx = 1, .adapter_dim = static_cast<int>(a)}};
  MoELayer<routers::TopK, activation::swiglu> plain{.router = rs.router};
  MoELayer<routers::TopK, activation::swiglu, dispatch::sorted_grouped, layer::hypermoe_addon> with{
      .router = rs.router, .addon = addon};
  std::vector<float> y0(tokens * d), y1(tokens * d), hyper(tokens * d);
  decltype(plain)::result_type r0;
  decltype(with)::result_type r1;
  plain.forward<float>(switchyard::host_context{}, D.xv(), rs.params(d), D.weights(), make_view(y0.data(), tokens, d), r0);
  with.forward<float>(switchyard::host_context{}, D.xv(), rs.params(d), D.weights(), make_view(y1.data(), tokens, d), r1, {}, hp);
  addon.hyper.forward(D.xv(), std::as_const(r0.plan).view(), hp, make_view(hyper.data(), tokens, d));
  double hyper_norm = 0;
  for (index_t i = 0; i < tokens * d; ++i) {
    BOOST_TEST(std::abs(y1[i] - (y0[i] + hyper[i])) <= 1e-5f * (1.0f + std::abs(y1[i])));
    hyper_norm += std::abs(hyper[i]);
  }
  BOOST_TEST(hyper_norm > 0.0);

  const auto dy = test::normal(g, tokens * d);
  const auto dyv = make_view<const float>(dy.data(), tokens, d);
  std::vector<float> dx0(tokens * d), dx1(tokens * d), dxh(tokens * d);
  auto g_layer = grd, g_module = grd;
  plain.backward<float>(switchyard::host_context{}, D.xv(), rs.params(d), D.weights(), r0, dyv, {}, make_view(dx0.data(), tokens, d), {}, {});
  with.backward<float>(switchyard::host_context{}, D.xv(), rs.params(d), D.weights(), r1, dyv, {}, make_view(dx1.data(), tokens, d), {}, {},
                       {}, hp, grads_of(g_layer));
  addon.hyper.backward(D.xv(), std::as_const(r0.plan).view(), hp, dyv, make_view(dxh.data(), tokens, d),
                       grads_of(g_module));
  for (index_t i = 0; i < tokens * d; ++i)
    BOOST_TEST(std::abs(dx1[i] - (dx0[i] + dxh[i])) <= 1e-5f * (1.0f + std::abs(dx1[i])));
  for (std::size_t t = 0; t < g_layer.size(); ++t)
    for (std::size_t i = 0; i < g_layer[t].size(); ++i) BOOST_TEST(g_layer[t][i] == g_module[t][i]);
}

// Batch invariance with the add-on (docs/design.md, "Same bits on any machine"): a
// batch_invariant layer with HyperMoE gives a token the same y and dx bits alone, reversed or
// among other tokens (the module's term is computed per token from its selection set).
BOOST_AUTO_TEST_CASE(hypermoe_addon_token_bits_independent_of_batch) {
  std::mt19937_64 g(test::base_seed() + 211);
  constexpr index_t tokens = 40, d = 96, f = 64, experts = 6;  // BLAS-sized without the flag
  constexpr index_t d_emb = 4, p = 7, h_in = 3, L = 2, d_le = 2, b = 5, a = 3;
  test::layer_data<float> D(g, 2 * tokens, d, f, experts, true, true);
  test::router_setup<routers::TopK> rs(g, {.k = 2}, 2 * tokens, d, experts);
  const hyper_parameters P(g, experts, d, d_emb, p, h_in, L, d_le, b, a);
  const layer::hypermoe_params hp = P.params();
  MoELayer<routers::TopK, activation::swiglu, dispatch::sorted_grouped, layer::hypermoe_addon> layer{
      .router = rs.router, .addon = {.hyper = {.layer_idx = 1, .adapter_dim = static_cast<int>(a)}},
      .batch_invariant = true};
  const auto dy = test::normal(g, 2 * tokens * d);
  // y and dx rows (as bits) of a forward + backward over the given tokens, in that order.
  auto run = [&](const std::vector<index_t>& rows) {
    const index_t n = static_cast<index_t>(rows.size());
    std::vector<float> x(n * d), dys(n * d), y(n * d, -7.0f), dx(n * d, 0.0f);
    for (index_t i = 0; i < n; ++i)
      for (index_t c = 0; c < d; ++c) {
        x[i * d + c] = D.x[rows[i] * d + c];
        dys[i * d + c] = dy[rows[i] * d + c];
      }
    decltype(layer)::result_type r;
    const auto xv = make_view<const float>(x.data(), n, d);
    layer.forward<float>(switchyard::host_context{}, xv, rs.params(d), D.weights(), make_view(y.data(), n, d), r, {}, hp);
    layer.backward<float>(switchyard::host_context{}, xv, rs.params(d), D.weights(), r, make_view<const float>(dys.data(), n, d), {},
                          make_view(dx.data(), n, d), {}, {}, {}, hp, {});
    std::vector<std::vector<float>> out;
    for (index_t i = 0; i < n; ++i) {
      std::vector<float> row(y.begin() + i * d, y.begin() + (i + 1) * d);
      row.insert(row.end(), dx.begin() + i * d, dx.begin() + (i + 1) * d);
      out.push_back(row);
    }
    return out;
  };
  std::vector<index_t> all(tokens), rev(tokens), mixed;
  for (index_t t = 0; t < tokens; ++t) all[t] = t, rev[t] = tokens - 1 - t;
  for (index_t t = 0; t < 15; ++t) mixed.push_back(tokens + 2 * t);
  mixed.insert(mixed.begin() + 3, 7);
  mixed.insert(mixed.begin() + 11, 30);
  const auto full = run(all), reversed = run(rev), others = run(mixed), alone = run({tokens - 1});
  auto same = [](const std::vector<float>& u, const std::vector<float>& w) {
    return std::memcmp(u.data(), w.data(), u.size() * sizeof(float)) == 0;
  };
  for (index_t i = 0; i < tokens; ++i)
    BOOST_TEST(same(reversed[i], full[rev[i]]), "token " << rev[i] << " differs in the reversed batch");
  BOOST_TEST(same(others[3], full[7]));
  BOOST_TEST(same(others[11], full[30]));
  BOOST_TEST(same(alone[0], full[tokens - 1]));
}
