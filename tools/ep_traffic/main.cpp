// SPDX-License-Identifier: Apache-2.0
// ep_traffic: the measurements behind docs/expert-parallel-scaling.md. Routes seeded synthetic
// token batches with the host routers (TopK, TopP, AdaptiveGating, DynMoE, DeepSeek-V3's
// ScoredTopK), shards the experts contiguously over N = 8, 16, 32, 64 ranks (rank r owns
// experts [r·E/N, (r+1)·E/N) and routes batch r), and counts what expert parallelism moves:
// rows per (source rank, destination rank), the load imbalance (max/mean rows received), the
// rows a per-rank deduplication would save, and the dynamic routers' mean k. Those counts are
// measured; the times printed next to them are a stated latency/bandwidth model (the
// constants below, documented in the doc with their sources), not measurements.
//
// Usage: ep_traffic [--tokens-per-rank T] [--d-route D] [--seed S] [--hidden H] [--d-ff F]
//                   [--tflops R] [--quick]
// Prints markdown tables on stdout. --quick: 512 tokens per rank, N up to 16, 10 bias steps of
// 1024 tokens (a smoke run, about 20 s on 2 cores).
#include <switchyard/routing/routers/presets.hpp>
#include <switchyard/switchyard.hpp>
#include <switchyard/training/selection_bias.hpp>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

namespace {
namespace sy = switchyard;
using sy::index_t;

// ---- options ----------------------------------------------------------------------------
struct options {
  int tokens_per_rank = 4096;  // tokens each rank routes (one micro-batch)
  int d_route = 128;           // width of the synthetic router inputs (routing only)
  unsigned seed = 2026;
  int hidden = 4096;           // d_model of the modelled layer: a row is hidden · 2 bytes (bf16)
  int d_ff = 1536;             // one expert's SwiGLU width in the modelled layer
  double tflops = 500.0;       // achieved dense bf16 TFLOP/s of the expert GEMMs (stated)
  std::vector<int> ranks{8, 16, 32, 64};
  int bias_steps = 60, bias_tokens = 8192;  // DeepSeek-V3's selection-bias training (below)
};

// ---- the synthetic token stream ---------------------------------------------------------
// "uniform": x_t ~ N(0, I_d), independent tokens (the optimistic case).
// "hot": documents of doc_len tokens; each document has a topic m drawn from a Zipf law over
// `topics` unit directions u_m (P(m) ∝ 1/(m+1)^zipf); its tokens are
// x_t = sqrt(rho·d)·u_m + sqrt(1 − rho)·z_t, z_t ~ N(0, I_d): a share rho of every token's
// energy lies along its document's topic, so tokens of one document (and one rank's batch)
// route alike and popular topics make hot experts.
struct scenario {
  const char* name;
  double rho;
  int topics;
  double zipf;
  int doc_len;
};

class token_source {
 public:
  token_source(const scenario& sc, int d, unsigned seed) : sc_(sc), d_(d), gen_(seed) {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    topic_.resize(static_cast<std::size_t>(sc.topics) * d);
    for (int m = 0; m < sc.topics; ++m) {
      double n2 = 0.0;
      float* u = &topic_[static_cast<std::size_t>(m) * d];
      for (int i = 0; i < d; ++i) {
        u[i] = normal(gen_);
        n2 += static_cast<double>(u[i]) * u[i];
      }
      const float inv = static_cast<float>(1.0 / std::sqrt(n2));
      for (int i = 0; i < d; ++i) u[i] *= inv;
    }
    std::vector<double> w(sc.topics);
    for (int m = 0; m < sc.topics; ++m) w[m] = 1.0 / std::pow(m + 1.0, sc.zipf);
    pick_ = std::discrete_distribution<int>(w.begin(), w.end());
  }
  // Fills x [T, d] (row-major) with the next T tokens of the stream.
  void fill(std::vector<float>& x, int tokens) {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    x.resize(static_cast<std::size_t>(tokens) * d_);
    const float a = static_cast<float>(std::sqrt(sc_.rho * d_)), b = static_cast<float>(std::sqrt(1.0 - sc_.rho));
    for (int t = 0; t < tokens; ++t) {
      if (left_in_doc_ == 0) {
        topic_now_ = pick_(gen_);
        left_in_doc_ = sc_.doc_len;
      }
      --left_in_doc_;
      const float* u = &topic_[static_cast<std::size_t>(topic_now_) * d_];
      for (int i = 0; i < d_; ++i) x[static_cast<std::size_t>(t) * d_ + i] = a * u[i] + b * normal(gen_);
    }
  }

 private:
  scenario sc_;
  int d_;
  std::mt19937 gen_;
  std::vector<float> topic_;
  std::discrete_distribution<int> pick_;
  int topic_now_ = 0, left_in_doc_ = 0;
};

// ---- traces -----------------------------------------------------------------------------
// The experts each token chose (its used slots), batch after batch: batch r is rank r's.
struct trace {
  std::string router;
  int experts = 0;
  int tokens_per_rank = 0;
  std::vector<index_t> begin{0};  // token t's ids are ids[begin[t], begin[t + 1])
  std::vector<std::int32_t> ids;
  [[nodiscard]] index_t tokens() const { return static_cast<index_t>(begin.size()) - 1; }
  [[nodiscard]] double mean_k() const {
    return tokens() == 0 ? 0.0 : static_cast<double>(ids.size()) / static_cast<double>(tokens());
  }
  void append(const sy::routing::routing_plan& plan) {
    for (index_t t = 0; t < plan.num_tokens; ++t) {
      for (index_t j = 0; j < plan.counts[t]; ++j) ids.push_back(plan.id(t, j));
      begin.push_back(static_cast<index_t>(ids.size()));
    }
  }
};

// Routes `batches` batches of the stream with `route_batch(x, T, plan)` into one trace.
template <class RouteBatch>
trace make_trace(const char* name, int experts, const options& o, const scenario& sc, int batches,
                 RouteBatch&& route_batch) {
  trace tr;
  tr.router = name;
  tr.experts = experts;
  tr.tokens_per_rank = o.tokens_per_rank;
  token_source src(sc, o.d_route, o.seed);  // the same tokens for every router
  std::vector<float> x;
  sy::routing::routing_plan plan;
  const auto started = std::chrono::steady_clock::now();
  for (int r = 0; r < batches; ++r) {
    src.fill(x, o.tokens_per_rank);
    route_batch(sy::make_view<const float>(x.data(), o.tokens_per_rank, o.d_route), plan);
    tr.append(plan);
  }
  std::fprintf(stderr, "ep_traffic: %s (%s): %d batches routed in %.1f s\n", name, sc.name, batches,
               std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count());
  return tr;
}

std::vector<float> randn(std::size_t n, float scale, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(n);
  for (auto& a : v) a = normal(gen);
  return v;
}

// ---- what expert parallelism moves for one trace and one rank count ----------------------
struct traffic {
  int ranks = 0;
  double mean_k = 0.0;
  // rows[r][p]: (token, slot) pairs of rank r's batch whose expert lives on rank p.
  std::vector<std::vector<index_t>> rows;
  std::vector<std::vector<index_t>> unique_rows;  // distinct tokens of r with an expert on p
};

traffic measure(const trace& tr, int ranks) {
  traffic tf;
  tf.ranks = ranks;
  tf.rows.assign(ranks, std::vector<index_t>(ranks, 0));
  tf.unique_rows.assign(ranks, std::vector<index_t>(ranks, 0));
  const int per_rank = tr.experts / ranks;
  index_t pairs = 0;
  std::vector<char> seen(ranks);
  for (int r = 0; r < ranks; ++r) {
    for (index_t t = static_cast<index_t>(r) * tr.tokens_per_rank;
         t < static_cast<index_t>(r + 1) * tr.tokens_per_rank; ++t) {
      std::fill(seen.begin(), seen.end(), 0);
      for (index_t i = tr.begin[t]; i < tr.begin[t + 1]; ++i) {
        const int p = tr.ids[i] / per_rank;
        ++tf.rows[r][p];
        ++pairs;
        if (!seen[p]) {
          seen[p] = 1;
          ++tf.unique_rows[r][p];
        }
      }
    }
  }
  tf.mean_k = static_cast<double>(pairs) / (static_cast<double>(ranks) * tr.tokens_per_rank);
  return tf;
}

// ---- the stated model ---------------------------------------------------------------------
// One all-to-all-v (docs/expert-parallel-scaling.md, "The model"): every rank sends its rows
// and receives its peers' at the same time; rank r finishes after
//   alpha + (peers − 1)·o + max(bytes out of r, bytes into r) / B
// and the collective ends with the slowest rank. Rows a rank keeps (its own experts) move
// nowhere. The hierarchical variant sends to the peers in the own node (8 GPUs) over NVLink
// and to the rest over InfiniBand at the same time: max of the two.
struct fabric {
  const char* name;
  double bytes_per_s;   // per GPU per direction
  double alpha_s;       // start-up latency of the collective
  double per_peer_s;    // added per peer message
};
constexpr fabric nvlink{"NVLink", 450e9, 3e-6, 0.0};
constexpr fabric infiniband{"IB", 50e9, 3e-6, 0.5e-6};
constexpr int gpus_per_node = 8;

struct a2a_time {
  double flat_s = 0.0;          // every peer over `f`
  double hierarchical_s = 0.0;  // in-node peers over NVLink, others over IB
};

// The time of the all-to-all-v in which rank r sends rows[r][p] · row_bytes to rank p
// (forward dispatch); `transpose` = the return trip (p sends rows[r][p] back to r).
double a2a_seconds(const std::vector<std::vector<index_t>>& rows, double row_bytes, const fabric& f,
                   bool in_node_only_nvlink) {
  const int n = static_cast<int>(rows.size());
  double worst = 0.0;
  for (int r = 0; r < n; ++r) {
    double out_ib = 0, in_ib = 0, out_nv = 0, in_nv = 0;
    int peers_ib = 0, peers_nv = 0;
    for (int p = 0; p < n; ++p) {
      if (p == r) continue;
      const bool same_node = in_node_only_nvlink && p / gpus_per_node == r / gpus_per_node;
      (same_node ? out_nv : out_ib) += static_cast<double>(rows[r][p]) * row_bytes;
      (same_node ? in_nv : in_ib) += static_cast<double>(rows[p][r]) * row_bytes;
      ++(same_node ? peers_nv : peers_ib);
    }
    double t = 0.0;
    if (peers_ib > 0)
      t = f.alpha_s + (peers_ib - 1) * f.per_peer_s + std::max(out_ib, in_ib) / f.bytes_per_s;
    if (peers_nv > 0)
      t = std::max(t, nvlink.alpha_s + (peers_nv - 1) * nvlink.per_peer_s +
                          std::max(out_nv, in_nv) / nvlink.bytes_per_s);
    worst = std::max(worst, t);
  }
  return worst;
}

std::vector<std::vector<index_t>> transposed(const std::vector<std::vector<index_t>>& m) {
  const std::size_t n = m.size();
  std::vector<std::vector<index_t>> t(n, std::vector<index_t>(n));
  for (std::size_t i = 0; i < n; ++i)
    for (std::size_t j = 0; j < n; ++j) t[j][i] = m[i][j];
  return t;
}

struct summary {
  double mean_k, rows_off_per_token, imbalance, send_imbalance, dedup_saving;
  double peer_mib_mean, peer_mib_max;
  double nvlink_us, ib_us, hier_us;  // one layer's forward + backward: 4 all-to-all-v
  double gemm_us;                    // forward + backward expert GEMMs on the slowest rank
};

summary summarize(const traffic& tf, const options& o) {
  const int n = tf.ranks;
  const double row_bytes = 2.0 * o.hidden + 8.0;  // bf16 row + (source token, slot) int32 pair
  summary s{};
  s.mean_k = tf.mean_k;
  index_t off = 0, off_unique = 0, peer_max = 0, recv_max = 0, recv_sum = 0, send_max = 0;
  for (int r = 0; r < n; ++r) {
    index_t recv = 0, send_off = 0;
    for (int p = 0; p < n; ++p) {
      recv += tf.rows[p][r];
      if (p != r) {
        off += tf.rows[r][p];
        off_unique += tf.unique_rows[r][p];
        peer_max = std::max(peer_max, tf.rows[r][p]);
        send_off += tf.rows[r][p];
      }
    }
    recv_max = std::max(recv_max, recv);
    recv_sum += recv;
    send_max = std::max(send_max, send_off);
  }
  const double tokens = static_cast<double>(n) * o.tokens_per_rank;
  s.rows_off_per_token = static_cast<double>(off) / tokens;
  s.imbalance = recv_sum == 0 ? 0.0 : static_cast<double>(recv_max) * n / static_cast<double>(recv_sum);
  s.send_imbalance = off == 0 ? 0.0 : static_cast<double>(send_max) * n / static_cast<double>(off);
  s.dedup_saving = off == 0 ? 0.0 : 1.0 - static_cast<double>(off_unique) / static_cast<double>(off);
  const double mib = 1024.0 * 1024.0;
  s.peer_mib_mean = static_cast<double>(off) * row_bytes / (static_cast<double>(n) * (n - 1)) / mib;
  s.peer_mib_max = static_cast<double>(peer_max) * row_bytes / mib;
  // Forward: dispatch (rows out) + combine (outputs back); backward: the output gradients out
  // and the input gradients back: the same two patterns again.
  const auto back = transposed(tf.rows);
  auto layer_time = [&](const fabric& f, bool hier) {
    return 2.0 * (a2a_seconds(tf.rows, row_bytes, f, hier) + a2a_seconds(back, row_bytes, f, hier));
  };
  s.nvlink_us = n <= gpus_per_node ? 1e6 * layer_time(nvlink, false) : NAN;
  s.ib_us = 1e6 * layer_time(infiniband, false);
  s.hier_us = 1e6 * layer_time(infiniband, true);
  // SwiGLU expert: W1 [2·d_ff, d] and W2 [d, d_ff]: 6·d·d_ff FLOPs a row forward, twice that
  // backward (input and weight gradients); the slowest rank's rows set the time.
  const double flops = 18.0 * o.hidden * static_cast<double>(o.d_ff) * static_cast<double>(recv_max);
  s.gemm_us = 1e6 * flops / (o.tflops * 1e12);
  return s;
}

void print_header() {
  std::printf("| router | N | mean k | rows off-rank / token | per-peer MiB mean / max | "
              "imbalance recv (max/mean) | send max/mean | dedup saves | "
              "a2a µs NVLink | a2a µs IB | a2a µs IB+NVLink | expert GEMM µs | GEMM / a2a (IB+NVLink) |\n");
  std::printf("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
}

void print_row(const char* router, int n, const summary& s) {
  char nv[32];
  if (std::isnan(s.nvlink_us))
    std::snprintf(nv, sizeof nv, "–");
  else
    std::snprintf(nv, sizeof nv, "%.0f", s.nvlink_us);
  std::printf("| %s | %d | %.2f | %.2f | %.2f / %.2f | %.3f | %.3f | %.0f%% | %s | %.0f | %.0f | %.0f | %.2f |\n",
              router, n, s.mean_k, s.rows_off_per_token, s.peer_mib_mean, s.peer_mib_max,
              s.imbalance, s.send_imbalance, 100.0 * s.dedup_saving, nv, s.ib_us, s.hier_us,
              s.gemm_us, s.gemm_us / s.hier_us);
}

int parse_int(const char* s, const char* name) {
  char* end = nullptr;
  const long v = std::strtol(s, &end, 10);
  if (end == s || *end != '\0' || v <= 0 || v > (1L << 30)) {
    std::fprintf(stderr, "ep_traffic: %s must be a positive integer, got '%s'\n", name, s);
    std::exit(2);
  }
  return static_cast<int>(v);
}

}  // namespace

int main(int argc, char** argv) {
  options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "ep_traffic: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--tokens-per-rank") o.tokens_per_rank = parse_int(value(), "--tokens-per-rank");
    else if (a == "--d-route") o.d_route = parse_int(value(), "--d-route");
    else if (a == "--seed") o.seed = static_cast<unsigned>(parse_int(value(), "--seed"));
    else if (a == "--hidden") o.hidden = parse_int(value(), "--hidden");
    else if (a == "--d-ff") o.d_ff = parse_int(value(), "--d-ff");
    else if (a == "--tflops") o.tflops = parse_int(value(), "--tflops");
    else if (a == "--quick") {
      o.tokens_per_rank = 512;
      o.ranks = {8, 16};
      o.bias_steps = 10;
      o.bias_tokens = 1024;
    } else {
      std::fprintf(stderr, "usage: ep_traffic [--tokens-per-rank T] [--d-route D] [--seed S] "
                           "[--hidden H] [--d-ff F] [--tflops R] [--quick]\n");
      return 2;
    }
  }
  const int d = o.d_route, batches = o.ranks.back();
  const auto started = std::chrono::steady_clock::now();

  // Router weights. Softmax routers: W [E, d] ~ N(0, (2/sqrt(d))²), so a token of norm
  // ≈ sqrt(d) has logits of standard deviation ≈ 2 (a confident but not one-hot router).
  constexpr int experts = 64, ds_experts = 256;
  const float logit_scale = 2.0f / std::sqrt(static_cast<float>(d));
  const auto gate = randn(static_cast<std::size_t>(experts) * d, logit_scale, o.seed + 1);
  const sy::routing::linear_router_params lin{sy::make_view<const float>(gate.data(), experts, d)};
  // DynMoE: gate columns [d, E]; cosine scores; one threshold for every expert, set so the
  // mean k on a separate calibration batch of the uniform stream is 2 (top-2's compute).
  const auto dyn_gate = randn(static_cast<std::size_t>(d) * experts, 1.0f, o.seed + 2);
  std::vector<std::int32_t> dyn_mask(experts, 1);
  std::vector<float> dyn_thresholds(experts, 0.0f);
  {
    token_source cal({"calibration", 0.0, 1, 0.0, 1}, d, o.seed + 100);
    std::vector<float> x;
    cal.fill(x, 4096);
    std::vector<float> cosines;
    for (int t = 0; t < 4096; ++t) {
      double xn = 0.0;
      for (int i = 0; i < d; ++i) xn += static_cast<double>(x[t * d + i]) * x[t * d + i];
      for (int e = 0; e < experts; ++e) {
        double dot = 0.0, wn = 0.0;
        for (int i = 0; i < d; ++i) {
          dot += static_cast<double>(x[t * d + i]) * dyn_gate[static_cast<std::size_t>(i) * experts + e];
          wn += static_cast<double>(dyn_gate[static_cast<std::size_t>(i) * experts + e]) *
                dyn_gate[static_cast<std::size_t>(i) * experts + e];
        }
        cosines.push_back(static_cast<float>(dot / std::sqrt(xn * wn)));
      }
    }
    // k̄ = 2 of 64: the (1 − 2/64) quantile of the cosines.
    std::sort(cosines.begin(), cosines.end());
    const float q = cosines[static_cast<std::size_t>((1.0 - 2.0 / experts) * cosines.size())];
    std::fill(dyn_thresholds.begin(), dyn_thresholds.end(), q);
  }
  const sy::routing::dynmoe_params dyn{sy::make_view<const float>(dyn_gate.data(), d, experts),
                                       sy::make_view<const float>(dyn_thresholds.data(), experts),
                                       sy::make_view<const std::int32_t>(dyn_mask.data(), experts),
                                       0.0f};
  // DeepSeek-V3: 256 experts in 8 groups (best 4 kept), top-8, sigmoid, weights normalised
  // × 2.5; its selection bias first trained by the aux-loss-free rule with DeepSeek-V3's
  // γ = 0.001 on the scenario's stream (another seed), as in training: 60 steps, each counting
  // the load of 8192 tokens (16 documents of the hot stream).
  const auto ds_gate = randn(static_cast<std::size_t>(ds_experts) * d, logit_scale, o.seed + 3);
  const sy::routers::ScoredTopK deepseek = sy::routers::presets::deepseek_v3(8, 8, 4, true, 2.5f);
  const int bias_steps = o.bias_steps, bias_tokens = o.bias_tokens;
  constexpr float bias_gamma = 0.001f;

  const sy::routers::TopK topk{.k = 2};
  const sy::routers::TopP topp{.p = 0.4f};
  const sy::routers::AdaptiveGating adaptive{.threshold = 0.1f};
  const sy::routers::DynMoE dynmoe{.training = true};

  const std::array<scenario, 2> scenarios{{{"uniform", 0.0, 1, 0.0, 1},
                                           {"hot", 0.5, 32, 1.0, 512}}};
  std::printf("ep_traffic: %d tokens per rank, router inputs d = %d, seed %u; modelled layer: "
              "hidden %d (bf16 rows of %d bytes + 8 bytes of metadata), SwiGLU d_ff %d, "
              "expert GEMMs at %.0f TFLOP/s\n\n",
              o.tokens_per_rank, d, o.seed, o.hidden, 2 * o.hidden, o.d_ff, o.tflops);
  for (const scenario& sc : scenarios) {
    std::vector<trace> traces;
    traces.push_back(make_trace("TopK k=2", experts, o, sc, batches, [&](auto x, auto& plan) {
      sy::routers::TopK::losses_type l;
      sy::host::route(topk, x, lin, plan, l);
    }));
    traces.push_back(make_trace("TopP p=0.4", experts, o, sc, batches, [&](auto x, auto& plan) {
      sy::routers::TopP::losses_type l;
      sy::host::route(topp, x, lin, plan, l);
    }));
    traces.push_back(make_trace("AdaptiveGating t=0.1", experts, o, sc, batches,
                                [&](auto x, auto& plan) {
                                  sy::routers::AdaptiveGating::losses_type l;
                                  sy::host::route(adaptive, x, lin, plan, l);
                                }));
    traces.push_back(make_trace("DynMoE", experts, o, sc, batches, [&](auto x, auto& plan) {
      sy::routers::DynMoE::losses_type l;
      sy::host::route(dynmoe, x, dyn, plan, l);
    }));
    // DeepSeek-V3: train the selection bias on this scenario's stream first.
    std::vector<float> bias(ds_experts, 0.0f);
    sy::routing::scored_router_params ds;
    ds.w = sy::make_view<const float>(ds_gate.data(), ds_experts, d);
    {
      token_source src(sc, d, o.seed + 200);
      std::vector<float> x;
      sy::routing::routing_plan plan;
      sy::routers::ScoredTopK::losses_type l;
      for (int step = 0; step < bias_steps; ++step) {
        src.fill(x, bias_tokens);
        ds.selection_bias = sy::make_view<const float>(bias.data(), ds_experts);
        sy::host::route(deepseek, sy::make_view<const float>(x.data(), bias_tokens, d), ds, plan, l);
        sy::training::update_selection_bias(plan.ref(), {bias.data(), bias.size()}, bias_gamma);
      }
    }
    ds.selection_bias = sy::make_view<const float>(bias.data(), ds_experts);
    traces.push_back(make_trace("DeepSeek-V3 (E=256, k=8)", ds_experts, o, sc, batches,
                                [&](auto x, auto& plan) {
                                  sy::routers::ScoredTopK::losses_type l;
                                  sy::host::route(deepseek, x, ds, plan, l);
                                }));
    sy::routing::scored_router_params ds0 = ds;
    ds0.selection_bias = {};
    traces.push_back(make_trace("DeepSeek-V3, no bias", ds_experts, o, sc, batches,
                                [&](auto x, auto& plan) {
                                  sy::routers::ScoredTopK::losses_type l;
                                  sy::host::route(deepseek, x, ds0, plan, l);
                                }));

    std::printf("### Scenario \"%s\"%s\n\n", sc.name,
                sc.rho > 0 ? " (documents of 512 tokens, 32 topics, Zipf 1.0, rho = 0.5)"
                           : " (independent N(0, I) tokens)");
    print_header();
    for (const trace& tr : traces)
      for (int n : o.ranks) print_row(tr.router.c_str(), n, summarize(measure(tr, n), o));
    std::printf("\n");
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  std::fprintf(stderr, "ep_traffic: %.1f s\n", seconds);
  return 0;
}
