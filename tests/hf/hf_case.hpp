// SPDX-License-Identifier: Apache-2.0
#pragma once
// Reader of the Hugging Face layer cases (`hf-moe-case/1`, ../shared/hf-cases/README.md): the
// JSON header, the raw little-endian arrays of the .bin, and a check of the header against the
// README's schema: an unknown family, key or value is a problem (the test fails, never skips).
// Every array must be read by the checker (`unread()`), so none is ignored silently.
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <switchyard/core/config.hpp>

namespace switchyard::hf {

using json = nlohmann::json;
namespace fs = std::filesystem;

//! One array of the .bin as the header's `arrays` table describes it.
struct array_entry {
  std::string dtype;           //!< float32, float64 or int32
  std::string role;            //!< input, parameter, expected, diagnostic, gradient
  std::vector<index_t> shape;  //!< C order
  std::size_t offset = 0;      //!< bytes into the .bin
  [[nodiscard]] std::size_t count() const {
    std::size_t n = 1;
    for (auto s : shape) n *= static_cast<std::size_t>(s);
    return n;
  }
};

//! A case: its header, its arrays, and which arrays a checker has read.
class hf_case {
 public:
  explicit hf_case(const fs::path& header_path) : path_(header_path) {
    std::ifstream in(header_path);
    if (!in) throw std::runtime_error("cannot open " + header_path.string());
    in >> h_;
    const fs::path bin = header_path.parent_path() / h_.at("bin").get<std::string>();
    std::ifstream b(bin, std::ios::binary);
    if (!b) throw std::runtime_error("cannot open " + bin.string());
    blob_.assign(std::istreambuf_iterator<char>(b), std::istreambuf_iterator<char>());
    for (const auto& [name, a] : h_.at("arrays").items()) {
      array_entry e;
      e.dtype = a.at("dtype").get<std::string>();
      e.role = a.at("role").get<std::string>();
      for (const auto& s : a.at("shape")) e.shape.push_back(s.get<index_t>());
      e.offset = a.at("offset").get<std::size_t>();
      arrays_[name] = e;
    }
  }

  [[nodiscard]] const json& header() const { return h_; }
  [[nodiscard]] std::string name() const { return h_.value("name", path_.stem().string()); }
  [[nodiscard]] bool has(const std::string& a) const { return arrays_.count(a) != 0; }
  [[nodiscard]] const std::vector<index_t>& shape(const std::string& a) const {
    return entry(a).shape;
  }

  //! A float32 array (marks it read).
  std::vector<float> f32(const std::string& a) { return read<float>(a, "float32"); }
  //! A float64 array (marks it read).
  std::vector<double> f64(const std::string& a) { return read<double>(a, "float64"); }
  //! An int32 array (marks it read).
  std::vector<std::int32_t> i32(const std::string& a) { return read<std::int32_t>(a, "int32"); }

  //! Arrays no checker read.
  [[nodiscard]] std::vector<std::string> unread() const {
    std::vector<std::string> out;
    for (const auto& [name, e] : arrays_)
      if (!read_.count(name)) out.push_back(name);
    return out;
  }

  //! Everything in the header the README does not define (empty: the case is understood).
  [[nodiscard]] std::vector<std::string> problems() const {
    std::vector<std::string> p;
    const auto keys = [&](const json& obj, const std::string& where,
                          const std::set<std::string>& known) {
      if (!obj.is_object()) {
        p.push_back(where + ": expected an object");
        return;
      }
      for (const auto& [k, v] : obj.items())
        if (!known.count(k)) p.push_back(where + ": unknown field '" + k + "'");
    };
    const auto one_of = [&](const json& v, const std::string& where,
                            const std::set<std::string>& allowed) {
      if (!v.is_string() || !allowed.count(v.get<std::string>()))
        p.push_back(where + ": unknown value " + v.dump());
    };
    keys(h_, "header",
         {"format", "name", "family", "description", "source", "dims", "router", "experts",
          "shared_experts", "capacity", "gradients", "numerics", "schema_check", "tolerances",
          "mapping", "hf_notes", "edge", "bin", "arrays"});
    if (h_.value("format", "") != "hf-moe-case/1") p.push_back("format: expected hf-moe-case/1");
    one_of(h_.value("family", json()), "family",
           {"deepseek_v3", "glm4_moe", "dots1", "deepseek_v2", "deepseek_v4", "llama4", "gpt_oss",
            "qwen3_next", "qwen2_moe", "longcat_flash", "minimax_m2", "ernie4_5_moe", "dbrx",
            "hunyuan_v1_moe", "mixtral", "qwen3_moe", "olmoe", "granitemoe",
            "switch_transformers"});
    keys(h_.at("dims"), "dims", {"T", "B", "S", "d", "d_ff", "E", "E_router", "k", "vocab"});
    const json& r = h_.at("router");
    keys(r, "router",
         {"weight", "bias", "scoring", "select_on", "softmax_after_topk", "selection", "k",
          "selection_bias", "group_limit", "hash", "normalize", "normalize_eps",
          "scaling_factor", "router_weight_on_input", "zero_experts"});
    one_of(r.at("scoring"), "router.scoring", {"softmax", "sigmoid", "sqrt_softplus"});
    one_of(r.at("select_on"), "router.select_on", {"scores", "logits"});
    one_of(r.at("selection"), "router.selection", {"topk", "hash"});
    if (!r.at("group_limit").is_null()) {
      keys(r.at("group_limit"), "router.group_limit",
           {"n_group", "topk_group", "group_score", "excluded_fill"});
      one_of(r.at("group_limit").at("group_score"), "router.group_limit.group_score",
             {"top2_sum", "max"});
      one_of(r.at("group_limit").at("excluded_fill"), "router.group_limit.excluded_fill",
             {"-inf", "0"});
    }
    if (!r.at("hash").is_null()) keys(r.at("hash"), "router.hash", {"table", "token_ids", "vocab"});
    const std::string norm = r.at("normalize").is_string() ? r.at("normalize").get<std::string>() : "?";
    if (norm != "none" && norm != "sum" && norm.rfind("pnorm:", 0) != 0)
      p.push_back("router.normalize: unknown value " + r.at("normalize").dump());
    if (!r.at("normalize_eps").is_null()) {
      keys(r.at("normalize_eps"), "router.normalize_eps", {"kind", "value"});
      one_of(r.at("normalize_eps").at("kind"), "router.normalize_eps.kind", {"add", "clamp_min"});
    }
    if (!r.at("zero_experts").is_null()) {
      keys(r.at("zero_experts"), "router.zero_experts", {"count", "first_id", "output"});
      one_of(r.at("zero_experts").at("output"), "router.zero_experts.output", {"identity"});
    }
    const auto activation = [&](const json& a, const std::string& where) {
      keys(a, where, {"name", "gated", "formula", "limit", "alpha"});
      one_of(a.at("name"), where + ".name",
             {"swiglu", "geglu", "gpt_oss_swiglu", "clamped_swiglu", "relu", "gelu", "gelu_tanh",
              "silu"});
    };
    keys(h_.at("experts"), "experts", {"count", "d_ff", "activation", "w1", "b1", "w2", "b2"});
    activation(h_.at("experts").at("activation"), "experts.activation");
    if (!h_.at("shared_experts").is_null()) {
      keys(h_.at("shared_experts"), "shared_experts",
           {"hf_count", "d_ff", "activation", "w1", "b1", "w2", "b2", "gate"});
      activation(h_.at("shared_experts").at("activation"), "shared_experts.activation");
      const json& g = h_.at("shared_experts").at("gate");
      if (!g.is_null()) {
        keys(g, "shared_experts.gate", {"fn", "weight"});
        one_of(g.at("fn"), "shared_experts.gate.fn", {"sigmoid"});
      }
    }
    if (!h_.at("capacity").is_null()) {
      const json& c = h_.at("capacity");
      keys(c, "capacity", {"scope", "sequences", "expert_capacity", "priority", "dropped_output"});
      one_of(c.at("scope"), "capacity.scope", {"sequence", "batch"});
      one_of(c.at("priority"), "capacity.priority", {"token_major", "slot_major"});
      one_of(c.at("dropped_output"), "capacity.dropped_output", {"zero", "scaled_input"});
    }
    if (!h_.at("edge").is_object() || !h_.at("edge").empty())
      p.push_back("edge: expected {} (no edge-case fields are defined), got " + h_.at("edge").dump());
    static const std::set<std::string> known_arrays = {
        "x", "dy", "input_ids", "hash_table", "router_w", "router_b", "selection_bias", "w1", "b1",
        "w2", "b2", "shared_w1", "shared_b1", "shared_w2", "shared_b2", "shared_gate_w", "y",
        "topk_ids", "topk_weights", "router_logits", "topk_kept", "dropped", "tie_mask", "y_fp64",
        "y_routed", "y_shared", "router_scores", "selection_scores", "grad_x", "grad_x_routed",
        "grad_router_logits", "grad_topk_weights", "grad_router_w", "grad_router_b", "grad_w1",
        "grad_b1", "grad_w2", "grad_b2", "grad_shared_w1", "grad_shared_b1", "grad_shared_w2",
        "grad_shared_b2", "grad_shared_gate_w"};
    for (const auto& [name, e] : arrays_) {
      if (!known_arrays.count(name)) p.push_back("arrays: unknown array '" + name + "'");
      if (e.offset % 8 != 0) p.push_back("arrays." + name + ": offset not a multiple of 8");
      const std::size_t bytes = e.dtype == "float64" ? 8 : 4;
      if (e.dtype != "float32" && e.dtype != "float64" && e.dtype != "int32")
        p.push_back("arrays." + name + ": unknown dtype " + e.dtype);
      if (e.offset + e.count() * bytes > blob_.size())
        p.push_back("arrays." + name + ": runs past the end of the .bin");
    }
    return p;
  }

 private:
  [[nodiscard]] const array_entry& entry(const std::string& a) const {
    const auto it = arrays_.find(a);
    if (it == arrays_.end()) throw std::runtime_error(name() + ": no array '" + a + "'");
    return it->second;
  }
  template <class V>
  std::vector<V> read(const std::string& a, const char* dtype) {
    const array_entry& e = entry(a);
    if (e.dtype != dtype)
      throw std::runtime_error(name() + ": array '" + a + "' is " + e.dtype + ", expected " + dtype);
    std::vector<V> out(e.count());
    std::memcpy(out.data(), blob_.data() + e.offset, out.size() * sizeof(V));  // little-endian host
    read_.insert(a);
    return out;
  }

  fs::path path_;
  json h_;
  std::vector<char> blob_;
  std::map<std::string, array_entry> arrays_;
  std::set<std::string> read_;
};

}  // namespace switchyard::hf
