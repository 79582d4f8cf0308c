// SPDX-License-Identifier: Apache-2.0
// The CUDA layer's forward with the TopK router (k = 1 and 2) against the host layer, for
// swiglu and gelu × sorted_grouped, padded_capacity (both dropped-output modes) and dense ×
// float, half and bfloat16 (tests/cuda/support/layer_forward.cuh says what is compared); and
// a padded_capacity forward captured in a CUDA graph replays bitwise equal to an eager run.
#include <boost/test/unit_test.hpp>

#include <random>
#include <tuple>

#include <boost/mp11/algorithm.hpp>

#include "cuda/support/layer_forward.cuh"

namespace sy = switchyard;
namespace gpu = switchyard::test::gpu;

namespace {
template <class A, class D>
using topk_layer = sy::MoELayer<sy::routers::TopK, A, D>;

using layers = std::tuple<topk_layer<sy::activation::swiglu, sy::dispatch::sorted_grouped>,
                          topk_layer<sy::activation::swiglu, sy::dispatch::padded_capacity>,
                          topk_layer<sy::activation::swiglu, sy::dispatch::dense>,
                          topk_layer<sy::activation::gelu, sy::dispatch::sorted_grouped>,
                          topk_layer<sy::activation::gelu, sy::dispatch::padded_capacity>,
                          topk_layer<sy::activation::gelu, sy::dispatch::dense>>;
}  // namespace

BOOST_AUTO_TEST_CASE_TEMPLATE(topk_forward_matches_host, Layer, layers) {
  gpu::forward_matches_host<Layer>(100);
}

// A padded_capacity forward (no host synchronisation) captured into a CUDA graph on the
// stream_context's stream with a caller workspace, replayed twice, gives the bits of an eager
// forward (y, the plan, losses and drops), for each storage type.
BOOST_AUTO_TEST_CASE(padded_capacity_forward_graph_replays_bitwise) {
  using Layer = topk_layer<sy::activation::swiglu, sy::dispatch::padded_capacity>;
  using Losses = Layer::losses_type;
  sy::cuda::stream_context sc;
  const cudaStream_t st = sc.stream();
  boost::mp11::mp_for_each<gpu::dtypes>([&](auto tag) {
    using T = decltype(tag);
    BOOST_TEST_CONTEXT(sy::element_type_name<T>()) {
      constexpr sy::index_t tokens = 300, d = 64, d_ff = 48, experts = 8;
      std::mt19937_64 g(sy::test::base_seed() + 150);
      gpu::router_kit<sy::routers::TopK> rk(g, tokens, d, experts);
      sy::test::layer_data<T> L(g, tokens, d, d_ff, experts, true, true);
      const Layer layer = gpu::make_layer<Layer>(
          {.k = 2}, gpu::dispatch_variants<sy::dispatch::padded_capacity>().at(1).value);
      gpu::device_mirror m(st);
      const auto x = m(L.xv());
      const auto w = L.weights(m);
      const auto rp = rk.device_params(m);
      const std::size_t ws_bytes = layer.workspace_size(sc.get(), tokens, rp, w);
      gpu::device_output<std::byte> ws_eager(ws_bytes, st), ws_graph(ws_bytes, st);
      gpu::device_output<T> y_eager(tokens * d, st), y_graph(tokens * d, st);
      gpu::device_state<Losses> s_eager(tokens, 2, experts, st), s_graph(tokens, 2, experts, st);

      layer.forward(sc.get(), x, rp, w, y_eager.view(tokens, d), s_eager.view(), ws_eager.span());
      sc.synchronize();

      cudaGraph_t graph = nullptr;
      sy::cuda::check(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal), "cudaStreamBeginCapture");
      try {
        layer.forward(sc.get(), x, rp, w, y_graph.view(tokens, d), s_graph.view(), ws_graph.span());
      } catch (...) {
        cudaGraph_t broken = nullptr;
        (void)cudaStreamEndCapture(st, &broken);  // leave the stream usable
        if (broken != nullptr) (void)cudaGraphDestroy(broken);
        throw;
      }
      sy::cuda::check(cudaStreamEndCapture(st, &graph), "cudaStreamEndCapture");
      cudaGraphExec_t exec = nullptr;
      sy::cuda::check(cudaGraphInstantiate(&exec, graph, 0), "cudaGraphInstantiate");
      const auto eager = s_eager.download();
      const auto y_e = y_eager.download();
      for (int replay = 0; replay < 2; ++replay) {
        BOOST_TEST_CONTEXT("replay " << replay) {
          y_graph.poison();
          s_graph.poison();
          sy::cuda::check(cudaGraphLaunch(exec, st), "cudaGraphLaunch");
          sc.synchronize();
          const auto r = s_graph.download();
          BOOST_TEST(gpu::same_bits(y_graph.download(), y_e), "y");
          BOOST_TEST(gpu::same_bits(r.plan.expert_ids, eager.plan.expert_ids), "plan ids");
          BOOST_TEST(gpu::same_bits(r.plan.counts, eager.plan.counts), "plan counts");
          BOOST_TEST(gpu::same_bits(r.plan.weights, eager.plan.weights), "plan weights");
          BOOST_TEST(gpu::same_bits(r.plan.logits, eager.plan.logits), "logits");
          BOOST_TEST(gpu::same_bits(r.plan.probs, eager.plan.probs), "probs");
          BOOST_TEST(gpu::same_bits(gpu::loss_values(r.losses), gpu::loss_values(eager.losses)), "losses");
          BOOST_TEST(gpu::same_bits(r.dropped, eager.dropped), "dropped");
          BOOST_CHECK_NO_THROW(sy::cuda::check_status(sc.get(), ws_graph.span()));
        }
      }
      (void)cudaGraphExecDestroy(exec);
      (void)cudaGraphDestroy(graph);
    }
  });
}
