// SPDX-License-Identifier: Apache-2.0
// The golden suite: every *.json in $SWITCHYARD_GOLDEN_DIR (default: ../shared/golden beside
// the checkout) becomes one Boost.Test case, checked by the checker registered for its
// `method`. Each file is first checked against shared/golden/README.md (golden.hpp,
// case_problems); a method with no checker fails with a message saying so.
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <set>

#include "golden/golden.hpp"

namespace fs = std::filesystem;
namespace bt = boost::unit_test;
using namespace switchyard::golden;

namespace {

// Methods whose checkers have not landed yet: their cases are registered as expected
// failures (they fail with "not supported", they never pass). Empty once every router
// of shared/docs/routing-algorithms.md is implemented.
const std::set<std::string> expected_unsupported = {};

fs::path golden_dir() {
  if (const char* env = std::getenv("SWITCHYARD_GOLDEN_DIR"); env && *env) return env;
  return SWITCHYARD_DEFAULT_GOLDEN_DIR;
}

void run_case(const fs::path& file) {
  golden_case c;
  c.path = file.string();
  std::ifstream in(file);
  BOOST_TEST_REQUIRE(static_cast<bool>(in), "cannot open " << file);
  try {
    in >> c.j;
  } catch (const std::exception& e) {
    BOOST_FAIL(file << ": not valid JSON: " << e.what());
  }
  // The file against the README (shared/golden/README.md) before any checker reads it.
  // BOOST_ERROR, not BOOST_FAIL: every problem is reported, and a case registered as an
  // expected failure still counts its errors.
  const auto problems = case_problems(c.j, c.path);
  for (const auto& p : problems) BOOST_ERROR(p);
  if (!problems.empty()) return;
  const std::string method = c.method();
  auto it = registry().find(method);
  if (it == registry().end()) {
    BOOST_ERROR(file << ": method '" << method << "' is not supported by Switchyard yet");
    return;
  }
  BOOST_TEST_MESSAGE(file.filename() << ": " << c.j.value("description", ""));
  BOOST_TEST_CONTEXT("golden file " << c.path) {
    it->second(c);
  }
  // Every key the file carries must have been read by the checker (none ignored silently).
  for (const auto& p : unread_keys(c)) BOOST_ERROR(p);
}

bool init_golden() {
  const fs::path dir = golden_dir();
  std::vector<fs::path> files;
  if (fs::is_directory(dir)) {
    for (const auto& e : fs::directory_iterator(dir))
      if (e.path().extension() == ".json") files.push_back(e.path());
  }
  std::sort(files.begin(), files.end());
  if (files.empty()) {
    std::cerr << "golden: no *.json files in " << dir
              << " (set SWITCHYARD_GOLDEN_DIR to the golden directory)\n";
    return false;  // a suite that checks nothing must not pass
  }
  std::cout << "golden: " << files.size() << " case files from " << dir << "\n";
  for (const auto& f : files) {
    std::string method;
    try {
      std::ifstream in(f);
      json j;
      in >> j;
      method = j.value("method", "");
    } catch (...) {
    }
    auto* tc = bt::make_test_case([f] { run_case(f); }, f.stem().string(), __FILE__, __LINE__);
    bt::framework::master_test_suite().add(tc, expected_unsupported.count(method) ? 1u : 0u);
  }
  return true;
}

}  // namespace

int main(int argc, char* argv[]) {
  return bt::unit_test_main(&init_golden, argc, argv);
}
