#pragma once
//! \file blas_info.hpp
//! `host::blas_runtime()`: which GEMM the host backend runs on this machine (library, version,
//! the kernel set it chose, the CPU's widest vector ISA) and whether that kernel set is older
//! than the CPU (a BLAS that does not recognise the CPU falls back to generic kernels several
//! times slower); `host::warn_if_generic_blas()` says so once per process on stderr.
//! docs/blas.md has the strategy.

#include <cstdio>
#include <string>

#include "switchyard/backend/host/gemm.hpp"

namespace switchyard::host {

//! What the host backend's GEMM runs on, measured at run time.
struct blas_runtime_info {
  std::string library;          //!< "OpenBLAS 0.3.21", "blocked loops (no BLAS)", ...
  std::string kernel;           //!< the kernel set the BLAS chose ("SkylakeX", "Haswell"); "" when unknown
  std::string cpu_isa;          //!< the CPU's widest vector ISA: "avx512", "avx2", "avx", "sse"
  bool generic_kernels = false; //!< the BLAS runs kernels older than the CPU supports
  int threads = 1;              //!< the BLAS's own thread count (1 when it has no control)
  std::string advice;           //!< what to do when generic_kernels; empty otherwise
};

namespace detail_blas {
inline std::string cpu_isa() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return "avx512";
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "avx2";
  if (__builtin_cpu_supports("avx")) return "avx";
  return "sse";
#else
  return "other";
#endif
}
}  // namespace detail_blas

//! The host GEMM's library, kernel set and CPU, probed once and cached.
inline const blas_runtime_info& blas_runtime() {
  static const blas_runtime_info info = [] {
    blas_runtime_info r;
    r.cpu_isa = detail_blas::cpu_isa();
#if SWITCHYARD_HOST_BLAS_THREAD_CONTROL
    r.library = OPENBLAS_VERSION;  // " OpenBLAS 0.3.21 "
    r.library.erase(0, r.library.find_first_not_of(' '));
    r.library.erase(r.library.find_last_not_of(' ') + 1);
    const char* core = openblas_get_corename();
    r.kernel = core != nullptr ? core : "";
    r.threads = openblas_get_num_threads();
    // Kernel sets without AVX2/FMA on a CPU that has them.
    for (const char* generic : {"Prescott", "Core2", "Penryn", "Dunnington", "Nehalem", "Atom",
                                "Katmai", "Coppermine", "Northwood", "Banias", "Opteron",
                                "Barcelona", "Bobcat", "Generic", "generic"}) {
      if (r.kernel == generic && (r.cpu_isa == "avx512" || r.cpu_isa == "avx2")) r.generic_kernels = true;
    }
#elif SWITCHYARD_HOST_GEMM_CBLAS
    r.library = "CBLAS (unknown vendor)";
#else
    r.library = "blocked loops (no BLAS)";
#endif
    if (r.generic_kernels) {
      r.advice = "the BLAS runs its generic '" + r.kernel + "' kernels on a CPU with " + r.cpu_isa +
                 ": GEMMs run several times slower than they can. See docs/blas.md.";
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
