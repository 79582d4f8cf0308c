// SPDX-License-Identifier: Apache-2.0
// Negative tests of the golden harness itself: every check it makes must be able to fail.
// `golden_harness_rejects_bad_cases` copies real golden files (of the build's default golden
// directory) into a temporary directory with
// one defect each (an unknown key, a misspelled param, a missing required key, a tolerance
// looser than the README's, a gradient case without its input, an upstream output off by a
// little, ...), runs this executable on each copy as a child process
// (SWITCHYARD_GOLDEN_DIR=<copy dir> --run_test=<case>) and requires the child to fail with a
// message naming the file and the key; an unmodified copy (the control) must pass.
#include <boost/test/unit_test.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "golden/golden.hpp"

namespace fs = std::filesystem;
using switchyard::golden::json;

namespace {

constexpr const char* child_env = "SWITCHYARD_GOLDEN_SELFTEST_CHILD";

//! Where the base files come from: the project's golden directory (the build's default), so
//! that pointing SWITCHYARD_GOLDEN_DIR at a directory of hand-made cases does not change the
//! self-test; SWITCHYARD_GOLDEN_DIR only where the default directory does not exist.
fs::path golden_source_dir() {
  if (fs::is_directory(SWITCHYARD_DEFAULT_GOLDEN_DIR)) return SWITCHYARD_DEFAULT_GOLDEN_DIR;
  if (const char* env = std::getenv("SWITCHYARD_GOLDEN_DIR"); env && *env) return env;
  return SWITCHYARD_DEFAULT_GOLDEN_DIR;
}

fs::path self_executable() {
  std::error_code ec;
  auto p = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) return p;
  return fs::absolute(boost::unit_test::framework::master_test_suite().argv[0]);
}

std::string shell_quote(const std::string& s) {
  std::string out = "'";
  for (char ch : s) out += ch == '\'' ? std::string("'\\''") : std::string(1, ch);
  return out + "'";
}

struct child_result {
  int status = -1;
  std::string output;
};

//! Runs this executable on the single case file `file` (its directory as the golden dir).
child_result run_child(const fs::path& file) {
  const std::string cmd = std::string("env ") + child_env +
                          "=1 SWITCHYARD_GOLDEN_DIR=" + shell_quote(file.parent_path().string()) +
                          " " + shell_quote(self_executable().string()) +
                          " --run_test=" + file.stem().string() + " --color_output=no 2>&1";
  child_result r;
  FILE* pipe = ::popen(cmd.c_str(), "r");
  BOOST_TEST_REQUIRE(pipe != nullptr, "cannot run " << cmd);
  std::array<char, 4096> buf{};
  while (std::fgets(buf.data(), static_cast<int>(buf.size()), pipe)) r.output += buf.data();
  const int raw = ::pclose(pipe);
  r.status = WIFEXITED(raw) ? WEXITSTATUS(raw) : 128;
  return r;
}

//! The golden file to mutate: `preferred` if present, else the first file of `method`.
std::optional<fs::path> base_file(const std::string& preferred, const std::string& method) {
  const fs::path dir = golden_source_dir();
  if (fs::exists(dir / (preferred + ".json"))) return dir / (preferred + ".json");
  std::vector<fs::path> files;
  if (!fs::is_directory(dir)) return std::nullopt;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().extension() == ".json" && e.path().stem().string().rfind(method + "_", 0) == 0)
      files.push_back(e.path());
  std::sort(files.begin(), files.end());
  if (files.empty()) return std::nullopt;
  return files.front();
}

struct mutation {
  std::string label;
  std::string preferred, method;  //!< base file
  std::function<void(json&)> apply;
  std::vector<std::string> must_say;  //!< substrings of the child's output; empty: must pass
};

std::vector<mutation> mutations() {
  auto erase = [](const char* section, const char* key) {
    return [=](json& j) { j.at(section).erase(key); };
  };
  // Scales the largest-magnitude value of an expected array (well above the atol floor).
  auto scale_largest = [](const char* key, double f) {
    return [=](json& j) {
      auto& d = j.at("expected").at(key).at("data");
      std::size_t at = 0;
      for (std::size_t i = 0; i < d.size(); ++i)
        if (std::abs(d[i].get<double>()) > std::abs(d[at].get<double>())) at = i;
      d[at] = d[at].get<double>() * f;
    };
  };
  const std::string topk = "topk_softmax_k2_renorm", sw = "hypermoe_switch_capacity_drop",
                    g2 = "hypermoe_gpt2_k2", dyn = "dynmoe_topany_train_basic";
  return {
      // Controls: unmodified copies pass.
      {"control topk_softmax", topk, "topk_softmax", [](json&) {}, {}},
      {"control hypermoe switch", sw, "hypermoe", [](json&) {}, {}},
      {"control hypermoe gpt2", g2, "hypermoe", [](json&) {}, {}},
      {"control dynmoe", dyn, "dynmoe_topany", [](json&) {}, {}},
      // Unknown keys.
      {"unknown top-level key",
       topk,
       "topk_softmax",
       [](json& j) { j["comment"] = "x"; },
       {"unknown top-level key 'comment'"}},
      {"unknown input key",
       topk,
       "topk_softmax",
       [](json& j) { j["inputs"]["bias"] = j["inputs"]["x"]; },
       {"unknown inputs key 'bias'"}},
      {"misspelled expected key",
       topk,
       "topk_softmax",
       [](json& j) {
         j["expected"]["z_los"] = j["expected"]["z_loss"];
         j["expected"].erase("z_loss");
       },
       {"unknown expected key 'z_los'", "missing required expected key 'z_loss'"}},
      {"unknown tolerance key",
       topk,
       "topk_softmax",
       [](json& j) { j["tolerance"]["loss_rtol"] = 1e-3; },
       {"unknown key 'tolerance.loss_rtol'"}},
      // Misspelled / unknown params.
      {"misspelled param (topk)",
       topk,
       "topk_softmax",
       [](json& j) {
         j["params"]["renormalise"] = j["params"]["renormalize"];
         j["params"].erase("renormalize");
       },
       {"unknown param 'params.renormalise'", "missing required param 'params.renormalize'"}},
      {"misspelled param (hypermoe)",
       sw,
       "hypermoe",
       [](json& j) {
         j["params"]["adaptor_dim"] = j["params"]["adapter_dim"];
         j["params"].erase("adapter_dim");
       },
       {"unknown param 'params.adaptor_dim'", "missing required param 'params.adapter_dim'"}},
      {"param of the wrong type",
       topk,
       "topk_softmax",
       [](json& j) { j["params"]["renormalize"] = "true"; },
       {"params.renormalize must be a boolean"}},
      {"hypermoe size param disagrees with the inputs",
       sw,
       "hypermoe",
       [](json& j) { j["params"]["process_dim"] = 9; },
       {"params.process_dim = 9"}},
      // Missing required keys.
      {"missing top-level tolerance",
       topk,
       "topk_softmax",
       [](json& j) { j.erase("tolerance"); },
       {"missing required top-level key 'tolerance'"}},
      {"missing param k",
       topk,
       "topk_softmax",
       erase("params", "k"),
       {"missing required param 'params.k'"}},
      {"missing loss",
       topk,
       "topk_softmax",
       erase("expected", "lb_loss_topk"),
       {"missing required expected key 'lb_loss_topk'"}},
      {"hypermoe without topk_indices",
       sw,
       "hypermoe",
       erase("expected", "topk_indices"),
       {"missing required expected key 'topk_indices'"}},
      {"hypermoe without combine_weights",
       g2,
       "hypermoe",
       erase("expected", "combine_weights"),
       {"missing required expected key 'combine_weights'"}},
      {"hypermoe without num_experts",
       sw,
       "hypermoe",
       erase("expected", "num_experts"),
       {"missing required expected key 'num_experts'"}},
      {"hypermoe switch without dropped",
       sw,
       "hypermoe",
       erase("expected", "dropped"),
       {"missing required expected key 'dropped'"}},
      {"hypermoe switch without expert_capacity",
       sw,
       "hypermoe",
       erase("params", "expert_capacity"),
       {"missing required param 'params.expert_capacity'"}},
      // Gradient cases: the check fails instead of being skipped.
      {"gradient case without its input",
       topk,
       "topk_softmax",
       erase("inputs", "grad_combine_dense"),
       {"inputs.grad_combine_dense"}},
      {"gradient input without the expected gradient",
       topk,
       "topk_softmax",
       erase("expected", "grad_router_logits"),
       {"expected.grad_router_logits"}},
      {"dynmoe gradient case without its input",
       dyn,
       "dynmoe_topany",
       erase("inputs", "grad_combine_dense"),
       {"inputs.grad_combine_dense"}},
      // Tolerances no looser than the README.
      {"loose rtol",
       topk,
       "topk_softmax",
       [](json& j) { j["tolerance"]["rtol"] = 1e-4; },
       {"tolerance.rtol = 0.0001 is looser than the README allows"}},
      {"loose atol",
       sw,
       "hypermoe",
       [](json& j) { j["tolerance"]["atol"] = "1e-5"; },
       {"tolerance.atol = 1e-05 is looser than the README allows"}},
      // Malformed arrays.
      {"array data/shape mismatch",
       topk,
       "topk_softmax",
       [](json& j) { j["inputs"]["x"]["data"].erase(0); },
       {"inputs.x.data: has"}},
      // The HyperMoE layer comparisons against the upstream numbers can fail.
      {"moe_output off by 1e-4 relative",
       sw,
       "hypermoe",
       scale_largest("moe_output", 1.0001),
       {"moe_output (MoELayer + hypermoe_addon)"}},
      {"gpt2 moe_output off by 1e-4 relative",
       g2,
       "hypermoe",
       scale_largest("moe_output", 1.0001),
       {"moe_output (MoELayer + hypermoe_addon)"}},
      {"expert_output off by 1e-4 relative",
       g2,
       "hypermoe",
       scale_largest("expert_output", 1.0001),
       {"expert_output (MoELayer without add-on)"}},
      {"hyper_output off by 1e-4 relative",
       sw,
       "hypermoe",
       scale_largest("hyper_output", 1.0001),
       {"hyper_output"}},
      {"a dropped token marked kept",
       sw,
       "hypermoe",
       [](json& j) {
         auto& d = j["expected"]["dropped"]["data"];
         for (auto& v : d)
           if (v == 1) {
             v = 0;
             break;
           }
       },
       {"dropped"}},
  };
}

}  // namespace

BOOST_AUTO_TEST_CASE(golden_harness_rejects_bad_cases) {
  if (std::getenv(child_env) != nullptr) return;  // a child runs only its one case
  std::mt19937_64 rng(std::random_device{}());
  const fs::path tmp =
      fs::temp_directory_path() / ("switchyard-golden-selftest-" + std::to_string(::getpid()) +
                                   "-" + std::to_string(rng() % 1000000));
  fs::create_directories(tmp);
  int n = 0;
  for (const auto& m : mutations()) {
    BOOST_TEST_CONTEXT("self-test '" << m.label << "'") {
      const auto base = base_file(m.preferred, m.method);
      if (!base) {
        BOOST_TEST_MESSAGE("skipped: no " << m.method << " file in " << golden_source_dir());
        continue;
      }
      json j;
      {
        std::ifstream in(*base);
        in >> j;
      }
      m.apply(j);
      const fs::path dir = tmp / std::to_string(n++);
      fs::create_directories(dir);
      const fs::path file = dir / base->filename();
      {
        std::ofstream out(file);
        out << j.dump(1);
      }
      const auto r = run_child(file);
      if (m.must_say.empty()) {
        BOOST_TEST(r.status == 0, "unmodified copy of " << *base << " must pass; output:\n"
                                                        << r.output);
      } else {
        BOOST_TEST(r.status != 0, "the defect was not detected; output:\n" << r.output);
        BOOST_TEST(r.output.find(file.string()) != std::string::npos,
                   "the message must name the file " << file << "; output:\n"
                                                     << r.output);
        for (const auto& s : m.must_say)
          BOOST_TEST(r.output.find(s) != std::string::npos, "the message must say \""
                                                                << s << "\"; output:\n"
                                                                << r.output);
      }
    }
  }
  std::error_code ec;
  fs::remove_all(tmp, ec);
}
