// SPDX-License-Identifier: Apache-2.0
#pragma once
// A small top-k layer with seeded inputs, gradient buffers and the helpers the hardening
// regression tests share: poison a buffer, compare bit patterns, expect a typed error.
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <switchyard/switchyard.hpp>

#include "host/layer/layer_reference.hpp"
#include "support/random.hpp"

namespace switchyard::test {

//! A value no computation produces: outputs are filled with it before a run.
inline constexpr float poison = -1.2345e+29f;

inline void fill_poison(std::vector<float>& v) { std::fill(v.begin(), v.end(), poison); }

//! Bitwise equality of two float vectors (NaN payloads and signed zeros included).
inline bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() &&
         std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

//! Runs f, expects an exception of type E (or derived) whose argument() is `argument`.
template <class E, class F>
void expect_named(F&& f, const std::string& argument) {
  try {
    f();
    BOOST_ERROR("no exception; expected one naming " << argument);
  } catch (const E& e) {
    BOOST_TEST(e.argument() == argument, "argument '" << e.argument() << "', expected '"
                                                      << argument << "': " << e.what());
  } catch (const std::exception& e) {
    BOOST_ERROR("wrong exception type: " << e.what());
  }
}

//! Inputs, weights and float gradient buffers of a TopK × SwiGLU layer (biases included).
struct small_layer {
  index_t tokens, d, f, experts;
  layer_data<float> L;
  router_setup<routers::TopK> rs;
  std::vector<float> dy, dx, gw1, gb1, gw2, gb2, gwr;

  small_layer(std::uint64_t salt, index_t t = 24, index_t d_ = 16, index_t f_ = 8,
              index_t e = 4, int k = 2)
      : small_layer(std::mt19937_64(base_seed() + salt), t, d_, f_, e, k) {}
  small_layer(std::mt19937_64 g, index_t t, index_t d_, index_t f_, index_t e, int k)
      : tokens(t), d(d_), f(f_), experts(e), L(g, t, d_, f_, e, true, true),
        rs(g, {.k = k}, t, d_, e), dy(normal(g, static_cast<std::size_t>(t * d_))) {
    reset_grads();
  }

  //! Gradient buffers filled with seeded non-zero values (backward accumulates into them).
  void reset_grads() {
    std::mt19937_64 g(base_seed() + 977);
    dx = normal(g, static_cast<std::size_t>(tokens * d));
    gw1 = normal(g, L.w1.size());
    gb1 = normal(g, L.b1.size());
    gw2 = normal(g, L.w2.size());
    gb2 = normal(g, L.b2.size());
    gwr = normal(g, rs.w.size());
  }

  [[nodiscard]] matrix_view<float> dxv() { return make_view(dx.data(), tokens, d); }
  [[nodiscard]] matrix_view<const float> dyv() const {
    return make_view<const float>(dy.data(), tokens, d);
  }
  [[nodiscard]] expert_grads grads() {
    return {make_view(gw1.data(), experts, L.p, d), make_view(gb1.data(), experts, L.p),
            make_view(gw2.data(), experts, d, f), make_view(gb2.data(), experts, d)};
  }
  [[nodiscard]] routing::linear_router_grads rgrads() {
    return {make_view(gwr.data(), experts, d)};
  }
  //! Every gradient buffer, concatenated (to compare before / after).
  [[nodiscard]] std::vector<float> all_grads() const {
    std::vector<float> v;
    for (const auto* b : {&dx, &gw1, &gb1, &gw2, &gb2, &gwr}) v.insert(v.end(), b->begin(), b->end());
    return v;
  }
};

}  // namespace switchyard::test
