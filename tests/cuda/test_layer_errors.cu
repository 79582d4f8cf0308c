// SPDX-License-Identifier: Apache-2.0
// Bad input to the CUDA layer, as a user sees it: the typed exception naming the argument.
// - too little workspace (forward and backward) → shape_error("workspace");
// - x in pageable or pinned host memory → memory_space_error("x");
// - a NaN in x → non_finite_error("x") naming the element: thrown by forward at
//   sorted_grouped's synchronisation point; on padded_capacity (no synchronisation) by
//   cuda::check_status(ctx, workspace), or at the end of the convenience path;
// - a caller plan with an out-of-range expert id or count through forward_experts →
//   range_error("plan.expert_ids" / "plan.counts") at the same points.
// After each data error the same context runs a valid forward: the error is not sticky.
// The #17 hardening cases on device memory (their host versions: tests/host/hardening/):
// - y overlapping x → aliasing_error("y", other "x"), x and y bitwise unchanged;
// - a NaN in x under sorted_grouped → non_finite_error("x") with y bitwise unchanged (it is
//   thrown at the synchronisation point, before the expert phase writes y);
// - backward given the state of a forward that threw → invalid_argument("state"), dx bitwise
//   unchanged; a forward that completes makes the state valid again.
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <typeinfo>
#include <vector>

#include <boost/core/demangle.hpp>

#include "cuda/support/layer_forward.cuh"

namespace sy = switchyard;
namespace gpu = switchyard::test::gpu;
using sy::index_t;

namespace {

using sorted_layer = sy::MoELayer<sy::routers::TopK, sy::activation::swiglu, sy::dispatch::sorted_grouped>;
using padded_layer = sy::MoELayer<sy::routers::TopK, sy::activation::swiglu, sy::dispatch::padded_capacity>;

//! Runs `f` (then waits for the stream) and checks it throws exactly E naming `argument`,
//! with `argument` and `in_message` in its message.
template <class E, class F>
void expect_error(const char* what, F&& f, const std::string& argument,
                  const std::string& in_message, sy::cuda::stream_context& sc) {
  BOOST_TEST_CONTEXT(what) {
    try {
      f();
      sc.synchronize();
      BOOST_ERROR("no exception; expected " << boost::core::demangle(typeid(E).name()) << " naming "
                                            << argument);
    } catch (const E& e) {
      BOOST_TEST(e.argument() == argument);
      const std::string msg = e.what();
      BOOST_TEST(msg.find(argument) != std::string::npos, "message: " << msg);
      BOOST_TEST(msg.find(in_message) != std::string::npos,
                 "message lacks '" << in_message << "': " << msg);
      BOOST_TEST_MESSAGE(what << ": " << msg);
    } catch (const std::exception& e) {
      BOOST_ERROR("expected " << boost::core::demangle(typeid(E).name()) << ", got "
                              << boost::core::demangle(typeid(e).name()) << ": " << e.what());
    }
  }
}

//! One TopK k = 2 swiglu problem on the host and the device (float).
struct problem {
  static constexpr index_t tokens = 64, d = 32, d_ff = 24, experts = 8;
  std::mt19937_64 g{sy::test::base_seed() + 900};
  sy::cuda::stream_context sc;
  gpu::router_kit<sy::routers::TopK> rk{g, tokens, d, experts};
  sy::test::layer_data<float> L{g, tokens, d, d_ff, experts, true, true};
  gpu::device_mirror m{sc.stream()};
  sy::matrix_view<const float> x_d = m(L.xv());
  sy::expert_weights<float> w_d = L.weights(m);
  sy::routing::linear_router_params rp_d = rk.device_params(m);
  gpu::device_output<float> y{static_cast<std::size_t>(tokens * d), sc.stream()};
  gpu::device_state<sy::routing::softmax_router_losses> state{tokens, 2, experts, sc.stream()};

  [[nodiscard]] sy::matrix_view<float> yv() const { return y.view(tokens, d); }
  //! x with a NaN at [t, i], on the device.
  [[nodiscard]] sy::matrix_view<const float> x_with_nan(index_t t, index_t i) {
    std::vector<float> x = L.x;
    x[static_cast<std::size_t>(t * d + i)] = NAN;
    return m(sy::make_view<const float>(x.data(), tokens, d));
  }
  //! A valid forward still works on this context (errors are not sticky).
  template <class Layer>
  void valid_forward_works(const Layer& layer) {
    gpu::device_output<std::byte> ws(layer.workspace_size(sc.get(), tokens, rp_d, w_d), sc.stream());
    layer.forward(sc.get(), x_d, rp_d, w_d, yv(), state.view(), ws.span());
    BOOST_CHECK_NO_THROW(sy::cuda::check_status(sc.get(), ws.span()));
    const auto y_h = y.download();
    bool finite = true;
    for (float v : y_h) finite = finite && std::isfinite(v);
    BOOST_TEST(finite, "y of a valid forward after an error is finite");
  }
};

//! Bitwise equality of two downloads.
template <class T>
bool same_bytes(const std::vector<T>& a, const std::vector<T>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

//! Seeded O(1) values (an accumulation or a write shows in their bits; never zeros).
std::vector<float> seeded(std::size_t n, std::uint64_t salt) {
  std::mt19937_64 g(sy::test::base_seed() + salt);
  return sy::test::normal(g, n);
}

padded_layer make_padded() {
  return gpu::make_layer<padded_layer>({.k = 2}, gpu::dispatch_variants<sy::dispatch::padded_capacity>().at(0).value);
}

}  // namespace

BOOST_AUTO_TEST_CASE(too_little_workspace_is_a_shape_error) {
  problem P;
  const sorted_layer sorted{.router = {.k = 2}};
  const padded_layer padded = make_padded();
  auto run = [&](const auto& layer, const char* name) {
    const std::size_t need = layer.workspace_size(P.sc.get(), P.tokens, P.rp_d, P.w_d);
    BOOST_TEST_REQUIRE(need > 0u);
    gpu::device_output<std::byte> ws(need - 1, P.sc.stream());
    expect_error<sy::shape_error>(
        name, [&] { layer.forward(P.sc.get(), P.x_d, P.rp_d, P.w_d, P.yv(), P.state.view(), ws.span()); },
        "workspace", std::to_string(need), P.sc);

    // Backward too (its own size).
    gpu::device_output<std::byte> fws(need, P.sc.stream());
    layer.forward(P.sc.get(), P.x_d, P.rp_d, P.w_d, P.yv(), P.state.view(), fws.span());
    const std::size_t bneed = layer.backward_workspace_size(P.sc.get(), P.tokens, P.rp_d, P.w_d);
    gpu::device_output<std::byte> bws(bneed - 1, P.sc.stream());
    gpu::device_output<float> dx(static_cast<std::size_t>(P.tokens * P.d), P.sc.stream());
    const auto dy = P.m(P.L.xv());  // any finite [T, d]
    expect_error<sy::shape_error>(
        name, [&] {
          layer.backward(P.sc.get(), P.x_d, P.rp_d, P.w_d, P.state.view(), dy,
                         sy::routing::softmax_router_losses{}, dx.view(P.tokens, P.d),
                         sy::expert_grads{}, sy::routing::linear_router_grads{}, bws.span());
        },
        "workspace", std::to_string(bneed), P.sc);
  };
  run(sorted, "sorted_grouped");
  run(padded, "padded_capacity");
}

BOOST_AUTO_TEST_CASE(host_memory_for_x_is_a_memory_space_error) {
  problem P;
  const sorted_layer layer{.router = {.k = 2}};
  // Pageable host memory.
  expect_error<sy::memory_space_error>(
      "pageable x", [&] { layer.forward(P.sc.get(), P.L.xv(), P.rp_d, P.w_d, P.yv(), P.state.view()); },
      "x", "host memory", P.sc);
  // Pinned host memory.
  float* pinned = nullptr;
  sy::cuda::check(cudaMallocHost(&pinned, P.L.x.size() * sizeof(float)), "cudaMallocHost");
  std::copy(P.L.x.begin(), P.L.x.end(), pinned);
  expect_error<sy::memory_space_error>(
      "pinned x",
      [&] {
        layer.forward(P.sc.get(), sy::make_view<const float>(pinned, P.tokens, P.d), P.rp_d, P.w_d,
                      P.yv(), P.state.view());
      },
      "x", "pinned host memory", P.sc);
  sy::cuda::check(cudaFreeHost(pinned), "cudaFreeHost");
  P.valid_forward_works(layer);
}

BOOST_AUTO_TEST_CASE(nan_in_x_is_a_non_finite_error) {
  problem P;
  const auto x_nan = P.x_with_nan(5, 3);
  {  // sorted_grouped: thrown by forward at its synchronisation point.
    const sorted_layer layer{.router = {.k = 2}};
    gpu::device_output<std::byte> ws(layer.workspace_size(P.sc.get(), P.tokens, P.rp_d, P.w_d), P.sc.stream());
    expect_error<sy::non_finite_error>(
        "sorted_grouped, caller workspace",
        [&] { layer.forward(P.sc.get(), x_nan, P.rp_d, P.w_d, P.yv(), P.state.view(), ws.span()); },
        "x", "x[5, 3]", P.sc);
    P.valid_forward_works(layer);
  }
  {  // padded_capacity: forward does not wait; check_status throws.
    const padded_layer layer = make_padded();
    gpu::device_output<std::byte> ws(layer.workspace_size(P.sc.get(), P.tokens, P.rp_d, P.w_d), P.sc.stream());
    layer.forward(P.sc.get(), x_nan, P.rp_d, P.w_d, P.yv(), P.state.view(), ws.span());
    expect_error<sy::non_finite_error>(
        "padded_capacity, check_status",
        [&] { sy::cuda::check_status(P.sc.get(), ws.span()); }, "x", "x[5, 3]",
        P.sc);
    // The convenience path (no workspace) waits at its end and throws there.
    expect_error<sy::non_finite_error>(
        "padded_capacity, convenience path",
        [&] { layer.forward(P.sc.get(), x_nan, P.rp_d, P.w_d, P.yv(), P.state.view()); }, "x", "x[5, 3]",
        P.sc);
    P.valid_forward_works(layer);
  }
}

BOOST_AUTO_TEST_CASE(out_of_range_plan_is_a_range_error) {
  problem P;
  // A valid plan from the host layer, then one id out of range and one count too large.
  const sorted_layer sorted{.router = {.k = 2}};
  const padded_layer padded = make_padded();
  sorted_layer::result_type r;
  std::vector<float> y_h(static_cast<std::size_t>(P.tokens * P.d));
  sorted.forward(sy::host_context{}, P.L.xv(), P.rk.host_params(), P.L.weights(),
                 sy::make_view(y_h.data(), P.tokens, P.d), r);
  auto bad_id = r.plan;
  bad_id.expert_ids[7 * 2 + 1] = static_cast<std::int32_t>(P.experts);  // token 7, slot 1
  auto bad_count = r.plan;
  bad_count.counts[9] = 3;  // width is 2
  const gpu::device_plan plan_id(bad_id, P.sc.stream()), plan_count(bad_count, P.sc.stream());
  gpu::device_output<index_t> dropped(static_cast<std::size_t>(P.experts), P.sc.stream());
  const sy::span<index_t> drop = dropped.span();

  gpu::device_output<std::byte> ws(sorted.experts_workspace_size(P.sc.get(), P.tokens, 2, P.w_d),
                                   P.sc.stream());
  expect_error<sy::range_error>(
      "sorted_grouped, bad id",
      [&] { sorted.forward_experts(P.sc.get(), P.x_d, plan_id.view(), P.w_d, P.yv(), drop, ws.span()); },
      "plan.expert_ids", "plan.expert_ids[7, 1]", P.sc);
  expect_error<sy::range_error>(
      "sorted_grouped, bad count",
      [&] { sorted.forward_experts(P.sc.get(), P.x_d, plan_count.view(), P.w_d, P.yv(), drop, ws.span()); },
      "plan.counts", "plan.counts[9]", P.sc);
  P.valid_forward_works(sorted);

  gpu::device_output<std::byte> pws(padded.experts_workspace_size(P.sc.get(), P.tokens, 2, P.w_d),
                                    P.sc.stream());
  padded.forward_experts(P.sc.get(), P.x_d, plan_id.view(), P.w_d, P.yv(), drop, pws.span());
  expect_error<sy::range_error>(
      "padded_capacity, bad id, check_status",
      [&] { sy::cuda::check_status(P.sc.get(), pws.span()); }, "plan.expert_ids",
      "plan.expert_ids[7, 1]", P.sc);
  P.valid_forward_works(padded);
}

BOOST_AUTO_TEST_CASE(y_overlapping_x_is_an_aliasing_error) {
  problem P;
  const sorted_layer layer{.router = {.k = 2}};
  // One device buffer of T + 1 rows: x is rows [0, T), y rows [1, T + 1).
  std::vector<float> host = P.L.x;
  host.resize(static_cast<std::size_t>((P.tokens + 1) * P.d), 0.5f);
  gpu::device_output<float> buf(host.size(), P.sc.stream());
  buf.set(host);
  const auto x = sy::make_view<const float>(buf.a.data(), P.tokens, P.d);
  const auto y = sy::make_view(buf.a.data() + P.d, P.tokens, P.d);
  gpu::device_output<std::byte> ws(layer.workspace_size(P.sc.get(), P.tokens, P.rp_d, P.w_d),
                                   P.sc.stream());
  try {
    layer.forward(P.sc.get(), x, P.rp_d, P.w_d, y, P.state.view(), ws.span());
    P.sc.synchronize();
    BOOST_ERROR("no exception for y overlapping x");
  } catch (const sy::aliasing_error& e) {
    BOOST_TEST(e.argument() == "y");
    BOOST_TEST(e.other_argument() == "x");
    BOOST_TEST(std::string(e.what()).find("y overlaps x") != std::string::npos, e.what());
  }
  BOOST_TEST(same_bytes(host, buf.download()), "x or y was written");
  P.valid_forward_works(layer);
}

BOOST_AUTO_TEST_CASE(nan_in_x_leaves_y_unchanged) {
  problem P;
  const sorted_layer layer{.router = {.k = 2}};
  const auto x_nan = P.x_with_nan(11, 7);
  P.y.set(seeded(static_cast<std::size_t>(P.tokens * P.d), 901));
  const std::vector<float> before = P.y.download();
  gpu::device_output<std::byte> ws(layer.workspace_size(P.sc.get(), P.tokens, P.rp_d, P.w_d),
                                   P.sc.stream());
  expect_error<sy::non_finite_error>(
      "sorted_grouped, caller workspace",
      [&] { layer.forward(P.sc.get(), x_nan, P.rp_d, P.w_d, P.yv(), P.state.view(), ws.span()); },
      "x", "x[11, 7]", P.sc);
  BOOST_TEST(same_bytes(before, P.y.download()), "y was written (caller workspace)");
  expect_error<sy::non_finite_error>(
      "sorted_grouped, convenience path",
      [&] { layer.forward(P.sc.get(), x_nan, P.rp_d, P.w_d, P.yv(), P.state.view()); }, "x",
      "x[11, 7]", P.sc);
  BOOST_TEST(same_bytes(before, P.y.download()), "y was written (convenience path)");
  P.valid_forward_works(layer);
}

BOOST_AUTO_TEST_CASE(backward_refuses_the_state_of_a_failed_forward) {
  problem P;
  const sorted_layer layer{.router = {.k = 2}};
  const std::size_t bytes =
      std::max(layer.workspace_size(P.sc.get(), P.tokens, P.rp_d, P.w_d),
               layer.backward_workspace_size(P.sc.get(), P.tokens, P.rp_d, P.w_d));
  gpu::device_output<std::byte> ws(bytes, P.sc.stream());
  bool complete = false;
  auto state = P.state.view();
  state.complete = &complete;  // host memory, whatever the context
  gpu::device_output<float> dx(static_cast<std::size_t>(P.tokens * P.d), P.sc.stream());
  const auto dy = P.m(P.L.xv());  // any finite [T, d]
  auto backward = [&] {
    layer.backward(P.sc.get(), P.x_d, P.rp_d, P.w_d, state, dy,
                   sy::routing::softmax_router_losses{}, dx.view(P.tokens, P.d),
                   sy::expert_grads{}, sy::routing::linear_router_grads{}, ws.span());
  };

  // A completed forward: its state is accepted.
  layer.forward(P.sc.get(), P.x_d, P.rp_d, P.w_d, P.yv(), state, ws.span());
  BOOST_TEST(complete);
  dx.set(seeded(static_cast<std::size_t>(P.tokens * P.d), 902));
  BOOST_CHECK_NO_THROW(backward());
  P.sc.synchronize();

  // A forward that throws past the layer's checks (a NaN in x, found on the device) leaves
  // the state incomplete; backward refuses it and writes nothing.
  const auto x_nan = P.x_with_nan(2, 4);
  expect_error<sy::non_finite_error>(
      "forward with a NaN in x",
      [&] { layer.forward(P.sc.get(), x_nan, P.rp_d, P.w_d, P.yv(), state, ws.span()); }, "x",
      "x[2, 4]", P.sc);
  BOOST_TEST(!complete);
  dx.set(seeded(static_cast<std::size_t>(P.tokens * P.d), 903));
  const std::vector<float> dx_before = dx.download();
  expect_error<sy::invalid_argument>("backward of the failed forward's state", backward, "state",
                                     "did not complete", P.sc);
  BOOST_TEST(same_bytes(dx_before, dx.download()), "dx was written");

  // A forward that completes makes the state valid again.
  layer.forward(P.sc.get(), P.x_d, P.rp_d, P.w_d, P.yv(), state, ws.span());
  BOOST_TEST(complete);
  BOOST_CHECK_NO_THROW(backward());
  P.sc.synchronize();
  const std::vector<float> dx_after = dx.download();
  bool finite = true;
  for (float v : dx_after) finite = finite && std::isfinite(v);
  BOOST_TEST(finite);
  BOOST_TEST(!same_bytes(dx_before, dx_after), "the accepted backward added nothing to dx");
}
