// SPDX-License-Identifier: Apache-2.0
// Must not compile: a layer run under host_context in a translation unit that included the
// layer but no backend. The diagnostic must be the one sentence naming the header.
#include <switchyard/layer/moe_layer.hpp>
#include <switchyard/routing/routers/topk.hpp>
#include <switchyard/activation/functors.hpp>

namespace sy = switchyard;

int main() {
  float x[8] = {1, 2, 3, 4, 5, 6, 7, 8}, y[8] = {}, gate[4] = {1, 0, 0, 1};
  float w1[2 * 4 * 2] = {}, w2[2 * 2 * 2] = {};
  const sy::MoELayer<sy::routers::TopK, sy::activation::swiglu> layer{.router = {.k = 1}};
  const sy::expert_weights<float> w{sy::make_view<const float>(w1, 2, 4, 2), {},
                                    sy::make_view<const float>(w2, 2, 2, 2), {}};
  decltype(layer)::result_type result;
  layer.forward(sy::host_context{}, sy::make_view<const float>(x, 4, 2),
                {sy::make_view<const float>(gate, 2, 2)}, w, sy::make_view(y, 4, 2), result);
  return 0;
}
