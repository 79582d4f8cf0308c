// SPDX-License-Identifier: Apache-2.0
#pragma once
//! \file blas_info.hpp
//! `host::blas_runtime()`: which GEMM the host backend runs on this machine (library, version,
//! the kernel set it chose, the CPU's widest vector ISA) and whether that kernel set is older
//! than the CPU (a BLAS that does not recognise the CPU falls back to generic kernels several
//! times slower: Debian 12's OpenBLAS 0.3.21 runs its SSE3 "Prescott" kernels on some current
//! Xeons, ~9x slower than its AVX-512 ones); `host::warn_if_generic_blas()` says so once per
//! process on stderr, with what to do. docs/blas.md has the strategy.

#include <cstdio>
#include <cstdlib>
#include <string>

#include "switchyard/backend/host/gemm.hpp"

namespace switchyard::host {

//! What the host backend's GEMM runs on, measured at run time.
struct blas_runtime_info {
  std::string library;          //!< "OpenBLAS 0.3.34.481.3 (scipy-openblas32)", "OpenBLAS 0.3.21", "blocked loops (no BLAS)", ...
  std::string kernel;           //!< the kernel set the BLAS chose ("SkylakeX", "Haswell"); "" when unknown
  std::string cpu_isa;          //!< the CPU's widest vector ISA: "avx512", "avx2", "avx", "sse" ("other" off x86)
  bool generic_kernels = false; //!< the BLAS runs kernels older than the CPU supports
  int threads = 1;              //!< the BLAS's own thread count (1 when it has no control)
  std::string advice;           //!< what to do when generic_kernels; empty otherwise
};

namespace detail_blas {

//! Rank of a vector ISA: sse 1, avx 2, avx2 (with FMA) 3, avx512 4; 0 when unknown.
inline int isa_rank(const std::string& isa) {
  if (isa == "avx512") return 4;
  if (isa == "avx2") return 3;
  if (isa == "avx") return 2;
  if (isa == "sse") return 1;
  return 0;
}

inline std::string cpu_isa() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  // OpenBLAS's AVX-512 kernels (SkylakeX and later) need F, BW, DQ and VL; the builtins also
  // check that the OS saves the registers.
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    return "avx512";
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "avx2";
  if (__builtin_cpu_supports("avx")) return "avx";
  return "sse";
#else
  return "other";
#endif
}

//! Whether the CPU is AMD's (the AVX2 kernel set to name is then "Zen", else "Haswell").
inline bool cpu_is_amd() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_is("amd");
#else
  return false;
#endif
}

//! The widest ISA an OpenBLAS x86-64 kernel set uses (its `openblas_get_corename()`, any case);
//! "" for a name not listed (a newer or non-x86 kernel set: never called generic).
inline std::string kernel_isa(std::string name) {
  for (char& ch : name) ch = static_cast<char>(ch >= 'A' && ch <= 'Z' ? ch - 'A' + 'a' : ch);
  for (const char* k : {"skylakex", "cooperlake", "sapphirerapids"})
    if (name == k) return "avx512";
  for (const char* k : {"haswell", "zen", "excavator"})
    if (name == k) return "avx2";
  for (const char* k : {"sandybridge", "bulldozer", "piledriver", "steamroller"})
    if (name == k) return "avx";
  for (const char* k : {"katmai", "coppermine", "northwood", "prescott", "banias", "core2",
                        "penryn", "dunnington", "nehalem", "atom", "nano", "opteron",
                        "opteron_sse3", "barcelona", "bobcat", "generic", "unknown"})
    if (name == k) return "sse";
  return "";
}

//! Whether an OpenBLAS kernel set is generic for a CPU: it lacks what the CPU has up to
//! AVX2/FMA (SSE kernels on an AVX/AVX2/AVX-512 CPU, AVX ones on an AVX2/AVX-512 CPU). AVX2
//! kernels on an AVX-512 CPU are not generic (within ~1.5x); an unknown kernel name never is.
inline bool older_than_cpu(const std::string& kernel, const std::string& cpu_isa) {
  const int k = isa_rank(kernel_isa(kernel)), c = isa_rank(cpu_isa);
  return k > 0 && k < (c < 3 ? c : 3);
}

//! The kernel set OPENBLAS_CORETYPE should name on this CPU: the newest one every OpenBLAS
//! since 0.3.10 ships for its ISA (SkylakeX's sgemm is also what Cooperlake/SapphireRapids run).
inline std::string best_kernel(const std::string& isa) {
  if (isa == "avx512") return "SkylakeX";
  if (isa == "avx2") return cpu_is_amd() ? "Zen" : "Haswell";
  if (isa == "avx") return "Sandybridge";
  return "";
}

//! "OpenBLAS 0.3.21" from the library's build line (`openblas_get_config()`): the version of
//! the library loaded at run time, which can differ from the header's.
inline std::string openblas_version(const char* config, const char* header_version) {
  std::string s = config != nullptr ? config : "";
  const std::size_t v = s.rfind("OpenBLAS ", 0) == 0 ? s.find(' ', 9) : std::string::npos;
  if (v != std::string::npos) return s.substr(0, v);
  s = header_version;  // " OpenBLAS 0.3.21 "
  s.erase(0, s.find_first_not_of(' '));
  s.erase(s.find_last_not_of(' ') + 1);
  return s;
}

}  // namespace detail_blas

//! The host GEMM's library, kernel set and CPU, probed once and cached.
//! `generic_kernels` is true when the kernel set lacks what the CPU has up to AVX2/FMA (an SSE
//! kernel set on an AVX/AVX2/AVX-512 CPU, an AVX one on an AVX2 or AVX-512 CPU), on Intel and AMD
//! alike (`detail_blas::older_than_cpu`); AVX2 kernels on an AVX-512 CPU are not called generic.
inline const blas_runtime_info& blas_runtime() {
  static const blas_runtime_info info = [] {
    blas_runtime_info r;
    r.cpu_isa = detail_blas::cpu_isa();
#if SWITCHYARD_HOST_BLAS_THREAD_CONTROL
    r.library = detail_blas::openblas_version(detail::openblas_config(), OPENBLAS_VERSION);
#  if defined(SWITCHYARD_BLAS_SCIPY_OPENBLAS)
    r.library += " (scipy-openblas32)";
#  endif
    const char* core = detail::openblas_corename();
    r.kernel = core != nullptr ? core : "";
    r.threads = detail::openblas_threads();
    r.generic_kernels = detail_blas::older_than_cpu(r.kernel, r.cpu_isa);
#elif SWITCHYARD_HOST_GEMM_CBLAS
    r.library = "CBLAS (unknown vendor)";
#else
    r.library = "blocked loops (no BLAS)";
#endif
    if (r.generic_kernels) {
      const std::string best = detail_blas::best_kernel(r.cpu_isa);
      r.advice = r.library + " runs its generic '" + r.kernel + "' kernels (" +
                 detail_blas::kernel_isa(r.kernel) + ") on a CPU with " + r.cpu_isa +
                 ": GEMMs run several times slower than they can. Fix: ";
#if defined(SWITCHYARD_BLAS_SCIPY_OPENBLAS)
      r.advice += "update scipy-openblas32 (scripts/setup, or pip install -U \"scipy-openblas32>=0.3.30,<0.4\") "
                  "and rebuild, or ";
#else
      r.advice += "re-run scripts/setup and configure with -DSWITCHYARD_BLAS=scipy-openblas "
                  "(a current OpenBLAS that knows this CPU), or ";
#endif
      const char* forced = std::getenv("OPENBLAS_CORETYPE");
      if (forced != nullptr && *forced != '\0') {
        r.advice += "unset OPENBLAS_CORETYPE (set to '" + std::string(forced) + "' here) or set it to " +
                    best + " before the process starts. See docs/blas.md.";
      } else {
        r.advice += "set OPENBLAS_CORETYPE=" + best +
                    " in the environment before the process starts. See docs/blas.md.";
      }
    }
    return r;
  }();
  return info;
}

//! Prints `blas_runtime().advice` once per process on stderr when the BLAS runs generic
//! kernels; nothing otherwise.
inline void warn_if_generic_blas() {
  static const bool warned = [] {
    const blas_runtime_info& r = blas_runtime();
    if (r.generic_kernels) std::fprintf(stderr, "switchyard: warning: %s\n", r.advice.c_str());
    return true;
  }();
  (void)warned;
}

}  // namespace switchyard::host
