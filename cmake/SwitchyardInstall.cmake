# SPDX-License-Identifier: Apache-2.0
# Install rules and the CMake package for find_package(switchyard CONFIG):
#   <prefix>/include/switchyard/...                      the headers (header-only library)
#   <prefix>/${SWITCHYARD_INSTALL_CMAKEDIR}/             switchyard-config.cmake, -config-version.cmake,
#       switchyardTargets.cmake       switchyard::switchyard (INTERFACE: C++20, CCCL::libcudacxx)
#       switchyardCudaTargets.cmake   switchyard::cuda (INTERFACE: + CCCL::CCCL, CUDA::cudart,
#                                     CUDA::cublas, cuda_std_20); only when the CUDA toolkit was
#                                     found here, and loaded by the config only when the consumer
#                                     finds the toolkit too (a host-only consumer needs no nvcc).
#       switchyardHostBlasTargets.cmake  switchyard::host_blas (INTERFACE: switchyard::switchyard
#                                     + what this build found of OpenMP::OpenMP_CXX and a CBLAS,
#                                     switchyard::scipy_openblas or BLAS::BLAS, with
#                                     SWITCHYARD_HAS_CBLAS); the config finds those again
#                                     (SwitchyardHostBlas.cmake, installed with it).
#       switchyard::mpi, switchyard::nccl  not exported: the config makes them on the consumer's
#                                     machine from MPI (FindMPI) and NCCL (nccl.h, libnccl), when
#                                     found there (COMPONENTS mpi / nccl: required).
# Included by the root CMakeLists.txt when SWITCHYARD_INSTALL is ON.
include(CMakePackageConfigHelpers)

set(SWITCHYARD_INSTALL_CMAKEDIR "${CMAKE_INSTALL_LIBDIR}/cmake/switchyard" CACHE STRING
    "Where switchyard-config.cmake is installed, relative to the prefix (vcpkg: share/switchyard)")
mark_as_advanced(SWITCHYARD_INSTALL_CMAKEDIR)

install(DIRECTORY "${PROJECT_SOURCE_DIR}/include/" DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}"
        COMPONENT switchyard)

install(TARGETS switchyard EXPORT switchyardTargets COMPONENT switchyard)
install(EXPORT switchyardTargets NAMESPACE switchyard:: FILE switchyardTargets.cmake
        DESTINATION "${SWITCHYARD_INSTALL_CMAKEDIR}" COMPONENT switchyard)

if(TARGET switchyard_cuda)
  # Consumers of switchyard::cuda compile CUDA as C++20. In this build the feature is set only
  # when the CUDA language is enabled (CMake rejects cuda_std_20 otherwise); the installed
  # target always carries it.
  get_target_property(_sy_cuda_features switchyard_cuda INTERFACE_COMPILE_FEATURES)
  if(NOT "cuda_std_20" IN_LIST _sy_cuda_features)
    set_property(TARGET switchyard_cuda APPEND PROPERTY INTERFACE_COMPILE_FEATURES
                 "$<INSTALL_INTERFACE:cuda_std_20>")
  endif()
  unset(_sy_cuda_features)
  install(TARGETS switchyard_cuda EXPORT switchyardCudaTargets COMPONENT switchyard)
  install(EXPORT switchyardCudaTargets NAMESPACE switchyard:: FILE switchyardCudaTargets.cmake
          DESTINATION "${SWITCHYARD_INSTALL_CMAKEDIR}" COMPONENT switchyard)
endif()

# switchyard::host_blas: the exported target names OpenMP::OpenMP_CXX and switchyard::scipy_openblas
# or BLAS::BLAS, which the config recreates with SwitchyardHostBlas.cmake from what this build
# found (recorded below).
install(TARGETS switchyard_host_blas EXPORT switchyardHostBlasTargets COMPONENT switchyard)
install(EXPORT switchyardHostBlasTargets NAMESPACE switchyard:: FILE switchyardHostBlasTargets.cmake
        DESTINATION "${SWITCHYARD_INSTALL_CMAKEDIR}" COMPONENT switchyard)
install(FILES "${CMAKE_CURRENT_LIST_DIR}/SwitchyardHostBlas.cmake"
        DESTINATION "${SWITCHYARD_INSTALL_CMAKEDIR}" COMPONENT switchyard)
# Which CBLAS (SWITCHYARD_HOST_BLAS_KIND: scipy-openblas, system, none) and, for scipy-openblas,
# the package directory this build used: the config looks there first, then asks Python.
set(SWITCHYARD_HOST_BLAS_KIND_BUILT "${SWITCHYARD_HOST_BLAS_KIND}")
set(SWITCHYARD_SCIPY_OPENBLAS_DIR_BUILT "${SWITCHYARD_SCIPY_OPENBLAS_DIR}")
foreach(_sy_part OPENMP CBLAS)
  if(SWITCHYARD_HOST_BLAS_${_sy_part})
    set(SWITCHYARD_HOST_BLAS_${_sy_part}_BUILT TRUE)
  else()
    set(SWITCHYARD_HOST_BLAS_${_sy_part}_BUILT FALSE)
  endif()
endforeach()

configure_package_config_file(
  "${CMAKE_CURRENT_LIST_DIR}/switchyard-config.cmake.in"
  "${PROJECT_BINARY_DIR}/switchyard-config.cmake"
  INSTALL_DESTINATION "${SWITCHYARD_INSTALL_CMAKEDIR}"
  NO_SET_AND_CHECK_MACRO)
write_basic_package_version_file(
  "${PROJECT_BINARY_DIR}/switchyard-config-version.cmake"
  VERSION "${PROJECT_VERSION}" COMPATIBILITY SameMajorVersion ARCH_INDEPENDENT)
install(FILES "${PROJECT_BINARY_DIR}/switchyard-config.cmake"
              "${PROJECT_BINARY_DIR}/switchyard-config-version.cmake"
        DESTINATION "${SWITCHYARD_INSTALL_CMAKEDIR}" COMPONENT switchyard)
