// SPDX-License-Identifier: Apache-2.0
// The CUDA layer's backward with every other router (TopP, AdaptiveGating, DA-MoE with its
// attention on the device, DynMoE in training and eval) × swiglu × sorted_grouped against the
// host layer's, over float and bfloat16 (tests/cuda/support/layer_backward.cuh says what is
// compared; the router gradients include the aux losses with coefficient 0.1).
#include <boost/test/unit_test.hpp>

#include <tuple>

#include "cuda/support/layer_backward.cuh"

namespace sy = switchyard;
namespace gpu = switchyard::test::gpu;

namespace {
template <class R>
using layer = sy::MoELayer<R, sy::activation::swiglu, sy::dispatch::sorted_grouped>;

using layers = std::tuple<layer<sy::routers::TopP>, layer<sy::routers::AdaptiveGating>,
                          layer<sy::routers::DAMoE<>>, layer<sy::routers::DynMoE>>;
}  // namespace

BOOST_AUTO_TEST_CASE_TEMPLATE(router_backward_matches_host, Layer, layers) {
  gpu::backward_matches_host<Layer>(800);
}
