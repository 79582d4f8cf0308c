// SPDX-License-Identifier: Apache-2.0
// Expert parallelism: the quickstart's layer (top-p, p = 0.4, SwiGLU experts, 8 experts,
// d = 64, d_ff = 128) split over the ranks of an MPI job (`mpirun -np 4`; any rank count that
// divides 8). Rank r holds its own batch of 16 tokens and experts [r·8/N, (r+1)·8/N) only; the
// router is replicated. Each rank runs forward and backward through
// `MoELayer<TopP, swiglu, parallel::ExpertParallel<parallel::mpi_comm>>`, which sends every
// (token, slot) pair to the rank owning its expert and the outputs back (all-to-all-v over MPI).
//
// It checks, bit for bit (docs/expert-parallel.md, "Same bits"), on every rank:
//  - y, the plan, the aux losses, dx and the router gradient against the single-process layer
//    (all 8 experts, one process) run on this rank's batch alone (batch_invariant = true);
//  - y and this rank's experts' weight gradients against the single-process layer run on the
//    concatenation of every rank's batch (the experts see the same rows in the same order).
// Then rank 0 prints the per-rank token counts (pairs sent to other ranks, received from them,
// rows per local expert) and the load imbalance (max/mean rows per rank). Any mismatch prints
// "CHECK FAILED" on stderr and every rank exits 1.
#include <switchyard/switchyard.hpp>
#include <switchyard/parallel/mpi_comm.hpp>

#include <mpi.h>

#include <algorithm>
#include <cstdint>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <exception>
#include <random>
#include <type_traits>
#include <vector>

namespace {
namespace sy = switchyard;
using sy::index_t;

constexpr int tokens = 16, d = 64, d_ff = 128, experts = 8;
constexpr float top_p = 0.4f;

int failed_checks = 0;
int my_rank = 0;
void check(bool ok, const char* format, ...) {
  if (ok) return;
  ++failed_checks;
  std::va_list args;
  va_start(args, format);
  std::fprintf(stderr, "expert_parallel rank %d CHECK FAILED: ", my_rank);
  std::vfprintf(stderr, format, args);
  std::fprintf(stderr, "\n");
  va_end(args);
}

std::vector<float> randn(std::mt19937& gen, std::size_t n, float scale) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& a : v) a = normal(gen) * scale;
  return v;
}

// Rank r's batch: its own seed, so a rank builds its tokens without the others'.
std::vector<float> batch_of(int r) {
  std::mt19937 gen(1000 + static_cast<unsigned>(r));
  return randn(gen, static_cast<std::size_t>(tokens) * d, 1.0f);
}

// Bitwise equality of n floats; reports the first difference.
void same_bits(const char* what, const float* a, const float* b, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) {
    if (std::memcmp(a + i, b + i, sizeof(float)) != 0) {
      check(false, "%s differs at element %zu: %.9g vs %.9g (single process)", what, i,
            static_cast<double>(a[i]), static_cast<double>(b[i]));
      return;
    }
  }
}

using Router = sy::routers::TopP;
using Single = sy::MoELayer<Router, sy::activation::swiglu, sy::dispatch::sorted_grouped>;
using EP = sy::MoELayer<Router, sy::activation::swiglu,
                        sy::parallel::ExpertParallel<sy::parallel::mpi_comm>>;

// What a forward + backward leaves behind.
struct run_out {
  std::vector<float> y, dx, dgate, dw1, dw2;
  sy::routing::topp_losses losses{};
  std::vector<std::int32_t> ids, counts;  // ids [T, width], -1 past a token's count
  std::vector<float> weights;
  index_t width = 0;
};

int run(const sy::parallel::mpi_comm& comm) {
  const int rank = comm.rank(), ranks = comm.size();
  my_rank = rank;
  if (experts % ranks != 0) {
    if (rank == 0)
      std::fprintf(stderr, "expert_parallel CHECK FAILED: %d experts cannot be split over %d ranks "
                           "(run with 1, 2, 4 or 8)\n", experts, ranks);
    return 1;
  }
  const int local = experts / ranks, first = rank * local;

  // The model, the same on every rank (the quickstart's seed and scales): router gate [E, d],
  // experts' fused [gate | up] W1 [E, 2·d_ff, d] and W2 [E, d, d_ff]. This rank keeps the
  // router and its shard of the experts.
  std::mt19937 gen(42);
  const auto gate = randn(gen, static_cast<std::size_t>(experts) * d, 0.2f);
  const auto w1 = randn(gen, static_cast<std::size_t>(experts) * 2 * d_ff * d, 0.125f);
  const auto w2 = randn(gen, static_cast<std::size_t>(experts) * d * d_ff, 0.09f);
  const std::size_t w1_block = static_cast<std::size_t>(2) * d_ff * d, w2_block = static_cast<std::size_t>(d) * d_ff;
  const std::vector<float> w1_mine(w1.begin() + first * w1_block, w1.begin() + (first + local) * w1_block);
  const std::vector<float> w2_mine(w2.begin() + first * w2_block, w2.begin() + (first + local) * w2_block);
  const auto x = batch_of(rank);

  const sy::host_context host{};
  const sy::routing::linear_router_params params{sy::make_view<const float>(gate.data(), experts, d)};
  const sy::routing::topp_losses coeffs{.dynamic_loss = 1e-4f, .lb_loss = 1e-2f, .z_loss = 1e-3f};

  // One forward + backward (dy = y: the gradient of ½‖y‖²) of `layer` on T tokens with
  // weights of `n` experts; outputs poisoned first, gradients accumulated from zero.
  auto forward_backward = [&](const auto& layer, const std::vector<float>& xs, index_t t,
                              const std::vector<float>& w1s, const std::vector<float>& w2s,
                              index_t n) {
    run_out o;
    const sy::expert_weights<float> w{sy::make_view<const float>(w1s.data(), n, 2 * d_ff, d), {},
                                      sy::make_view<const float>(w2s.data(), n, d, d_ff), {}};
    const auto xv = sy::make_view<const float>(xs.data(), t, d);
    o.y.assign(static_cast<std::size_t>(t) * d, -123.0f);
    typename std::remove_cvref_t<decltype(layer)>::result_type result;
    layer.forward(host, xv, params, w, sy::make_view(o.y.data(), t, d), result);
    o.dx.assign(o.y.size(), 0.0f);
    o.dgate.assign(gate.size(), 0.0f);
    o.dw1.assign(w1s.size(), 0.0f);
    o.dw2.assign(w2s.size(), 0.0f);
    layer.backward(host, xv, params, w, result, sy::make_view<const float>(o.y.data(), t, d), coeffs,
                   sy::make_view(o.dx.data(), t, d),
                   {sy::make_view(o.dw1.data(), n, 2 * d_ff, d), {},
                    sy::make_view(o.dw2.data(), n, d, d_ff), {}},
                   {sy::make_view(o.dgate.data(), experts, d)});
    o.losses = result.losses;
    const auto& p = result.plan;
    o.width = p.width;
    for (index_t i = 0; i < t; ++i) {
      o.counts.push_back(p.counts[i]);
      for (index_t j = 0; j < p.width; ++j) {
        o.ids.push_back(j < p.counts[i] ? p.id(i, j) : -1);
        o.weights.push_back(j < p.counts[i] ? p.weight(i, j) : 0.0f);
      }
    }
    return o;
  };

  // ---- this rank under expert parallelism ---------------------------------------------------
  EP ep{.router = {.p = top_p}};
  ep.dispatch.comm = &comm;
  ep.batch_invariant = true;
  const run_out mine = forward_backward(ep, x, tokens, w1_mine, w2_mine, local);

  // ---- the single-process references (every rank computes them itself) ----------------------
  Single single{.router = {.p = top_p}};
  single.batch_invariant = true;
  // (1) this rank's batch alone, all experts in one process.
  const run_out alone = forward_backward(single, x, tokens, w1, w2, experts);
  same_bits("y (vs this batch alone)", mine.y.data(), alone.y.data(), mine.y.size());
  check(mine.counts == alone.counts && mine.ids == alone.ids, "the plan's experts differ");
  same_bits("plan weights", mine.weights.data(), alone.weights.data(), mine.weights.size());
  same_bits("dx", mine.dx.data(), alone.dx.data(), mine.dx.size());
  same_bits("d gate (router gradient)", mine.dgate.data(), alone.dgate.data(), mine.dgate.size());
  const float l_mine[3] = {mine.losses.dynamic_loss, mine.losses.lb_loss, mine.losses.z_loss};
  const float l_alone[3] = {alone.losses.dynamic_loss, alone.losses.lb_loss, alone.losses.z_loss};
  same_bits("aux losses", l_mine, l_alone, 3);
  // (2) the concatenation of every rank's batch: this rank's experts saw exactly its rows.
  std::vector<float> x_all;
  for (int s = 0; s < ranks; ++s) {
    const auto xs = batch_of(s);
    x_all.insert(x_all.end(), xs.begin(), xs.end());
  }
  const run_out all = forward_backward(single, x_all, static_cast<index_t>(ranks) * tokens, w1, w2, experts);
  same_bits("y (vs the concatenated batch)", mine.y.data(),
            all.y.data() + static_cast<std::size_t>(rank) * tokens * d, mine.y.size());
  same_bits("dW1 of this rank's experts", mine.dw1.data(), all.dw1.data() + first * w1_block,
            mine.dw1.size());
  same_bits("dW2 of this rank's experts", mine.dw2.data(), all.dw2.data() + first * w2_block,
            mine.dw2.size());

  // ---- token counts: what this rank sent where, gathered on every rank ----------------------
  // sent[p] = pairs of this rank's tokens whose expert lives on rank p (p = id / (E/N)).
  std::vector<index_t> sent(static_cast<std::size_t>(ranks), 0), per_expert(static_cast<std::size_t>(experts), 0);
  for (int t = 0; t < tokens; ++t)
    for (int j = 0; j < mine.counts[static_cast<std::size_t>(t)]; ++j) {
      const int e = mine.ids[static_cast<std::size_t>(t * mine.width + j)];
      ++sent[static_cast<std::size_t>(e / local)];
      ++per_expert[static_cast<std::size_t>(e)];
    }
  // matrix[s][p]: rank s's pairs for rank p; experts[s][e]: rank s's pairs for expert e.
  std::vector<std::vector<index_t>> matrix(static_cast<std::size_t>(ranks), std::vector<index_t>(static_cast<std::size_t>(ranks)));
  std::vector<index_t> column(static_cast<std::size_t>(ranks));
  for (int p = 0; p < ranks; ++p) {
    comm.all_gather(sent[static_cast<std::size_t>(p)], {column.data(), column.size()});
    for (int s = 0; s < ranks; ++s) matrix[static_cast<std::size_t>(s)][static_cast<std::size_t>(p)] = column[static_cast<std::size_t>(s)];
  }
  std::vector<index_t> expert_rows(static_cast<std::size_t>(experts), 0);
  for (int e = 0; e < experts; ++e) {
    comm.all_gather(per_expert[static_cast<std::size_t>(e)], {column.data(), column.size()});
    for (int s = 0; s < ranks; ++s) expert_rows[static_cast<std::size_t>(e)] += column[static_cast<std::size_t>(s)];
  }
  // The concatenated single-process plan must count the same rows per expert.
  for (int e = 0; e < experts; ++e) {
    index_t want = 0;
    for (std::size_t i = 0; i < all.ids.size(); ++i) want += all.ids[i] == e ? 1 : 0;
    check(expert_rows[static_cast<std::size_t>(e)] == want,
          "expert %d: %lld rows over the ranks, %lld in the single-process plan", e,
          static_cast<long long>(expert_rows[static_cast<std::size_t>(e)]), static_cast<long long>(want));
  }

  // Not a comparison of zeros: rows reached this rank's experts, so their gradients moved.
  index_t my_rows = 0;
  for (int l = 0; l < local; ++l) my_rows += expert_rows[static_cast<std::size_t>(first + l)];
  bool nonzero = false;
  for (float g : mine.dw1) nonzero = nonzero || g != 0.0f;
  check(my_rows == 0 || nonzero, "dW1 of this rank's experts is all zero after %lld rows",
        static_cast<long long>(my_rows));

  if (rank == 0) {
    std::printf("Switchyard expert parallelism: the quickstart layer (top-p, p = %.2f, SwiGLU, "
                "%d experts, d = %d, d_ff = %d) over %d MPI ranks, %d tokens and %d experts each\n",
                static_cast<double>(top_p), experts, d, d_ff, ranks, tokens, local);
    std::printf("rank | experts | pairs routed | to own experts | sent to others | received from others | "
                "rows per local expert | rows computed\n");
    index_t max_rows = 0, total_rows = 0;
    for (int r = 0; r < ranks; ++r) {
      index_t routed = 0, out = 0, in = 0, rows = 0;
      for (int p = 0; p < ranks; ++p) {
        routed += matrix[static_cast<std::size_t>(r)][static_cast<std::size_t>(p)];
        rows += matrix[static_cast<std::size_t>(p)][static_cast<std::size_t>(r)];
        if (p != r) {
          out += matrix[static_cast<std::size_t>(r)][static_cast<std::size_t>(p)];
          in += matrix[static_cast<std::size_t>(p)][static_cast<std::size_t>(r)];
        }
      }
      std::printf("%4d | %d..%d    | %12lld | %14lld | %14lld | %20lld |", r, r * local, r * local + local - 1,
                  static_cast<long long>(routed), static_cast<long long>(matrix[static_cast<std::size_t>(r)][static_cast<std::size_t>(r)]),
                  static_cast<long long>(out), static_cast<long long>(in));
      for (int l = 0; l < local; ++l)
        std::printf(" e%d: %lld", r * local + l, static_cast<long long>(expert_rows[static_cast<std::size_t>(r * local + l)]));
      std::printf(" | %lld\n", static_cast<long long>(rows));
      max_rows = std::max(max_rows, rows);
      total_rows += rows;
    }
    const double mean = static_cast<double>(total_rows) / ranks;
    std::printf("mean k = %.3f; load imbalance (max/mean rows per rank) = %lld / %.2f = %.3f\n",
                static_cast<double>(total_rows) / (static_cast<double>(ranks) * tokens),
                static_cast<long long>(max_rows), mean, mean > 0 ? static_cast<double>(max_rows) / mean : 0.0);
  }
  // Every rank learns whether any rank failed, and all exit alike.
  const bool all_ok = comm.all_agree(failed_checks == 0);
  if (rank == 0) {
    if (all_ok) {
      std::printf("every rank: y, plan, aux losses, dx, router and expert weight gradients bitwise "
                  "equal to the single-process layer (GEMMs: %s)\nall checks passed\n",
                  sy::host::gemm_backend_name());
    } else
      std::fprintf(stderr, "expert_parallel CHECK FAILED: a check failed on some rank (see above)\n");
  }
  return all_ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int code = 1;
  try {
    const sy::parallel::mpi_comm comm;  // MPI_COMM_WORLD
    code = run(comm);
  } catch (const std::exception& e) {
    // The layer agrees on bad arguments before exchanging, so every rank lands here alike; an
    // abort still ends a job whose ranks disagree.
    std::fprintf(stderr, "expert_parallel rank %d CHECK FAILED: exception: %s\n", my_rank, e.what());
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  MPI_Finalize();
  return code;
}
