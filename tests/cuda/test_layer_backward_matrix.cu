// SPDX-License-Identifier: Apache-2.0
// The CUDA layer's backward with every activation the other GPU files do not run against the
// host layer's, over float and bfloat16 (tests/cuda/support/layer_backward.cuh says what is
// compared): TopK (k = 1 raw and k = 2 renormalised) × relu, gelu_tanh, silu, geglu,
// clamped_swiglu and gpt_oss_swiglu, each activation with one dispatch and each dispatch with a
// plain and a gated activation (padded_capacity runs both dropped-output modes):
//
//   sorted_grouped: silu, clamped_swiglu   dense: gelu_tanh, gpt_oss_swiglu
//   padded_capacity (drop = zero and scaled_input): relu, geglu
//
// The clamped activations run with limit 1.5 (the models use 7), so that their clipped,
// zero-gradient branches are taken on the GPU too. Six layer types, dtypes looped inside.
// Not on the GPU (host backend only, so only in tests/host/layer/test_moe_layer_gradcheck_*):
// routers::ScoredTopK (refused at compile time by backend/cuda/router.cuh), routers::ReMoE and
// routers::ExpertChoice (no device route), shared experts, identity experts and the weight on
// the input (refused by the CUDA layer).
#include <boost/test/unit_test.hpp>

#include <cstdint>
#include <exception>
#include <tuple>

#include "cuda/support/layer_backward.cuh"

namespace sy = switchyard;
namespace gpu = switchyard::test::gpu;

namespace {
using sy::dispatch::dense;
using sy::dispatch::padded_capacity;
using sy::dispatch::sorted_grouped;
template <class A, class D>
using layer = sy::MoELayer<sy::routers::TopK, A, D>;

//! The activation of the layer under test: the clamped ones with limit 1.5.
template <class A>
A make_activation() {
  if constexpr (requires(A a) { a.limit; }) {
    A a{};
    a.limit = 1.5f;
    return a;
  } else {
    return A{};
  }
}

using layers = std::tuple<layer<sy::activation::silu, sorted_grouped>,
                          layer<sy::activation::clamped_swiglu, sorted_grouped>,
                          layer<sy::activation::gelu_tanh, dense>,
                          layer<sy::activation::gpt_oss_swiglu, dense>,
                          layer<sy::activation::relu, padded_capacity>,
                          layer<sy::activation::geglu, padded_capacity>>;
}  // namespace

BOOST_AUTO_TEST_CASE_TEMPLATE(activation_backward_matches_host, Layer, layers) {
  using RK = gpu::router_kit<sy::routers::TopK>;
  using AK = gpu::addon_kit<sy::no_addon>;
  sy::cuda::stream_context sc;
  boost::mp11::mp_for_each<gpu::backward_dtypes>([&](auto tag) {
    using T = decltype(tag);
    for (const auto& rv : RK::variants()) {
      for (const auto& dv : gpu::dispatch_variants<typename Layer::dispatch_type>()) {
        Layer l = gpu::make_layer<Layer>(rv.value, dv.value);
        l.activation = make_activation<typename Layer::activation_type>();
        std::uint64_t k = 0;
        for (const auto& s : gpu::forward_shapes(RK::width(rv.value, 8))) {
          const std::uint64_t seed = sy::test::base_seed() + 900 + 1000 * (++k);
          BOOST_TEST_CONTEXT(sy::element_type_name<T>() << ", " << rv.name << ", " << dv.name
                                                        << ", " << s.name << " (T=" << s.tokens
                                                        << "), seed " << seed) {
            try {
              gpu::backward_run<Layer, T, RK, AK>(sc, l, s, seed);
            } catch (const std::exception& e) {  // report every failing combination
              BOOST_ERROR("exception: " << e.what());
            }
          }
        }
      }
    }
  });
}
