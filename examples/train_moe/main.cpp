// SPDX-License-Identifier: Apache-2.0
// train_moe: a small model (embedding -> residual MoE layer(s) -> linear head) trained end to
// end with Switchyard on the host backend, on a synthetic task whose hard tokens need more
// experts (trainer.hpp; README.md beside this file). One progress line per epoch; CSV and PNG
// of the curves on request.
//
//   train_moe                       every router, small settings, checked (what CTest runs)
//   train_moe --router all --csv train_moe.csv --png train_moe.png   the full run
//   train_moe --router topp --epochs 20 --optimizer sgd --lr 0.05 --aux "lb_loss=0.01"
//
// Exits non-zero, naming the check on stderr ("CHECK FAILED"), when a run's loss did not fall
// well below its start or became non-finite.
#include "trainer.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {
int failed_checks = 0;
void check(bool ok, const char* format, ...) {
  if (ok) return;
  ++failed_checks;
  std::va_list args;
  va_start(args, format);
  std::fprintf(stderr, "train_moe CHECK FAILED: ");
  std::vfprintf(stderr, format, args);
  std::fprintf(stderr, "\n");
  va_end(args);
}

void usage() {
  std::printf(
      "usage: train_moe [--router NAME|all] [--epochs N] [--steps N] [--seed N]\n"
      "                 [--optimizer sgd|adam] [--lr X] [--aux \"name=value,...\"|none]\n"
      "                 [--aux-warmup N] [--micro-batches N] [--layers N] [--experts N]\n"
      "                 [--d N] [--d-ff N] [--tokens N] [--threads N]\n"
      "                 [--csv PATH] [--png PATH] [--small] [--quiet]\n"
      "routers: topk topp dynmoe adaptive hypermoe damoe deepseek deepseek-nobias remoe\n"
      "no arguments: every router with small settings, checked (the CTest run)\n");
}

// A bar of eighth blocks, one character per expert, scaled to the largest load.
std::string load_bar(const std::vector<double>& load, int experts, int layers) {
  static const char* blocks[] = {" ", "\u2581", "\u2582", "\u2583", "\u2584",
                                 "\u2585", "\u2586", "\u2587", "\u2588"};
  std::string s;
  for (int l = 0; l < layers; ++l) {
    if (l > 0) s += "|";
    double mx = 0;
    for (int e = 0; e < experts; ++e) mx = std::max(mx, load[static_cast<std::size_t>(l * experts + e)]);
    for (int e = 0; e < experts; ++e) {
      const double v = load[static_cast<std::size_t>(l * experts + e)];
      const int level = mx > 0 ? static_cast<int>(std::lround(8.0 * v / mx)) : 0;
      s += blocks[v > 0 && level == 0 ? 1 : level];
    }
  }
  return s;
}

// The metric each router is about, for the progress line.
std::string router_metric(const std::string& router, const train_moe::epoch_metrics& m) {
  char buf[128];
  if (router == "adaptive") std::snprintf(buf, sizeof buf, "top-2 share %.3f", m.top2_share);
  else if (router == "dynmoe") std::snprintf(buf, sizeof buf, "active experts %.0f, unrouted %.3f", m.active_experts, m.unrouted);
  else if (router == "remoe") std::snprintf(buf, sizeof buf, "sparsity %.3f, lambda %.2e", m.sparsity, m.lambda);
  else if (router == "deepseek" || router == "deepseek-nobias") std::snprintf(buf, sizeof buf, "imbalance %.2f", m.imbalance);
  else std::snprintf(buf, sizeof buf, "aux %.4f", m.aux);
  return buf;
}

const char* csv_header =
    "router,epoch,loss,accuracy,accuracy_easy,accuracy_hard,aux,mean_k,mean_k_easy,mean_k_hard,"
    "unrouted,imbalance,top2_share,active_experts,sparsity,lambda,load";
}  // namespace

int main(int argc, char** argv) {
  const bool ctest_run = argc == 1;
  train_moe::config base = ctest_run ? train_moe::config::small() : train_moe::config{};
  std::string router = "all", csv_path, png_path;
  bool quiet = false, layers_given = false;
  int threads = 1;  // the model is tiny: more threads only add synchronisation
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "train_moe: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    try {
      if (a == "--router") router = value();
      else if (a == "--epochs") base.epochs = std::stoi(value());
      else if (a == "--steps") base.steps_per_epoch = std::stoi(value());
      else if (a == "--seed") base.seed = std::stoull(value());
      else if (a == "--optimizer") base.optimizer = value();
      else if (a == "--lr") base.lr = std::stod(value());
      else if (a == "--aux") base.aux = value();
      else if (a == "--aux-warmup") base.aux_warmup = std::stoi(value());
      else if (a == "--micro-batches") base.micro_batches = std::stoi(value());
      else if (a == "--layers") {
        base.layers = std::stoi(value());
        layers_given = true;
      }
      else if (a == "--experts") base.experts = std::stoi(value());
      else if (a == "--d") base.d = std::stoi(value());
      else if (a == "--d-ff") base.d_ff = std::stoi(value());
      else if (a == "--remoe-alpha") base.remoe_alpha = std::stof(value());
      else if (a == "--remoe-lambda") base.remoe_lambda = std::stof(value());
      else if (a == "--noise") base.label_noise = std::stod(value());
      else if (a == "--top-p") base.top_p = std::stof(value());
      else if (a == "--tokens") base.tokens = std::stoi(value());
      else if (a == "--threads") threads = std::stoi(value());
      else if (a == "--csv") csv_path = value();
      else if (a == "--png") png_path = value();
      else if (a == "--quiet") quiet = true;
      else if (a == "--small") {
        const train_moe::config s = train_moe::config::small();
        base.epochs = s.epochs;
        base.steps_per_epoch = s.steps_per_epoch;
      } else if (a == "--help" || a == "-h") {
        usage();
        return 0;
      } else {
        std::fprintf(stderr, "train_moe: unknown argument '%s'\n", a.c_str());
        usage();
        return 2;
      }
    } catch (const std::exception& e) {
      std::fprintf(stderr, "train_moe: bad value for %s: %s\n", a.c_str(), e.what());
      return 2;
    }
  }
#ifdef _OPENMP
  omp_set_num_threads(threads);
#else
  (void)threads;
#endif
  std::vector<std::string> routers;
  if (router == "all") {
    routers = train_moe::router_names();
  } else {
    const auto& known = train_moe::router_names();
    if (std::find(known.begin(), known.end(), router) == known.end()) {
      std::fprintf(stderr, "train_moe: unknown router '%s'\n", router.c_str());
      usage();
      return 2;
    }
    routers.push_back(router);
  }

  std::printf("train_moe: %d easy tasks (one skill), %d hard (two skills), %d tokens x %d batches, %d epochs, "
              "E = %d, d = %d, d_ff = %d, %d MoE layer(s), %s lr %g, %d micro-batch(es), seed %llu\n",
              base.skills, base.skills / 2, base.tokens,
              base.steps_per_epoch, base.epochs, base.experts, base.d, base.d_ff, base.layers,
              base.optimizer.c_str(), base.lr, base.micro_batches,
              static_cast<unsigned long long>(base.seed));
  std::vector<train_moe::run_result> results;
  for (const auto& name : routers) {
    train_moe::config cfg = base;
    cfg.router = name;
    if (name == "adaptive" && !layers_given && cfg.layers < 2) {
      // The curriculum compares per-batch complexity vectors over the MoE layers: with one
      // layer they are scalars, every batch is equally similar and the order never changes.
      cfg.layers = 2;
      std::printf("adaptive: 2 MoE layers (the curriculum compares complexity over layers)\n");
    }
    if (name == "dynmoe" && cfg.dynmoe_mask.empty() && cfg.experts >= 4) {
      // Show the adaptive update at work: one slot starts free, the last slot's threshold is
      // out of reach (it receives no token and is removed at the first update), and raised
      // thresholds leave some tokens routed to no expert (an expert is added for them).
      cfg.dynmoe_mask.assign(static_cast<std::size_t>(cfg.experts), '1');
      cfg.dynmoe_mask[static_cast<std::size_t>(cfg.experts / 2 - 1)] = '0';
      cfg.dynmoe_starved_slot = cfg.experts - 1;
      cfg.dynmoe_threshold = 0.2f;
      std::printf("dynmoe: initial mask %s, slot %d starved, thresholds G = %.1f, update period %d "
                  "forwards\n", cfg.dynmoe_mask.c_str(), cfg.dynmoe_starved_slot,
                  static_cast<double>(cfg.dynmoe_threshold), cfg.dynmoe_period);
    }
    const auto start = std::chrono::steady_clock::now();
    train_moe::run_result r;
    try {
      r = train_moe::train(cfg);
    } catch (const std::exception& e) {
      check(false, "%s: training threw: %s", name.c_str(), e.what());
      continue;
    }
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    for (const auto& m : r.epochs) {
      if (quiet && m.epoch + 1 != cfg.epochs) continue;
      std::printf("%-15s epoch %2d  loss %.3f  acc %.3f (easy %.2f hard %.2f)  k %.2f (easy %.2f "
                  "hard %.2f)  load %s  %s\n",
                  name.c_str(), m.epoch + 1, m.loss, m.accuracy, m.accuracy_easy, m.accuracy_hard,
                  m.mean_k, m.mean_k_easy, m.mean_k_hard,
                  load_bar(m.load, cfg.experts, cfg.layers).c_str(), router_metric(name, m).c_str());
      for (const auto& ev : r.dynmoe_events) {  // DynMoE's adaptive updates in this epoch
        if (quiet || ev.step / cfg.steps_per_epoch != m.epoch || (ev.removed == 0 && ev.added < 0))
          continue;
        std::string removed;
        for (std::size_t e = 0; e < ev.mask_before.size(); ++e)
          if (ev.mask_before[e] == 1 && ev.routing_records[e] == 0.0f) removed += " " + std::to_string(e);
        int active = 0;
        for (auto v : ev.mask_after) active += v;
        const std::string added = ev.added >= 0 ? "added slot " + std::to_string(ev.added) : "added none";
        std::printf("%-15s   layer %d, update after forward %lld: removed slot(s)%s, %s, %d active\n",
                    name.c_str(), ev.layer, static_cast<long long>(ev.forward),
                    removed.empty() ? " none" : removed.c_str(), added.c_str(), active);
      }
    }
    std::printf("%-15s loss %.3f -> %.3f (last epoch / first epoch %.2f), %.2f s\n", name.c_str(),
                r.epochs.front().loss, r.epochs.back().loss, r.loss_ratio(), seconds);
    bool finite = true;
    for (double v : r.step_loss) finite = finite && std::isfinite(v);
    check(finite, "%s: a step's loss is not finite", name.c_str());
    // "Well below its start": the last epoch's mean loss under 0.6x the first epoch's (the
    // runs reach 0.2-0.45x; README.md lists them).
    check(r.loss_ratio() < 0.6, "%s: last epoch's loss %.4f is not below 0.6x the first's %.4f",
          name.c_str(), r.epochs.back().loss, r.epochs.front().loss);
    results.push_back(std::move(r));
  }

  if (!png_path.empty() && csv_path.empty()) csv_path = png_path + ".csv";
  if (!csv_path.empty()) {
    std::ofstream out(csv_path);
    out << csv_header << "\n";
    for (const auto& r : results) {
      for (const auto& m : r.epochs) {
        out << r.router << ',' << m.epoch + 1 << ',' << m.loss << ',' << m.accuracy << ','
            << m.accuracy_easy << ',' << m.accuracy_hard << ',' << m.aux << ',' << m.mean_k << ','
            << m.mean_k_easy << ',' << m.mean_k_hard << ',' << m.unrouted << ',' << m.imbalance
            << ',' << m.top2_share << ',' << m.active_experts << ',' << m.sparsity << ','
            << m.lambda << ',';
        for (std::size_t i = 0; i < m.load.size(); ++i) out << (i ? ";" : "") << m.load[i];
        out << "\n";
      }
    }
    check(static_cast<bool>(out), "could not write %s", csv_path.c_str());
    std::printf("wrote %s\n", csv_path.c_str());
  }
  if (!png_path.empty()) {
    const char* env = std::getenv("SWITCHYARD_PYTHON");
    const std::string python = env != nullptr && *env != '\0' ? env : "python3";
    const std::string script =
        (std::filesystem::path(__FILE__).parent_path() / "plot.py").string();
    const std::string command = "\"" + python + "\" \"" + script + "\" \"" + csv_path + "\" \"" + png_path + "\"";
    const std::string probe = "\"" + python + "\" -c \"import matplotlib\" >/dev/null 2>&1";
    if (std::filesystem::exists(script) && std::system(probe.c_str()) == 0) {
      const int rc = std::system(command.c_str());
      check(rc == 0, "plot.py failed (exit %d): %s", rc, command.c_str());
      if (rc == 0) std::printf("wrote %s\n", png_path.c_str());
    } else {
      std::printf("no python3 with matplotlib (set SWITCHYARD_PYTHON); to draw the plot run:\n  %s\n",
                  command.c_str());
    }
  }
  if (failed_checks != 0) {
    std::fprintf(stderr, "train_moe: %d check(s) failed\n", failed_checks);
    return 1;
  }
  std::printf("all checks passed\n");
  return 0;
}
