// SPDX-License-Identifier: Apache-2.0
#pragma once
// HyperMoE parameters for the layer tests: {rows, cols} of each tensor (cols 0 = vector),
// seeded random values, parameter and gradient views.
#include <algorithm>
#include <array>
#include <random>
#include <vector>

#include <switchyard/layer/hypermoe_addon.hpp>
#include <switchyard/switchyard.hpp>

#include "support/random.hpp"

namespace switchyard::test {

struct hyper_parameters {
  std::vector<std::array<index_t, 2>> shape;
  std::vector<std::vector<float>> val;
  hyper_parameters(std::mt19937_64& g, index_t experts, index_t d, index_t d_emb, index_t p,
                   index_t h_in, index_t L, index_t d_le, index_t b, index_t a)
      : shape{{experts, d_emb}, {p, d_emb}, {p, 0}, {h_in, p}, {h_in, 0}, {L, d_le},
              {b, h_in + d_le}, {b, 0}, {a * d, b}, {a * d, 0}, {d * a, b}, {d * a, 0},
              {d, b}, {d, 0}, {a, b}, {a, 0}} {
    for (const auto& s : shape)
      val.push_back(normal(g, static_cast<std::size_t>(s[0] * std::max<index_t>(1, s[1])), 0.5f));
  }
  //! Zeroed storage shaped like the parameters (for gradients).
  std::vector<std::vector<float>> zeros() const {
    std::vector<std::vector<float>> z;
    for (const auto& s : shape) z.emplace_back(static_cast<std::size_t>(s[0] * std::max<index_t>(1, s[1])), 0.0f);
    return z;
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
  //! Gradient views over storage `s` shaped like the parameters.
  layer::hypermoe_grads grads(std::vector<std::vector<float>>& s) const {
    auto m = [&](int i) { return make_view(s[i].data(), shape[i][0], shape[i][1]); };
    auto v = [&](int i) { return make_view(s[i].data(), shape[i][0]); };
    layer::hypermoe_grads hg;
    hg.expert_emb = m(0);
    hg.process1 = {m(1), v(2)};
    hg.process2 = {m(3), v(4)};
    hg.generator.layer_embed = m(5);
    hg.generator.linear1 = {m(6), v(7)};
    hg.generator.weight_up = {m(8), v(9)};
    hg.generator.weight_down = {m(10), v(11)};
    hg.generator.bias_up = {m(12), v(13)};
    hg.generator.bias_down = {m(14), v(15)};
    return hg;
  }
};

}  // namespace switchyard::test
