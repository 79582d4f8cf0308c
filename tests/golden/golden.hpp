#pragma once
// Golden harness: reads a case file (format in shared/golden/README.md) and gives the
// per-method checkers typed access to inputs/expected arrays and the tolerance rules.
// A checker registers itself for one `method` with SWITCHYARD_GOLDEN_METHOD-free static
// registration: `const golden::registrar reg{"topk_softmax", &check_topk};`.
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <cstdint>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <switchyard/routing/plan.hpp>
#include <string>
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
    const json& a = s.at(key);
    array<T> out;
    out.shape = a.at("shape").get<std::vector<std::int64_t>>();
    for (const auto& v : a.at("data")) out.data.push_back(v.get<T>());
    return out;
  }
  template <class T = float>
  [[nodiscard]] array<T> input(const std::string& key) const { return get<T>("inputs", key); }
  template <class T = float>
  [[nodiscard]] array<T> expected(const std::string& key) const {
    return get<T>("expected", key);
  }
};

//! Tolerances of shared/golden/README.md: outputs atol + rtol·|want|; losses/gradients use
//! the looser loss rtol.
struct tolerance {
  double atol = 1e-6;
  double rtol = 1e-5;
  double loss_rtol = 1e-4;
};

inline tolerance tolerance_of(const golden_case& c) {
  tolerance t;
  if (c.j.contains("tolerance")) {
    const json& tj = c.j.at("tolerance");
    auto num = [](const json& v) {
      return v.is_string() ? std::stod(v.get<std::string>()) : v.get<double>();
    };
    if (tj.contains("atol")) t.atol = num(tj.at("atol"));
    if (tj.contains("rtol")) t.rtol = num(tj.at("rtol"));
  }
  return t;
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

//! When the case has `grad_combine_dense`, checks `grad_router_logits` = d(Σ cot ⊙ dense
//! combine weights)/d(logits), with no aux losses, through the router's backward_logits.
template <class Router, class Plan>
void check_router_logit_gradient(const golden_case& c, const Router& router, const Plan& plan,
                                 const tolerance& tol) {
  if (!c.has_input("grad_combine_dense")) return;
  const auto cot = c.input("grad_combine_dense");
  std::vector<float> d_slots(static_cast<std::size_t>(plan.num_tokens * plan.width));
  routing::dense_to_slot_cotangent(plan, cot.data.data(), d_slots.data());
  std::vector<float> d_logits(static_cast<std::size_t>(plan.num_tokens * plan.num_experts));
  router.backward_logits(plan, d_slots.data(), {}, d_logits.data());  // no aux losses
  check_close("grad_router_logits", d_logits, c.expected("grad_router_logits").data, tol.atol,
              tol.loss_rtol);
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
