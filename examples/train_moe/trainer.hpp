// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file trainer.hpp
//! A small model trained end to end with Switchyard's MoE layer on the host backend, shared by
//! `examples/train_moe` (the program), `tests/host/training/test_train_moe.cpp` (the papers'
//! behaviours asserted on it) and, later, a GPU run through another layer runner.
//!
//! The task (`train_moe::dataset`) needs routing: every token belongs to a task (its id reaches
//! the model through an embedding) and carries a feature vector u ∈ R^m. Skill s is one bit
//! of u, the XOR of the signs of two projections (not linear in u: an expert FFN must compute
//! it). Easy tasks ask for one skill (2 classes); hard tasks for two at once (4 classes). The
//! experts are small (d_ff = 4, about one skill each), so a hard token is best served by two
//! experts. Every task has its own classes.
//!
//! The model: h0 = embedding[task] + P·u (P trainable, [d, m]); h_{l+1} = h_l + MoE_l(h_l) for
//! `layers` MoE layers (SwiGLU experts with biases, `dispatch::sorted_grouped`); logits =
//! H·h_L + c; softmax cross-entropy. Plain SGD with momentum or Adam, written here (float
//! parameters, double optimizer state, sequential loops: no result depends on the thread
//! count). Everything is seeded (`config::seed`): the data are generated once per run and the
//! batches visited in a fixed order (Adaptive Gating: the curriculum order).
//!
//! Routers by name (`config::router`): topk, topp, dynmoe, adaptive, hypermoe, damoe,
//! deepseek, deepseek-nobias (the same with γ = 0), remoe. `train(cfg)` returns per-epoch
//! metrics and the traces the tests read (README.md beside this file explains each).
//!
//! The layer-runner seam: every MoE forward and backward goes through a `Runner` (default
//! `host_runner`) over HOST buffers — inputs, parameters, outputs and gradients all live in
//! host memory, and the runner returns the plan and the losses in host memory. A GPU runner
//! (a `cuda::stream_context`, device copies of the parameters and activations, uploaded before
//! and downloaded after each call) can replace it without changing the trainer; see
//! `host_runner` for the exact contract.

#include <switchyard/layer/hypermoe_addon.hpp>
#include <switchyard/routing/routers/presets.hpp>
#include <switchyard/switchyard.hpp>
#include <switchyard/training/aux_loss.hpp>
#include <switchyard/training/curriculum.hpp>
#include <switchyard/training/dynmoe_update.hpp>
#include <switchyard/training/grad_accumulation.hpp>
#include <switchyard/training/remoe_controller.hpp>
#include <switchyard/training/selection_bias.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace train_moe {
namespace sy = switchyard;
using sy::index_t;

// ---- configuration ----------------------------------------------------------------------

//! Every knob of a run. The defaults are the example's full run; `small()` the CTest one.
struct config {
  std::string router = "topk";  //!< topk, topp, dynmoe, adaptive, hypermoe, damoe, deepseek, deepseek-nobias, remoe
  int experts = 8;              //!< E (DynMoE: E_max slots)
  int d = 16;                   //!< model width
  int d_ff = 4;                 //!< expert hidden width (SwiGLU: W1 is [E, 2·d_ff, d]): about one skill
  int features = 8;             //!< m, the width of a token's feature vector u
  int skills = 4;               //!< easy tasks (one skill each); hard tasks: skills / 2 (two skills each)
  double label_noise = 0.0;     //!< share of hard tokens whose class is replaced by a random one of their 4
  int layers = 1;               //!< MoE layers (residual blocks)
  int tokens = 64;              //!< tokens per batch (one "sample" of the curriculum)
  int steps_per_epoch = 16;     //!< batches per epoch; the data set holds tokens · steps_per_epoch
  int epochs = 30;              //!< passes over the data set
  std::string optimizer = "adam";  //!< sgd (with momentum) or adam
  double lr = 0.01;                //!< learning rate
  double momentum = 0.9;           //!< SGD momentum
  double beta1 = 0.9, beta2 = 0.999, adam_eps = 1e-8;  //!< Adam
  //! Aux-loss coefficients, `name=value` items (training::parse_coefficients) applied over the
  //! router's defaults; "none" sets every coefficient to 0.
  std::string aux;
  int aux_warmup = 0;      //!< steps of linear warm-up of the aux coefficients (aux_loss_schedule)
  int micro_batches = 1;   //!< gradient accumulation: micro-batches per step (>= 1)
  std::uint64_t seed = 1;  //!< data, initialisation and every random choice
  //! MoELayer::batch_invariant: fixed-order kernels instead of the BLAS, so a run is bitwise
  //! the same on any x86-64 CPU (not only for any thread count): the tests' fixed-seed
  //! assertions then hold on every CI machine, not only up to BLAS rounding.
  bool batch_invariant = true;

  // ---- router knobs ----
  int k = 2;                         //!< top-k, HyperMoE, DeepSeek: experts per token
  float top_p = 0.5f;                //!< top-p threshold
  float dynamic_loss = 1e-4f;        //!< top-p's dynamic (entropy) loss coefficient (> 0; the paper's 1e-4)
  float adaptive_threshold = 0.1f;   //!< Adaptive Gating: top-2 iff p1 − p2 <= threshold
  bool curriculum = true;            //!< Adaptive Gating: curriculum order between epochs
  int damoe_k_max = 4;               //!< DA-MoE: k_max of the importance rule
  float damoe_easy_importance = 0.25f;  //!< DA-MoE: importance of an easy token (hard: 1)
  float deepseek_gamma = 0.01f;      //!< DeepSeek: selection-bias update speed γ
  float remoe_target = 0.75f;        //!< ReMoE: target sparsity (1 − k/E)
  float remoe_lambda = 1e-3f;        //!< ReMoE: initial λ
  //! ReMoE: the controller's step multiplier α (> 1). ReMoE's 1.2 is meant for thousands of
  //! steps; over a hundred, λ grows past what the target needs before the sparsity (which
  //! lags it) answers, and ReLU gates that died stay dead: 1.05 settles near the target.
  float remoe_alpha = 1.05f;
  //! DynMoE: schedule period, in training forwards (one per micro-batch; an update the
  //! schedule asks for runs after the step's optimizer update, never between a forward and
  //! its backward).
  int dynmoe_period = 8;
  std::string dynmoe_mask;           //!< DynMoE: initial mask, '1'/'0' per slot (empty: all active)
  int dynmoe_starved_slot = -1;      //!< DynMoE: slot whose threshold starts unreachable (-1: none)
  float dynmoe_threshold = 0.0f;     //!< DynMoE: initial threshold logit G of the active slots
  int hyper_adapter = 4;             //!< HyperMoE: adapter width a

  //! The CTest-sized run (under a second for every router on one core).
  [[nodiscard]] static config small() {
    config c;
    c.epochs = 8;
    c.steps_per_epoch = 12;
    return c;
  }
};

//! The routers `train` knows, in the order `--router all` runs them.
inline const std::vector<std::string>& router_names() {
  static const std::vector<std::string> names{"topk",     "topp",     "dynmoe",
                                              "adaptive", "hypermoe", "damoe",
                                              "deepseek", "deepseek-nobias", "remoe"};
  return names;
}

// ---- results ----------------------------------------------------------------------------

//! What one epoch measured (averages over its training steps; loads summed over them).
struct epoch_metrics {
  int epoch = 0;
  double loss = 0.0;         //!< mean cross-entropy (the task loss, without aux terms)
  double accuracy = 0.0;     //!< share of tokens whose argmax logit is their class
  double accuracy_easy = 0.0, accuracy_hard = 0.0;
  double aux = 0.0;          //!< mean of the router's aux losses weighted by their coefficients
  double mean_k = 0.0;       //!< experts per token (mean over tokens and layers)
  double mean_k_easy = 0.0, mean_k_hard = 0.0;
  double unrouted = 0.0;     //!< share of (token, layer) pairs routed to no expert
  std::vector<double> load;  //!< [layers · E] (token, expert) pairs per expert, layer-major
  double imbalance = 0.0;    //!< max over layers of max/mean load (active experts only)
  double top2_share = 0.0;   //!< Adaptive Gating: share of tokens routed to two experts
  double active_experts = 0.0;  //!< DynMoE: active slots at the end of the epoch (mean over layers)
  double sparsity = 0.0;     //!< ReMoE: mean measured sparsity (1 − active gates / (T·E))
  double lambda = 0.0;       //!< ReMoE: λ at the end of the epoch
};

//! One DynMoE adaptive update (per layer).
struct dynmoe_event {
  int layer = 0;
  index_t forward = 0;    //!< the schedule's forward count of the forward it followed
  int step = 0;           //!< the optimizer step after which it ran
  std::vector<float> routing_records;   //!< the recorder's tokens per slot
  double sample_sum = 0.0;              //!< Σ of the un-routed tokens' sum (≠ 0: add one)
  std::vector<std::int32_t> mask_before, mask_after;
  index_t removed = 0;
  int added = -1;
  //! The next step's expert-gradient L1 norm per slot (w1, b1, w2, b2), to show masked slots get
  //! none and the added one gets some.
  std::vector<double> next_slot_grad;
};

//! What `train` returns.
struct run_result {
  std::string router;
  std::vector<epoch_metrics> epochs;
  double initial_loss = 0.0;            //!< loss of the first batch before any update
  std::vector<double> step_loss;        //!< loss of every step
  std::vector<std::vector<int>> batch_order;  //!< [epoch][position] batch visited
  //! Adaptive Gating: [epoch][batch · layers + layer] tokens routed to two experts.
  std::vector<std::vector<std::int32_t>> top2_counts;
  std::vector<dynmoe_event> dynmoe_events;
  std::vector<int> active_per_step;     //!< DynMoE: layer 0's active slots at each step's start
  //! Every trained tensor's name and mean |value − initial value| at the end (a tensor every
  //! step left alone, e.g. one whose gradient never arrives, shows 0).
  std::vector<std::pair<std::string, double>> parameter_change;
  //! Last epoch's mean loss over the first epoch's.
  [[nodiscard]] double loss_ratio() const {
    return epochs.empty() ? 1.0 : epochs.back().loss / epochs.front().loss;
  }
};

// ---- random numbers (own transforms: the same numbers with any standard library) --------

//! A seeded generator: 53-bit uniforms from mt19937_64 and Box-Muller normals.
struct rng {
  std::mt19937_64 gen;
  explicit rng(std::uint64_t seed) : gen(seed) {}
  double uniform() { return static_cast<double>(gen() >> 11) * 0x1.0p-53; }
  double normal() {
    const double u1 = 1.0 - uniform(), u2 = uniform();
    return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
  }
  int below(int n) { return static_cast<int>(gen() % static_cast<std::uint64_t>(n)); }
};

// ---- the data -----------------------------------------------------------------------------

//! The synthetic task (see the file comment), generated once per run. Skill s of `skills`
//! is one bit of u: [(a_s·u)(b_s·u) > 0] (the XOR of two signs: not linear in u). Easy task
//! s < skills asks for skill s (2 classes); hard task h asks for skills 2h and 2h + 1 at once
//! (4 classes: 2·bit_2h + bit_2h+1). Every task has its own classes.
struct dataset {
  int skills = 0, tasks = 0, features = 0, classes = 0;
  std::vector<int> task, label;  //!< [N]
  std::vector<float> u;          //!< [N, m]
  [[nodiscard]] bool hard(int n) const { return task[static_cast<std::size_t>(n)] >= skills; }
  [[nodiscard]] int size() const { return static_cast<int>(task.size()); }

  dataset(int n, int skills_, int m, double noise, rng& r)
      : skills(skills_), tasks(skills_ + skills_ / 2), features(m) {
    std::vector<int> base(static_cast<std::size_t>(tasks));
    for (int s = 0; s < tasks; ++s) {
      base[static_cast<std::size_t>(s)] = classes;
      classes += s < skills ? 2 : 4;
    }
    std::vector<double> proj(static_cast<std::size_t>(skills) * 2 * m);  // a_s, b_s
    for (auto& v : proj) v = r.normal();
    task.resize(static_cast<std::size_t>(n));
    label.resize(static_cast<std::size_t>(n));
    u.resize(static_cast<std::size_t>(n) * m);
    std::vector<double> uu(static_cast<std::size_t>(m));
    auto bit = [&](int s) {
      double a = 0, b = 0;
      for (int j = 0; j < m; ++j) {
        a += proj[(static_cast<std::size_t>(s) * 2) * m + j] * uu[static_cast<std::size_t>(j)];
        b += proj[(static_cast<std::size_t>(s) * 2 + 1) * m + j] * uu[static_cast<std::size_t>(j)];
      }
      return a * b > 0.0 ? 1 : 0;
    };
    for (int i = 0; i < n; ++i) {
      const int s = r.below(tasks);
      task[static_cast<std::size_t>(i)] = s;
      for (int j = 0; j < m; ++j) {
        uu[static_cast<std::size_t>(j)] = r.normal();
        u[static_cast<std::size_t>(i) * m + j] = static_cast<float>(uu[static_cast<std::size_t>(j)]);
      }
      int& y = label[static_cast<std::size_t>(i)];
      if (s < skills) {
        y = base[static_cast<std::size_t>(s)] + bit(s);
      } else {
        const int h = s - skills;
        y = base[static_cast<std::size_t>(s)] + 2 * bit(2 * h) + bit(2 * h + 1);
        if (noise > 0.0 && r.uniform() < noise) y = base[static_cast<std::size_t>(s)] + r.below(4);
      }
    }
  }
};

// ---- parameters and the optimizers ---------------------------------------------------------

//! One trainable tensor: value, gradient buffer (each micro-batch's backward accumulates
//! into it; after `gradient_accumulator::finish` it holds the step's gradient) and the
//! optimizer state. `slots` > 0 marks a tensor split over DynMoE's expert slots: along its
//! first axis (`slot_major`) or its last (w_gate [d, E_max]); masked slots are not updated.
struct tensor {
  std::string name;
  std::vector<float> value, buffer;
  std::vector<double> m, v;
  int slots = 0;
  bool slot_major = true;
  int layer = -1;  //!< the layer whose DynMoE mask governs the slots

  [[nodiscard]] std::size_t size() const { return value.size(); }
  [[nodiscard]] int slot_of(std::size_t i) const {
    return slot_major ? static_cast<int>(i / (size() / static_cast<std::size_t>(slots)))
                      : static_cast<int>(i % static_cast<std::size_t>(slots));
  }
};

//! The parameters of the model, by index.
class parameter_store {
 public:
  //! Adds a tensor of n values drawn normal(0, scale) (scale 0: zeros; negative: uniform
  //! ±|scale|); returns its index.
  int add(std::string name, std::size_t n, double scale, rng& r) {
    tensor t;
    t.name = std::move(name);
    t.value.resize(n);
    for (auto& x : t.value) {
      x = scale == 0.0 ? 0.0f
                       : static_cast<float>(scale > 0.0 ? scale * r.normal()
                                                        : -scale * (2.0 * r.uniform() - 1.0));
    }
    t.buffer.assign(n, 0.0f);
    t.m.assign(n, 0.0);
    t.v.assign(n, 0.0);
    tensors_.push_back(std::move(t));
    return static_cast<int>(tensors_.size()) - 1;
  }
  tensor& operator[](int i) { return tensors_[static_cast<std::size_t>(i)]; }
  const tensor& operator[](int i) const { return tensors_[static_cast<std::size_t>(i)]; }
  std::vector<tensor>& all() { return tensors_; }
  float* value(int i) { return tensors_[static_cast<std::size_t>(i)].value.data(); }
  float* buffer(int i) { return tensors_[static_cast<std::size_t>(i)].buffer.data(); }

 private:
  std::vector<tensor> tensors_;
};

//! SGD with momentum or Adam over every tensor; slots masked in `masks[layer]` are skipped.
struct optimizer {
  std::string kind = "adam";
  double lr = 0.01, momentum = 0.9, beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  long steps = 0;

  void step(parameter_store& store, const std::vector<std::vector<std::int32_t>>& masks) {
    ++steps;
    const double c1 = 1.0 - std::pow(beta1, static_cast<double>(steps));
    const double c2 = 1.0 - std::pow(beta2, static_cast<double>(steps));
    for (auto& t : store.all()) {
      for (std::size_t i = 0; i < t.size(); ++i) {
        if (t.slots > 0 && masks[static_cast<std::size_t>(t.layer)][static_cast<std::size_t>(t.slot_of(i))] == 0)
          continue;
        const double g = t.buffer[i];
        double delta;
        if (kind == "sgd") {
          t.m[i] = momentum * t.m[i] + g;
          delta = lr * t.m[i];
        } else {
          t.m[i] = beta1 * t.m[i] + (1.0 - beta1) * g;
          t.v[i] = beta2 * t.v[i] + (1.0 - beta2) * g * g;
          delta = lr * (t.m[i] / c1) / (std::sqrt(t.v[i] / c2) + eps);
        }
        t.value[i] = static_cast<float>(static_cast<double>(t.value[i]) - delta);
      }
    }
  }
};

// ---- the layer-runner seam ------------------------------------------------------------------

//! What a runner keeps per MoE layer between a forward and its backward (host runner: the
//! host-owned result and the two workspaces, grown once to the largest micro-batch).
template <class Layer>
struct host_layer_state {
  typename Layer::result_type result;
  std::vector<std::byte> forward_ws, backward_ws;
};

//! Runs one MoE layer on the host backend. The contract a GPU runner must keep:
//! - `state<Layer>`: default-constructible, one per layer, reused every step;
//! - `forward(layer, state, x, rp, w, y, ap)`: x [T, d], y [T, d] (overwritten), the router
//!   params `rp`, the expert weights `w` and the add-on params `ap` are views of HOST memory;
//! - `plan(state)` / `losses(state)`: the last forward's plan and aux losses in HOST memory
//!   (a GPU runner downloads them after its forward); the trainer reads them for its metrics
//!   and DynMoE's recorder, and never writes them;
//! - `backward(layer, state, x, rp, w, dy, coeffs, dx, grads, rgrads, ap, ag)`: HOST views;
//!   dx and every gradient view ACCUMULATE (+=), as `MoELayer::backward` does.
//! The trainer calls forward then backward on the same state with the same x and parameters.
struct host_runner {
  template <class Layer>
  using state = host_layer_state<Layer>;
  sy::host_context ctx{};

  template <class Layer>
  void forward(const Layer& layer, state<Layer>& s, sy::matrix_view<const float> x,
               const typename Layer::router_params& rp, const sy::expert_weights<float>& w,
               sy::matrix_view<float> y, const typename Layer::addon_params& ap) const {
    const auto bytes = layer.workspace_size(ctx, x.extent(0), rp, w, ap);
    if (s.forward_ws.size() < bytes) s.forward_ws.resize(bytes);
    layer.forward(ctx, x, rp, w, y, s.result, s.forward_ws, ap);
  }
  template <class Layer>
  sy::routing::plan_ref plan(state<Layer>& s) const {
    return s.result.plan.ref();
  }
  template <class Layer>
  const typename Layer::losses_type& losses(const state<Layer>& s) const {
    return s.result.losses;
  }
  template <class Layer>
  void backward(const Layer& layer, state<Layer>& s, sy::matrix_view<const float> x,
                const typename Layer::router_params& rp, const sy::expert_weights<float>& w,
                sy::matrix_view<const float> dy, const typename Layer::losses_type& coeffs,
                sy::matrix_view<float> dx, const sy::expert_grads& grads,
                const typename Layer::router_grads& rgrads,
                const typename Layer::addon_params& ap,
                const typename Layer::addon_grads& ag) const {
    const auto bytes = layer.backward_workspace_size(ctx, x.extent(0), rp, w, ap);
    if (s.backward_ws.size() < bytes) s.backward_ws.resize(bytes);
    layer.backward(ctx, x, rp, w, s.result, dy, coeffs, dx, grads, rgrads, s.backward_ws, ap, ag);
  }
};

// ---- the layers, one type per router ----------------------------------------------------------

using swiglu = sy::activation::swiglu;
using topk_layer = sy::MoELayer<sy::routers::TopK, swiglu>;
using topp_layer = sy::MoELayer<sy::routers::TopP, swiglu>;
using dynmoe_layer = sy::MoELayer<sy::routers::DynMoE, swiglu>;
using adaptive_layer = sy::MoELayer<sy::routers::AdaptiveGating, swiglu>;
using hypermoe_layer =
    sy::MoELayer<sy::routers::TopK, swiglu, sy::dispatch::sorted_grouped, sy::layer::hypermoe_addon>;
using damoe_layer = sy::MoELayer<sy::routers::DAMoE<sy::routing::importance::precomputed>, swiglu>;
using deepseek_layer = sy::MoELayer<sy::routers::ScoredTopK, swiglu>;
using remoe_layer = sy::MoELayer<sy::routers::ReMoE, swiglu>;

namespace detail {
template <class Layer, class Router>
inline constexpr bool routed_by = std::is_same_v<typename Layer::router_type, Router>;
}  // namespace detail

//! The model, its optimizer and the loop, for one layer type. `Runner`: the seam above.
template <class Layer, class Runner = host_runner>
class trainer {
  using router_type = typename Layer::router_type;
  using losses_type = typename Layer::losses_type;
  static constexpr bool is_dynmoe = detail::routed_by<Layer, sy::routers::DynMoE>;
  static constexpr bool is_adaptive = detail::routed_by<Layer, sy::routers::AdaptiveGating>;
  static constexpr bool is_scored = detail::routed_by<Layer, sy::routers::ScoredTopK>;
  static constexpr bool is_remoe = detail::routed_by<Layer, sy::routers::ReMoE>;
  static constexpr bool is_damoe =
      std::is_same_v<typename Layer::router_params, sy::routing::da_moe_params>;
  static constexpr bool has_hyper = Layer::has_addon;

  // per layer: tensor ids and router state
  struct block {
    Layer layer;
    int w1 = -1, b1 = -1, w2 = -1, b2 = -1, router_w = -1, thresholds = -1;
    int hyper[5] = {-1, -1, -1, -1, -1};  // expert_emb, process1 (w, b), process2 (w, b)
    std::vector<float> selection_bias;     // DeepSeek
    std::vector<std::int32_t> mask;        // DynMoE (always sized E: all 1 for other routers)
    sy::training::dynmoe_recorder recorder;
    sy::training::dynmoe_schedule schedule;
    bool update_pending = false;
    index_t update_forward = 0;
    typename Runner::template state<Layer> state;
  };

 public:
  trainer(const config& cfg, Runner runner = {})
      : cfg_(cfg), runner_(std::move(runner)), rng_(cfg.seed),
        data_(cfg.tokens * cfg.steps_per_epoch, cfg.skills, cfg.features, cfg.label_noise, rng_) {
    check_config();
    const int E = cfg.experts, d = cfg.d, f = cfg.d_ff, m = cfg.features;
    emb_ = store_.add("embedding", static_cast<std::size_t>(data_.tasks) * d, 1.0, rng_);
    proj_ = store_.add("P", static_cast<std::size_t>(d) * m, 1.0 / std::sqrt(m), rng_);
    head_ = store_.add("H", static_cast<std::size_t>(data_.classes) * d, 0.5 / std::sqrt(d), rng_);
    head_b_ = store_.add("c", static_cast<std::size_t>(data_.classes), 0.0, rng_);
    if constexpr (has_hyper) make_hyper_generator();
    blocks_.resize(static_cast<std::size_t>(cfg.layers));
    for (int l = 0; l < cfg.layers; ++l) {
      block& b = blocks_[static_cast<std::size_t>(l)];
      b.layer = make_layer(l);
      b.mask.assign(static_cast<std::size_t>(E), 1);
      b.w1 = store_.add("w1", static_cast<std::size_t>(E) * 2 * f * d, 1.0 / std::sqrt(d), rng_);
      b.b1 = store_.add("b1", static_cast<std::size_t>(E) * 2 * f, 0.0, rng_);
      b.w2 = store_.add("w2", static_cast<std::size_t>(E) * d * f, 0.5 / std::sqrt(f), rng_);
      b.b2 = store_.add("b2", static_cast<std::size_t>(E) * d, 0.0, rng_);
      if constexpr (is_dynmoe) {
        b.router_w = store_.add("w_gate", static_cast<std::size_t>(d) * E, 1.0, rng_);
        b.thresholds = store_.add("thresholds", static_cast<std::size_t>(E), 0.0, rng_);
        for (int e = 0; e < E; ++e) {
          b.mask[static_cast<std::size_t>(e)] =
              cfg.dynmoe_mask.empty() ? 1 : (cfg.dynmoe_mask[static_cast<std::size_t>(e)] == '1');
          store_[b.thresholds].value[static_cast<std::size_t>(e)] =
              e == cfg.dynmoe_starved_slot ? 20.0f : cfg.dynmoe_threshold;
        }
        for (int id : std::array<int, 6>{b.w1, b.b1, b.w2, b.b2, b.router_w, b.thresholds}) {
          store_[id].slots = E;
          store_[id].layer = l;
        }
        store_[b.router_w].slot_major = false;
        b.schedule.period = cfg.dynmoe_period;
      } else {
        b.router_w = store_.add("router", static_cast<std::size_t>(E) * d, 0.1, rng_);
      }
      if constexpr (is_scored) b.selection_bias.assign(static_cast<std::size_t>(E), 0.0f);
      if constexpr (has_hyper) make_hyper_layer(b);
    }
    coefficients_ = default_coefficients();
    if (cfg.aux == "none") {
      coefficients_ = sy::training::scale_coefficients(coefficients_, 0.0f);
    } else if (!cfg.aux.empty()) {
      coefficients_ = sy::training::parse_coefficients<losses_type>(cfg.aux, coefficients_);
    }
    controller_.target_sparsity = cfg.remoe_target;
    controller_.lambda = cfg.remoe_lambda;
    controller_.alpha = cfg.remoe_alpha;
    opt_.kind = cfg.optimizer;
    opt_.lr = cfg.lr;
    opt_.momentum = cfg.momentum;
    opt_.beta1 = cfg.beta1;
    opt_.beta2 = cfg.beta2;
    opt_.eps = cfg.adam_eps;
  }

  //! Trains `cfg.epochs` epochs and returns the metrics and traces.
  run_result run() {
    run_result out;
    out.router = cfg_.router;
    const int batches = cfg_.steps_per_epoch, L = cfg_.layers;
    std::vector<int> order(static_cast<std::size_t>(batches));
    for (int i = 0; i < batches; ++i) order[static_cast<std::size_t>(i)] = i;
    sy::training::aux_loss_schedule<losses_type> aux_schedule{.coefficients = coefficients_,
                                                              .warmup_steps = cfg_.aux_warmup};
    int step = 0;
    std::vector<std::vector<float>> initial;
    for (const auto& t : store_.all()) initial.push_back(t.value);
    out.initial_loss = evaluate_batch(0);
    for (int epoch = 0; epoch < cfg_.epochs; ++epoch) {
      out.batch_order.push_back(order);
      std::vector<std::int32_t> top2(static_cast<std::size_t>(batches) * L, 0);
      epoch_sums sums(cfg_.experts, L);
      for (int pos = 0; pos < batches; ++pos) {
        const int batch = order[static_cast<std::size_t>(pos)];
        if constexpr (is_dynmoe) out.active_per_step.push_back(active(0));
        losses_type coeffs = aux_schedule.at(step);
        if constexpr (is_remoe) coeffs.l1 = controller_.lambda;
        const double loss = train_step(batch, coeffs, sums, top2.data() + batch * L, out, step);
        out.step_loss.push_back(loss);
        ++step;
      }
      out.top2_counts.push_back(top2);
      out.epochs.push_back(sums.finish(epoch, *this));
      if constexpr (is_adaptive) {
        if (cfg_.curriculum) {
          const std::vector<std::int32_t> seq_len(static_cast<std::size_t>(batches), cfg_.tokens);
          const auto c = sy::training::curriculum_order(
              sy::make_view<const std::int32_t>(top2.data(), batches, L),
              sy::make_view<const std::int32_t>(seq_len.data(), batches));
          order.assign(c.order.begin(), c.order.end());
        }
      }
    }
    for (std::size_t i = 0; i < store_.all().size(); ++i) {
      const tensor& t = store_.all()[i];
      double change = 0;
      for (std::size_t j = 0; j < t.size(); ++j)
        change += std::abs(static_cast<double>(t.value[j]) - initial[i][j]);
      out.parameter_change.emplace_back(t.name, change / static_cast<double>(t.size()));
    }
    return out;
  }

 private:
  // ---- per-epoch sums ----
  struct epoch_sums {
    double loss = 0, correct = 0, correct_easy = 0, correct_hard = 0, tokens = 0, easy = 0,
           hard = 0, aux = 0, k = 0, k_easy = 0, k_hard = 0, unrouted = 0, two = 0,
           sparsity = 0, steps = 0, routed_tokens = 0;
    std::vector<double> load;
    int experts, layers;
    epoch_sums(int e, int l) : load(static_cast<std::size_t>(e) * l, 0.0), experts(e), layers(l) {}
    epoch_metrics finish(int epoch, const trainer& tr) const {
      epoch_metrics m;
      m.epoch = epoch;
      m.loss = loss / steps;
      m.accuracy = correct / tokens;
      m.accuracy_easy = easy > 0 ? correct_easy / easy : 0.0;
      m.accuracy_hard = hard > 0 ? correct_hard / hard : 0.0;
      m.aux = aux / steps;
      m.mean_k = k / routed_tokens;
      m.mean_k_easy = easy > 0 ? k_easy / (easy * layers) : 0.0;
      m.mean_k_hard = hard > 0 ? k_hard / (hard * layers) : 0.0;
      m.unrouted = unrouted / routed_tokens;
      m.top2_share = two / routed_tokens;
      m.sparsity = sparsity / (steps * layers);
      m.lambda = is_remoe ? tr.controller_.lambda : 0.0;
      m.load = load;
      double active_sum = 0;
      for (int l = 0; l < layers; ++l) {
        double mx = 0, total = 0;
        int n = 0;
        for (int e = 0; e < experts; ++e) {
          if (tr.blocks_[static_cast<std::size_t>(l)].mask[static_cast<std::size_t>(e)] == 0) continue;
          const double v = load[static_cast<std::size_t>(l) * experts + e];
          mx = std::max(mx, v);
          total += v;
          ++n;
        }
        if (total > 0) m.imbalance = std::max(m.imbalance, mx / (total / n));
        active_sum += n;
      }
      m.active_experts = active_sum / layers;
      return m;
    }
  };

  int active(int l) const {
    int n = 0;
    for (auto v : blocks_[static_cast<std::size_t>(l)].mask) n += v != 0;
    return n;
  }

  void check_config() const {
    auto need = [](bool ok, const std::string& what) {
      if (!ok) throw std::invalid_argument("train_moe: " + what);
    };
    need(cfg_.experts >= 2 && cfg_.d >= 1 && cfg_.d_ff >= 1 && cfg_.features >= 1,
         "experts >= 2, d, d_ff, features >= 1");
    need(cfg_.skills >= 2 && cfg_.skills % 2 == 0 && cfg_.layers >= 1 && cfg_.tokens >= 1,
         "skills even and >= 2, layers, tokens >= 1");
    need(cfg_.steps_per_epoch >= 1 && cfg_.epochs >= 1, "steps_per_epoch and epochs >= 1");
    need(cfg_.micro_batches >= 1 && cfg_.micro_batches <= cfg_.tokens,
         "micro_batches in [1, tokens]");
    need(cfg_.optimizer == "sgd" || cfg_.optimizer == "adam", "optimizer is sgd or adam");
    need(cfg_.dynmoe_mask.empty() || static_cast<int>(cfg_.dynmoe_mask.size()) == cfg_.experts,
         "dynmoe_mask has one character per expert slot");
  }

  Layer make_layer(int l) const {
    Layer layer{};
    layer.batch_invariant = cfg_.batch_invariant;
    if constexpr (detail::routed_by<Layer, sy::routers::TopK>) {
      layer.router.k = cfg_.k;
      if constexpr (has_hyper) layer.addon.hyper = {.layer_idx = l, .adapter_dim = cfg_.hyper_adapter};
    } else if constexpr (detail::routed_by<Layer, sy::routers::TopP>) {
      layer.router.p = cfg_.top_p;
    } else if constexpr (is_adaptive) {
      layer.router.threshold = cfg_.adaptive_threshold;
    } else if constexpr (is_damoe) {
      layer.router.k_rule = {.k_min = 1, .k_max = cfg_.damoe_k_max};
    } else if constexpr (is_scored) {
      layer.router = sy::routers::presets::deepseek_v3(cfg_.k);
    } else if constexpr (is_remoe) {
      layer.router.max_k = cfg_.experts;  // no cap: the controller alone sets the sparsity
    }
    (void)l;
    return layer;
  }

  losses_type default_coefficients() const {
    losses_type c{};
    if constexpr (std::is_same_v<losses_type, sy::routing::softmax_router_losses>) {
      c.lb_topk = 0.01f;
    } else if constexpr (std::is_same_v<losses_type, sy::routing::topp_losses>) {
      c.dynamic_loss = cfg_.dynamic_loss;
      c.lb_loss = 0.01f;
    } else if constexpr (std::is_same_v<losses_type, sy::routing::dynmoe_losses>) {
      c = sy::routing::dynmoe_losses::deepspeed();
    } else if constexpr (std::is_same_v<losses_type, sy::routing::adaptive_gating_losses>) {
      c.lb_loss = 0.01f;
    }  // DeepSeek: aux-loss free; ReMoE: l1 = the controller's λ, set every step
    return c;
  }

  // ---- HyperMoE parameters ----
  int gen_[11] = {};  // layer_embed, linear1 (w, b), weight_up, weight_down, bias_up, bias_down (w, b each)
  static constexpr int d_emb = 4, p_dim = 8, h_in = 4, d_le = 2, bott = 4;
  void make_hyper_generator() {
    const int d = cfg_.d, a = cfg_.hyper_adapter, L = cfg_.layers;
    gen_[0] = store_.add("layer_embed", static_cast<std::size_t>(L) * d_le, 1.0, rng_);
    gen_[1] = store_.add("linear1.w", static_cast<std::size_t>(bott) * (h_in + d_le),
                         1.0 / std::sqrt(h_in + d_le), rng_);
    gen_[2] = store_.add("linear1.b", bott, 0.0, rng_);
    // The heads start small, as HyperMoE's "hyperfanin" init (uniform ±bound) has them, at 100×
    // its bound so that a run of a few hundred steps moves the generated adapter.
    const double up = sy::layer::hyperfanin_bound(bott, a), down = sy::layer::hyperfanin_bound(bott, d);
    gen_[3] = store_.add("weight_up.w", static_cast<std::size_t>(a) * d * bott, -up * 100, rng_);
    gen_[4] = store_.add("weight_up.b", static_cast<std::size_t>(a) * d, 0.0, rng_);
    gen_[5] = store_.add("weight_down.w", static_cast<std::size_t>(d) * a * bott, -down * 100, rng_);
    gen_[6] = store_.add("weight_down.b", static_cast<std::size_t>(d) * a, 0.0, rng_);
    gen_[7] = store_.add("bias_up.w", static_cast<std::size_t>(d) * bott, -sy::layer::hyperfanin_bound(bott, 1) * 100, rng_);
    gen_[8] = store_.add("bias_up.b", static_cast<std::size_t>(d), 0.0, rng_);
    gen_[9] = store_.add("bias_down.w", static_cast<std::size_t>(a) * bott, -sy::layer::hyperfanin_bound(bott, 1) * 100, rng_);
    gen_[10] = store_.add("bias_down.b", static_cast<std::size_t>(a), 0.0, rng_);
  }
  void make_hyper_layer(block& b) {
    const int E = cfg_.experts;
    b.hyper[0] = store_.add("expert_emb", static_cast<std::size_t>(E) * d_emb, 1.0, rng_);
    b.hyper[1] = store_.add("process1.w", static_cast<std::size_t>(p_dim) * d_emb, 1.0 / std::sqrt(d_emb), rng_);
    b.hyper[2] = store_.add("process1.b", p_dim, 0.0, rng_);
    b.hyper[3] = store_.add("process2.w", static_cast<std::size_t>(h_in) * p_dim, 1.0 / std::sqrt(p_dim), rng_);
    b.hyper[4] = store_.add("process2.b", h_in, 0.0, rng_);
  }
  sy::layer::hypermoe_params hyper_params(const block& b) {
    const int d = cfg_.d, a = cfg_.hyper_adapter, L = cfg_.layers;
    auto m = [&](int id, index_t r, index_t c) { return sy::make_view<const float>(store_.value(id), r, c); };
    auto v = [&](int id, index_t n) { return sy::make_view<const float>(store_.value(id), n); };
    sy::layer::hypermoe_params p;
    p.expert_emb = m(b.hyper[0], cfg_.experts, d_emb);
    p.process1 = {m(b.hyper[1], p_dim, d_emb), v(b.hyper[2], p_dim)};
    p.process2 = {m(b.hyper[3], h_in, p_dim), v(b.hyper[4], h_in)};
    p.generator.layer_embed = m(gen_[0], L, d_le);
    p.generator.linear1 = {m(gen_[1], bott, h_in + d_le), v(gen_[2], bott)};
    p.generator.weight_up = {m(gen_[3], static_cast<index_t>(a) * d, bott), v(gen_[4], static_cast<index_t>(a) * d)};
    p.generator.weight_down = {m(gen_[5], static_cast<index_t>(d) * a, bott), v(gen_[6], static_cast<index_t>(d) * a)};
    p.generator.bias_up = {m(gen_[7], d, bott), v(gen_[8], d)};
    p.generator.bias_down = {m(gen_[9], a, bott), v(gen_[10], a)};
    return p;
  }
  sy::layer::hypermoe_grads hyper_grads(const block& b) {
    const int d = cfg_.d, a = cfg_.hyper_adapter, L = cfg_.layers;
    auto m = [&](int id, index_t r, index_t c) { return sy::make_view(store_.buffer(id), r, c); };
    auto v = [&](int id, index_t n) { return sy::make_view(store_.buffer(id), n); };
    sy::layer::hypermoe_grads g;
    g.expert_emb = m(b.hyper[0], cfg_.experts, d_emb);
    g.process1 = {m(b.hyper[1], p_dim, d_emb), v(b.hyper[2], p_dim)};
    g.process2 = {m(b.hyper[3], h_in, p_dim), v(b.hyper[4], h_in)};
    g.generator.layer_embed = m(gen_[0], L, d_le);
    g.generator.linear1 = {m(gen_[1], bott, h_in + d_le), v(gen_[2], bott)};
    g.generator.weight_up = {m(gen_[3], static_cast<index_t>(a) * d, bott), v(gen_[4], static_cast<index_t>(a) * d)};
    g.generator.weight_down = {m(gen_[5], static_cast<index_t>(d) * a, bott), v(gen_[6], static_cast<index_t>(d) * a)};
    g.generator.bias_up = {m(gen_[7], d, bott), v(gen_[8], d)};
    g.generator.bias_down = {m(gen_[9], a, bott), v(gen_[10], a)};
    return g;
  }

  // ---- views of one layer's parameters ----
  sy::expert_weights<float> weights(const block& b) {
    const index_t E = cfg_.experts, d = cfg_.d, f = cfg_.d_ff;
    return {sy::make_view<const float>(store_.value(b.w1), E, 2 * f, d),
            sy::make_view<const float>(store_.value(b.b1), E, 2 * f),
            sy::make_view<const float>(store_.value(b.w2), E, d, f),
            sy::make_view<const float>(store_.value(b.b2), E, d)};
  }
  sy::expert_grads weight_grads(const block& b) {
    const index_t E = cfg_.experts, d = cfg_.d, f = cfg_.d_ff;
    return {sy::make_view(store_.buffer(b.w1), E, 2 * f, d), sy::make_view(store_.buffer(b.b1), E, 2 * f),
            sy::make_view(store_.buffer(b.w2), E, d, f), sy::make_view(store_.buffer(b.b2), E, d)};
  }
  typename Layer::router_params router_params(const block& b, const float* importance, index_t n) {
    const index_t E = cfg_.experts, d = cfg_.d;
    if constexpr (is_dynmoe) {
      return {sy::make_view<const float>(store_.value(b.router_w), d, E),
              sy::make_view<const float>(store_.value(b.thresholds), E),
              sy::make_view<const std::int32_t>(b.mask.data(), E), 0.0f};
    } else if constexpr (is_damoe) {
      typename Layer::router_params p{};
      p.w = sy::make_view<const float>(store_.value(b.router_w), E, d);
      p.importance = sy::make_view<const float>(importance, n);
      return p;
    } else if constexpr (is_scored) {
      typename Layer::router_params p{};
      p.w = sy::make_view<const float>(store_.value(b.router_w), E, d);
      p.selection_bias = sy::make_view<const float>(b.selection_bias.data(), E);
      return p;
    } else {
      (void)importance;
      (void)n;
      return {sy::make_view<const float>(store_.value(b.router_w), E, d)};
    }
  }
  typename Layer::router_grads router_grads(const block& b) {
    const index_t E = cfg_.experts, d = cfg_.d;
    if constexpr (is_dynmoe) {
      return {sy::make_view(store_.buffer(b.router_w), d, E), sy::make_view(store_.buffer(b.thresholds), E)};
    } else {
      typename Layer::router_grads g{};
      g.w = sy::make_view(store_.buffer(b.router_w), E, d);
      return g;
    }
  }

  // ---- the model ----
  //! h0 [n, d] of tokens [first, first + n).
  void embed(int first, int n, std::vector<float>& h0) {
    const int d = cfg_.d, m = cfg_.features;
    h0.assign(static_cast<std::size_t>(n) * d, 0.0f);
    const float* emb = store_.value(emb_);
    const float* P = store_.value(proj_);
    for (int t = 0; t < n; ++t) {
      const int i = first + t;
      const float* u = &data_.u[static_cast<std::size_t>(i) * m];
      for (int r = 0; r < d; ++r) {
        double s = emb[static_cast<std::size_t>(data_.task[i]) * d + r];
        for (int j = 0; j < m; ++j) s += static_cast<double>(P[static_cast<std::size_t>(r) * m + j]) * u[j];
        h0[static_cast<std::size_t>(t) * d + r] = static_cast<float>(s);
      }
    }
  }

  //! Loss of batch `batch` with the current parameters, without training (nothing recorded).
  double evaluate_batch(int batch) {
    const int n = cfg_.tokens, first = batch * n;
    std::vector<float> h;
    embed(first, n, h);
    std::vector<float> y(h.size());
    std::vector<float> importance = importances(first, n);
    for (auto& b : blocks_) {
      forward_layer(b, h, y, n, importance.data());
      for (std::size_t i = 0; i < h.size(); ++i) h[i] += y[i];
    }
    double loss = 0;
    std::vector<double> p(static_cast<std::size_t>(data_.classes));
    for (int t = 0; t < n; ++t) loss += head(h.data() + static_cast<std::size_t>(t) * cfg_.d, first + t, p);
    return loss / n;
  }

  std::vector<float> importances(int first, int n) const {
    std::vector<float> imp(static_cast<std::size_t>(n), 1.0f);
    for (int t = 0; t < n; ++t)
      imp[static_cast<std::size_t>(t)] = data_.hard(first + t) ? 1.0f : cfg_.damoe_easy_importance;
    return imp;
  }

  void forward_layer(block& b, const std::vector<float>& x, std::vector<float>& y, int n,
                     const float* importance) {
    typename Layer::addon_params ap{};
    if constexpr (has_hyper) ap = hyper_params(b);
    runner_.forward(b.layer, b.state, sy::make_view<const float>(x.data(), n, cfg_.d),
                    router_params(b, importance, n), weights(b), sy::make_view(y.data(), n, cfg_.d), ap);
  }

  //! Softmax cross-entropy of token `i` from h [d]; p receives the probabilities.
  double head(const float* h, int i, std::vector<double>& p) {
    const int C = data_.classes, d = cfg_.d;
    const float* H = store_.value(head_);
    const float* c = store_.value(head_b_);
    double mx = -1e300;
    for (int k = 0; k < C; ++k) {
      double s = c[k];
      for (int r = 0; r < d; ++r) s += static_cast<double>(H[static_cast<std::size_t>(k) * d + r]) * h[r];
      p[static_cast<std::size_t>(k)] = s;
      mx = std::max(mx, s);
    }
    double z = 0;
    for (int k = 0; k < C; ++k) z += std::exp(p[static_cast<std::size_t>(k)] - mx);
    const double lse = mx + std::log(z);
    const double loss = lse - p[static_cast<std::size_t>(data_.label[i])];
    for (int k = 0; k < C; ++k) p[static_cast<std::size_t>(k)] = std::exp(p[static_cast<std::size_t>(k)] - lse);
    return loss;
  }

  //! One optimizer step over batch `batch` (its micro-batches accumulated); returns its loss.
  double train_step(int batch, const losses_type& coeffs, epoch_sums& sums, std::int32_t* top2,
                    run_result& out, int step) {
    const int T = cfg_.tokens, M = cfg_.micro_batches, L = cfg_.layers, d = cfg_.d, E = cfg_.experts;
    sy::training::gradient_accumulator& acc = accumulator();
    acc.begin_step();
    const sy::training::micro_batches split{.tokens = T, .count = M};
    double step_loss = 0, step_aux = 0, sparsity = 0;
    std::vector<std::vector<index_t>> step_load(static_cast<std::size_t>(L), std::vector<index_t>(static_cast<std::size_t>(E), 0));
    for (int mb = 0; mb < M; ++mb) {
      // micro-batch mb: its tokens of the batch, its share of them as the weight
      const int lo = static_cast<int>(split.begin(mb)), n = static_cast<int>(split.size(mb));
      const int first = batch * T + lo;
      const double weight = split.weight(mb);
      acc.zero_buffers();
      std::vector<std::vector<float>> h(static_cast<std::size_t>(L) + 1);
      embed(first, n, h[0]);
      const std::vector<float> importance = importances(first, n);
      std::vector<float> y(static_cast<std::size_t>(n) * d);
      for (int l = 0; l < L; ++l) {
        block& b = blocks_[static_cast<std::size_t>(l)];
        sy::training::dynmoe_schedule::step sched{};
        if constexpr (is_dynmoe) {
          const index_t count = b.schedule.forward_count;
          sched = b.schedule.on_forward(true);
          if (sched.begin_recording) b.recorder.reset(E, d);
          if (sched.update) {
            b.update_pending = true;
            b.update_forward = count;
          }
        }
        forward_layer(b, h[static_cast<std::size_t>(l)], y, n, importance.data());
        h[static_cast<std::size_t>(l) + 1] = h[static_cast<std::size_t>(l)];
        for (std::size_t i = 0; i < y.size(); ++i) h[static_cast<std::size_t>(l) + 1][i] += y[i];
        const sy::routing::plan_ref plan = runner_.plan(b.state);
        if constexpr (is_dynmoe) {
          if (sched.record)
            b.recorder.record(plan, sy::make_view<const float>(h[static_cast<std::size_t>(l)].data(), n, d));
        }
        // routing metrics
        for (int t = 0; t < n; ++t) {
          const int k = plan.counts[static_cast<std::size_t>(t)];
          const bool hard = data_.hard(first + t);
          sums.k += k;
          (hard ? sums.k_hard : sums.k_easy) += k;
          sums.unrouted += k == 0;
          sums.two += k == 2;
          if (k == 2) ++top2[l];
          for (int j = 0; j < k; ++j) {
            const int e = plan.id(t, j);
            sums.load[static_cast<std::size_t>(l) * E + e] += 1;
            ++step_load[static_cast<std::size_t>(l)][static_cast<std::size_t>(e)];
          }
        }
        sums.routed_tokens += n;
        const losses_type& ls = runner_.losses(b.state);
        step_aux += weight * weighted_aux(ls, coeffs);
        if constexpr (is_remoe) sparsity += weight * ls.sparsity;
      }
      // head, loss and its gradient (of the micro-batch's mean loss)
      const int C = data_.classes;
      std::vector<double> p(static_cast<std::size_t>(C));
      std::vector<float> dh(static_cast<std::size_t>(n) * d, 0.0f);
      float* dH = store_.buffer(head_);
      float* dc = store_.buffer(head_b_);
      const float* H = store_.value(head_);
      const std::vector<float>& hL = h[static_cast<std::size_t>(L)];
      double loss = 0;
      for (int t = 0; t < n; ++t) {
        const int i = first + t;
        loss += head(hL.data() + static_cast<std::size_t>(t) * d, i, p);
        const int pred = static_cast<int>(std::max_element(p.begin(), p.end()) - p.begin());
        const bool right = pred == data_.label[i], hard = data_.hard(i);
        sums.correct += right;
        (hard ? sums.correct_hard : sums.correct_easy) += right;
        (hard ? sums.hard : sums.easy) += 1;
        sums.tokens += 1;
        for (int k = 0; k < C; ++k) {
          const double g = (p[static_cast<std::size_t>(k)] - (k == data_.label[i] ? 1.0 : 0.0)) / n;
          dc[k] += static_cast<float>(g);
          for (int r = 0; r < d; ++r) {
            dH[static_cast<std::size_t>(k) * d + r] += static_cast<float>(g * hL[static_cast<std::size_t>(t) * d + r]);
            dh[static_cast<std::size_t>(t) * d + r] += static_cast<float>(g * H[static_cast<std::size_t>(k) * d + r]);
          }
        }
      }
      step_loss += weight * loss / n;
      // back through the residual MoE blocks: dh_l = dh_{l+1} + MoE_l's dx
      for (int l = L - 1; l >= 0; --l) {
        block& b = blocks_[static_cast<std::size_t>(l)];
        std::vector<float> dx = dh;
        typename Layer::addon_params ap{};
        typename Layer::addon_grads ag{};
        if constexpr (has_hyper) {
          ap = hyper_params(b);
          ag = hyper_grads(b);
        }
        const auto x = sy::make_view<const float>(h[static_cast<std::size_t>(l)].data(), n, d);
        runner_.backward(b.layer, b.state, x, router_params(b, importance.data(), n), weights(b),
                         sy::make_view<const float>(dh.data(), n, d), coeffs,
                         sy::make_view(dx.data(), n, d), weight_grads(b), router_grads(b), ap, ag);
        dh = std::move(dx);
      }
      // embedding and P
      float* demb = store_.buffer(emb_);
      float* dP = store_.buffer(proj_);
      const int m = cfg_.features;
      for (int t = 0; t < n; ++t) {
        const int i = first + t;
        const float* u = &data_.u[static_cast<std::size_t>(i) * m];
        for (int r = 0; r < d; ++r) {
          const float g = dh[static_cast<std::size_t>(t) * d + r];
          demb[static_cast<std::size_t>(data_.task[i]) * d + r] += g;
          for (int j = 0; j < m; ++j) dP[static_cast<std::size_t>(r) * m + j] += g * u[j];
        }
      }
      acc.add(weight);
    }
    acc.finish();  // the buffers now hold the step's gradient
    // the first step after a DynMoE update: each slot's expert-gradient norm
    if constexpr (is_dynmoe) {
      for (auto& ev : out.dynmoe_events) {
        if (ev.step != step - 1 || !ev.next_slot_grad.empty()) continue;
        const block& b = blocks_[static_cast<std::size_t>(ev.layer)];
        ev.next_slot_grad.assign(static_cast<std::size_t>(E), 0.0);
        for (int id : std::array<int, 4>{b.w1, b.b1, b.w2, b.b2}) {
          const tensor& t = store_[id];
          for (std::size_t i = 0; i < t.size(); ++i)
            ev.next_slot_grad[static_cast<std::size_t>(t.slot_of(i))] += std::abs(static_cast<double>(t.buffer[i]));
        }
      }
    }
    std::vector<std::vector<std::int32_t>> masks;
    for (const auto& b : blocks_) masks.push_back(b.mask);
    opt_.step(store_, masks);
    sums.loss += step_loss;
    sums.aux += step_aux;
    sums.steps += 1;
    // after the step: the routers' own updates
    if constexpr (is_scored) {
      for (int l = 0; l < L; ++l) {
        auto& b = blocks_[static_cast<std::size_t>(l)];
        const auto& load = step_load[static_cast<std::size_t>(l)];
        sy::training::update_selection_bias(sy::span<const index_t>(load.data(), load.size()),
                                            sy::span<float>(b.selection_bias.data(), b.selection_bias.size()),
                                            cfg_.router == "deepseek-nobias" ? 0.0f : cfg_.deepseek_gamma);
      }
    }
    if constexpr (is_remoe) {
      sums.sparsity += sparsity * L;  // epoch metric: mean over layers (sparsity summed them)
      controller_.update(sparsity / L);
    }
    if constexpr (is_dynmoe) {
      for (int l = 0; l < L; ++l) {
        block& b = blocks_[static_cast<std::size_t>(l)];
        if (!b.update_pending) continue;
        b.update_pending = false;
        dynmoe_event ev;
        ev.layer = l;
        ev.forward = b.update_forward;
        ev.step = step;
        ev.routing_records = b.recorder.routing_records;
        for (float v : b.recorder.sample_records) ev.sample_sum += v;
        ev.mask_before = b.mask;
        const auto r = sy::training::adaptive_update(
            b.recorder, sy::make_view(store_.value(b.router_w), d, E),
            sy::make_view(store_.value(b.thresholds), E), sy::make_view(b.mask.data(), E));
        ev.mask_after = b.mask;
        ev.removed = r.removed;
        ev.added = r.added_expert;
        if (r.added_expert >= 0) reset_slot(b, r.added_expert);
        out.dynmoe_events.push_back(std::move(ev));
      }
    }
    return step_loss;
  }

  //! The accumulator over every tensor's buffer (made on first use: the tensors exist then).
  sy::training::gradient_accumulator& accumulator() {
    if (!accumulator_) {
      std::vector<sy::span<float>> buffers;
      for (auto& t : store_.all()) buffers.emplace_back(t.buffer.data(), t.buffer.size());
      accumulator_.emplace(std::move(buffers));
    }
    return *accumulator_;
  }

  //! DynMoE added slot e: fresh expert weights (seeded by the slot and the step), zero
  //! optimizer state for every tensor of the slot (the gate column and threshold that
  //! adaptive_update set keep their values).
  void reset_slot(block& b, int e) {
    rng r(cfg_.seed * 1000003u + static_cast<std::uint64_t>(opt_.steps) * 131u + static_cast<std::uint64_t>(e));
    const double scale_w1 = 1.0 / std::sqrt(cfg_.d), scale_w2 = 0.5 / std::sqrt(cfg_.d_ff);
    for (int id : std::array<int, 6>{b.w1, b.b1, b.w2, b.b2, b.router_w, b.thresholds}) {
      tensor& t = store_[id];
      for (std::size_t i = 0; i < t.size(); ++i) {
        if (t.slot_of(i) != e) continue;
        t.m[i] = 0.0;
        t.v[i] = 0.0;
        if (id == b.w1) t.value[i] = static_cast<float>(scale_w1 * r.normal());
        if (id == b.w2) t.value[i] = static_cast<float>(scale_w2 * r.normal());
        if (id == b.b1 || id == b.b2) t.value[i] = 0.0f;
      }
    }
  }

  //! Σ coefficient · loss value of one forward (for the printout).
  static double weighted_aux(const losses_type& values, const losses_type& coeffs) {
    double s = 0;
    std::apply([&](const auto&... field) { ((s += static_cast<double>(field.of(coeffs)) * field.of(values)), ...); },
               losses_type::coefficient_fields());
    return s;
  }

  config cfg_;
  Runner runner_;
  rng rng_;
  dataset data_;
  parameter_store store_;
  int emb_ = -1, proj_ = -1, head_ = -1, head_b_ = -1;
  std::vector<block> blocks_;
  losses_type coefficients_{};
  sy::training::remoe_controller controller_{};
  optimizer opt_;
  std::optional<sy::training::gradient_accumulator> accumulator_;
};

//! Trains the router `cfg.router` names; throws std::invalid_argument for an unknown name.
template <class Runner = host_runner>
run_result train(const config& cfg, Runner runner = {}) {
  const std::string& r = cfg.router;
  if (r == "topk") return trainer<topk_layer, Runner>(cfg, runner).run();
  if (r == "topp") return trainer<topp_layer, Runner>(cfg, runner).run();
  if (r == "dynmoe") return trainer<dynmoe_layer, Runner>(cfg, runner).run();
  if (r == "adaptive") return trainer<adaptive_layer, Runner>(cfg, runner).run();
  if (r == "hypermoe") return trainer<hypermoe_layer, Runner>(cfg, runner).run();
  if (r == "damoe") return trainer<damoe_layer, Runner>(cfg, runner).run();
  if (r == "deepseek" || r == "deepseek-nobias") return trainer<deepseek_layer, Runner>(cfg, runner).run();
  if (r == "remoe") return trainer<remoe_layer, Runner>(cfg, runner).run();
  throw std::invalid_argument("train_moe: unknown router '" + r +
                              "' (topk, topp, dynmoe, adaptive, hypermoe, damoe, deepseek, "
                              "deepseek-nobias, remoe)");
}

}  // namespace train_moe
