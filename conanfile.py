# SPDX-License-Identifier: Apache-2.0
"""Conan 2 recipe for Switchyard, a header-only C++20/CUDA Mixture-of-Experts library.

System requirement (not a Conan package): the CUDA toolkit (CUDA 13.0 tested). Switchyard
takes CCCL (libcu++, CUB, Thrust) from the toolkit, never from a package, and the CUDA backend
links the toolkit's cudart and cuBLAS. The package ships a CMake build module that finds the
toolkit (optional) and CCCL (required) and links them, so consumers using CMakeDeps get:
  switchyard::switchyard  host headers, C++20, CCCL::libcudacxx (no CUDA compiler needed)
  switchyard::cuda        when the toolkit is found: + CCCL::CCCL, CUDA::cudart, CUDA::cublas,
                          CUDA compiled as C++20
  switchyard::host_blas   always: + OpenMP and a CBLAS (OpenBLAS unless BLA_VENDOR says
                          otherwise) with SWITCHYARD_HAS_CBLAS, as far as they are found on the
                          consumer's machine (system packages, not Conan requirements)
If CCCL is not under the toolkit, point CMake at it (-DCCCL_DIR=<dir>/lib/cmake/cccl).
Usage: docs/integration.md. Test: `conan create . --build=missing`.
"""
import os
import re

from conan import ConanFile
from conan.errors import ConanInvalidConfiguration
from conan.tools.files import copy, load
from conan.tools.layout import basic_layout
from conan.tools.scm import Version

required_conan_version = ">=2.0"


class SwitchyardConan(ConanFile):
    name = "switchyard"
    license = "Apache-2.0"
    description = "Header-only C++20/CUDA Mixture-of-Experts layers with dynamic routers"
    topics = ("mixture-of-experts", "moe", "cuda", "header-only", "routing")
    package_type = "header-library"
    settings = "os", "arch", "compiler", "build_type"
    exports_sources = "include/*", "cmake/*", "CMakeLists.txt", "LICENSE*"
    no_copy_source = True
    # No requirements: CCCL and the CUDA runtime/cuBLAS come from the system CUDA toolkit.

    def set_version(self):
        # One source of truth: project(switchyard VERSION x.y.z) in CMakeLists.txt.
        cmakelists = load(self, os.path.join(self.recipe_folder, "CMakeLists.txt"))
        self.version = re.search(r"project\(switchyard\s+VERSION\s+([0-9.]+)", cmakelists).group(1)

    def layout(self):
        basic_layout(self, src_folder=".")

    def package_id(self):
        self.info.clear()  # header-only: one package for every configuration

    def validate(self):
        # C++20 with concepts: GCC >= 11 or Clang >= 14 (GCC 12 is tested). The standard
        # itself is raised to C++20 by the targets' compile features.
        compiler = self.settings.get_safe("compiler")
        version = self.settings.get_safe("compiler.version")
        minimum = {"gcc": "11", "clang": "14"}.get(str(compiler))
        if minimum and version and Version(version) < minimum:
            raise ConanInvalidConfiguration(f"switchyard needs C++20: {compiler} >= {minimum}")

    def package(self):
        copy(self, "LICENSE*", src=self.source_folder, dst=os.path.join(self.package_folder, "licenses"))
        copy(self, "*", src=os.path.join(self.source_folder, "include"),
             dst=os.path.join(self.package_folder, "include"))
        for module in ("switchyard-conan-deps.cmake", "SwitchyardHostBlas.cmake"):
            copy(self, module, src=os.path.join(self.source_folder, "cmake"),
                 dst=os.path.join(self.package_folder, "lib", "cmake", "switchyard-conan"))

    def package_info(self):
        self.cpp_info.bindirs = []
        self.cpp_info.libdirs = []
        self.cpp_info.set_property("cmake_file_name", "switchyard")
        self.cpp_info.set_property("cmake_target_name", "switchyard::switchyard")
        # Finds CCCL (from the CUDA toolkit) and links it; defines switchyard::cuda when the
        # toolkit is found, and switchyard::host_blas. Included by the config file CMakeDeps
        # generates.
        self.cpp_info.builddirs = [os.path.join("lib", "cmake", "switchyard-conan")]
        self.cpp_info.set_property("cmake_build_modules",
                                   [os.path.join("lib", "cmake", "switchyard-conan",
                                                 "switchyard-conan-deps.cmake")])
