// SPDX-License-Identifier: Apache-2.0
// host::blas_runtime() (backend/host/blas_info.hpp) and the CBLAS mapping of gemm.hpp: the
// fields agree with each other and with the build (scipy-openblas or a system CBLAS); the
// generic-kernel rule on Intel and AMD kernel names; host::sgemm through whichever library is
// linked equals a float64 reference; the thread controls and blas_single_thread_scope.
// CTest runs this twice: as loaded (this machine's kernel set must not be generic with
// scipy-openblas) and as host.backend.test_blas_info.prescott with OPENBLAS_CORETYPE=Prescott
// (generic kernels on any AVX CPU, and advice naming the fix).
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include <switchyard/backend/host/blas_info.hpp>
#include <switchyard/backend/host/gemm.hpp>

#include "support/random.hpp"

namespace sy = switchyard;
namespace host = switchyard::host;
using sy::index_t;

namespace {

std::string env_coretype() {
  const char* v = std::getenv("OPENBLAS_CORETYPE");
  return v != nullptr ? v : "";
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

}  // namespace

BOOST_AUTO_TEST_CASE(runtime_fields_are_consistent) {
  const host::blas_runtime_info& r = host::blas_runtime();
  BOOST_TEST_MESSAGE("library '" << r.library << "', kernel '" << r.kernel << "', cpu " << r.cpu_isa
                                 << ", threads " << r.threads << ", generic " << r.generic_kernels);
  BOOST_TEST(!r.library.empty());
  BOOST_TEST((r.cpu_isa == "avx512" || r.cpu_isa == "avx2" || r.cpu_isa == "avx" || r.cpu_isa == "sse" ||
              r.cpu_isa == "other"));
  BOOST_TEST(r.threads >= 1);
  BOOST_TEST(r.generic_kernels == !r.advice.empty());
  BOOST_TEST(&r == &host::blas_runtime());  // probed once
#if SWITCHYARD_HOST_BLAS_THREAD_CONTROL
  BOOST_TEST(r.library.rfind("OpenBLAS 0.", 0) == 0, "library: " << r.library);
  BOOST_TEST(!r.kernel.empty());
  BOOST_TEST(r.threads == host::blas_threads());
  BOOST_TEST(r.generic_kernels == host::detail_blas::older_than_cpu(r.kernel, r.cpu_isa));
#  if defined(SWITCHYARD_BLAS_SCIPY_OPENBLAS)
  BOOST_TEST(contains(r.library, "(scipy-openblas32)"), "library: " << r.library);
#  else
  BOOST_TEST(!contains(r.library, "scipy"), "library: " << r.library);
#  endif
#elif SWITCHYARD_HOST_GEMM_CBLAS
  BOOST_TEST(r.kernel.empty());
  BOOST_TEST(!r.generic_kernels);
#else
  BOOST_TEST(r.library == "blocked loops (no BLAS)");
  BOOST_TEST(!r.generic_kernels);
#endif
}

BOOST_AUTO_TEST_CASE(generic_kernels_as_loaded_or_forced) {
  const host::blas_runtime_info& r = host::blas_runtime();
  if (!SWITCHYARD_HOST_BLAS_THREAD_CONTROL) return;  // no kernel set to judge
  const std::string forced = env_coretype();
  if (forced == "Prescott" || forced == "prescott") {
    // Prescott (SSE3; scipy-openblas's oldest set, Katmai, stands in for it) on any AVX CPU.
    if (host::detail_blas::isa_rank(r.cpu_isa) < 2) return;
    BOOST_TEST(host::detail_blas::kernel_isa(r.kernel) == "sse", "kernel: " << r.kernel);
    BOOST_TEST(r.generic_kernels);
    // OPENBLAS_CORETYPE is set here, so the advice says to unset it or name the right set.
    BOOST_TEST(contains(r.advice, "unset OPENBLAS_CORETYPE"), r.advice);
    BOOST_TEST(contains(r.advice, "set it to " + host::detail_blas::best_kernel(r.cpu_isa)), r.advice);
#if defined(SWITCHYARD_BLAS_SCIPY_OPENBLAS)
    BOOST_TEST(contains(r.advice, "scipy-openblas32"), r.advice);
#else
    BOOST_TEST(contains(r.advice, "-DSWITCHYARD_BLAS=scipy-openblas"), r.advice);
#endif
    BOOST_TEST(contains(r.advice, r.kernel), r.advice);
  } else if (forced.empty()) {
#if defined(SWITCHYARD_BLAS_SCIPY_OPENBLAS)
    // A current OpenBLAS knows this CPU: it must not fall back to generic kernels.
    BOOST_TEST(!r.generic_kernels, r.advice);
#else
    // A system OpenBLAS may not know the CPU (the reason for scipy-openblas): report only.
    BOOST_WARN_MESSAGE(!r.generic_kernels, r.advice);
#endif
  }
}

BOOST_AUTO_TEST_CASE(generic_rule_on_intel_and_amd_kernel_names) {
  using host::detail_blas::kernel_isa;
  using host::detail_blas::older_than_cpu;
  BOOST_TEST(kernel_isa("Prescott") == "sse");
  BOOST_TEST(kernel_isa("KATMAI") == "sse");
  BOOST_TEST(kernel_isa("Barcelona") == "sse");
  BOOST_TEST(kernel_isa("Sandybridge") == "avx");
  BOOST_TEST(kernel_isa("Piledriver") == "avx");
  BOOST_TEST(kernel_isa("Haswell") == "avx2");
  BOOST_TEST(kernel_isa("Zen") == "avx2");
  BOOST_TEST(kernel_isa("SkylakeX") == "avx512");
  BOOST_TEST(kernel_isa("SapphireRapids") == "avx512");
  BOOST_TEST(kernel_isa("NeoverseV2") == "");
  // Intel
  BOOST_TEST(older_than_cpu("Prescott", "avx512"));
  BOOST_TEST(older_than_cpu("Sandybridge", "avx512"));
  BOOST_TEST(!older_than_cpu("Haswell", "avx512"));
  BOOST_TEST(!older_than_cpu("SkylakeX", "avx512"));
  BOOST_TEST(older_than_cpu("Nehalem", "avx"));
  BOOST_TEST(!older_than_cpu("Prescott", "sse"));
  // AMD
  BOOST_TEST(older_than_cpu("Barcelona", "avx2"));
  BOOST_TEST(older_than_cpu("Bulldozer", "avx2"));
  BOOST_TEST(!older_than_cpu("Zen", "avx2"));
  BOOST_TEST(!older_than_cpu("Zen", "avx512"));
  BOOST_TEST(!older_than_cpu("Excavator", "avx2"));
  // unknown names never
  BOOST_TEST(!older_than_cpu("SomeFutureCore", "avx512"));
  BOOST_TEST(host::detail_blas::best_kernel("avx512") == "SkylakeX");
  BOOST_TEST(host::detail_blas::best_kernel("avx") == "Sandybridge");
}

BOOST_AUTO_TEST_CASE(sgemm_through_the_linked_library_matches_float64) {
  std::mt19937_64 g(sy::test::base_seed() + 14);
  struct shape { index_t m, n, k; host::op ta, tb; };
  const shape shapes[] = {{37, 29, 53, host::op::none, host::op::none},
                          {64, 48, 96, host::op::none, host::op::transpose},
                          {33, 70, 41, host::op::transpose, host::op::none},
                          {130, 140, 150, host::op::transpose, host::op::transpose}};
  for (const shape& s : shapes) {
    const index_t lda = (s.ta == host::op::none ? s.k : s.m) + 3;
    const index_t ldb = (s.tb == host::op::none ? s.n : s.k) + 2;
    const index_t ldc = s.n + 5;
    const index_t a_rows = s.ta == host::op::none ? s.m : s.k, b_rows = s.tb == host::op::none ? s.k : s.n;
    const std::vector<float> a = sy::test::normal(g, static_cast<std::size_t>(a_rows * lda));
    const std::vector<float> b = sy::test::normal(g, static_cast<std::size_t>(b_rows * ldb));
    std::vector<float> c = sy::test::normal(g, static_cast<std::size_t>(s.m * ldc));
    const std::vector<float> c0 = c;
    const float alpha = 0.75f, beta = -0.5f;
    host::sgemm(s.ta, s.tb, s.m, s.n, s.k, alpha, a.data(), lda, b.data(), ldb, beta, c.data(), ldc);
    double worst = 0.0;
    for (index_t i = 0; i < s.m; ++i)
      for (index_t j = 0; j < s.n; ++j) {
        double acc = 0.0, mag = 0.0;
        for (index_t p = 0; p < s.k; ++p) {
          const double av = s.ta == host::op::none ? a[i * lda + p] : a[p * lda + i];
          const double bv = s.tb == host::op::none ? b[p * ldb + j] : b[j * ldb + p];
          acc += av * bv;
          mag += std::abs(av * bv);
        }
        const double ref = alpha * acc + beta * static_cast<double>(c0[i * ldc + j]);
        const double err = std::abs(ref - c[i * ldc + j]) / (std::abs(alpha) * mag + std::abs(beta * c0[i * ldc + j]) + 1e-30);
        worst = std::max(worst, err);
      }
    BOOST_TEST(worst < 1e-5, "m " << s.m << " n " << s.n << " k " << s.k << ": relative error " << worst);
    // Padding columns of C are untouched.
    for (index_t i = 0; i < s.m; ++i)
      for (index_t j = s.n; j < ldc; ++j) BOOST_TEST(c[i * ldc + j] == c0[i * ldc + j]);
  }
}

BOOST_AUTO_TEST_CASE(thread_controls_and_single_thread_scope) {
  const int before = host::blas_threads();
  BOOST_TEST(before >= 1);
#if SWITCHYARD_HOST_BLAS_THREAD_CONTROL
  BOOST_TEST(host::blas_single_thread_scope::active());
  host::set_blas_threads(2);
  BOOST_TEST(host::blas_threads() == 2);
  BOOST_TEST(openblas_get_num_threads() == 2);  // the plain OpenBLAS name works with either library
  {
    const host::blas_single_thread_scope one;
    BOOST_TEST(host::blas_threads() == 1);
  }
  BOOST_TEST(host::blas_threads() == 2);
  openblas_set_num_threads(1);
  BOOST_TEST(host::blas_threads() == 1);
  host::set_blas_threads(before);
  BOOST_TEST(host::blas_threads() == before);
#else
  BOOST_TEST(!host::blas_single_thread_scope::active());
  host::set_blas_threads(2);  // no control: nothing changes
  BOOST_TEST(host::blas_threads() == 1);
#endif
}
