// SPDX-License-Identifier: Apache-2.0
// HyperMoE module (spec §4): forward against a float64 reference written here, the
// unselected-sum identity, determinism and batch invariance, gradients of every parameter
// kind and of x against central finite differences of the float64 reference, the init
// scale, the Switch / GPT-2 variant pieces, bad input, and the workspace: forward and
// backward given one of workspace_size bytes allocate nothing (global operator new counts).
#include <boost/test/unit_test.hpp>

#include <switchyard/layer/hypermoe.hpp>
#include <switchyard/layer/hypermoe_addon.hpp>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "support/random.hpp"

namespace sy = switchyard;
using sy::index_t;

// Global operator new/delete that count allocations while `counting` is set.
namespace {
std::atomic<bool> counting{false};
std::atomic<long> allocations{0};
void* counted_alloc(std::size_t n, std::size_t align = 0) {
  if (counting.load()) allocations.fetch_add(1);
  if (n == 0) n = 1;
  void* p = align > alignof(std::max_align_t) ? std::aligned_alloc(align, (n + align - 1) / align * align)
                                              : std::malloc(n);
  if (p == nullptr) throw std::bad_alloc();
  return p;
}
}  // namespace
void* operator new(std::size_t n) { return counted_alloc(n); }
void* operator new[](std::size_t n) { return counted_alloc(n); }
void* operator new(std::size_t n, std::align_val_t a) { return counted_alloc(n, static_cast<std::size_t>(a)); }
void* operator new[](std::size_t n, std::align_val_t a) { return counted_alloc(n, static_cast<std::size_t>(a)); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
  try {
    return counted_alloc(n);
  } catch (...) {
    return nullptr;
  }
}
void* operator new[](std::size_t n, const std::nothrow_t& t) noexcept { return operator new(n, t); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }

namespace {

// Parameter tensors in a fixed order, float storage (what the module reads) and gradients.
enum tensor_id { EMB, P1W, P1B, P2W, P2B, LE, G1W, G1B, WUW, WUB, WDW, WDB, BUW, BUB, BDW, BDB, N_TENSORS };
const char* const tensor_names[N_TENSORS] = {
    "expert_emb", "process1.w", "process1.b", "process2.w", "process2.b", "layer_embed",
    "linear1.w", "linear1.b", "weight_up.w", "weight_up.b", "weight_down.w", "weight_down.b",
    "bias_up.w", "bias_up.b", "bias_down.w", "bias_down.b"};

struct dims {
  index_t E = 5, d = 6, d_emb = 4, p = 7, h_in = 3, L = 3, d_le = 2, b = 5, a = 3;
};

struct fixture {
  dims s;
  std::vector<index_t> rows, cols;  // shape of each tensor (cols = 0 for vectors)
  std::vector<std::vector<float>> value, grad;

  explicit fixture(const dims& dd, std::mt19937_64& g, float scale = 0.5f) : s(dd) {
    const index_t shape[N_TENSORS][2] = {
        {s.E, s.d_emb}, {s.p, s.d_emb}, {s.p, 0}, {s.h_in, s.p}, {s.h_in, 0}, {s.L, s.d_le},
        {s.b, s.h_in + s.d_le}, {s.b, 0}, {s.a * s.d, s.b}, {s.a * s.d, 0}, {s.d * s.a, s.b},
        {s.d * s.a, 0}, {s.d, s.b}, {s.d, 0}, {s.a, s.b}, {s.a, 0}};
    for (int i = 0; i < N_TENSORS; ++i) {
      rows.push_back(shape[i][0]);
      cols.push_back(shape[i][1]);
      const auto n = static_cast<std::size_t>(shape[i][0] * std::max<index_t>(1, shape[i][1]));
      value.push_back(sy::test::normal(g, n, scale));
      grad.emplace_back(n, 0.0f);
    }
    // Positive hidden biases keep most ReLU units alive, so every gradient path is exercised.
    for (int i : {P1B, G1B})
      for (auto& v : value[i]) v = 0.5f + std::abs(v);
  }
  [[nodiscard]] sy::matrix_view<const float> m(int i) const {
    return sy::make_view(value[i].data(), rows[i], cols[i]);
  }
  [[nodiscard]] sy::vector_view<const float> v(int i) const {
    return sy::make_view(value[i].data(), rows[i]);
  }
  [[nodiscard]] sy::matrix_view<float> gm(int i) { return sy::make_view(grad[i].data(), rows[i], cols[i]); }
  [[nodiscard]] sy::vector_view<float> gv(int i) { return sy::make_view(grad[i].data(), rows[i]); }

  [[nodiscard]] sy::layer::hypermoe_params params() const {
    sy::layer::hypermoe_params p;
    p.expert_emb = m(EMB);
    p.process1 = {m(P1W), v(P1B)};
    p.process2 = {m(P2W), v(P2B)};
    p.generator.layer_embed = m(LE);
    p.generator.linear1 = {m(G1W), v(G1B)};
    p.generator.weight_up = {m(WUW), v(WUB)};
    p.generator.weight_down = {m(WDW), v(WDB)};
    p.generator.bias_up = {m(BUW), v(BUB)};
    p.generator.bias_down = {m(BDW), v(BDB)};
    return p;
  }
  [[nodiscard]] sy::layer::hypermoe_grads grads() {
    sy::layer::hypermoe_grads g;
    g.expert_emb = gm(EMB);
    g.process1 = {gm(P1W), gv(P1B)};
    g.process2 = {gm(P2W), gv(P2B)};
    g.generator.layer_embed = gm(LE);
    g.generator.linear1 = {gm(G1W), gv(G1B)};
    g.generator.weight_up = {gm(WUW), gv(WUB)};
    g.generator.weight_down = {gm(WDW), gv(WDB)};
    g.generator.bias_up = {gm(BUW), gv(BUB)};
    g.generator.bias_down = {gm(BDW), gv(BDB)};
    return g;
  }
  [[nodiscard]] std::vector<std::vector<double>> as_double() const {
    std::vector<std::vector<double>> out;
    for (const auto& t : value) out.emplace_back(t.begin(), t.end());
    return out;
  }
};

// A plan of width `width` with random distinct ids and counts in [min_count, width]; several
// tokens repeat a selection set (in another slot order) so that grouping is exercised.
sy::routing::routing_plan random_plan(std::mt19937_64& g, index_t tokens, index_t width,
                                      index_t experts, index_t min_count) {
  sy::routing::routing_plan plan;
  plan.resize(tokens, width, experts);
  std::uniform_int_distribution<index_t> cnt(min_count, width);
  for (index_t t = 0; t < tokens; ++t) {
    std::vector<std::int32_t> perm(static_cast<std::size_t>(experts));
    for (index_t e = 0; e < experts; ++e) perm[e] = static_cast<std::int32_t>(e);
    if (t >= 2 && t % 3 == 2) {  // same set as token t-2, reversed slot order
      const index_t c = plan.counts[t - 2];
      plan.counts[t] = static_cast<std::int32_t>(c);
      for (index_t j = 0; j < c; ++j) plan.expert_ids[t * width + j] = plan.expert_ids[(t - 2) * width + (c - 1 - j)];
      continue;
    }
    std::shuffle(perm.begin(), perm.end(), g);
    const index_t c = cnt(g);
    plan.counts[t] = static_cast<std::int32_t>(c);
    for (index_t j = 0; j < c; ++j) plan.expert_ids[t * width + j] = perm[j];
  }
  return plan;
}

// Float64 reference: per token, the unselected sum by an O(E) loop, then the math of §4.
std::vector<double> reference_forward(const dims& s, int layer, const std::vector<std::vector<double>>& P,
                                      const std::vector<double>& x,
                                      const sy::routing::routing_plan& plan) {
  const index_t T = plan.num_tokens;
  auto affine = [](const std::vector<double>& w, const std::vector<double>& b,
                   const std::vector<double>& in, index_t out) {
    std::vector<double> y(static_cast<std::size_t>(out));
    const auto n = static_cast<index_t>(in.size());
    for (index_t o = 0; o < out; ++o) {
      double acc = b[o];
      for (index_t i = 0; i < n; ++i) acc += w[o * n + i] * in[i];
      y[o] = acc;
    }
    return y;
  };
  auto relu = [](std::vector<double> v) {
    for (auto& a : v) a = std::max(0.0, a);
    return v;
  };
  std::vector<double> out(static_cast<std::size_t>(T * s.d));
  for (index_t t = 0; t < T; ++t) {
    std::vector<double> u(static_cast<std::size_t>(s.d_emb), 0.0);
    for (index_t e = 0; e < s.E; ++e) {
      bool selected = false;
      for (index_t j = 0; j < plan.counts[t]; ++j) selected |= plan.id(t, j) == e;
      if (!selected)
        for (index_t i = 0; i < s.d_emb; ++i) u[i] += P[EMB][e * s.d_emb + i];
    }
    auto z = affine(P[P2W], P[P2B], relu(affine(P[P1W], P[P1B], u, s.p)), s.h_in);
    for (index_t i = 0; i < s.d_le; ++i) z.push_back(P[LE][layer * s.d_le + i]);
    const auto h = relu(affine(P[G1W], P[G1B], z, s.b));
    const auto wd = affine(P[WDW], P[WDB], h, s.d * s.a);  // [d, a]
    const auto wu = affine(P[WUW], P[WUB], h, s.a * s.d);  // [a, d]
    const auto bu = affine(P[BUW], P[BUB], h, s.d);
    const auto bd = affine(P[BDW], P[BDB], h, s.a);
    for (index_t o = 0; o < s.d; ++o) {
      double y = bu[o];
      for (index_t j = 0; j < s.a; ++j) {
        double m = bd[j];
        for (index_t i = 0; i < s.d; ++i) m += x[t * s.d + i] * wd[i * s.a + j];
        y += std::max(0.0, m) * wu[j * s.d + o];
      }
      out[t * s.d + o] = y;
    }
  }
  return out;
}

double dot(const std::vector<double>& a, const std::vector<float>& b) {
  double s = 0.0;
  for (std::size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

struct seeded {
  std::uint64_t seed = sy::test::base_seed();
  std::mt19937_64 g{seed};
  seeded() { BOOST_TEST_MESSAGE("seed " << seed); }
};

}  // namespace

BOOST_FIXTURE_TEST_CASE(forward_matches_float64_reference, seeded) {
  dims s;
  fixture f(s, g);
  const index_t T = 11;
  const auto x = sy::test::normal(g, static_cast<std::size_t>(T * s.d));
  const auto plan = random_plan(g, T, 2, s.E, 0);
  for (int layer = 0; layer < s.L; ++layer) {
    sy::layer::hypermoe_module mod{.layer_idx = layer, .adapter_dim = static_cast<int>(s.a)};
    std::vector<float> y(static_cast<std::size_t>(T * s.d));
    mod.forward(sy::matrix_view<const float>(sy::make_view(x.data(), T, s.d)), plan, f.params(),
                sy::make_view(y.data(), T, s.d));
    const auto ref = reference_forward(s, layer, f.as_double(), {x.begin(), x.end()}, plan);
    double max_ref = 0.0;
    for (std::size_t i = 0; i < y.size(); ++i) {
      BOOST_TEST(std::abs(y[i] - ref[i]) <= 1e-6 + 1e-5 * std::abs(ref[i]), "seed " << seed << " i " << i << ": " << y[i] << " vs " << ref[i]);
      max_ref = std::max(max_ref, std::abs(ref[i]));
    }
    BOOST_TEST(max_ref > 1e-3);  // the case is not trivially zero
  }
}

BOOST_FIXTURE_TEST_CASE(selection_embedding_is_the_unselected_sum, seeded) {
  dims s;
  s.E = 9;
  s.d_emb = 7;
  fixture f(s, g, 2.0f);
  const index_t T = 40;
  const auto plan = random_plan(g, T, 4, s.E, 0);
  sy::layer::hypermoe_module mod{.layer_idx = 0, .adapter_dim = static_cast<int>(s.a)};
  std::vector<float> u(static_cast<std::size_t>(T * s.d_emb));
  mod.selection_embedding(plan.view(), f.m(EMB), sy::make_view(u.data(), T, s.d_emb));
  for (index_t t = 0; t < T; ++t) {
    for (index_t i = 0; i < s.d_emb; ++i) {
      double want = 0.0;  // O(E) loop over the unselected experts
      for (index_t e = 0; e < s.E; ++e) {
        bool sel = false;
        for (index_t j = 0; j < plan.counts[t]; ++j) sel |= plan.id(t, j) == e;
        if (!sel) want += f.value[EMB][e * s.d_emb + i];
      }
      BOOST_TEST(std::abs(u[t * s.d_emb + i] - want) <= 1e-5 * (1.0 + std::abs(want)),
                 "seed " << seed << " t " << t << " i " << i);
    }
  }
}

BOOST_FIXTURE_TEST_CASE(forward_and_backward_are_deterministic_and_batch_invariant, seeded) {
  dims s;
  fixture f(s, g);
  const index_t T = 13;
  const auto x = sy::test::normal(g, static_cast<std::size_t>(T * s.d));
  const auto dy = sy::test::normal(g, static_cast<std::size_t>(T * s.d));
  const auto plan = random_plan(g, T, 2, s.E, 1);
  const sy::layer::hypermoe_module mod{.layer_idx = 1, .adapter_dim = static_cast<int>(s.a)};
  const auto xv = sy::matrix_view<const float>(sy::make_view(x.data(), T, s.d));

  std::vector<float> y1(x.size()), y2(x.size());
  mod.forward(xv, plan, f.params(), sy::make_view(y1.data(), T, s.d));
  mod.forward(xv, plan, f.params(), sy::make_view(y2.data(), T, s.d));
  BOOST_TEST(y1 == y2);

  std::vector<float> dx1(x.size(), 0.0f), dx2(x.size(), 0.0f);
  const auto dyv = sy::matrix_view<const float>(sy::make_view(dy.data(), T, s.d));
  mod.backward(xv, plan, f.params(), dyv, sy::make_view(dx1.data(), T, s.d), f.grads());
  const auto g1 = f.grad;
  for (auto& v : f.grad) std::fill(v.begin(), v.end(), 0.0f);
  mod.backward(xv, plan, f.params(), dyv, sy::make_view(dx2.data(), T, s.d), f.grads());
  BOOST_TEST(dx1 == dx2);
  for (int i = 0; i < N_TENSORS; ++i) BOOST_TEST(g1[i] == f.grad[i], tensor_names[i]);

  // One token alone gives bit-identical output to the same token inside the batch.
  for (index_t t = 0; t < T; ++t) {
    sy::routing::routing_plan one;
    one.resize(1, plan.width, plan.num_experts);
    one.counts[0] = plan.counts[t];
    for (index_t j = 0; j < plan.width; ++j) one.expert_ids[j] = plan.id(t, j);
    std::vector<float> yt(static_cast<std::size_t>(s.d));
    mod.forward(sy::matrix_view<const float>(sy::make_view(x.data() + t * s.d, 1, s.d)), one,
                f.params(), sy::make_view(yt.data(), 1, s.d));
    BOOST_TEST(std::equal(yt.begin(), yt.end(), y1.begin() + t * s.d), "token " << t);
  }
}

BOOST_FIXTURE_TEST_CASE(gradients_match_central_differences, seeded) {
  dims s;
  fixture f(s, g);
  const index_t T = 7;
  const int layer = 2;
  const auto x = sy::test::normal(g, static_cast<std::size_t>(T * s.d));
  const auto dy = sy::test::normal(g, static_cast<std::size_t>(T * s.d));
  const auto plan = random_plan(g, T, 2, s.E, 0);
  const sy::layer::hypermoe_module mod{.layer_idx = layer, .adapter_dim = static_cast<int>(s.a)};

  std::vector<float> dx(x.size(), 0.25f);  // accumulate: starts non-zero
  for (auto& v : f.grad) std::fill(v.begin(), v.end(), 0.25f);
  mod.backward(sy::matrix_view<const float>(sy::make_view(x.data(), T, s.d)), plan, f.params(),
               sy::matrix_view<const float>(sy::make_view(dy.data(), T, s.d)),
               sy::make_view(dx.data(), T, s.d), f.grads());

  const double h = 1e-6;
  auto P = f.as_double();
  std::vector<double> xd(x.begin(), x.end());
  auto loss = [&] { return dot(reference_forward(s, layer, P, xd, plan), dy); };
  auto close = [](double got, double want) { return std::abs(got - want) <= 2e-5 + 1e-4 * std::abs(want); };
  for (int i = 0; i < N_TENSORS; ++i) {
    double max_fd = 0.0;
    for (std::size_t k = 0; k < P[i].size(); ++k) {
      const double v0 = P[i][k];
      P[i][k] = v0 + h;
      const double lp = loss();
      P[i][k] = v0 - h;
      const double lm = loss();
      P[i][k] = v0;
      const double fd = (lp - lm) / (2 * h);
      const double got = f.grad[i][k] - 0.25;
      max_fd = std::max(max_fd, std::abs(fd));
      BOOST_TEST(close(got, fd), "seed " << seed << " " << tensor_names[i] << "[" << k << "]: " << got << " vs fd " << fd);
    }
    if (i == LE) {
      // Only row `layer` of the shared layer embedding receives gradient.
      for (index_t r = 0; r < s.L; ++r)
        for (index_t c = 0; c < s.d_le; ++c)
          if (r != layer) BOOST_TEST(f.grad[LE][r * s.d_le + c] == 0.25f);
    }
    BOOST_TEST(max_fd > 1e-6, tensor_names[i] << " gradient is not trivially zero");
  }
  for (std::size_t k = 0; k < xd.size(); ++k) {
    const double v0 = xd[k];
    xd[k] = v0 + h;
    const double lp = loss();
    xd[k] = v0 - h;
    const double lm = loss();
    xd[k] = v0;
    const double fd = (lp - lm) / (2 * h);
    BOOST_TEST(close(dx[k] - 0.25, fd), "seed " << seed << " x[" << k << "]: " << dx[k] - 0.25 << " vs fd " << fd);
  }
}

BOOST_FIXTURE_TEST_CASE(empty_gradient_views_are_skipped, seeded) {
  dims s;
  fixture f(s, g);
  const index_t T = 4;
  const auto x = sy::test::normal(g, static_cast<std::size_t>(T * s.d));
  const auto dy = sy::test::normal(g, static_cast<std::size_t>(T * s.d));
  const auto plan = random_plan(g, T, 1, s.E, 1);
  const sy::layer::hypermoe_module mod{.layer_idx = 0, .adapter_dim = static_cast<int>(s.a)};
  const auto xv = sy::matrix_view<const float>(sy::make_view(x.data(), T, s.d));
  const auto dyv = sy::matrix_view<const float>(sy::make_view(dy.data(), T, s.d));
  // Only the embedding gradient requested; dx skipped.
  sy::layer::hypermoe_grads only_emb;
  only_emb.expert_emb = f.gm(EMB);
  BOOST_CHECK_NO_THROW(mod.backward(xv, plan, f.params(), dyv, {}, only_emb));
  const auto emb_grad = f.grad[EMB];
  // The same gradient as with everything requested.
  for (auto& v : f.grad) std::fill(v.begin(), v.end(), 0.0f);
  std::vector<float> dx(x.size(), 0.0f);
  mod.backward(xv, plan, f.params(), dyv, sy::make_view(dx.data(), T, s.d), f.grads());
  BOOST_TEST(emb_grad == f.grad[EMB]);
}

BOOST_FIXTURE_TEST_CASE(upstream_init_scale_gives_near_zero_adapter, seeded) {
  // Upstream init (adapter_generators.py, torch defaults), smaller widths: embeddings N(0, 1),
  // embedding_process and linear1 U(±1/sqrt(fan_in)), heads U(±hyperfanin bound), head biases 0.
  dims s{.E = 8, .d = 64, .d_emb = 16, .p = 16, .h_in = 16, .L = 4, .d_le = 10, .b = 16, .a = 8};
  fixture f(s, g, 1.0f);
  auto fill_uniform = [&](int i, double bound) {
    f.value[i] = sy::test::uniform(g, f.value[i].size(), static_cast<float>(-bound), static_cast<float>(bound));
  };
  // embedding_process and linear1: nn.Linear's default init, U(±1/sqrt(fan_in)).
  for (int i : {P1W, P1B, P2W, P2B, G1W, G1B})
    fill_uniform(i, 1.0 / std::sqrt(static_cast<double>(f.cols[i == P1B ? P1W : i == P2B ? P2W : i == G1B ? G1W : i])));
  fill_uniform(WUW, sy::layer::hyperfanin_bound(s.b, s.a));
  fill_uniform(WDW, sy::layer::hyperfanin_bound(s.b, s.d));
  fill_uniform(BUW, sy::layer::hyperfanin_bound(s.b, 1));
  fill_uniform(BDW, sy::layer::hyperfanin_bound(s.b, 1));
  for (int i : {WUB, WDB, BUB, BDB}) std::fill(f.value[i].begin(), f.value[i].end(), 0.0f);
  const index_t T = 32;
  const auto x = sy::test::normal(g, static_cast<std::size_t>(T * s.d));
  const auto plan = random_plan(g, T, 1, s.E, 1);
  const sy::layer::hypermoe_module mod{.layer_idx = 3, .adapter_dim = static_cast<int>(s.a)};
  std::vector<float> y(x.size());
  mod.forward(sy::matrix_view<const float>(sy::make_view(x.data(), T, s.d)), plan, f.params(),
              sy::make_view(y.data(), T, s.d));
  double max_abs = 0.0;
  for (float v : y) max_abs = std::max(max_abs, static_cast<double>(std::abs(v)));
  double max_x = 0.0;
  for (float v : x) max_x = std::max(max_x, static_cast<double>(std::abs(v)));
  BOOST_TEST(max_abs < 1e-2 * max_x, "max |hyper(x)| = " << max_abs << ", max |x| = " << max_x);
  // Not vacuous: the same hypernetwork with O(1) heads generates an O(1) adapter.
  for (int i : {WUW, WDW, BUW, BDW})
    for (auto& v : f.value[i]) v *= 1000.0f;
  mod.forward(sy::matrix_view<const float>(sy::make_view(x.data(), T, s.d)), plan, f.params(),
              sy::make_view(y.data(), T, s.d));
  double max_big = 0.0;
  for (float v : y) max_big = std::max(max_big, static_cast<double>(std::abs(v)));
  BOOST_TEST(max_big > 100.0 * max_abs, "init " << max_abs << " vs O(1) heads " << max_big);
}

BOOST_AUTO_TEST_CASE(switch_capacity_drops_in_token_order_and_lb_counts_dropped_as_expert0) {
  sy::routing::routing_plan plan;
  plan.resize(5, 1, 3);
  const std::int32_t ids[5] = {2, 2, 1, 2, 1};
  for (int t = 0; t < 5; ++t) {
    plan.expert_ids[t] = ids[t];
    plan.counts[t] = 1;
    plan.weights[t] = 0.5f;
    for (int e = 0; e < 3; ++e) plan.probs[t * 3 + e] = (e == ids[t]) ? 0.5f : 0.25f;
  }
  std::vector<std::int32_t> dropped(5);
  BOOST_TEST(sy::layer::switch_capacity_drop(plan, 1, dropped) == 3);
  BOOST_TEST(dropped == (std::vector<std::int32_t>{0, 1, 0, 1, 1}));
  // f = (3, 1, 1)/5 (dropped counted as expert 0), P̄ = (0.25, 0.3, 0.45).
  const double want = 3.0 * (0.6 * 0.25 + 0.2 * 0.3 + 0.2 * 0.45);
  BOOST_TEST(std::abs(sy::layer::switch_hf_load_balance_loss(plan, dropped) - want) < 1e-6);
  BOOST_TEST(sy::layer::switch_capacity_drop(plan, 64, dropped) == 0);
  BOOST_CHECK_THROW(sy::layer::switch_capacity_drop(plan, 1, ::cuda::std::span<std::int32_t>(dropped.data(), 4)),
                    sy::shape_error);
}

BOOST_AUTO_TEST_CASE(cv_squared_uses_unbiased_variance) {
  const std::vector<double> v{1.0, 2.0, 3.0};  // var = 1, mean = 2
  BOOST_TEST(std::abs(sy::layer::cv_squared({v.data(), v.size()}) - 0.25) < 1e-9);
  const std::vector<double> one{5.0};
  BOOST_TEST(sy::layer::cv_squared({one.data(), one.size()}) == 0.0);
  // Two tokens, E = 2, top-1 with gates 1: importance = load = (2, 0).
  sy::routing::routing_plan plan;
  plan.resize(2, 1, 2);
  plan.expert_ids = {0, 0};
  plan.counts = {1, 1};
  plan.weights = {1.0f, 1.0f};
  BOOST_TEST(std::abs(sy::layer::gpt2_cv_loss_eval(plan) - 0.01 * 2 * (2.0 / 1.0)) < 1e-6);
}

BOOST_FIXTURE_TEST_CASE(bad_input_is_rejected_with_named_errors, seeded) {
  dims s;
  fixture f(s, g);
  const index_t T = 3;
  const auto x = sy::test::normal(g, static_cast<std::size_t>(T * s.d));
  const auto plan = random_plan(g, T, 1, s.E, 1);
  const auto xv = sy::matrix_view<const float>(sy::make_view(x.data(), T, s.d));
  std::vector<float> y(x.size());
  const auto yv = sy::make_view(y.data(), T, s.d);
  auto expect = [](auto&& fn, const std::string& arg, std::initializer_list<std::string> parts, auto tag) {
    using E = decltype(tag);
    try {
      fn();
      BOOST_ERROR("expected an error naming " << arg);
    } catch (const E& e) {
      BOOST_TEST(e.argument() == arg);
      const std::string m = e.what();
      for (const auto& p : parts) BOOST_TEST(m.find(p) != std::string::npos, "'" << m << "' lacks '" << p << "'");
    }
  };
  for (int bad : {-1, static_cast<int>(s.L)}) {
    const sy::layer::hypermoe_module mod{.layer_idx = bad, .adapter_dim = static_cast<int>(s.a)};
    expect([&] { mod.forward(xv, plan, f.params(), yv); }, "layer_idx",
           {"layer_idx", "[0, 3)", std::to_string(bad)}, sy::range_error{"", ""});
  }
  const sy::layer::hypermoe_module ok{.layer_idx = 0, .adapter_dim = static_cast<int>(s.a)};
  // adapter_dim inconsistent with the generator heads.
  const sy::layer::hypermoe_module wrong_a{.layer_idx = 0, .adapter_dim = static_cast<int>(s.a + 1)};
  expect([&] { wrong_a.forward(xv, plan, f.params(), yv); }, "params.generator.weight_up.w",
         {"[24, 5]", "[18, 5]"}, sy::shape_error{"", ""});
  const sy::layer::hypermoe_module zero_a{.layer_idx = 0, .adapter_dim = 0};
  expect([&] { zero_a.forward(xv, plan, f.params(), yv); }, "adapter_dim", {"adapter_dim", "0"},
         sy::range_error{"", ""});
  // x of another width than the generator was built for.
  std::vector<float> x7(static_cast<std::size_t>(T * 7));
  expect([&] { ok.forward(sy::matrix_view<const float>(sy::make_view(x7.data(), T, 7)), plan, f.params(), sy::make_view(x7.data(), T, 7)); },
         "params.generator.weight_up.w", {"[21, 5]", "[18, 5]"}, sy::shape_error{"", ""});
  // Output and plan shapes.
  expect([&] { ok.forward(xv, plan, f.params(), sy::make_view(y.data(), T - 1, s.d)); }, "hyper_out",
         {"[3, 6]", "[2, 6]"}, sy::shape_error{"", ""});
  const auto plan_e4 = random_plan(g, T, 1, s.E - 1, 1);
  expect([&] { ok.forward(xv, plan_e4, f.params(), yv); }, "plan", {"5", "4"}, sy::shape_error{"", ""});
  const auto plan_t2 = random_plan(g, T - 1, 1, s.E, 1);
  expect([&] { ok.forward(xv, plan_t2, f.params(), yv); }, "plan.expert_ids", {"[3, *]", "[2, 1]"},
         sy::shape_error{"", ""});
  // Parameter and gradient shapes.
  auto p = f.params();
  p.process2.b = sy::make_view(f.value[P2B].data(), s.h_in - 1);
  expect([&] { ok.forward(xv, plan, p, yv); }, "params.process2.b", {"[3]", "[2]"}, sy::shape_error{"", ""});
  auto gr = f.grads();
  gr.generator.bias_down.w = sy::make_view(f.grad[BDW].data(), s.b, s.a);
  expect([&] { ok.backward(xv, plan, f.params(), sy::matrix_view<const float>(yv), {}, gr); },
         "grads.generator.bias_down.w", {"[3, 5]", "[5, 3]"}, sy::shape_error{"", ""});
  expect([&] { ok.backward(xv, plan, f.params(), sy::matrix_view<const float>(sy::make_view(y.data(), T, s.d - 1)), {}, f.grads()); },
         "dy", {"[3, 6]", "[3, 5]"}, sy::shape_error{"", ""});
}

BOOST_AUTO_TEST_CASE(empty_batch_is_valid) {
  std::mt19937_64 g(1);
  dims s;
  fixture f(s, g);
  sy::routing::routing_plan plan;
  plan.resize(0, 1, s.E);
  const sy::layer::hypermoe_module mod{.layer_idx = 0, .adapter_dim = static_cast<int>(s.a)};
  std::vector<float> none;
  BOOST_CHECK_NO_THROW(mod.forward(sy::matrix_view<const float>(sy::make_view(none.data(), 0, s.d)), plan,
                                   f.params(), sy::make_view(none.data(), 0, s.d)));
  BOOST_CHECK_NO_THROW(mod.backward(sy::matrix_view<const float>(sy::make_view(none.data(), 0, s.d)), plan,
                                    f.params(), sy::matrix_view<const float>(sy::make_view(none.data(), 0, s.d)),
                                    {}, f.grads()));
  for (const auto& v : f.grad) BOOST_TEST(std::all_of(v.begin(), v.end(), [](float a) { return a == 0.0f; }));
}

BOOST_FIXTURE_TEST_CASE(workspace_gives_the_same_bits_and_no_allocation, seeded) {
  dims s;
  fixture f(s, g);
  const index_t T = 37, width = 2;  // more selection sets than group_slots below
  const auto x = sy::test::normal(g, static_cast<std::size_t>(T * s.d));
  const auto dy = sy::test::normal(g, static_cast<std::size_t>(T * s.d));
  const auto plan = random_plan(g, T, width, s.E, 0);
  const auto xv = sy::matrix_view<const float>(sy::make_view(x.data(), T, s.d));
  const auto dyv = sy::matrix_view<const float>(sy::make_view(dy.data(), T, s.d));
  const auto pv = plan.view();
  const auto P = f.params();

  // Reference: the overloads that allocate their workspace.
  const sy::layer::hypermoe_module ref_mod{.layer_idx = 1, .adapter_dim = static_cast<int>(s.a)};
  std::vector<float> y_ref(x.size()), dx_ref(x.size(), 0.0f);
  ref_mod.forward(xv, pv, P, sy::make_view(y_ref.data(), T, s.d));
  ref_mod.backward(xv, pv, P, dyv, sy::make_view(dx_ref.data(), T, s.d), f.grads());
  const auto grads_ref = f.grad;

  for (int slots : {1, 3, 16}) {
    const sy::layer::hypermoe_module mod{.layer_idx = 1, .adapter_dim = static_cast<int>(s.a), .group_slots = slots};
    std::vector<std::byte> bytes(mod.workspace_size(T, s.d, width, P));
    std::vector<float> y(x.size()), dx(x.size(), 0.0f);
    const auto yv = sy::make_view(y.data(), T, s.d);
    const auto dxv = sy::make_view(dx.data(), T, s.d);
    for (auto& v : f.grad) std::fill(v.begin(), v.end(), 0.0f);
    const auto grads = f.grads();
    // A workspace starting off alignment still suffices (workspace_size includes the slack).
    const ::cuda::std::span<std::byte> ws_bytes(bytes.data() + 1, bytes.size() - 1);
    {
      sy::workspace_arena warm_f(ws_bytes), warm_b(ws_bytes);
      mod.forward(xv, pv, P, yv, warm_f);  // warm-up (OpenMP's thread pool, ...)
      std::vector<float> dx_warm(x.size(), 0.0f);
      mod.backward(xv, pv, P, dyv, sy::make_view(dx_warm.data(), T, s.d), grads, warm_b);
      for (auto& v : f.grad) std::fill(v.begin(), v.end(), 0.0f);
    }
    sy::workspace_arena ws_f(ws_bytes), ws_b(ws_bytes);
    allocations = 0;
    counting = true;
    mod.forward(xv, pv, P, yv, ws_f);
    mod.backward(xv, pv, P, dyv, dxv, grads, ws_b);
    counting = false;
    BOOST_TEST(allocations.load() == 0, "group_slots " << slots << ": " << allocations.load() << " allocations");
    BOOST_TEST(y == y_ref, "group_slots " << slots);
    BOOST_TEST(dx == dx_ref, "group_slots " << slots);
    for (int i = 0; i < N_TENSORS; ++i) BOOST_TEST(f.grad[i] == grads_ref[i], tensor_names[i] << ", group_slots " << slots);
    BOOST_TEST(ws_f.used() <= bytes.size() - 1);
    BOOST_TEST(ws_b.used() <= bytes.size() - 1);
  }

  // The selection embedding takes its arrays from the same workspace.
  std::vector<std::byte> bytes(ref_mod.workspace_size(T, s.d, width, P));
  std::vector<float> u1(static_cast<std::size_t>(T * s.d_emb)), u2(u1.size());
  ref_mod.selection_embedding(pv, P.expert_emb, sy::make_view(u1.data(), T, s.d_emb));
  sy::workspace_arena ws({bytes.data(), bytes.size()});
  allocations = 0;
  counting = true;
  ref_mod.selection_embedding(pv, P.expert_emb, sy::make_view(u2.data(), T, s.d_emb), ws);
  counting = false;
  BOOST_TEST(allocations.load() == 0);
  BOOST_TEST(u1 == u2);

  // Too small a workspace is a shape_error naming "workspace"; the add-on's size is the module's.
  std::vector<std::byte> small(bytes.size() / 2);
  sy::workspace_arena too_small({small.data(), small.size()});
  std::vector<float> y(x.size());
  try {
    ref_mod.forward(xv, pv, P, sy::make_view(y.data(), T, s.d), too_small);
    BOOST_ERROR("expected shape_error(workspace)");
  } catch (const sy::shape_error& e) {
    BOOST_TEST(e.argument() == "workspace");
  }
  const sy::layer::hypermoe_addon addon{.hyper = ref_mod};
  BOOST_TEST(addon.workspace_size(T, s.d, width, s.E, P) == bytes.size());
}
