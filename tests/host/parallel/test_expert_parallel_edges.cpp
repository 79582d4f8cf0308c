// SPDX-License-Identifier: Apache-2.0
// Expert parallelism, the rest of issue #16's list on the thread communicator: the thread
// communicator itself (its collectives against what they must move for N = 1 … 8, an
// exception on one rank releasing the others), edge routings (every token to one expert, a
// rank that receives nothing, k = 0 and k = k_max tokens, identity / zero experts never sent,
// odd rank counts), static_bound overflow counted and the kept pairs bitwise equal to the
// single-process layer, and bad input rejected with the same typed error on every rank.
#include <boost/test/unit_test.hpp>

#include <atomic>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "host/parallel/ep_cases.hpp"

namespace sy = switchyard;
using sy::index_t;
using sy::parallel::thread_comm;

BOOST_AUTO_TEST_CASE(thread_comm_moves_what_the_concept_says) {
  for (int n = 1; n <= 8; ++n) {
    sy::parallel::thread_group group(n);
    sy::parallel::run_ranks(group, [&](const thread_comm& c) {
      const int r = c.rank();
      std::vector<index_t> all(static_cast<std::size_t>(n), -1);
      c.all_gather(100 + r, {all.data(), all.size()});
      for (int s = 0; s < n; ++s) sy::test::ep::check(all[s] == 100 + s, "all_gather");
      sy::test::ep::check(c.all_agree(true), "all_agree(true)");
      sy::test::ep::check(!c.all_agree(r != n - 1), "all_agree with one false");
      // all_to_all: block p of rank r holds 1000·r + p.
      std::vector<index_t> send(static_cast<std::size_t>(n)), recv(send.size(), -1);
      for (int p = 0; p < n; ++p) send[p] = 1000 * r + p;
      c.all_to_all(send.data(), recv.data(), sizeof(index_t), nullptr);
      for (int s = 0; s < n; ++s) sy::test::ep::check(recv[s] == 1000 * s + r, "all_to_all");
      // all_to_all_v: rank r sends (r + p) % 3 bytes to p, values 7·r + p.
      std::vector<index_t> sb(n), sd(n), rb(n), rd(n);
      index_t so = 0, ro = 0;
      for (int p = 0; p < n; ++p) {
        sb[p] = (r + p) % 3;
        sd[p] = so;
        so += sb[p];
        rb[p] = (p + r) % 3;
        rd[p] = ro;
        ro += rb[p];
      }
      std::vector<unsigned char> vs(static_cast<std::size_t>(so)), vr(static_cast<std::size_t>(ro), 0xff);
      for (int p = 0; p < n; ++p)
        for (index_t i = 0; i < sb[p]; ++i) vs[sd[p] + i] = static_cast<unsigned char>(7 * r + p);
      c.all_to_all_v(vs.data(), sb.data(), sd.data(), vr.data(), rb.data(), rd.data(), nullptr);
      for (int s = 0; s < n; ++s)
        for (index_t i = 0; i < rb[s]; ++i)
          sy::test::ep::check(vr[rd[s] + i] == static_cast<unsigned char>(7 * s + r), "all_to_all_v");
    });
  }
}

BOOST_AUTO_TEST_CASE(an_exception_on_one_rank_releases_the_others) {
  sy::parallel::thread_group group(4);
  // Rank 2 throws before a collective the others are waiting in: run_ranks rethrows its error.
  BOOST_CHECK_EXCEPTION(sy::parallel::run_ranks(group,
                                                [&](const thread_comm& c) {
                                                  if (c.rank() == 2) throw std::out_of_range("rank 2");
                                                  (void)c.all_agree(true);
                                                }),
                        std::out_of_range, [](const std::out_of_range& e) {
                          return std::string(e.what()) == "rank 2";
                        });
  // A rank returning without the collective: the others get comm_error, not a hang.
  BOOST_CHECK_THROW(sy::parallel::run_ranks(group,
                                            [&](const thread_comm& c) {
                                              if (c.rank() != 0) (void)c.all_agree(true);
                                            }),
                    sy::comm_error);
  // The group is reusable afterwards.
  std::atomic<int> ok{0};
  sy::parallel::run_ranks(group, [&](const thread_comm& c) { ok += c.all_agree(true); });
  BOOST_CHECK_EQUAL(ok.load(), 4);
  BOOST_CHECK_THROW(sy::parallel::thread_group(0), sy::range_error);
}

namespace {

//! Runs `body(comm, pb)` on N thread ranks for every N in `ranks`.
template <class Body>
void on_ranks(std::initializer_list<int> ranks, std::uint64_t salt, const Body& body,
              index_t identity = 0, index_t zero = 0) {
  for (int n : ranks) {
    sy::test::ep::problem pb;
    pb.ranks = n;
    pb.seed = sy::test::base_seed() + salt + static_cast<std::uint64_t>(n);
    pb.identity = identity;
    pb.zero = zero;
    BOOST_TEST_CONTEXT("N = " << n) {
      sy::parallel::thread_group group(n);
      sy::parallel::run_ranks(group, [&](const thread_comm& c) { body(c, pb); });
    }
  }
}

}  // namespace

BOOST_AUTO_TEST_CASE(edge_routings_equal_the_single_process_layer) {
  using sy::test::ep::edge;
  for (edge which : {edge::one_expert, edge::last_rank_idle, edge::k_extremes, edge::mixed}) {
    BOOST_TEST_CONTEXT("edge " << static_cast<int>(which)) {
      on_ranks({1, 2, 3, 5, 7, 8}, 100, [&](const thread_comm& c, const sy::test::ep::problem& pb) {
        sy::test::ep::plan_case<float>(c, pb, which);
      });
      // With identity and zero experts in the plans (never sent: combined on their rank).
      on_ranks({2, 3}, 200,
               [&](const thread_comm& c, const sy::test::ep::problem& pb) {
                 sy::test::ep::plan_case<sy::bfloat16>(c, pb, which);
               },
               1, 2);
    }
  }
}

BOOST_AUTO_TEST_CASE(non_ffn_slots_are_never_sent) {
  // Every used slot names an identity or zero expert: no rank sends or receives a row, and
  // the result is the single-process one (ranks 2: the exchange still runs, empty).
  sy::test::ep::problem pb;
  pb.ranks = 3;
  pb.identity = 2;
  pb.zero = 1;
  pb.seed = sy::test::base_seed() + 300;
  std::vector<sy::test::ep::plan_store> plans;
  for (int s = 0; s < pb.ranks; ++s) {
    auto p = sy::test::ep::edge_plan(pb, s, sy::test::ep::edge::mixed);
    for (index_t t = 0; t < p.tokens; ++t)
      for (index_t j = 0; j < p.counts[t]; ++j)
        p.ids[t * p.width + j] = static_cast<std::int32_t>(pb.experts() + (t + j) % 3);
    // one id may now repeat in a token: keep the first slot of each
    for (index_t t = 0; t < p.tokens; ++t) {
      p.counts[t] = std::min<std::int32_t>(p.counts[t], 1);
      for (index_t j = p.counts[t]; j < p.width; ++j) {
        p.ids[t * p.width + j] = -1;
        p.weights[t * p.width + j] = 0.0f;
      }
    }
    plans.push_back(p);
  }
  sy::host::expert_rows_stats stats;
  sy::parallel::thread_group group(pb.ranks);
  std::mutex m;
  sy::parallel::run_ranks(group, [&](const thread_comm& c) {
    sy::host::expert_rows_probe probe;
    sy::test::ep::compare_with_concatenation<sy::routers::TopK, float>(c, pb, sy::routers::TopK{.k = 2},
                                                                       plans);
    const std::lock_guard<std::mutex> lock(m);
    stats.pairs += probe.stats.pairs;
  });
  // The probe records the EP phases' plans (this rank's FFN slots): none.
  BOOST_CHECK_EQUAL(stats.pairs, 0);
}

BOOST_AUTO_TEST_CASE(static_bound_overflow_is_counted_and_the_kept_pairs_are_exact) {
  using sy::test::ep::edge;
  for (index_t bound : {0, 1, 2, 5, 1000}) {
    BOOST_TEST_CONTEXT("peer_rows = " << bound) {
      on_ranks({1, 2, 3, 4}, 400 + static_cast<std::uint64_t>(bound),
               [&](const thread_comm& c, const sy::test::ep::problem& pb) {
                 sy::test::ep::static_bound_case<float>(c, pb, bound);
                 sy::test::ep::static_bound_case<sy::bfloat16>(c, pb, bound, edge::one_expert);
               });
    }
  }
}

namespace {

//! thread_comm claiming device memory: the host backend must refuse it.
struct device_space_comm : thread_comm {
  explicit device_space_comm(const thread_comm& c) : thread_comm(c) {}
  static constexpr sy::parallel::memory_space space = sy::parallel::memory_space::device;
};

using topk_ep = sy::MoELayer<sy::routers::TopK, sy::activation::swiglu,
                             sy::parallel::ExpertParallel<thread_comm>>;

//! Everything one rank needs to call forward, with knobs for the bad inputs.
struct rank_inputs {
  index_t tokens = 5, d = 8, d_ff = 6, local = 2, router_experts;
  std::vector<float> x, gate, w1, w2, y;
  rank_inputs(int ranks, index_t local_experts, index_t router_e = -1)
      : local(local_experts), router_experts(router_e < 0 ? local_experts * ranks : router_e) {
    std::mt19937_64 g(sy::test::base_seed() + 500);
    x = sy::test::normal(g, static_cast<std::size_t>(tokens * d));
    gate = sy::test::normal(g, static_cast<std::size_t>(router_experts * d));
    w1 = sy::test::normal(g, static_cast<std::size_t>(local * 2 * d_ff * d), 0.3f);
    w2 = sy::test::normal(g, static_cast<std::size_t>(local * d * d_ff), 0.3f);
    y.assign(static_cast<std::size_t>(tokens * d), -1.0f);
  }
  sy::expert_weights<float> weights() const {
    sy::expert_weights<float> w;
    w.w1 = sy::make_view<const float>(w1.data(), local, 2 * d_ff, d);
    w.w2 = sy::make_view<const float>(w2.data(), local, d, d_ff);
    return w;
  }
  template <class Layer>
  void forward(const Layer& layer) {
    sy::moe_result<sy::routing::softmax_router_losses> res;
    layer.forward(sy::host_context{}, sy::make_view<const float>(x.data(), tokens, d),
                  {sy::make_view<const float>(gate.data(), router_experts, d)}, weights(),
                  sy::make_view<float>(y.data(), tokens, d), res);
  }
};

//! Runs `body` on N thread ranks; every rank must throw E whose message contains `fragment`
//! (on the ranks whose own check failed; the others name the failing rank).
template <class E, class Body>
void every_rank_throws(int n, const std::string& fragment, const Body& body) {
  sy::parallel::thread_group group(n);
  std::atomic<int> threw{0}, named{0};
  sy::parallel::run_ranks(group, [&](const thread_comm& c) {
    try {
      body(c);
    } catch (const E& e) {
      ++threw;
      named += std::string(e.what()).find(fragment) != std::string::npos ? 1 : 0;
      return;
    } catch (const std::exception& e) {
      sy::test::ep::check(false, sy::detail::concat("rank ", c.rank(), " threw another type: ", e.what()));
      return;
    }
    sy::test::ep::check(false, sy::detail::concat("rank ", c.rank(), " did not throw"));
  });
  BOOST_CHECK_EQUAL(threw.load(), n);
  BOOST_CHECK_GE(named.load(), 1);
}

}  // namespace

BOOST_AUTO_TEST_CASE(bad_input_gives_every_rank_the_same_typed_error) {
  // E not divisible by N: 8 experts over 3 ranks (each rank holds 2 or 3: neither fits).
  every_rank_throws<sy::shape_error>(3, "not a multiple", [](const thread_comm& c) {
    rank_inputs in(3, 2, 8);
    topk_ep layer;
    layer.dispatch.comm = &c;
    in.forward(layer);
  });
  // Mismatched E across ranks: rank 1 has 3 experts (router E = 9), the others 2 (E = 6).
  every_rank_throws<sy::shape_error>(3, "disagree", [](const thread_comm& c) {
    rank_inputs in(3, c.rank() == 1 ? 3 : 2);
    topk_ep layer;
    layer.dispatch.comm = &c;
    in.forward(layer);
  });
  // One rank's own shape error (y too short on rank 2): the same type everywhere.
  every_rank_throws<sy::shape_error>(4, "y", [](const thread_comm& c) {
    rank_inputs in(4, 2);
    if (c.rank() == 2) in.tokens = 4, in.x.resize(static_cast<std::size_t>(4 * 8));
    topk_ep layer;
    layer.dispatch.comm = &c;
    sy::moe_result<sy::routing::softmax_router_losses> res;
    layer.forward(sy::host_context{}, sy::make_view<const float>(in.x.data(), in.tokens, in.d),
                  {sy::make_view<const float>(in.gate.data(), in.router_experts, in.d)}, in.weights(),
                  sy::make_view<float>(in.y.data(), index_t{5}, in.d), res);
  });
  // A NaN token on one rank (found by the backend, agreed too).
  every_rank_throws<sy::non_finite_error>(2, "finite", [](const thread_comm& c) {
    rank_inputs in(2, 2);
    if (c.rank() == 1) in.x[3] = std::numeric_limits<float>::quiet_NaN();
    topk_ep layer;
    layer.dispatch.comm = &c;
    in.forward(layer);
  });
  // A communicator whose memory space is not the host backend's.
  every_rank_throws<sy::memory_space_error>(2, "memory space", [](const thread_comm& c) {
    const device_space_comm dc(c);
    rank_inputs in(2, 2);
    sy::MoELayer<sy::routers::TopK, sy::activation::swiglu,
                 sy::parallel::ExpertParallel<device_space_comm>>
        layer;
    layer.dispatch.comm = &dc;
    in.forward(layer);
  });
  // A null communicator (on every rank: no rank can reach another).
  every_rank_throws<sy::null_pointer_error>(2, "dispatch.comm", [](const thread_comm&) {
    rank_inputs in(2, 2);
    topk_ep layer;
    in.forward(layer);
  });
  // Capacity hyperparameters and unsupported combinations, agreed like shapes.
  every_rank_throws<sy::range_error>(2, "peer_rows", [](const thread_comm& c) {
    rank_inputs in(2, 2);
    sy::MoELayer<sy::routers::TopK, sy::activation::swiglu,
                 sy::parallel::ExpertParallel<thread_comm, sy::parallel::static_bound>>
        layer;
    layer.dispatch = {.comm = &c, .capacity = {.peer_rows = c.rank() == 0 ? -1 : 4}};
    in.forward(layer);
  });
  // Ranks disagreeing on static_bound's block (each bound valid alone): every rank throws
  // before any block moves (an all_to_all of unequal blocks would hang or mix rows).
  every_rank_throws<sy::range_error>(3, "disagree", [](const thread_comm& c) {
    rank_inputs in(3, 2);
    sy::MoELayer<sy::routers::TopK, sy::activation::swiglu,
                 sy::parallel::ExpertParallel<thread_comm, sy::parallel::static_bound>>
        layer;
    layer.dispatch = {.comm = &c, .capacity = {.peer_rows = c.rank() == 2 ? 3 : 4}};
    in.forward(layer);
  });
  every_rank_throws<sy::unsupported_error>(2, "router_weight_on_input", [](const thread_comm& c) {
    rank_inputs in(2, 2);
    topk_ep layer;
    layer.dispatch.comm = &c;
    layer.router_weight_on_input = true;
    in.forward(layer);
  });
}
