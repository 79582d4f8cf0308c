# What switchyard::host_blas carries, found in one place for every route: the build tree
# (CMakeLists.txt: add_subdirectory, FetchContent, the tests/examples/benchmarks), the installed
# switchyard-config.cmake (installed next to it) and the Conan build module (packaged next to it).
#
# switchyard_find_host_blas([VENDOR <BLA_VENDOR>] [OPENMP] [BLAS] [QUIET])
#   OPENMP  find OpenMP (C++); sets SWITCHYARD_HOST_BLAS_OPENMP (TRUE when OpenMP::OpenMP_CXX exists)
#   BLAS    find a BLAS (BLA_VENDOR when the caller has set it, else VENDOR, e.g. OpenBLAS) and
#           its cblas.h; sets SWITCHYARD_HOST_BLAS_CBLAS (TRUE when BLAS::BLAS exists and
#           cblas.h was found) and the cache entry SWITCHYARD_CBLAS_INCLUDE_DIR (set it yourself
#           to point at another cblas.h). A BLAS library without cblas.h does not count: the
#           host GEMMs need the header (backend/host/gemm.hpp), so the target carries neither.
#   QUIET   passed to find_package.
# Both result variables are FALSE for a part not asked for. The imported targets are created in
# the calling directory (as find_package's always are); BLA_VENDOR is not changed for the caller.
# OpenBLAS's cblas.h also declares its thread controls; gemm.hpp detects them itself
# (SWITCHYARD_HOST_BLAS_THREAD_CONTROL), so no further definition is needed.
include_guard(GLOBAL)

function(switchyard_find_host_blas)
  cmake_parse_arguments(PARSE_ARGV 0 arg "OPENMP;BLAS;QUIET" "VENDOR" "")
  set(quiet "")
  if(arg_QUIET)
    set(quiet QUIET)
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
  if(arg_BLAS)
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
      elseif(NOT arg_QUIET)
        message(WARNING "switchyard: a BLAS was found (${libs}) but no cblas.h: "
                "switchyard::host_blas leaves it out and the host GEMMs use the blocked loop nest. "
                "Set SWITCHYARD_CBLAS_INCLUDE_DIR to the directory holding cblas.h.")
      endif()
    endif()
  endif()

  set(SWITCHYARD_HOST_BLAS_OPENMP ${openmp} PARENT_SCOPE)
  set(SWITCHYARD_HOST_BLAS_CBLAS ${cblas} PARENT_SCOPE)
endfunction()

# switchyard_describe_host_blas(<out>): one line saying what switchyard::host_blas carries.
function(switchyard_describe_host_blas out)
  set(parts "switchyard::switchyard")
  if(SWITCHYARD_HOST_BLAS_OPENMP)
    list(APPEND parts "OpenMP")
  endif()
  if(SWITCHYARD_HOST_BLAS_CBLAS)
    get_target_property(libs BLAS::BLAS INTERFACE_LINK_LIBRARIES)
    list(REMOVE_ITEM libs "")
    list(JOIN libs " " libs)
    list(APPEND parts "CBLAS ${libs} with cblas.h in ${SWITCHYARD_CBLAS_INCLUDE_DIR} + SWITCHYARD_HAS_CBLAS")
  else()
    list(APPEND parts "no CBLAS: the host GEMMs use the blocked loop nest")
  endif()
  list(JOIN parts ", " text)
  set(${out} "${text}" PARENT_SCOPE)
endfunction()
