// The CUDA layer's forward with the TopK router (k = 1 and 2) against the host layer, for
// swiglu and gelu × sorted_grouped, padded_capacity (both dropped-output modes) and dense ×
// float, half and bfloat16 (tests/cuda/support/layer_forward.cuh says what is compared).
#include <boost/test/unit_test.hpp>

#include <tuple>

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
