# SPDX-License-Identifier: Apache-2.0
# Overlay port for Switchyard (header-only). Use from a checkout:
#   vcpkg install switchyard --overlay-ports=<switchyard>/ports
# or, in manifest mode, add "switchyard" to vcpkg.json and
#   "vcpkg-configuration": {"overlay-ports": ["<switchyard>/ports"]}.
# The sources are the checkout this port lives in (../.. of this directory). For a registry,
# replace the SOURCE_PATH line with:
#   vcpkg_from_git(OUT_SOURCE_PATH SOURCE_PATH URL <switchyard git URL> REF <commit sha>)
# CCCL (libcu++, CUB, Thrust), cudart and cuBLAS come from the system CUDA toolkit (the "cuda"
# dependency checks it is installed); there is deliberately no CCCL port dependency.
# tests/packaging/run_vcpkg_port.cmake runs this file with vcpkg's helpers emulated
# (CTest: packaging.vcpkg).
set(VCPKG_BUILD_TYPE release)  # header-only: no debug configuration

get_filename_component(SOURCE_PATH "${CMAKE_CURRENT_LIST_DIR}/../.." ABSOLUTE)

vcpkg_cmake_configure(
  SOURCE_PATH "${SOURCE_PATH}"
  OPTIONS
    -DSWITCHYARD_BUILD_TESTS=OFF
    -DSWITCHYARD_BUILD_EXAMPLES=OFF
    -DSWITCHYARD_BUILD_BENCHMARKS=OFF
    -DSWITCHYARD_ENABLE_CUDA=OFF
    -DSWITCHYARD_INSTALL=ON
    # The host BLAS from vcpkg's world (FindBLAS: vcpkg's openblas port, or the system's), never
    # a Python package found by chance on the build machine: the installed config must not name
    # a path outside the package (docs/blas.md). SWITCHYARD_BLAS=auto opts in to scipy-openblas32.
    -DSWITCHYARD_BLAS=system
)
vcpkg_cmake_install()
vcpkg_cmake_config_fixup(PACKAGE_NAME switchyard CONFIG_PATH lib/cmake/switchyard)

# Header-only: nothing may remain under lib/ or debug/.
file(REMOVE_RECURSE "${CURRENT_PACKAGES_DIR}/lib" "${CURRENT_PACKAGES_DIR}/debug")

file(INSTALL "${CMAKE_CURRENT_LIST_DIR}/usage" DESTINATION "${CURRENT_PACKAGES_DIR}/share/${PORT}")
vcpkg_install_copyright(FILE_LIST "${SOURCE_PATH}/LICENSE")
