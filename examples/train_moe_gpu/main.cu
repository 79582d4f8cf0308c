// SPDX-License-Identifier: Apache-2.0
// examples/train_moe on the GPU: the same small model (examples/train_moe/trainer.hpp) trained
// with every MoE layer's forward and backward on the CUDA backend (train_moe::cuda_runner,
// examples/train_moe/cuda_runner.cuh) and, for comparison, on the host; for each router the
// GPU runs (topk, topp, dynmoe, adaptive) it prints both loss curves per epoch, then checks
// that the GPU run learns, that its curve follows the host's (within the loose tolerance of
// tests/cuda/test_training.cu: the runs differ by float summation order, and a routing near
// tie may fall the other way), and that a second GPU run gives the same bits.
// Without a GPU it prints why and exits 77 (CTest: Skipped).
//
//   train_moe_gpu [--router topk|topp|dynmoe|adaptive|all] [--epochs N]
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "../train_moe/cuda_runner.cuh"

namespace {
namespace sy = switchyard;  // `using namespace switchyard;` would make `cuda::` ambiguous

int failed_checks = 0;
void check(bool ok, const std::string& router, const std::string& what) {
  if (ok) return;
  ++failed_checks;
  std::fprintf(stderr, "train_moe_gpu CHECK FAILED: %s: %s\n", router.c_str(), what.c_str());
}

//! The host run of the routers the GPU runner runs (only these trainers are instantiated).
train_moe::run_result train_host(const train_moe::config& cfg) {
  const std::string& r = cfg.router;
  if (r == "topk") return train_moe::trainer<train_moe::topk_layer>(cfg).run();
  if (r == "topp") return train_moe::trainer<train_moe::topp_layer>(cfg).run();
  if (r == "adaptive") return train_moe::trainer<train_moe::adaptive_layer>(cfg).run();
  return train_moe::trainer<train_moe::dynmoe_layer>(cfg).run();
}

bool same_curve(const train_moe::run_result& a, const train_moe::run_result& b) {
  if (a.step_loss.size() != b.step_loss.size() || a.epochs.size() != b.epochs.size()) return false;
  if (std::memcmp(a.step_loss.data(), b.step_loss.data(), a.step_loss.size() * sizeof(double)) != 0)
    return false;
  for (std::size_t e = 0; e < a.epochs.size(); ++e) {
    const auto &x = a.epochs[e], &y = b.epochs[e];
    if (std::memcmp(&x.loss, &y.loss, sizeof(double)) != 0 || x.load != y.load ||
        std::memcmp(&x.accuracy, &y.accuracy, sizeof(double)) != 0)
      return false;
  }
  return true;
}

void run_router(const train_moe::config& cfg, train_moe::cuda_runner& runner) {
  const std::string& name = cfg.router;
  const train_moe::run_result host = train_host(cfg);
  const train_moe::run_result gpu = train_moe::train_cuda(cfg, runner);
  const train_moe::run_result again = train_moe::train_cuda(cfg, runner);
  std::printf("\n== %s (%d epochs of %d steps, %d tokens) ==\n", name.c_str(), cfg.epochs,
              cfg.steps_per_epoch, cfg.tokens);
  std::printf("epoch  loss host  loss GPU   rel.diff   acc host  acc GPU  experts/token host  GPU\n");
  for (std::size_t e = 0; e < gpu.epochs.size() && e < host.epochs.size(); ++e) {
    const auto &h = host.epochs[e], &g = gpu.epochs[e];
    const double rel = std::abs(g.loss - h.loss) / h.loss;
    std::printf("%5zu  %.6f   %.6f   %.2e   %.4f    %.4f   %.3f              %.3f\n", e, h.loss, g.loss,
                rel, h.accuracy, g.accuracy, h.mean_k, g.mean_k);
    check(std::isfinite(g.loss), name, "epoch " + std::to_string(e) + ": GPU loss not finite");
    check(rel <= 0.15, name, "epoch " + std::to_string(e) + ": GPU loss differs from the host's by more than 15%");
  }
  std::printf("loss last/first epoch: host %.3f, GPU %.3f; second GPU run %s\n", host.loss_ratio(),
              gpu.loss_ratio(), same_curve(gpu, again) ? "bitwise identical" : "DIFFERENT");
  check(gpu.epochs.size() == host.epochs.size(), name, "epoch counts differ");
  check(gpu.loss_ratio() < 0.6, name, "the GPU run does not learn (last/first epoch loss >= 0.6)");
  check(same_curve(gpu, again), name, "two GPU runs differ (the backend is bitwise reproducible)");
}
}  // namespace

int main(int argc, char** argv) {
  int devices = 0;
  const cudaError_t st = cudaGetDeviceCount(&devices);
  if (st == cudaErrorNoDevice || st == cudaErrorInsufficientDriver || (st == cudaSuccess && devices == 0)) {
    std::printf("SKIPPED: no CUDA device (%s): train_moe_gpu trains on the GPU only\n", cudaGetErrorName(st));
    return 77;
  }
  try {
    sy::cuda::check(st, "cudaGetDeviceCount");
    std::string router = "all";
    train_moe::config cfg = train_moe::config::small();  // the CTest-sized run
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      if (a == "--router" && i + 1 < argc) {
        router = argv[++i];
      } else if (a == "--epochs" && i + 1 < argc) {
        cfg.epochs = std::atoi(argv[++i]);
      } else {
        std::fprintf(stderr, "usage: train_moe_gpu [--router topk|topp|dynmoe|adaptive|all] [--epochs N]\n");
        return 2;
      }
    }
    const auto& names = train_moe::cuda_router_names();
    if (router != "all" && std::find(names.begin(), names.end(), router) == names.end()) {
      std::fprintf(stderr, "train_moe_gpu: router '%s' does not run on the GPU runner (topk, topp, dynmoe, adaptive)\n",
                   router.c_str());
      return 2;
    }
    train_moe::cuda_runner runner;  // one stream context for every run (its copies share it)
    runner.context();
    for (const auto& name : names) {
      if (router != "all" && router != name) continue;
      cfg.router = name;
      run_router(cfg, runner);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "train_moe_gpu CHECK FAILED: exception: %s\n", e.what());
    return 1;
  }
  if (failed_checks != 0) {
    std::fprintf(stderr, "train_moe_gpu: %d check(s) failed\n", failed_checks);
    return 1;
  }
  std::printf("\ntrain_moe_gpu: every check passed\n");
  return 0;
}
