// SPDX-License-Identifier: Apache-2.0
// The CUDA layer's forward with the TopP and AdaptiveGating routers against the host layer,
// for swiglu and gelu × sorted_grouped, padded_capacity (both dropped-output modes) and dense
// × float, half and bfloat16 (tests/cuda/support/layer_forward.cuh says what is compared).
#include <boost/test/unit_test.hpp>

#include <tuple>

#include "cuda/support/layer_forward.cuh"

namespace sy = switchyard;
namespace gpu = switchyard::test::gpu;

namespace {
template <class R, class A, class D>
using layer = sy::MoELayer<R, A, D>;
using sy::activation::gelu;
using sy::activation::swiglu;
using sy::dispatch::dense;
using sy::dispatch::padded_capacity;
using sy::dispatch::sorted_grouped;

using topp_layers = std::tuple<
    layer<sy::routers::TopP, swiglu, sorted_grouped>, layer<sy::routers::TopP, swiglu, padded_capacity>,
    layer<sy::routers::TopP, swiglu, dense>, layer<sy::routers::TopP, gelu, sorted_grouped>,
    layer<sy::routers::TopP, gelu, padded_capacity>, layer<sy::routers::TopP, gelu, dense>>;
using adaptive_layers = std::tuple<
    layer<sy::routers::AdaptiveGating, swiglu, sorted_grouped>,
    layer<sy::routers::AdaptiveGating, swiglu, padded_capacity>,
    layer<sy::routers::AdaptiveGating, swiglu, dense>,
    layer<sy::routers::AdaptiveGating, gelu, sorted_grouped>,
    layer<sy::routers::AdaptiveGating, gelu, padded_capacity>,
    layer<sy::routers::AdaptiveGating, gelu, dense>>;
}  // namespace

BOOST_AUTO_TEST_CASE_TEMPLATE(topp_forward_matches_host, Layer, topp_layers) {
  gpu::forward_matches_host<Layer>(200);
}

BOOST_AUTO_TEST_CASE_TEMPLATE(adaptive_gating_forward_matches_host, Layer, adaptive_layers) {
  gpu::forward_matches_host<Layer>(300);
}
