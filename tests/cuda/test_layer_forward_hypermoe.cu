// SPDX-License-Identifier: Apache-2.0
// The CUDA layer's forward with the HyperMoE add-on (TopK k = 1 and 2 routing) against the
// host layer, for swiglu and gelu × sorted_grouped, padded_capacity (both dropped-output
// modes) and dense × float, half and bfloat16 (tests/cuda/support/layer_forward.cuh says what
// is compared; y includes the add-on's term).
#include <boost/test/unit_test.hpp>

#include <tuple>

#include <switchyard/layer/hypermoe_addon.hpp>

#include "cuda/support/layer_forward.cuh"

namespace sy = switchyard;
namespace gpu = switchyard::test::gpu;

namespace {
template <class A, class D>
using layer = sy::MoELayer<sy::routers::TopK, A, D, sy::layer::hypermoe_addon>;
using sy::activation::gelu;
using sy::activation::swiglu;
using sy::dispatch::dense;
using sy::dispatch::padded_capacity;
using sy::dispatch::sorted_grouped;

using layers = std::tuple<layer<swiglu, sorted_grouped>, layer<swiglu, padded_capacity>,
                          layer<swiglu, dense>, layer<gelu, sorted_grouped>,
                          layer<gelu, padded_capacity>, layer<gelu, dense>>;
}  // namespace

BOOST_AUTO_TEST_CASE_TEMPLATE(hypermoe_forward_matches_host, Layer, layers) {
  gpu::forward_matches_host<Layer>(600);
}
