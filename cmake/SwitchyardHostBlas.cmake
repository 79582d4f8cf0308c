# SPDX-License-Identifier: Apache-2.0
# What switchyard::host_blas carries, found in one place for every route: the build tree
# (CMakeLists.txt: add_subdirectory, FetchContent, the tests/examples/benchmarks), the installed
# switchyard-config.cmake (installed next to it) and the Conan build module (packaged next to it).
# docs/blas.md has the strategy.
#
# switchyard_find_host_blas([MODE <auto|scipy-openblas|system|none>] [VENDOR <BLA_VENDOR>]
#                           [OPENMP] [BLAS] [QUIET] [SCIPY_HINTS <dir>...] [PYTHONS <exe>...])
#   OPENMP  find OpenMP (C++); sets SWITCHYARD_HOST_BLAS_OPENMP (TRUE when OpenMP::OpenMP_CXX exists)
#   MODE    which CBLAS (BLAS alone means MODE system; neither means none):
#           scipy-openblas  PyPI's scipy-openblas32 (a current OpenBLAS, every symbol prefixed
#                     scipy_, so it never clashes with another BLAS in the process):
#                     switchyard_find_scipy_openblas below; the target switchyard::scipy_openblas.
#           system    a BLAS through FindBLAS (BLA_VENDOR when the caller has set it, else VENDOR,
#                     e.g. OpenBLAS) and its cblas.h; BLAS::BLAS and the cache entry
#                     SWITCHYARD_CBLAS_INCLUDE_DIR (set it yourself to point at another cblas.h).
#                     A BLAS library without cblas.h does not count: the host GEMMs need the
#                     header (backend/host/gemm.hpp).
#           auto      scipy-openblas when found, else system (skipped when the caller set
#                     CMAKE_DISABLE_FIND_PACKAGE_BLAS), else none.
#           none      no CBLAS: the host GEMMs use the blocked loop nest.
#   QUIET   passed to find_package; no warnings.
# Results (FALSE / empty for a part not asked for or not found):
#   SWITCHYARD_HOST_BLAS_OPENMP   TRUE when OpenMP::OpenMP_CXX exists
#   SWITCHYARD_HOST_BLAS_CBLAS    TRUE when a CBLAS with its header was found
#   SWITCHYARD_HOST_BLAS_KIND     scipy-openblas, system or none: what was found
#   SWITCHYARD_HOST_BLAS_TARGET   the imported target to link (switchyard::scipy_openblas, BLAS::BLAS)
#   SWITCHYARD_SCIPY_OPENBLAS_DIR the scipy_openblas32 package directory (scipy-openblas only)
#   SWITCHYARD_SCIPY_OPENBLAS_VERSION  its OpenBLAS version ("0.3.34.481.3")
# The imported targets are created in the calling directory (as find_package's always are;
# switchyard::scipy_openblas is GLOBAL); BLA_VENDOR is not changed for the caller.
# OpenBLAS's cblas.h also declares its thread controls; gemm.hpp detects them itself
# (SWITCHYARD_HOST_BLAS_THREAD_CONTROL); switchyard::scipy_openblas adds the definition
# SWITCHYARD_BLAS_SCIPY_OPENBLAS, with which gemm.hpp calls the scipy_-prefixed names.
include_guard(GLOBAL)

# switchyard_find_scipy_openblas([HINTS <dir>...] [PYTHONS <exe>...] [QUIET])
# Finds PyPI's scipy-openblas32 wheel: a directory holding include/cblas.h (declaring
# scipy_cblas_sgemm) and lib/libscipy_openblas.so. Looked for, first hit wins, in
#   1. SWITCHYARD_SCIPY_OPENBLAS_ROOT (CMake variable, else environment variable): that package
#      directory (.../site-packages/scipy_openblas32) or the site-packages directory above it;
#   2. HINTS (the installed config passes the directory the build used);
#   3. `import scipy_openblas32` run by SWITCHYARD_PYTHON, then each of PYTHONS (the root
#      CMakeLists.txt passes the checkout's .venv), then $VIRTUAL_ENV/bin/python, then python3 on
#      PATH (the package's get_include_dir()).
# Creates the IMPORTED GLOBAL target switchyard::scipy_openblas (the shared library, its include
# directory, SWITCHYARD_BLAS_SCIPY_OPENBLAS) and sets SWITCHYARD_SCIPY_OPENBLAS_DIR /
# SWITCHYARD_SCIPY_OPENBLAS_VERSION in the caller (empty when not found).
function(switchyard_find_scipy_openblas)
  cmake_parse_arguments(PARSE_ARGV 0 arg "QUIET" "" "HINTS;PYTHONS")
  set(found_dir "")
  if(TARGET switchyard::scipy_openblas)
    get_target_property(found_dir switchyard::scipy_openblas SWITCHYARD_SCIPY_OPENBLAS_DIR)
  else()
    set(candidates "")
    if(SWITCHYARD_SCIPY_OPENBLAS_ROOT)
      list(APPEND candidates "${SWITCHYARD_SCIPY_OPENBLAS_ROOT}" "${SWITCHYARD_SCIPY_OPENBLAS_ROOT}/scipy_openblas32")
    elseif(DEFINED ENV{SWITCHYARD_SCIPY_OPENBLAS_ROOT} AND NOT "$ENV{SWITCHYARD_SCIPY_OPENBLAS_ROOT}" STREQUAL "")
      list(APPEND candidates "$ENV{SWITCHYARD_SCIPY_OPENBLAS_ROOT}" "$ENV{SWITCHYARD_SCIPY_OPENBLAS_ROOT}/scipy_openblas32")
    endif()
    if(candidates)
      list(GET candidates 0 root)
      _switchyard_scipy_openblas_valid("${root}" ok_root)
      _switchyard_scipy_openblas_valid("${root}/scipy_openblas32" ok_site)
      if(NOT ok_root AND NOT ok_site AND NOT arg_QUIET)
        message(WARNING "switchyard: SWITCHYARD_SCIPY_OPENBLAS_ROOT=${root} holds no scipy-openblas32 "
                "(include/cblas.h with scipy_cblas_sgemm, lib/libscipy_openblas.so): looking elsewhere")
      endif()
    endif()
    list(APPEND candidates ${arg_HINTS})
    foreach(dir IN LISTS candidates)
      _switchyard_scipy_openblas_valid("${dir}" ok)
      if(ok)
        set(found_dir "${dir}")
        break()
      endif()
    endforeach()
    if(NOT found_dir)
      set(pythons "")
      if(SWITCHYARD_PYTHON)
        list(APPEND pythons "${SWITCHYARD_PYTHON}")
      endif()
      list(APPEND pythons ${arg_PYTHONS})
      if(DEFINED ENV{VIRTUAL_ENV} AND EXISTS "$ENV{VIRTUAL_ENV}/bin/python")
        list(APPEND pythons "$ENV{VIRTUAL_ENV}/bin/python")
      endif()
      find_program(_switchyard_python3 NAMES python3 NO_CACHE)
      if(_switchyard_python3)
        list(APPEND pythons "${_switchyard_python3}")
      endif()
      list(REMOVE_DUPLICATES pythons)
      foreach(py IN LISTS pythons)
        if(NOT EXISTS "${py}")
          continue()
        endif()
        execute_process(
          COMMAND "${py}" -c "import os, scipy_openblas32 as m; print(os.path.dirname(m.get_include_dir()))"
          RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_QUIET OUTPUT_STRIP_TRAILING_WHITESPACE)
        if(rc EQUAL 0 AND out)
          _switchyard_scipy_openblas_valid("${out}" ok)
          if(ok)
            set(found_dir "${out}")
            break()
          endif()
        endif()
      endforeach()
    endif()
    if(found_dir)
      file(REAL_PATH "${found_dir}" found_dir)
      file(GLOB lib "${found_dir}/lib/libscipy_openblas*.so")
      list(GET lib 0 lib)
      get_filename_component(soname "${lib}" NAME)
      add_library(switchyard::scipy_openblas SHARED IMPORTED GLOBAL)
      set_target_properties(switchyard::scipy_openblas PROPERTIES
        IMPORTED_LOCATION "${lib}"
        IMPORTED_SONAME "${soname}"
        INTERFACE_INCLUDE_DIRECTORIES "${found_dir}/include"
        INTERFACE_COMPILE_DEFINITIONS SWITCHYARD_BLAS_SCIPY_OPENBLAS
        SWITCHYARD_SCIPY_OPENBLAS_DIR "${found_dir}")
    elseif(NOT arg_QUIET)
      message(STATUS "switchyard: scipy-openblas32 not found (pip install \"scipy-openblas32>=0.3.30,<0.4\", "
                     "or set SWITCHYARD_SCIPY_OPENBLAS_ROOT to its package directory)")
    endif()
  endif()
  set(version "")
  if(found_dir)
    file(STRINGS "${found_dir}/include/openblas_config.h" line REGEX "#define OPENBLAS_VERSION ")
    if(line MATCHES "OpenBLAS ([0-9][0-9.]*)")
      set(version "${CMAKE_MATCH_1}")
    endif()
  endif()
  set(SWITCHYARD_SCIPY_OPENBLAS_DIR "${found_dir}" PARENT_SCOPE)
  set(SWITCHYARD_SCIPY_OPENBLAS_VERSION "${version}" PARENT_SCOPE)
endfunction()

# <ok> = whether <dir> holds the scipy-openblas32 layout (prefixed cblas.h and the library).
function(_switchyard_scipy_openblas_valid dir ok)
  set(result FALSE)
  if(dir AND EXISTS "${dir}/include/cblas.h" AND EXISTS "${dir}/include/openblas_config.h")
    file(GLOB lib "${dir}/lib/libscipy_openblas*.so")
    if(lib)
      file(STRINGS "${dir}/include/cblas.h" prefixed REGEX "scipy_cblas_sgemm" LIMIT_COUNT 1)
      if(prefixed)
        set(result TRUE)
      endif()
    endif()
  endif()
  set(${ok} ${result} PARENT_SCOPE)
endfunction()

function(switchyard_find_host_blas)
  cmake_parse_arguments(PARSE_ARGV 0 arg "OPENMP;BLAS;QUIET" "VENDOR;MODE" "SCIPY_HINTS;PYTHONS")
  set(quiet "")
  if(arg_QUIET)
    set(quiet QUIET)
  endif()
  set(mode none)
  if(arg_MODE)
    set(mode "${arg_MODE}")
  elseif(arg_BLAS)
    set(mode system)
  endif()
  if(NOT mode MATCHES "^(auto|scipy-openblas|system|none)$")
    message(FATAL_ERROR "switchyard: SWITCHYARD_BLAS must be auto, scipy-openblas, system or none, got '${mode}'")
  endif()

  set(openmp FALSE)
  if(arg_OPENMP)
    if(NOT TARGET OpenMP::OpenMP_CXX)
      find_package(OpenMP ${quiet} COMPONENTS CXX)
    endif()
    if(TARGET OpenMP::OpenMP_CXX)
      set(openmp TRUE)
    endif()
  endif()

  set(cblas FALSE)
  set(kind none)
  set(target "")
  set(scipy_dir "")
  set(scipy_version "")
  if(mode STREQUAL "scipy-openblas" OR (mode STREQUAL "auto" AND NOT CMAKE_DISABLE_FIND_PACKAGE_BLAS))
    set(scipy_quiet "")
    if(arg_QUIET)
      set(scipy_quiet QUIET)
    endif()
    switchyard_find_scipy_openblas(HINTS ${arg_SCIPY_HINTS} PYTHONS ${arg_PYTHONS} ${scipy_quiet})
    if(SWITCHYARD_SCIPY_OPENBLAS_DIR)
      set(cblas TRUE)
      set(kind scipy-openblas)
      set(target switchyard::scipy_openblas)
      set(scipy_dir "${SWITCHYARD_SCIPY_OPENBLAS_DIR}")
      set(scipy_version "${SWITCHYARD_SCIPY_OPENBLAS_VERSION}")
    endif()
  endif()
  if(mode STREQUAL "system" OR (mode STREQUAL "auto" AND NOT cblas))
    if(NOT TARGET BLAS::BLAS)
      if(NOT DEFINED BLA_VENDOR AND arg_VENDOR)
        set(BLA_VENDOR "${arg_VENDOR}")  # function scope: the caller's BLA_VENDOR is untouched
      endif()
      find_package(BLAS ${quiet})
    endif()
    if(TARGET BLAS::BLAS)
      # cblas.h: on the default include path on Debian/Ubuntu (<arch>/cblas.h, an alternative
      # pointing at OpenBLAS's), under include/openblas on Fedora, next to the library's lib/
      # elsewhere (Homebrew, a source build, a package manager's prefix).
      set(hints "")
      get_target_property(libs BLAS::BLAS INTERFACE_LINK_LIBRARIES)
      foreach(lib IN LISTS libs)
        if(IS_ABSOLUTE "${lib}")
          get_filename_component(dir "${lib}" DIRECTORY)
          list(APPEND hints "${dir}/../include" "${dir}/../../include")
        endif()
      endforeach()
      # The plain directories first, so that a default one (Debian's) wins and adds nothing to
      # the command line; then vendor subdirectories.
      find_path(SWITCHYARD_CBLAS_INCLUDE_DIR cblas.h HINTS ${hints}
                DOC "Directory holding the cblas.h of the BLAS switchyard::host_blas links")
      if(NOT SWITCHYARD_CBLAS_INCLUDE_DIR)
        find_path(SWITCHYARD_CBLAS_INCLUDE_DIR cblas.h HINTS ${hints}
                  PATH_SUFFIXES openblas openblas-pthread openblas-openmp
                  DOC "Directory holding the cblas.h of the BLAS switchyard::host_blas links")
      endif()
      mark_as_advanced(SWITCHYARD_CBLAS_INCLUDE_DIR)
      if(SWITCHYARD_CBLAS_INCLUDE_DIR)
        set(cblas TRUE)
        set(kind system)
        set(target BLAS::BLAS)
      elseif(NOT arg_QUIET)
        message(WARNING "switchyard: a BLAS was found (${libs}) but no cblas.h: "
                "switchyard::host_blas leaves it out and the host GEMMs use the blocked loop nest. "
                "Set SWITCHYARD_CBLAS_INCLUDE_DIR to the directory holding cblas.h.")
      endif()
    endif()
  endif()

  set(SWITCHYARD_HOST_BLAS_OPENMP ${openmp} PARENT_SCOPE)
  set(SWITCHYARD_HOST_BLAS_CBLAS ${cblas} PARENT_SCOPE)
  set(SWITCHYARD_HOST_BLAS_KIND ${kind} PARENT_SCOPE)
  set(SWITCHYARD_HOST_BLAS_TARGET "${target}" PARENT_SCOPE)
  set(SWITCHYARD_SCIPY_OPENBLAS_DIR "${scipy_dir}" PARENT_SCOPE)
  set(SWITCHYARD_SCIPY_OPENBLAS_VERSION "${scipy_version}" PARENT_SCOPE)
endfunction()

# switchyard_describe_host_blas(<out>): one line saying what switchyard::host_blas carries
# (from the result variables of switchyard_find_host_blas in the calling scope).
function(switchyard_describe_host_blas out)
  set(parts "switchyard::switchyard")
  if(SWITCHYARD_HOST_BLAS_OPENMP)
    list(APPEND parts "OpenMP")
  endif()
  if(SWITCHYARD_HOST_BLAS_CBLAS AND SWITCHYARD_HOST_BLAS_KIND STREQUAL "scipy-openblas")
    list(APPEND parts "CBLAS scipy-openblas (OpenBLAS ${SWITCHYARD_SCIPY_OPENBLAS_VERSION}, scipy_ symbols) from ${SWITCHYARD_SCIPY_OPENBLAS_DIR} + SWITCHYARD_HAS_CBLAS")
  elseif(SWITCHYARD_HOST_BLAS_CBLAS)
    get_target_property(libs BLAS::BLAS INTERFACE_LINK_LIBRARIES)
    list(REMOVE_ITEM libs "")
    list(JOIN libs " " libs)
    list(APPEND parts "CBLAS system ${libs} with cblas.h in ${SWITCHYARD_CBLAS_INCLUDE_DIR} + SWITCHYARD_HAS_CBLAS")
  else()
    list(APPEND parts "no CBLAS: the host GEMMs use the blocked loop nest")
  endif()
  list(JOIN parts ", " text)
  set(${out} "${text}" PARENT_SCOPE)
endfunction()
