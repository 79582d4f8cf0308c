// SPDX-License-Identifier: Apache-2.0
#pragma once
// Seeded random inputs for tests: fresh values every test, reproducible from the seed the
// test prints on failure. Never zeros.
#include <cstdint>
#include <random>
#include <vector>

namespace switchyard::test {

//! Seed of a test run: SWITCHYARD_TEST_SEED if set, else a fixed default (CI reproducible).
inline std::uint64_t base_seed() {
  if (const char* s = std::getenv("SWITCHYARD_TEST_SEED")) return std::strtoull(s, nullptr, 10);
  return 20261125u;
}

//! n normal(0, stddev) floats from the generator.
inline std::vector<float> normal(std::mt19937_64& g, std::size_t n, float stddev = 1.0f) {
  std::normal_distribution<float> d(0.0f, stddev);
  std::vector<float> v(n);
  for (auto& x : v) x = d(g);
  return v;
}

//! n uniform floats in [lo, hi).
inline std::vector<float> uniform(std::mt19937_64& g, std::size_t n, float lo, float hi) {
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = d(g);
  return v;
}

}  // namespace switchyard::test
