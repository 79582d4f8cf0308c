// SPDX-License-Identifier: Apache-2.0
// Must not compile: a user's activation with no derivative, used in a MoELayer. The
// diagnostic is the one sentence from switchyard::check_activation, not a template wall.
#include <switchyard/layer/moe_layer.hpp>
#include <switchyard/routing/routers/topk.hpp>

struct my_square {
  using policy_kind = switchyard::activation_tag;
  SWITCHYARD_HD float operator()(float v) const { return v * v; }
};

int main() {
  switchyard::MoELayer<switchyard::routers::TopK, my_square> layer{};
  (void)layer;
  return 0;
}
