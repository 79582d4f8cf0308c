// SPDX-License-Identifier: Apache-2.0
// training::micro_batches and training::gradient_accumulator (training/grad_accumulation.hpp):
// the split, and gradient accumulation through a real MoELayer. With the aux coefficients at
// 0 (a loss that is a mean over tokens), 4 micro-batches of unequal size accumulate to the
// full batch's gradients within float rounding, for every gradient the layer produces (dx,
// expert W1/b1/W2/b2, the router's); the accumulated bits are the same run to run and with 1
// or 2 threads; the float64 sums are exactly the weighted sums of the micro-batch buffers.
//
// Tolerance (stated once, used for every gradient): both the full batch and the accumulated
// result are float computations of G = Σ_t G_t (G_t: token t's contribution). Each is within
// γ_n · A of the exact value, with A = Σ_t |G_t| (float64 sum of the per-token gradients'
// magnitudes, each token run alone) and γ_n = n·u/(1 − n·u), u = 2⁻²⁴, n the longest
// chain of roundings: the token sum (T), the longest inner product (max(d, P, E)), and 4
// more for dy's scaling, the weight, the float64 sum and the final rounding. So the two
// differ by at most 2·γ_n·A per element; the test asserts that, and the same bound against the
// float64 sum of the per-token gradients.
#include <boost/mp11/list.hpp>
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include <omp.h>

#include <switchyard/switchyard.hpp>

#include "host/layer/layer_reference.hpp"
#include "support/random.hpp"

namespace sy = switchyard;
using sy::index_t;

namespace {

void set_threads(int n) {
  omp_set_num_threads(n);
  sy::host::set_blas_threads(n);
}

struct thread_guard {
  int omp = omp_get_max_threads();
  int blas = sy::host::blas_threads();
  ~thread_guard() {
    omp_set_num_threads(omp);
    sy::host::set_blas_threads(blas);
  }
};

// ---- the split -------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(micro_batches_are_contiguous_and_balanced) {
  const sy::training::micro_batches mb{.tokens = 50, .count = 4};
  BOOST_TEST(mb.size(0) == 13);
  BOOST_TEST(mb.size(1) == 13);
  BOOST_TEST(mb.size(2) == 12);
  BOOST_TEST(mb.size(3) == 12);
  BOOST_TEST(mb.begin(0) == 0);
  BOOST_TEST(mb.begin(1) == 13);
  BOOST_TEST(mb.begin(2) == 26);
  BOOST_TEST(mb.begin(3) == 38);
  BOOST_TEST(mb.weight(0) == 13.0 / 50.0);
  for (index_t tokens : {1, 2, 7, 50, 64, 1000, 1001}) {
    for (index_t count : {1, 2, 3, 4, 7, 64}) {
      if (count > tokens) continue;
      const sy::training::micro_batches m{.tokens = tokens, .count = count};
      index_t next = 0, lo = tokens, hi = 0;
      double weights = 0.0;
      for (index_t i = 0; i < count; ++i) {
        BOOST_TEST(m.begin(i) == next);
        BOOST_TEST(m.size(i) == tokens / count + (i < tokens % count ? 1 : 0));
        lo = std::min(lo, m.size(i));
        hi = std::max(hi, m.size(i));
        next += m.size(i);
        weights += m.weight(i);
      }
      BOOST_TEST(next == tokens);
      BOOST_TEST(hi - lo <= 1);
      BOOST_TEST(std::abs(weights - 1.0) <= 1e-12);
    }
  }
  // An empty batch: every micro-batch is empty, with weight 0.
  const sy::training::micro_batches empty{.tokens = 0, .count = 3};
  BOOST_TEST(empty.size(2) == 0);
  BOOST_TEST(empty.begin(2) == 0);
  BOOST_TEST(empty.weight(1) == 0.0);
}

template <class F>
std::string range_error_argument(F&& f) {
  try {
    f();
  } catch (const sy::range_error& e) {
    return e.argument();
  }
  return "(no range_error)";
}

BOOST_AUTO_TEST_CASE(micro_batches_errors_name_the_argument) {
  using mbs = sy::training::micro_batches;
  BOOST_TEST(range_error_argument([] { mbs{.tokens = 10, .count = 0}.validate(); }) == "count");
  BOOST_TEST(range_error_argument([] { mbs{.tokens = 10, .count = 11}.validate(); }) == "count");
  BOOST_TEST(range_error_argument([] { mbs{.tokens = -1, .count = 1}.validate(); }) == "tokens");
  BOOST_TEST(range_error_argument([] { (void)mbs{.tokens = 10, .count = 3}.size(3); }) == "i");
  BOOST_TEST(range_error_argument([] { (void)mbs{.tokens = 10, .count = 3}.begin(-1); }) == "i");
  BOOST_TEST(range_error_argument([] { (void)mbs{.tokens = 10, .count = 3}.weight(5); }) == "i");
  BOOST_TEST(range_error_argument([] { (void)mbs{.tokens = 10, .count = 0}.size(0); }) == "count");
  try {
    (void)mbs{.tokens = 10, .count = 11}.size(0);
  } catch (const sy::range_error& e) {
    BOOST_TEST(std::string(e.what()).find("11") != std::string::npos);
  }
}

BOOST_AUTO_TEST_CASE(accumulator_errors_and_plain_arithmetic) {
  std::vector<float> a = {1.0f, 2.0f, 3.0f}, b = {0.5f};
  sy::training::gradient_accumulator acc({sy::span<float>(a), sy::span<float>(b), {}});
  acc.begin_step();
  BOOST_TEST(acc.micro_batches_added() == 0);
  acc.add(0.25);  // sums = 0.25·(1, 2, 3), 0.25·0.5
  acc.zero_buffers();
  BOOST_TEST((a == std::vector<float>{0.0f, 0.0f, 0.0f}));
  a = {4.0f, -8.0f, 1.0f};
  b = {2.0f};
  acc.add(0.75);
  BOOST_TEST(acc.micro_batches_added() == 2);
  acc.finish();
  BOOST_TEST((a == std::vector<float>{3.25f, -5.5f, 1.5f}));
  BOOST_TEST(b[0] == 1.625f);
  BOOST_TEST(acc.sums(0)[1] == -5.5);
  BOOST_TEST(range_error_argument([&] { acc.add(std::numeric_limits<double>::quiet_NaN()); }) ==
             "weight");
  BOOST_TEST(range_error_argument([&] { (void)acc.sums(3); }) == "b");
  try {
    sy::training::gradient_accumulator bad(
        {sy::span<float>(a), sy::span<float>(static_cast<float*>(nullptr), 4)});
    BOOST_FAIL("a null buffer was accepted");
  } catch (const sy::null_pointer_error& e) {
    BOOST_TEST(e.argument() == "buffers[1]");
  }
  acc.begin_step();
  BOOST_TEST(acc.micro_batches_added() == 0);
  acc.finish();  // nothing added: zeros
  BOOST_TEST((a == std::vector<float>{0.0f, 0.0f, 0.0f}));
}

// ---- through a layer ---------------------------------------------------------------------

//! The router's gradient buffers and their views.
template <class R>
struct router_buffers {
  std::vector<float> w;
  router_buffers(index_t e, index_t d) : w(static_cast<std::size_t>(e * d)) {}
  typename R::grads_type view(index_t e, index_t d) { return {sy::make_view(w.data(), e, d)}; }
  std::vector<std::vector<float>*> all() { return {&w}; }
};
template <>
struct router_buffers<sy::routers::DynMoE> {
  std::vector<float> w, th;
  router_buffers(index_t e, index_t d)
      : w(static_cast<std::size_t>(e * d)), th(static_cast<std::size_t>(e)) {}
  sy::routing::dynmoe_grads view(index_t e, index_t d) {
    return {sy::make_view(w.data(), d, e), sy::make_view(th.data(), e)};
  }
  std::vector<std::vector<float>*> all() { return {&w, &th}; }
};

//! Every gradient of one step: dx [T, d] (the whole batch), the experts', the router's.
template <class R>
struct grads {
  std::vector<float> dx, dw1, db1, dw2, db2;
  router_buffers<R> rb;
  grads(index_t t, index_t d, index_t p, index_t f, index_t e)
      : dx(static_cast<std::size_t>(t * d)),
        dw1(static_cast<std::size_t>(e * p * d)),
        db1(static_cast<std::size_t>(e * p)),
        dw2(static_cast<std::size_t>(e * d * f)),
        db2(static_cast<std::size_t>(e * d)),
        rb(e, d) {}
  std::vector<std::vector<float>*> all() {
    std::vector<std::vector<float>*> v = {&dx, &dw1, &db1, &dw2, &db2};
    for (auto* r : rb.all()) v.push_back(r);
    return v;
  }
  std::vector<sy::span<float>> spans() {
    std::vector<sy::span<float>> s;
    for (auto* v : all()) s.emplace_back(v->data(), v->size());
    return s;
  }
};
const char* const grad_names[] = {
    "dx", "dW1", "db1", "dW2", "db2", "router w", "router thresholds"};

template <class R>
R make_router() {
  if constexpr (std::is_same_v<R, sy::routers::TopK>)
    return {.k = 2};
  else if constexpr (std::is_same_v<R, sy::routers::TopP>)
    return {.p = 0.6f};
  else
    return R{};
}

//! A layer, its weights and a batch with a loss L = mean_t ⟨y_t, g_t⟩ (g random): the
//! gradient of a micro-batch's mean loss is dy_t = g_t / n.
template <class R>
struct problem {
  static constexpr index_t tokens = 50, d = 16, f = 24, experts = 6;
  sy::test::layer_data<float> L;
  sy::test::router_setup<R> rs;
  std::vector<float> g;
  sy::MoELayer<R, sy::activation::swiglu, sy::dispatch::sorted_grouped> layer;

  problem(std::mt19937_64& gen, bool batch_invariant)
      : L(gen, tokens, d, f, experts, true, true),
        rs(gen, make_router<R>(), tokens, d, experts),
        g(sy::test::normal(gen, static_cast<std::size_t>(tokens * d))),
        layer{.router = rs.router, .batch_invariant = batch_invariant} {}

  grads<R> make_grads() const { return grads<R>(tokens, d, L.p, f, experts); }

  //! Forward + backward (+=) of tokens [begin, begin + n) with dy = g / n_mean and coefficients
  //! `coeffs`; dx lands in rows [begin, begin + n) of out.dx.
  void run(index_t begin, index_t n, index_t n_mean, const typename R::losses_type& coeffs,
           grads<R>& out) const {
    std::vector<float> x(L.x.begin() + begin * d, L.x.begin() + (begin + n) * d);
    std::vector<float> dy(static_cast<std::size_t>(n * d)), y(dy.size());
    for (std::size_t i = 0; i < dy.size(); ++i)
      dy[i] =
          static_cast<float>(static_cast<double>(g[begin * d + i]) / static_cast<double>(n_mean));
    typename decltype(layer)::result_type res;
    const auto xv = sy::make_view<const float>(x.data(), n, d);
    // Sub-batch router params: the router's own rows (DA-MoE-style per-token params do not
    // appear here; TopK/TopP/DynMoE params are per expert).
    const auto rp = rs.params(d);
    layer.template forward<float>(sy::host_context{}, xv, rp, L.weights(),
                                  sy::make_view(y.data(), n, d), res);
    layer.template backward<float>(
        sy::host_context{}, xv, rp, L.weights(), res, sy::make_view<const float>(dy.data(), n, d),
        coeffs, sy::make_view(out.dx.data() + begin * d, n, d),
        {sy::make_view(out.dw1.data(), experts, L.p, d),
         sy::make_view(out.db1.data(), experts, L.p), sy::make_view(out.dw2.data(), experts, d, f),
         sy::make_view(out.db2.data(), experts, d)},
        out.rb.view(experts, d));
  }

  //! The full batch's gradients.
  grads<R> full(const typename R::losses_type& coeffs) const {
    auto out = make_grads();
    run(0, tokens, tokens, coeffs, out);
    return out;
  }

  //! The accumulated gradients of `count` micro-batches; `check_sums` compares the
  //! accumulator's float64 sums with the weighted sum of the micro-batch buffers (bitwise).
  grads<R> accumulated(index_t count, const typename R::losses_type& coeffs,
                       bool check_sums = false) const {
    auto out = make_grads();
    const sy::training::micro_batches mb{.tokens = tokens, .count = count};
    sy::training::gradient_accumulator acc(out.spans());
    auto bufs = out.all();
    std::vector<std::vector<double>> expect(bufs.size());
    for (std::size_t b = 0; b < bufs.size(); ++b) expect[b].assign(bufs[b]->size(), 0.0);
    acc.begin_step();
    for (index_t i = 0; i < mb.count; ++i) {
      acc.zero_buffers();
      run(mb.begin(i), mb.size(i), mb.size(i), coeffs, out);
      acc.add(mb.weight(i));
      for (std::size_t b = 0; b < bufs.size(); ++b)
        for (std::size_t j = 0; j < bufs[b]->size(); ++j)
          expect[b][j] += mb.weight(i) * static_cast<double>((*bufs[b])[j]);
    }
    BOOST_TEST(acc.micro_batches_added() == count);
    acc.finish();
    if (check_sums) {
      for (std::size_t b = 0; b < bufs.size(); ++b) {
        const auto s = acc.sums(b);
        bool same = true;
        for (std::size_t j = 0; j < s.size(); ++j)
          same = same && s[j] == expect[b][j] && (*bufs[b])[j] == static_cast<float>(expect[b][j]);
        BOOST_TEST(same,
                   grad_names[b] << ": float64 sums differ from the weighted sum of the buffers");
      }
    }
    return out;
  }

  //! A = Σ_t |G_t| per element: each token alone (dy = g_t / T), magnitudes summed in double
  //! (dx: the row's largest magnitude); `sums` receives Σ_t G_t in double.
  std::vector<std::vector<double>> token_magnitudes(std::vector<std::vector<double>>* sums) const {
    auto probe = make_grads();
    const auto bufs = probe.all();
    std::vector<std::vector<double>> a(bufs.size());
    for (std::size_t b = 0; b < bufs.size(); ++b) a[b].assign(bufs[b]->size(), 0.0);
    *sums = a;
    for (index_t t = 0; t < tokens; ++t) {
      for (auto* v : bufs) std::fill(v->begin(), v->end(), 0.0f);
      run(t, 1, tokens, {}, probe);
      for (std::size_t b = 0; b < bufs.size(); ++b)
        for (std::size_t j = 0; j < bufs[b]->size(); ++j) {
          a[b][j] += std::abs(static_cast<double>((*bufs[b])[j]));
          (*sums)[b][j] += static_cast<double>((*bufs[b])[j]);
        }
    }
    // dx has no token sum: its rounding is that of its inner products (over experts, P, d),
    // whose scale is the row's, so dx's A is the row's largest |dx_t,c| (a normwise bound).
    for (index_t t = 0; t < tokens; ++t) {
      double row = 0.0;
      for (index_t c = 0; c < d; ++c) row = std::max(row, a[0][t * d + c]);
      for (index_t c = 0; c < d; ++c) a[0][t * d + c] = row;
    }
    return a;
  }
};

bool bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

template <class R>
void check_accumulation(std::uint64_t seed, bool batch_invariant) {
  std::mt19937_64 gen(seed);
  const problem<R> pb(gen, batch_invariant);
  const typename R::losses_type no_aux{};
  // One thread for the many small runs (results do not depend on it; fewer parallel regions
  // keep the test quick on a loaded 2-core machine); 2 threads for the determinism check.
  const thread_guard guard;
  set_threads(1);
  auto full = pb.full(no_aux);
  auto acc = pb.accumulated(4, no_aux, true);
  std::vector<std::vector<double>> token_sum;
  const auto mag = pb.token_magnitudes(&token_sum);

  constexpr double u = 1.0 / (1 << 24);
  const double n = static_cast<double>(problem<R>::tokens +
                                       std::max({problem<R>::d, pb.L.p, problem<R>::experts}) + 4);
  const double gamma = n * u / (1.0 - n * u);
  const auto fb = full.all(), ab = acc.all();
  for (std::size_t b = 0; b < fb.size(); ++b) {
    double worst_full = 0.0, worst_ref = 0.0;  // max |diff| / (γ_n · A)
    bool nonzero = false;
    for (std::size_t j = 0; j < fb[b]->size(); ++j) {
      const double fv = (*fb[b])[j], av = (*ab[b])[j], ref = token_sum[b][j];
      const double bound = gamma * mag[b][j] + std::numeric_limits<float>::denorm_min();
      nonzero = nonzero || av != 0.0;
      worst_full = std::max(worst_full, std::abs(av - fv) / bound);
      worst_ref = std::max(worst_ref, std::abs(av - ref) / bound);
    }
    BOOST_TEST_MESSAGE(grad_names[b] << ": max |acc − full| = " << worst_full
                                     << " γ_n·A, max |acc − Σ_t G_t| = " << worst_ref << " γ_n·A");
    BOOST_TEST(nonzero, grad_names[b] << " is all zeros");
    BOOST_TEST(worst_full <= 2.0, grad_names[b] << ": accumulated vs full batch: " << worst_full
                                                << " · γ_n·A (bound 2)");
    BOOST_TEST(worst_ref <= 2.0, grad_names[b] << ": accumulated vs float64 Σ_t G_t: " << worst_ref
                                               << " · γ_n·A (bound 2)");
  }

  // Deterministic: the same bits run to run and with 1 or 2 threads.
  auto one = pb.accumulated(4, no_aux);
  set_threads(2);
  auto two = pb.accumulated(4, no_aux);
  auto again = pb.accumulated(4, no_aux);
  const auto ob = one.all(), tb = two.all(), gb = again.all();
  for (std::size_t b = 0; b < ab.size(); ++b) {
    BOOST_TEST(bitwise_equal(*ob[b], *tb[b]), grad_names[b] << " differs between 1 and 2 threads");
    BOOST_TEST(bitwise_equal(*tb[b], *gb[b]), grad_names[b] << " differs run to run");
  }
}

using routers_under_test =
    boost::mp11::mp_list<sy::routers::TopK, sy::routers::TopP, sy::routers::DynMoE>;

}  // namespace

BOOST_AUTO_TEST_CASE_TEMPLATE(micro_batches_accumulate_to_the_full_batch, R, routers_under_test) {
  check_accumulation<R>(sy::test::base_seed() + 1501, false);
  check_accumulation<R>(sy::test::base_seed() + 1502, true);
}

// The batch-level aux losses are computed per micro-batch (as Megatron-LM and Hugging Face
// do): with a load-balance coefficient the router's accumulated gradient is not the full
// batch's (documented in grad_accumulation.hpp); the expert gradients do not see the aux
// losses and still agree.
BOOST_AUTO_TEST_CASE(aux_losses_are_per_micro_batch) {
  std::mt19937_64 gen(sy::test::base_seed() + 1503);
  const problem<sy::routers::TopK> pb(gen, false);
  const sy::routing::softmax_router_losses lb{.lb_topk = 0.5f};
  auto full = pb.full(lb), acc = pb.accumulated(4, lb);
  double router_diff = 0.0, router_scale = 0.0, expert_diff = 0.0, expert_scale = 0.0;
  for (std::size_t j = 0; j < full.rb.w.size(); ++j) {
    router_diff = std::max(router_diff, static_cast<double>(std::abs(full.rb.w[j] - acc.rb.w[j])));
    router_scale = std::max(router_scale, static_cast<double>(std::abs(full.rb.w[j])));
  }
  for (std::size_t j = 0; j < full.dw2.size(); ++j) {
    expert_diff = std::max(expert_diff, static_cast<double>(std::abs(full.dw2[j] - acc.dw2[j])));
    expert_scale = std::max(expert_scale, static_cast<double>(std::abs(full.dw2[j])));
  }
  BOOST_TEST_MESSAGE("router w: max diff " << router_diff << " of max " << router_scale
                                           << "; dW2: " << expert_diff << " of " << expert_scale);
  BOOST_TEST(router_diff > 1e-3 * router_scale);
  BOOST_TEST(expert_diff <= 1e-5 * expert_scale);
}
