// SPDX-License-Identifier: Apache-2.0
#pragma once
// Golden harness: reads a case file (format in shared/golden/README.md), checks it against the
// README (case_problems: known keys only, required keys present, tolerances no looser than the
// README's) and gives the per-method checkers typed access to inputs/expected arrays and the
// tolerance rules. After a checker, every inputs/expected key of the file must have been read.
// A checker registers itself for one `method` with SWITCHYARD_GOLDEN_METHOD-free static
// registration: `const golden::registrar reg{"topk_softmax", &check_topk};`.
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <switchyard/backend/host/route.hpp>
#include <switchyard/routing/plan.hpp>
#include <vector>

namespace switchyard::golden {

using json = nlohmann::json;

//! A flat row-major array with its shape, as stored in a golden file.
template <class T>
struct array {
  std::vector<std::int64_t> shape;
  std::vector<T> data;
  [[nodiscard]] std::int64_t dim(std::size_t i) const { return shape.at(i); }
  [[nodiscard]] T scalar() const { return data.at(0); }
};

struct golden_case {
  std::string path;
  json j;
  //! Keys of `inputs` / `expected` a checker has read (through `get`): after the checker, the
  //! harness fails the case for any key of the file that was never read, so a key can neither
  //! be ignored by the schema nor by the checker.
  mutable std::set<std::string> read_inputs, read_expected;

  [[nodiscard]] std::string method() const { return j.at("method").get<std::string>(); }
  [[nodiscard]] const json& params() const { return j.at("params"); }
  [[nodiscard]] bool has_input(const std::string& k) const { return j.at("inputs").contains(k); }
  [[nodiscard]] bool has_expected(const std::string& k) const {
    return j.at("expected").contains(k);
  }

  template <class T>
  [[nodiscard]] array<T> get(const char* section, const std::string& key) const {
    const json& s = j.at(section);
    if (!s.contains(key)) {
      BOOST_FAIL(path << ": missing " << section << "." << key);
    }
    (std::string(section) == "inputs" ? read_inputs : read_expected).insert(key);
    const json& a = s.at(key);
    array<T> out;
    out.shape = a.at("shape").get<std::vector<std::int64_t>>();
    for (const auto& v : a.at("data")) out.data.push_back(v.get<T>());
    return out;
  }
  template <class T = float>
  [[nodiscard]] array<T> input(const std::string& key) const {
    return get<T>("inputs", key);
  }
  template <class T = float>
  [[nodiscard]] array<T> expected(const std::string& key) const {
    return get<T>("expected", key);
  }
};

//! The README's tolerances (shared/golden/README.md, "Tolerance"): outputs
//! `|got − want| <= 1e-6 + 1e-5·|want|`, losses and gradients `<= 1e-6 + 1e-4·|want|`. A file
//! may ask for tighter values (its `tolerance` object), never for looser ones: the harness
//! fails a case whose `tolerance.atol` / `tolerance.rtol` exceeds these.
inline constexpr double readme_atol = 1e-6;
inline constexpr double readme_rtol = 1e-5;
inline constexpr double readme_loss_rtol = 1e-4;

//! Tolerances of one case: outputs atol + rtol·|want|; losses/gradients use loss_rtol.
struct tolerance {
  double atol = readme_atol;
  double rtol = readme_rtol;
  double loss_rtol = readme_loss_rtol;
};

//! A tolerance value of a file: a JSON number or a numeric string; nullopt otherwise.
inline std::optional<double> tolerance_number(const json& v) {
  if (v.is_number()) return v.get<double>();
  if (v.is_string()) {
    const auto s = v.get<std::string>();
    try {
      std::size_t used = 0;
      const double d = std::stod(s, &used);
      if (used == s.size()) return d;
    } catch (const std::exception&) {
    }
  }
  return std::nullopt;
}

//! The case's tolerances: the file's atol / rtol where it gives them (validated against the
//! README caps before any checker runs, see case_problems), never looser than the README.
inline tolerance tolerance_of(const golden_case& c) {
  tolerance t;
  if (c.j.contains("tolerance")) {
    const json& tj = c.j.at("tolerance");
    if (tj.contains("atol"))
      t.atol = std::min(readme_atol, tolerance_number(tj.at("atol")).value_or(readme_atol));
    if (tj.contains("rtol"))
      t.rtol = std::min(readme_rtol, tolerance_number(tj.at("rtol")).value_or(readme_rtol));
  }
  return t;
}

// ---------------------------------------------------------------------------------------------
// What a case file may and must carry, per shared/golden/README.md. The harness checks every
// file against it before the method's checker runs (case_problems): an unknown top-level key,
// param, input or expected key, a missing required one, a param of the wrong JSON type, a
// malformed array or a tolerance looser than the README's fails the case with a message
// naming the file, the key and what was expected.

//! JSON type of a parameter.
enum class param_kind { integer, number, boolean, string };

inline const char* kind_name(param_kind k) {
  switch (k) {
    case param_kind::integer:
      return "an integer";
    case param_kind::number:
      return "a number";
    case param_kind::boolean:
      return "a boolean";
    case param_kind::string:
      return "a string";
  }
  return "?";
}

inline bool has_kind(const json& v, param_kind k) {
  switch (k) {
    case param_kind::integer:
      return v.is_number_integer();
    case param_kind::number:
      return v.is_number();
    case param_kind::boolean:
      return v.is_boolean();
    case param_kind::string:
      return v.is_string();
  }
  return false;
}

struct param_rule {
  param_kind kind;
  bool required;
};

//! Keys that come all together or not at all (a gradient case: README "Gradient cases carry
//! an input grad_combine_dense ..."): a case with some but not all of them fails.
struct key_group {
  std::string what;
  std::set<std::string> inputs, expected;
};

//! The README's rules for one method (and mode: adaptive_gating's op, dynmoe_topany's op,
//! hypermoe's variant).
struct case_schema {
  std::string mode;  //!< e.g. "hypermoe (variant=switch_top1)", for the messages
  std::map<std::string, param_rule> params;
  std::set<std::string> inputs_required, inputs_optional;
  std::set<std::string> expected_required, expected_optional;
  std::vector<key_group> groups;  //!< all-or-nothing key sets (optional as a whole)
};

//! The methods of the README's format block.
inline const std::vector<std::string>& readme_methods() {
  static const std::vector<std::string> m = {"topk_softmax",  "topp",     "da_moe",
                                             "dynmoe_topany", "hypermoe", "adaptive_gating"};
  return m;
}

//! The README's top-level keys ("File format"). None is marked optional there, so all are
//! required.
inline const std::set<std::string>& readme_top_level_keys() {
  static const std::set<std::string> k = {"method", "name",     "description", "params",
                                          "inputs", "expected", "source",      "tolerance"};
  return k;
}

//! Keys the files' `tolerance` object may carry: atol and rtol (the harness's only knobs,
//! each optional: absent means the README's value) and a free-text note.
inline const std::set<std::string>& tolerance_keys() {
  static const std::set<std::string> k = {"atol", "rtol", "note"};
  return k;
}

namespace schema_detail {

inline std::string join(const std::set<std::string>& s) {
  std::string out;
  for (const auto& k : s) out += (out.empty() ? "" : ", ") + k;
  return out.empty() ? "(none)" : out;
}

//! The plan keys every routing case carries (README "Plan outputs").
inline std::set<std::string> plan_keys() {
  return {"topk_indices", "combine_weights", "num_experts"};
}

//! Diagnostic keys (README: "Extra diagnostic keys (`router_logits`, `router_probs`, …) are
//! there to help debug"): optional; the checkers compare them when present.
inline std::set<std::string> router_diagnostics() {
  return {"router_logits", "router_probs"};
}

//! README "Gradient cases carry an input grad_combine_dense [T, E] ... Expected
//! grad_router_logits": optional as a whole (a case is a gradient case or not), but a case
//! carrying half of it fails instead of skipping the gradient check.
inline key_group router_gradient() {
  return {"gradient case (README: grad_combine_dense -> grad_router_logits)",
          {"grad_combine_dense"},
          {"grad_router_logits"}};
}

inline std::set<std::string> unite(std::set<std::string> a, const std::set<std::string>& b) {
  a.insert(b.begin(), b.end());
  return a;
}

}  // namespace schema_detail

//! The README's schema of a case of `method` with these params, or nullopt with `why` set
//! (a method, op or variant the README does not define).
inline std::optional<case_schema> readme_schema(const std::string& method, const json& params,
                                                std::string& why) {
  using namespace schema_detail;
  using pk = param_kind;
  case_schema s;
  s.mode = method;
  if (method == "topk_softmax") {
    // README table: "k, renormalize" (neither in parentheses: both required).
    s.params = {{"k", {pk::integer, true}}, {"renormalize", {pk::boolean, true}}};
    s.inputs_required = {"x", "w_router"};
    s.expected_required = unite(plan_keys(), {"lb_loss_switch", "lb_loss_topk", "z_loss"});
    s.expected_optional = router_diagnostics();
    s.groups = {router_gradient()};
  } else if (method == "topp") {
    // README table: "p, (max_k: Switchyard extension)": p required, max_k optional.
    s.params = {{"p", {pk::number, true}}, {"max_k", {pk::integer, false}}};
    s.inputs_required = {"x", "w_router"};
    s.expected_required = unite(plan_keys(), {"dynamic_loss", "lb_loss"});
    s.expected_optional = router_diagnostics();
    s.groups = {router_gradient()};
  } else if (method == "adaptive_gating") {
    // README table: "threshold, renormalize; or op=curriculum_order".
    if (params.is_object() && params.contains("op")) {
      if (params.at("op") != "curriculum_order") {
        why = "params.op = " + params.at("op").dump() +
              " is not an op the README defines for adaptive_gating (curriculum_order)";
        return std::nullopt;
      }
      s.mode = "adaptive_gating (op=curriculum_order)";
      s.params = {{"op", {pk::string, true}}};
      s.inputs_required = {"top2_counts", "seq_len"};
      s.expected_required = {"order", "cosine_to_reference", "complexity"};
    } else {
      s.params = {{"threshold", {pk::number, true}}, {"renormalize", {pk::boolean, true}}};
      s.inputs_required = {"x", "w_router"};
      s.expected_required = unite(plan_keys(), {"lb_loss", "top2_fraction"});
      s.expected_optional = router_diagnostics();
      s.groups = {router_gradient()};
    }
  } else if (method == "dynmoe_topany") {
    // README table: "training, variant=deepspeed; or op=adaptive_update".
    if (params.is_object() && params.contains("op")) {
      if (params.at("op") != "adaptive_update") {
        why = "params.op = " + params.at("op").dump() +
              " is not an op the README defines for dynmoe_topany (adaptive_update)";
        return std::nullopt;
      }
      s.mode = "dynmoe_topany (op=adaptive_update)";
      // The update is the DeepSpeed variant's too; the files repeat variant, optional here.
      s.params = {{"op", {pk::string, true}}, {"variant", {pk::string, false}}};
      s.inputs_required = {"w_gate", "thresholds", "experts_mask", "log_temperature", "x_record"};
      s.expected_required = {"routing_records", "sample_records", "new_experts_mask",
                             "new_w_gate",      "new_thresholds", "added_expert"};
      // Not in the README table; compared when present (the generator writes it).
      s.expected_optional = {"num_active_experts"};
    } else {
      s.params = {{"training", {pk::boolean, true}}, {"variant", {pk::string, true}}};
      s.inputs_required = {"x", "w_gate", "thresholds", "experts_mask", "log_temperature"};
      // "aux_loss (+ parts)": the parts are the four terms of spec §3.3.
      s.expected_required =
          unite(plan_keys(), {"scores", "threshold_probs", "gates", "top_k_reported", "aux_loss",
                              "sim_loss", "simple_loss", "load_balance_loss", "efficiency_loss"});
      // README: "For DynMoE ... the expected gradients are grad_w_gate [d, E_max] and
      // grad_thresholds [E_max]" of a gradient case (input grad_combine_dense).
      s.groups = {{"gradient case (README: grad_combine_dense -> grad_w_gate, grad_thresholds)",
                   {"grad_combine_dense"},
                   {"grad_w_gate", "grad_thresholds"}}};
    }
  } else if (method == "da_moe") {
    // README table: "k_max, k_min, importance, k_rule, renormalize" (all required).
    s.params = {{"k_max", {pk::integer, true}},
                {"k_min", {pk::integer, true}},
                {"importance", {pk::string, true}},
                {"k_rule", {pk::string, true}},
                {"renormalize", {pk::boolean, true}}};
    s.inputs_required = {"x", "w_router", "attn_probs"};
    s.expected_required =
        unite(plan_keys(), {"token_importance", "relative_importance", "lb_loss_switch"});
    // Not in the README's da_moe row; the other softmax-router losses, compared when present.
    s.expected_optional = unite(router_diagnostics(), {"lb_loss_topk", "z_loss"});
    s.groups = {router_gradient()};  // README "Conventions shared by all methods"
  } else if (method == "hypermoe") {
    // README table: "variant (switch_top1 / gpt2_topk), layer_idx, adapter_dim, …" — the "…"
    // defers to the spec (routing-algorithms.md §4); the rest are the spec's hyperparameter
    // names (§4 "Defaults"), optional and checked against the input shapes by the checker.
    const std::string variant =
        params.is_object() && params.contains("variant") && params.at("variant").is_string()
            ? params.at("variant").get<std::string>()
            : std::string();
    if (variant != "switch_top1" && variant != "gpt2_topk") {
      why = "params.variant must be \"switch_top1\" or \"gpt2_topk\" (README hypermoe row), got " +
            (params.is_object() && params.contains("variant") ? params.at("variant").dump()
                                                              : std::string("nothing"));
      return std::nullopt;
    }
    s.mode = "hypermoe (variant=" + variant + ")";
    s.params = {{"variant", {pk::string, true}},
                {"layer_idx", {pk::integer, true}},
                {"adapter_dim", {pk::integer, true}},
                {"experts_embedding_dim", {pk::integer, false}},
                {"process_dim", {pk::integer, false}},
                {"hypernet_input", {pk::integer, false}},
                {"hypernetwork_bottleneck", {pk::integer, false}},
                {"layer_emb_dim", {pk::integer, false}},
                {"num_layers", {pk::integer, false}},
                {"expert_act", {pk::string, false}}};
    s.inputs_required = {"x",           "expert_emb",  "proc_w1",    "proc_b1",   "proc_w2",
                         "proc_b2",     "layer_embed", "gen_w1",     "gen_b1",    "gen_wup",
                         "gen_bwup",    "gen_wdown",   "gen_bwdown", "gen_bup_w", "gen_bup_b",
                         "gen_bdown_w", "gen_bdown_b"};
    // README "Plan outputs ... width = ... 1 or k (HyperMoE)": the plan keys are required,
    // and the hypermoe row's extra keys.
    s.expected_required =
        unite(plan_keys(), {"selection_embedding", "expert_output", "hyper_output", "moe_output"});
    s.expected_optional = router_diagnostics();
    if (variant == "switch_top1") {
      // Spec §4.1 step 3: the capacity in token order; no default there, so required.
      s.params["expert_capacity"] = {pk::integer, true};
      s.inputs_required.insert({"w_router", "expert_wi", "expert_wo"});
      // "z_loss, lb_loss_switch / cv_loss, dropped": Switch has the HF z-loss, the Switch
      // load balance and the capacity drops; GPT-2 has the cv² loss.
      s.expected_required.insert({"z_loss", "lb_loss_switch", "dropped"});
    } else {
      s.params["k"] = {pk::integer, true};
      s.params["training"] = {pk::boolean, false};  // spec §4.2: goldens are eval (clean gating)
      s.inputs_required.insert(
          {"w_gate", "expert_w_fc", "expert_b_fc", "expert_w_proj", "expert_b_proj"});
      s.expected_required.insert("cv_loss");
    }
  } else {
    why = "method '" + method + "' is not one of the README's methods (topk_softmax, topp, " +
          "da_moe, dynmoe_topany, hypermoe, adaptive_gating)";
    return std::nullopt;
  }
  return s;
}

//! Problems of an array entry {"shape", "dtype", "data"} (README "File format").
inline void array_problems(const std::string& where, const json& a, std::vector<std::string>& out) {
  if (!a.is_object()) {
    out.push_back(where + ": must be an object {\"shape\", \"dtype\", \"data\"}, got " +
                  std::string(a.type_name()));
    return;
  }
  for (const auto& [k, v] : a.items()) {
    if (k != "shape" && k != "dtype" && k != "data")
      out.push_back(where + ": unknown array key '" + k + "' (expected shape, dtype, data)");
  }
  for (const char* k : {"shape", "dtype", "data"}) {
    if (!a.contains(k)) out.push_back(where + ": missing array key '" + k + "'");
  }
  if (!a.contains("shape") || !a.contains("dtype") || !a.contains("data")) return;
  const json& shape = a.at("shape");
  std::int64_t n = 1;
  bool shape_ok = shape.is_array();
  if (shape_ok) {
    for (const auto& e : shape) {
      if (!e.is_number_integer() || e.get<std::int64_t>() < 0)
        shape_ok = false;
      else
        n *= e.get<std::int64_t>();
    }
  }
  if (!shape_ok) {
    out.push_back(where + ".shape: must be an array of non-negative integers, got " + shape.dump());
    return;
  }
  const json& dtype = a.at("dtype");
  if (dtype != "float32" && dtype != "int32") {
    out.push_back(where + ".dtype: must be \"float32\" or \"int32\", got " + dtype.dump());
    return;
  }
  const json& data = a.at("data");
  if (!data.is_array()) {
    out.push_back(where + ".data: must be an array, got " + std::string(data.type_name()));
    return;
  }
  if (static_cast<std::int64_t>(data.size()) != n) {
    out.push_back(where + ".data: has " + std::to_string(data.size()) + " values, shape " +
                  shape.dump() + " needs " + std::to_string(n));
  }
  const bool ints = dtype == "int32";
  for (std::size_t i = 0; i < data.size(); ++i) {
    const json& v = data[i];
    const bool ok = ints ? v.is_number_integer() : v.is_number();
    if (!ok) {
      out.push_back(where + ".data[" + std::to_string(i) + "]: must be " +
                    (ints ? "an integer (dtype int32)" : "a number") + ", got " + v.dump());
      break;
    }
  }
}

//! Everything wrong with a case file against the README (empty: the file is well formed).
//! Each message starts with `path` and names the key and what was expected.
inline std::vector<std::string> case_problems(const json& j, const std::string& path) {
  using schema_detail::join;
  std::vector<std::string> out;
  auto add = [&](const std::string& m) { out.push_back(path + ": " + m); };
  if (!j.is_object()) {
    add("the file must hold a JSON object (README 'File format')");
    return out;
  }
  const auto& top = readme_top_level_keys();
  for (const auto& [k, v] : j.items()) {
    if (!top.count(k))
      add("unknown top-level key '" + k + "' (README 'File format' keys: " + join(top) + ")");
  }
  for (const auto& k : top) {
    if (!j.contains(k)) add("missing required top-level key '" + k + "' (README 'File format')");
  }
  for (const char* k : {"method", "name", "description", "source"}) {
    if (j.contains(k) && !j.at(k).is_string())
      add(std::string("top-level key '") + k + "' must be a string, got " + j.at(k).dump());
  }
  for (const char* k : {"params", "inputs", "expected", "tolerance"}) {
    if (j.contains(k) && !j.at(k).is_object())
      add(std::string("top-level key '") + k + "' must be an object, got " +
          std::string(j.at(k).type_name()));
  }
  if (!out.empty()) return out;  // the rest needs the structure

  // README: files are named `<method>_<short-desc>.json`, `name` being the short description.
  const std::string method = j.at("method").get<std::string>();
  const std::string stem = std::filesystem::path(path).stem().string();
  const std::string want_stem = method + "_" + j.at("name").get<std::string>();
  if (stem != want_stem)
    add("file name '" + stem + "' must be <method>_<name> = '" + want_stem +
        "' (README: named `<method>_<short-desc>.json`)");

  // Tolerance: known keys, numbers, never looser than the README.
  for (const auto& [k, v] : j.at("tolerance").items()) {
    if (!tolerance_keys().count(k)) {
      add("unknown key 'tolerance." + k + "' (known: " + join(tolerance_keys()) + ")");
      continue;
    }
    if (k == "note") continue;
    const auto val = tolerance_number(v);
    const double cap = k == "atol" ? readme_atol : readme_rtol;
    std::ostringstream msg;
    if (!val || !std::isfinite(*val) || *val < 0.0) {
      msg << "tolerance." << k << " must be a finite number >= 0, got " << v.dump();
      add(msg.str());
    } else if (*val > cap) {
      msg << "tolerance." << k << " = " << *val << " is looser than the README allows (<= " << cap
          << ", README 'Tolerance')";
      add(msg.str());
    }
  }

  std::string why;
  const auto schema = readme_schema(method, j.at("params"), why);
  if (!schema) {
    add(why);
    return out;
  }
  const std::string& mode = schema->mode;

  // Params: the README's set for the method, required ones present, JSON types right.
  std::set<std::string> known_params, required_params;
  for (const auto& [k, r] : schema->params) {
    known_params.insert(k);
    if (r.required) required_params.insert(k);
  }
  for (const auto& [k, v] : j.at("params").items()) {
    const auto it = schema->params.find(k);
    if (it == schema->params.end()) {
      add("unknown param 'params." + k + "' for " + mode +
          " (the README documents: " + join(known_params) + ")");
    } else if (!has_kind(v, it->second.kind)) {
      add("params." + k + " must be " + kind_name(it->second.kind) + ", got " + v.dump());
    }
  }
  for (const auto& [k, r] : schema->params) {
    if (r.required && !j.at("params").contains(k))
      add("missing required param 'params." + k + "' for " + mode +
          " (README methods table; required: " + join(required_params) + ")");
  }

  // Inputs and expected keys: known, required present, arrays well formed.
  auto section = [&](const char* name, const std::set<std::string>& required,
                     const std::set<std::string>& optional, bool is_inputs) {
    std::set<std::string> known = schema_detail::unite(required, optional);
    for (const auto& g : schema->groups) {
      const auto& ks = is_inputs ? g.inputs : g.expected;
      known.insert(ks.begin(), ks.end());
    }
    const json& sec = j.at(name);
    for (const auto& [k, v] : sec.items()) {
      if (!known.count(k))
        add(std::string("unknown ") + name + " key '" + k + "' for " + mode +
            " (known: " + join(known) + ")");
      else
        array_problems(path + ": " + name + "." + k, v, out);
    }
    for (const auto& k : required) {
      if (!sec.contains(k))
        add(std::string("missing required ") + name + " key '" + k + "' for " + mode +
            " (README; required: " + join(required) + ")");
    }
  };
  section("inputs", schema->inputs_required, schema->inputs_optional, true);
  section("expected", schema->expected_required, schema->expected_optional, false);

  // All-or-nothing groups: a gradient check whose inputs are missing fails, never skips.
  for (const auto& g : schema->groups) {
    std::vector<std::string> have, miss;
    for (const auto& k : g.inputs)
      (j.at("inputs").contains(k) ? have : miss).push_back("inputs." + k);
    for (const auto& k : g.expected)
      (j.at("expected").contains(k) ? have : miss).push_back("expected." + k);
    if (!have.empty() && !miss.empty()) {
      std::string h, m;
      for (const auto& k : have) h += (h.empty() ? "" : ", ") + k;
      for (const auto& k : miss) m += (m.empty() ? "" : ", ") + k;
      add("incomplete " + g.what + ": has " + h + " but is missing " + m);
    }
  }
  return out;
}

//! After a checker ran: every inputs/expected key of the file must have been read by it.
inline std::vector<std::string> unread_keys(const golden_case& c) {
  std::vector<std::string> out;
  for (const auto& [k, v] : c.j.at("inputs").items())
    if (!c.read_inputs.count(k))
      out.push_back(c.path + ": inputs key '" + k + "' was never read by the " + c.method() +
                    " checker");
  for (const auto& [k, v] : c.j.at("expected").items())
    if (!c.read_expected.count(k))
      out.push_back(c.path + ": expected key '" + k + "' was never compared by the " + c.method() +
                    " checker");
  return out;
}

//! Compares float arrays element-wise: |got − want| <= atol + rtol·|want|; NaN never passes.
inline void check_close(const std::string& what, const std::vector<float>& got,
                        const std::vector<float>& want, double atol, double rtol) {
  BOOST_TEST_CONTEXT(what) {
    BOOST_TEST_REQUIRE(got.size() == want.size());
    std::size_t bad = 0;
    for (std::size_t i = 0; i < got.size(); ++i) {
      const double g = got[i], w = want[i];
      const bool ok = std::isfinite(g) && std::abs(g - w) <= atol + rtol * std::abs(w);
      if (!ok && bad++ < 5) {
        BOOST_ERROR(what << "[" << i << "]: got " << g << ", want " << w << " (|diff| "
                         << std::abs(g - w) << " > " << atol + rtol * std::abs(w) << ")");
      }
    }
    if (bad > 5) BOOST_ERROR(what << ": " << bad << " mismatches in all");
  }
}

inline void check_close(const std::string& what, double got, double want, double atol,
                        double rtol) {
  check_close(what, std::vector<float>{static_cast<float>(got)},
              std::vector<float>{static_cast<float>(want)}, atol, rtol);
}

//! Integer arrays must match exactly.
template <class A, class B>
void check_exact(const std::string& what, const std::vector<A>& got, const std::vector<B>& want) {
  BOOST_TEST_CONTEXT(what) {
    BOOST_TEST_REQUIRE(got.size() == want.size());
    std::size_t bad = 0;
    for (std::size_t i = 0; i < got.size(); ++i) {
      if (static_cast<std::int64_t>(got[i]) != static_cast<std::int64_t>(want[i]) && bad++ < 5) {
        BOOST_ERROR(what << "[" << i << "]: got " << got[i] << ", want " << want[i]);
      }
    }
    if (bad > 5) BOOST_ERROR(what << ": " << bad << " mismatches in all");
  }
}

//! Checks the plan keys every router case carries: topk_indices (exact, with the width),
//! combine_weights, num_experts (exact).
template <class Plan>
void check_plan(const golden_case& c, const Plan& plan, const tolerance& tol) {
  const auto ids = c.expected<std::int64_t>("topk_indices");
  BOOST_TEST(plan.width == ids.dim(1), "plan width " << plan.width << " vs " << ids.dim(1));
  check_exact("topk_indices", plan.expert_ids, ids.data);
  check_close("combine_weights", plan.weights, c.expected("combine_weights").data, tol.atol,
              tol.rtol);
  check_exact("num_experts", plan.counts, c.expected<std::int64_t>("num_experts").data);
}

//! Checks `grad_router_logits` = d(Σ cot ⊙ dense combine weights)/d(logits), with no aux
//! losses, through the host backend's generic route (host::route_backward_logits). README: "Gradient cases carry an input
//! `grad_combine_dense`", so a case with neither key is not a gradient case and has nothing to
//! check; a case with one of the two fails (case_problems rejects it before the checker runs,
//! and reading the missing key here fails the case too) instead of skipping the check.
template <class Router, class Plan>
void check_router_logit_gradient(const golden_case& c, const Router& router, const Plan& plan,
                                 const tolerance& tol) {
  if (!c.has_input("grad_combine_dense") && !c.has_expected("grad_router_logits")) return;
  const auto cot = c.input("grad_combine_dense");
  const auto want = c.expected("grad_router_logits");
  std::vector<float> d_slots(static_cast<std::size_t>(plan.num_tokens * plan.width));
  routing::dense_to_slot_cotangent(plan, cot.data.data(), d_slots.data());
  std::vector<float> d_logits(static_cast<std::size_t>(plan.num_tokens * plan.num_experts));
  host::route_backward_logits(router, plan, d_slots.data(), {}, d_logits.data());  // no aux losses
  check_close("grad_router_logits", d_logits, want.data, tol.atol, tol.loss_rtol);
}

//! A diagnostic key (README: "Extra diagnostic keys (`router_logits`, `router_probs`, …) are
//! there to help debug"): optional in the file, compared at the output tolerance when present.
inline void check_diagnostic(const golden_case& c, const std::string& key,
                             const std::vector<float>& got, const tolerance& tol) {
  if (c.has_expected(key)) check_close(key, got, c.expected(key).data, tol.atol, tol.rtol);
}

using checker = std::function<void(const golden_case&)>;

//! method name -> checker.
inline std::map<std::string, checker>& registry() {
  static std::map<std::string, checker> r;
  return r;
}

//! Registers a checker for one method at static-initialisation time.
struct registrar {
  registrar(const std::string& method, checker c) { registry()[method] = std::move(c); }
};

//! Throws (fails the case) with a message naming the unsupported parameter.
[[noreturn]] inline void unsupported(const golden_case& c, const std::string& what) {
  BOOST_FAIL(c.path << ": not supported yet: " << what);
  throw std::logic_error("unreachable");
}

}  // namespace switchyard::golden
