// SPDX-License-Identifier: Apache-2.0
// The HyperMoE device add-on's pieces (layer/hypermoe/device_rows.hpp), run on the host in the
// order the CUDA backend runs them (a serial loop for each launch and each block phase, std
// sort and scan for CUB), against layer::hypermoe_module: the groups (first-use order, token
// lists, sets), hyper(x) and every gradient bit for bit, on fresh random plans (E <= 64 bit-mask
// keys, E > 64 hashed keys, forced key collisions, tokens routed nowhere, any number of forward
// blocks, float and bfloat16 x, absent gradients).
#include <boost/test/unit_test.hpp>

#include <switchyard/layer/hypermoe/device_rows.hpp>
#include <switchyard/layer/hypermoe_addon.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "host/layer/hyper_setup.hpp"
#include "support/random.hpp"

namespace sy = switchyard;
using sy::index_t;

namespace {

//! The block phases on the host: every index, in order (the barrier is the loop's end).
struct serial_phases {
  template <class F>
  void operator()(index_t n, const F& f) const {
    for (index_t i = 0; i < n; ++i) f(i);
  }
};

//! The grouping backend on the host: loops, a stable sort on the key, an exclusive sum.
//! `collide` forces every key to 0 (a hash collision between all sets).
struct host_backend {
  bool collide = false;
  template <class F>
  void run(index_t n, const F& f, const char*) const {
    for (index_t i = 0; i < n; ++i) f(i);
  }
  void sort_pairs(const std::uint64_t* kin, std::uint64_t* kout, const std::int32_t* vin,
                  std::int32_t* vout, index_t n, int end_bit, std::byte*, std::size_t) const {
    std::vector<std::uint64_t> k(kin, kin + n);
    const std::uint64_t mask =
        end_bit >= 64 ? ~std::uint64_t{0} : ((std::uint64_t{1} << end_bit) - 1);
    for (auto& v : k) {
      BOOST_REQUIRE((v & ~mask) == 0u);  // keys fit the bits the device sorts
      if (collide) v = 0;
    }
    std::vector<index_t> idx(static_cast<std::size_t>(n));
    std::iota(idx.begin(), idx.end(), 0);
    std::stable_sort(idx.begin(), idx.end(), [&](index_t a, index_t b) { return k[a] < k[b]; });
    for (index_t i = 0; i < n; ++i) {
      kout[i] = k[idx[i]];
      vout[i] = vin[idx[i]];
    }
  }
  void exclusive_sum(const std::int32_t* in, std::int32_t* out, index_t n, std::byte*,
                     std::size_t) const {
    std::int32_t acc = 0;
    for (index_t i = 0; i < n; ++i) {
      const std::int32_t v = in[i];
      out[i] = acc;
      acc += v;
    }
  }
};

template <class V>
bool same_bits(const V& a, const V& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(a[0])) == 0);
}

// A random plan: T tokens, `width` slots, E experts; sets drawn from a pool of `pool` sets so
// that groups hold several tokens; some tokens routed to fewer experts, or none.
sy::routing::routing_plan random_plan(std::mt19937_64& gen, index_t tokens, index_t width,
                                      index_t experts, int pool) {
  std::vector<std::vector<std::int32_t>> sets;
  std::uniform_int_distribution<index_t> count(0, width);
  for (int i = 0; i < pool; ++i) {
    std::vector<std::int32_t> all(static_cast<std::size_t>(experts));
    std::iota(all.begin(), all.end(), 0);
    std::shuffle(all.begin(), all.end(), gen);
    all.resize(static_cast<std::size_t>(i == 0 ? 0 : std::max<index_t>(1, count(gen))));
    sets.push_back(all);
  }
  sy::routing::routing_plan plan;
  plan.resize(tokens, width, experts);
  std::uniform_int_distribution<int> pick(0, pool - 1);
  for (index_t t = 0; t < tokens; ++t) {
    auto s = sets[static_cast<std::size_t>(pick(gen))];
    std::shuffle(s.begin(), s.end(), gen);  // the slot order must not matter
    plan.counts[t] = static_cast<std::int32_t>(s.size());
    for (std::size_t j = 0; j < s.size(); ++j) {
      plan.expert_ids[t * width + static_cast<index_t>(j)] = s[j];
      plan.weights[t * width + static_cast<index_t>(j)] = 1.0f / static_cast<float>(s.size());
    }
  }
  return plan;
}

struct dims {
  index_t experts, d, d_emb, p, h_in, L, d_le, b, a;
};

struct fixture {
  dims m;
  sy::test::hyper_parameters P;
  sy::layer::hypermoe_module module;
  fixture(std::mt19937_64& gen, dims dm, int layer_idx, int group_slots)
      : m(dm), P(gen, dm.experts, dm.d, dm.d_emb, dm.p, dm.h_in, dm.L, dm.d_le, dm.b, dm.a) {
    for (auto& v : P.val[2]) v = 0.5f + std::abs(v);  // keep most ReLU units alive
    for (auto& v : P.val[7]) v = 0.5f + std::abs(v);
    module.layer_idx = layer_idx;
    module.adapter_dim = static_cast<int>(dm.a);
    module.group_slots = group_slots;
  }
};

// The device scratch over host bytes.
struct device_side {
  std::vector<std::byte> bytes;
  sy::detail::hyper_device_scratch w;
  device_side(const sy::layer::hypermoe_dims& s, index_t tokens, index_t width, index_t blocks,
              bool backward) {
    sy::workspace_arena m;
    (void)sy::detail::hyper_device_scratch::take(m, s, tokens, width, 0, blocks, backward);
    bytes.resize(m.required());
    sy::workspace_arena ws({bytes.data(), bytes.size()});
    w = sy::detail::hyper_device_scratch::take(ws, s, tokens, width, 0, blocks, backward);
  }
};

template <class X>
sy::ops::hyper_program<X> program(const fixture& f, const sy::matrix_view<const X>& x,
                                  const sy::routing::routing_plan& plan, const host_backend& be,
                                  const sy::detail::hyper_device_scratch& w) {
  const auto s = f.module.validate(f.P.params(), f.m.d);
  sy::detail::hyper_group_pipeline(be, plan.view(), s.experts, w);
  be.run(s.emb_dim, sy::ops::hyper_embedding_total{f.P.params().expert_emb, w.all}, "");
  sy::ops::hyper_program<X> pr;
  pr.x = x;
  pr.p = f.P.params();
  pr.s = s;
  pr.layer = f.module.layer_idx;
  pr.groups = w.groups;
  pr.all = w.all;
  return pr;
}

template <class X>
void check_forward(std::mt19937_64& gen, dims dm, index_t tokens, index_t width, int pool,
                   int group_slots, bool collide) {
  fixture f(gen, dm, 1, group_slots);
  const auto plan = random_plan(gen, tokens, width, dm.experts, pool);
  std::vector<X> xs;
  for (float v : sy::test::normal(gen, static_cast<std::size_t>(tokens * dm.d))) xs.push_back(X(v));
  const auto x = sy::make_view<const X>(xs.data(), tokens, dm.d);
  std::vector<float> host_out(static_cast<std::size_t>(tokens * dm.d), -7.0f);
  std::vector<float> dev_out(host_out);
  f.module.forward(x, plan.view(), f.P.params(), sy::make_view(host_out.data(), tokens, dm.d));

  const auto s = f.module.validate(f.P.params(), dm.d);
  const index_t blocks = std::max<index_t>(1, std::min<index_t>(group_slots, tokens));
  device_side dev(s, tokens, width, blocks, false);
  const host_backend be{collide};
  const auto pr = program(f, x, plan, be, dev.w);
  for (index_t blk = 0; blk < blocks; ++blk)
    sy::ops::hyper_forward_block(serial_phases{}, pr, blk, blocks, dev.w.slots,
                                 sy::make_view(dev_out.data(), tokens, dm.d));
  BOOST_TEST(same_bits(host_out, dev_out));
  BOOST_TEST(std::none_of(dev_out.begin(), dev_out.end(), [](float v) { return v == -7.0f; }));
}

template <class X>
void check_backward(std::mt19937_64& gen, dims dm, index_t tokens, index_t width, int pool,
                    bool collide, bool want_dx, bool all_grads) {
  fixture f(gen, dm, static_cast<int>(dm.L - 1), 4);
  const auto plan = random_plan(gen, tokens, width, dm.experts, pool);
  std::vector<X> xs;
  for (float v : sy::test::normal(gen, static_cast<std::size_t>(tokens * dm.d))) xs.push_back(X(v));
  const auto x = sy::make_view<const X>(xs.data(), tokens, dm.d);
  const auto dys = sy::test::normal(gen, static_cast<std::size_t>(tokens * dm.d));
  const auto dy = sy::make_view<const float>(dys.data(), tokens, dm.d);
  const auto dx0 = sy::test::normal(gen, static_cast<std::size_t>(tokens * dm.d));
  auto g0 = f.P.zeros();
  for (auto& v : g0) v = sy::test::normal(gen, v.size());
  std::vector<float> dx_h = dx0, dx_d = dx0;
  auto gh = g0, gd = g0;
  auto grads_of = [&](std::vector<std::vector<float>>& st) {
    auto g = f.P.grads(st);
    if (!all_grads) {  // skip a few
      g.process2.w = {};
      g.generator.weight_up.b = {};
      g.expert_emb = {};
    }
    return g;
  };
  const auto dxv = [&](std::vector<float>& v) {
    return want_dx ? sy::make_view(v.data(), tokens, dm.d) : sy::matrix_view<float>{};
  };
  f.module.backward(x, plan.view(), f.P.params(), dy, dxv(dx_h), grads_of(gh));

  const auto s = f.module.validate(f.P.params(), dm.d);
  device_side dev(s, tokens, width, 0, true);
  const host_backend be{collide};
  const auto pr = program(f, x, plan, be, dev.w);
  sy::ops::hyper_backward_block(serial_phases{}, pr, dy, dxv(dx_d), grads_of(gd), dev.w.bwd);

  BOOST_TEST(same_bits(dx_h, dx_d));  // per token: the same whatever the grouping
  for (std::size_t i = 0; i < gh.size(); ++i) {
    BOOST_TEST_CONTEXT("gradient tensor " << i) {
      if (!collide) {
        BOOST_TEST(same_bits(gh[i], gd[i]));
      } else {  // a set split over several groups: its partial sums reach the floats apart
        for (std::size_t k = 0; k < gh[i].size(); ++k)
          BOOST_TEST(gd[i][k] == gh[i][k], boost::test_tools::tolerance(1e-4f));
      }
    }
  }
  if (want_dx) BOOST_TEST(!same_bits(dx_h, dx0));  // gradient flowed
  BOOST_TEST(!same_bits(gh[8], g0[8]));            // weight_up.w
}

const dims small{6, 8, 5, 7, 4, 3, 3, 6, 5};
const dims wide{70, 6, 4, 5, 3, 2, 2, 4, 3};  // E > 64: hashed keys

}  // namespace

BOOST_AUTO_TEST_CASE(device_grouping_gives_the_host_groups) {
  std::mt19937_64 gen(sy::test::base_seed() + 1201);
  for (const dims& dm : {small, wide}) {
    for (index_t tokens : {1, 9, 57}) {
      const index_t width = 3;
      const auto plan = random_plan(gen, tokens, width, dm.experts, 7);
      sy::workspace_arena m;
      (void)sy::detail::take_selection_groups(m, tokens, width);
      std::vector<std::byte> hb(m.required());
      sy::workspace_arena hws({hb.data(), hb.size()});
      auto host = sy::detail::take_selection_groups(hws, tokens, width);
      sy::detail::group_by_selection(plan.view(), host);

      sy::layer::hypermoe_dims s;
      s.experts = dm.experts;
      device_side dev(s, tokens, width, 1, false);
      sy::detail::hyper_group_pipeline(host_backend{}, plan.view(), dm.experts, dev.w);
      const auto& g = dev.w.groups;
      BOOST_TEST_REQUIRE(*g.count == host.count);
      for (index_t gi = 0; gi < host.count; ++gi) {
        BOOST_TEST(g.first[gi] == host.first[gi]);
        BOOST_TEST_REQUIRE(g.group_size(gi) == host.size(gi));
        for (index_t k = 0; k < host.size(gi); ++k)
          BOOST_TEST(g.group_tokens(gi)[k] == host.tokens(gi)[k]);
        BOOST_TEST_REQUIRE(g.set_length(gi) == host.set_length(gi));
        for (index_t k = 0; k < host.set_length(gi); ++k)
          BOOST_TEST(g.set(gi)[k] == host.set(gi)[k]);
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(device_forward_program_gives_the_host_output_bitwise) {
  std::mt19937_64 gen(sy::test::base_seed() + 1202);
  for (int rep = 0; rep < 2; ++rep) {
    check_forward<float>(gen, small, 40, 2, 6, 16, false);
    check_forward<float>(gen, small, 40, 2, 6, 3, false);  // groups share blocks
    check_forward<float>(gen, small, 23, 3, 9, 1, true);   // all keys collide
    check_forward<sy::bfloat16>(gen, small, 31, 2, 5, 4, false);
    check_forward<sy::half>(gen, wide, 37, 3, 8, 5, false);
    check_forward<float>(gen, small, 1, 2, 3, 16, false);  // decode
  }
}

BOOST_AUTO_TEST_CASE(device_backward_program_gives_the_host_gradients_bitwise) {
  std::mt19937_64 gen(sy::test::base_seed() + 1203);
  for (int rep = 0; rep < 2; ++rep) {
    check_backward<float>(gen, small, 40, 2, 6, false, true, true);
    check_backward<float>(gen, small, 29, 3, 9, false, false, false);  // no dx, some grads absent
    check_backward<sy::bfloat16>(gen, small, 26, 2, 5, false, true, true);
    check_backward<float>(gen, wide, 33, 3, 8, false, true, true);
    check_backward<float>(gen, small, 21, 2, 4, true, true, true);  // all keys collide
  }
}
