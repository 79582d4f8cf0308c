// SPDX-License-Identifier: Apache-2.0
// The CUDA layer's backward with the TopK router (k = 1 and 2) against the host layer's, over
// float and bfloat16: swiglu with sorted_grouped, padded_capacity (both dropped-output modes)
// and dense, gelu with sorted_grouped, and the HyperMoE add-on with sorted_grouped
// (tests/cuda/support/layer_backward.cuh says what is compared). `sanitizer_case` is one small
// forward + backward per dispatch, for scripts/gpu-check's compute-sanitizer stage.
#include <boost/test/unit_test.hpp>

#include <tuple>

#include <switchyard/layer/hypermoe_addon.hpp>

#include "cuda/support/layer_backward.cuh"

namespace sy = switchyard;
namespace gpu = switchyard::test::gpu;

namespace {
template <class A, class D, class AddOn = sy::no_addon>
using layer = sy::MoELayer<sy::routers::TopK, A, D, AddOn>;
using sy::activation::gelu;
using sy::activation::swiglu;
using sy::dispatch::dense;
using sy::dispatch::padded_capacity;
using sy::dispatch::sorted_grouped;

using layers = std::tuple<layer<swiglu, sorted_grouped>, layer<swiglu, padded_capacity>,
                          layer<swiglu, dense>, layer<gelu, sorted_grouped>,
                          layer<swiglu, sorted_grouped, sy::layer::hypermoe_addon>>;
}  // namespace

BOOST_AUTO_TEST_CASE_TEMPLATE(topk_backward_matches_host, Layer, layers) {
  gpu::backward_matches_host<Layer>(700);
}

// Small sizes for compute-sanitizer (memcheck, racecheck, initcheck, synccheck): TopK k = 2,
// swiglu, float, T = 37, E = 16, one forward comparison and one backward comparison for
// sorted_grouped and for padded_capacity.
BOOST_AUTO_TEST_CASE(sanitizer_case) {
  sy::cuda::stream_context sc;
  const gpu::shape s{37, 19, 13, 16, "sanitizer T=37"};
  const sy::routers::TopK router{.k = 2, .renormalize = true};
  gpu::forward_coverage cov;
  const std::uint64_t seed = sy::test::base_seed() + 777;
  {
    using L = layer<swiglu, sorted_grouped>;
    const L l = gpu::make_layer<L>(router, {});
    gpu::forward_run<L, float, gpu::router_kit<sy::routers::TopK>, gpu::addon_kit<sy::no_addon>>(
        sc, l, s, seed, cov);
    gpu::backward_run<L, float, gpu::router_kit<sy::routers::TopK>, gpu::addon_kit<sy::no_addon>>(
        sc, l, s, seed);
  }
  {
    using L = layer<swiglu, padded_capacity>;
    const L l = gpu::make_layer<L>(router, gpu::dispatch_variants<padded_capacity>().at(1).value);
    gpu::forward_run<L, float, gpu::router_kit<sy::routers::TopK>, gpu::addon_kit<sy::no_addon>>(
        sc, l, s, seed, cov);
    gpu::backward_run<L, float, gpu::router_kit<sy::routers::TopK>, gpu::addon_kit<sy::no_addon>>(
        sc, l, s, seed);
  }
  sc.synchronize();
}
