// SPDX-License-Identifier: Apache-2.0
// The CUDA layer's forward with the DA-MoE router (default importance: column means of the
// attention probabilities, on the device) and the DynMoE router (training and eval; a masked
// expert slot holding NaN weights) against the host layer, for swiglu and gelu ×
// sorted_grouped, padded_capacity (both dropped-output modes) and dense × float, half and
// bfloat16 (tests/cuda/support/layer_forward.cuh says what is compared).
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
using damoe = sy::routers::DAMoE<>;
using dynmoe = sy::routers::DynMoE;

using damoe_layers = std::tuple<layer<damoe, swiglu, sorted_grouped>, layer<damoe, swiglu, padded_capacity>,
                                layer<damoe, swiglu, dense>, layer<damoe, gelu, sorted_grouped>,
                                layer<damoe, gelu, padded_capacity>, layer<damoe, gelu, dense>>;
using dynmoe_layers = std::tuple<layer<dynmoe, swiglu, sorted_grouped>, layer<dynmoe, swiglu, padded_capacity>,
                                 layer<dynmoe, swiglu, dense>, layer<dynmoe, gelu, sorted_grouped>,
                                 layer<dynmoe, gelu, padded_capacity>, layer<dynmoe, gelu, dense>>;
}  // namespace

BOOST_AUTO_TEST_CASE_TEMPLATE(damoe_forward_matches_host, Layer, damoe_layers) {
  gpu::forward_matches_host<Layer>(400);
}

BOOST_AUTO_TEST_CASE_TEMPLATE(dynmoe_forward_matches_host, Layer, dynmoe_layers) {
  gpu::forward_matches_host<Layer>(500);
}
