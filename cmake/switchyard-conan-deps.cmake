# SPDX-License-Identifier: Apache-2.0
# CMake build module of the Conan package (conanfile.py, cmake_build_modules): CMakeDeps
# generates switchyard-config.cmake and the switchyard::switchyard target from package_info;
# this adds what it cannot express, the same as the installed switchyard-config.cmake:
#  - CCCL (libcu++/CUB/Thrust) from the system CUDA toolkit, linked to switchyard::switchyard;
#  - C++20;
#  - switchyard::cuda when the CUDA toolkit is found;
#  - switchyard::host_blas, always: switchyard::switchyard + what is found here of OpenMP and a
#    CBLAS (SWITCHYARD_BLAS if the consumer sets it, else the system BLAS: BLA_VENDOR if set,
#    else OpenBLAS; with SWITCHYARD_HAS_CBLAS). The package is
#    header-only and built once for every configuration, so this is decided on the consumer's
#    machine (SwitchyardHostBlas.cmake, packaged next to this file).
include_guard(GLOBAL)

if(NOT CUDAToolkit_FOUND)
  find_package(CUDAToolkit QUIET)
endif()
set(_switchyard_cccl_hints "")
if(CUDAToolkit_FOUND)
  list(APPEND _switchyard_cccl_hints "${CUDAToolkit_LIBRARY_DIR}/cmake/cccl"
       "${CUDAToolkit_LIBRARY_ROOT}/lib64/cmake/cccl")
endif()
find_package(CCCL CONFIG REQUIRED HINTS ${_switchyard_cccl_hints})
unset(_switchyard_cccl_hints)

# CMake 3.25.0/3.25.1 map CUDA_STANDARD 20 to -std=c++17 for nvcc (cmake#24250), and when CUDA
# was enabled without the fix they do not list cuda_std_20 at all (nvcc 13): supply both.
# Affects the directory calling find_package and the subdirectories it adds afterwards.
if(CMAKE_VERSION VERSION_LESS 3.25.2)
  set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION "-std=c++20")
  set(CMAKE_CUDA20_EXTENSION_COMPILE_OPTION "-std=c++20")
  if(CMAKE_CUDA_COMPILER_LOADED AND NOT "cuda_std_20" IN_LIST CMAKE_CUDA_COMPILE_FEATURES)
    list(APPEND CMAKE_CUDA_COMPILE_FEATURES cuda_std_20)
    set(CMAKE_CUDA20_COMPILE_FEATURES cuda_std_20)
  endif()
endif()

set_property(TARGET switchyard::switchyard APPEND PROPERTY INTERFACE_LINK_LIBRARIES CCCL::libcudacxx)
set_property(TARGET switchyard::switchyard APPEND PROPERTY INTERFACE_COMPILE_FEATURES cxx_std_20)

if(CUDAToolkit_FOUND AND NOT TARGET switchyard::cuda)
  add_library(switchyard::cuda INTERFACE IMPORTED)
  set_target_properties(switchyard::cuda PROPERTIES
    INTERFACE_LINK_LIBRARIES "switchyard::switchyard;CCCL::CCCL;CUDA::cudart;CUDA::cublas"
    INTERFACE_COMPILE_FEATURES cuda_std_20)
endif()

include("${CMAKE_CURRENT_LIST_DIR}/SwitchyardHostBlas.cmake")
if(NOT TARGET switchyard::host_blas)
  # The consumer's SWITCHYARD_BLAS if set (docs/blas.md), else the system BLAS: the package
  # stays what Conan's own profile and system packages say, never a Python package found by
  # chance; -DSWITCHYARD_BLAS=auto or scipy-openblas opts in to scipy-openblas32.
  if(DEFINED SWITCHYARD_BLAS)
    set(_switchyard_blas_mode "${SWITCHYARD_BLAS}")
  else()
    set(_switchyard_blas_mode system)
  endif()
  switchyard_find_host_blas(MODE "${_switchyard_blas_mode}" VENDOR OpenBLAS OPENMP QUIET)
  add_library(switchyard::host_blas INTERFACE IMPORTED)
  set_property(TARGET switchyard::host_blas PROPERTY INTERFACE_LINK_LIBRARIES switchyard::switchyard)
  if(SWITCHYARD_HOST_BLAS_OPENMP)
    set_property(TARGET switchyard::host_blas APPEND PROPERTY INTERFACE_LINK_LIBRARIES OpenMP::OpenMP_CXX)
  endif()
  if(SWITCHYARD_HOST_BLAS_CBLAS)
    set_property(TARGET switchyard::host_blas APPEND PROPERTY INTERFACE_LINK_LIBRARIES
                 ${SWITCHYARD_HOST_BLAS_TARGET})
    set_property(TARGET switchyard::host_blas APPEND PROPERTY INTERFACE_COMPILE_DEFINITIONS SWITCHYARD_HAS_CBLAS)
  endif()
  if(SWITCHYARD_HOST_BLAS_KIND STREQUAL "system")
    set_property(TARGET switchyard::host_blas APPEND PROPERTY
                 INTERFACE_SYSTEM_INCLUDE_DIRECTORIES "${SWITCHYARD_CBLAS_INCLUDE_DIR}")
    set_property(TARGET switchyard::host_blas APPEND PROPERTY
                 INTERFACE_INCLUDE_DIRECTORIES "${SWITCHYARD_CBLAS_INCLUDE_DIR}")
  endif()
  switchyard_describe_host_blas(_switchyard_host_blas_text)
  message(STATUS "switchyard::host_blas (SWITCHYARD_BLAS=${_switchyard_blas_mode}): ${_switchyard_host_blas_text}")
  unset(_switchyard_host_blas_text)
  unset(_switchyard_blas_mode)
endif()
