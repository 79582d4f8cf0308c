# SPDX-License-Identifier: Apache-2.0
# Configures, builds and runs one packaging consumer (cmake -P, driven by CTest).
#   -DCONSUMER_SOURCE=<dir> -DCONSUMER_BINARY=<dir>   the consumer project and its build dir
#   -DGENERATOR=... [-DMAKE_PROGRAM=...] -DCXX_COMPILER=... [-DCUDA_COMPILER=...]
#   [-DCXX_LAUNCHER=...] [-DCUDA_LAUNCHER=...]         same generator/compilers as the main build
#   [-DCONFIGURE_ARGS=a|b|c]                           extra -D arguments ('|'-separated)
#   [-DINSTALL_FROM=<build dir> -DINSTALL_PREFIX=<dir>] install a build tree first
#   [-DCHECK_NO_CUDA_INCLUDES=ON]                      the build log (-H) must name no CUDA runtime header
#   [-DSTRIP_CUDA_FROM_PATH=ON]                        run with no nvcc on PATH
# The consumer executable is <CONSUMER_BINARY>/<CONSUMER_EXE, default consumer>. Exit code 77 from it means "skipped":
# passed on with cmake_language(EXIT) where CMake has it (>= 3.29), and always printed as
# SWITCHYARD_PACKAGING_SKIPPED for the test's SKIP_REGULAR_EXPRESSION.
cmake_minimum_required(VERSION 3.25)

function(step what)
  message(STATUS "[packaging] ${what}: ${ARGN}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  set(step_output "${out}" PARENT_SCOPE)
  if(NOT rc EQUAL 0)
    message("${out}")
    message(FATAL_ERROR "[packaging] ${what} failed (${rc})")
  endif()
endfunction()

if(STRIP_CUDA_FROM_PATH)
  # Drop every PATH entry that holds nvcc (the toolkit's bin/, and e.g. /usr/local/bin where
  # some installs link it): the consumer must configure and build without a CUDA compiler.
  string(REPLACE ":" ";" _dirs "$ENV{PATH}")
  set(_path "")
  foreach(d IN LISTS _dirs)
    if(NOT EXISTS "${d}/nvcc")
      string(APPEND _path "${d}:")
    endif()
  endforeach()
  set(ENV{PATH} "${_path}")
  find_program(_nvcc nvcc NO_CACHE)
  if(_nvcc)
    message(FATAL_ERROR "nvcc is still on PATH: ${_nvcc}")
  endif()
endif()

if(INSTALL_FROM)
  file(REMOVE_RECURSE "${INSTALL_PREFIX}")
  step("install" "${CMAKE_COMMAND}" --install "${INSTALL_FROM}" --prefix "${INSTALL_PREFIX}")
endif()

if(NOT CONSUMER_SOURCE)
  return()
endif()

file(REMOVE_RECURSE "${CONSUMER_BINARY}")
set(args -S "${CONSUMER_SOURCE}" -B "${CONSUMER_BINARY}" -G "${GENERATOR}"
    "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}" -DCMAKE_BUILD_TYPE=Release)
if(MAKE_PROGRAM)
  list(APPEND args "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}")
endif()
if(CUDA_COMPILER)
  list(APPEND args "-DCMAKE_CUDA_COMPILER=${CUDA_COMPILER}")
endif()
if(CXX_LAUNCHER)
  list(APPEND args "-DCMAKE_CXX_COMPILER_LAUNCHER=${CXX_LAUNCHER}")
endif()
if(CUDA_LAUNCHER)
  list(APPEND args "-DCMAKE_CUDA_COMPILER_LAUNCHER=${CUDA_LAUNCHER}")
endif()
if(CONFIGURE_ARGS)
  string(REPLACE "|" ";" _extra "${CONFIGURE_ARGS}")
  list(APPEND args ${_extra})
endif()

step("configure" "${CMAKE_COMMAND}" ${args})
step("build" "${CMAKE_COMMAND}" --build "${CONSUMER_BINARY}" --config Release -j 2)
set(build_log "${step_output}")

if(CHECK_NO_CUDA_INCLUDES)
  # -H prints one line per header opened. It must list Switchyard's umbrella header (so the
  # check is not vacuous) and none of the CUDA runtime / cuBLAS / driver headers.
  if(NOT build_log MATCHES "switchyard/switchyard\\.hpp")
    message("${build_log}")
    message(FATAL_ERROR "no -H include trace in the build log: cannot check the host headers")
  endif()
  if(build_log MATCHES "[/\\\\](cuda_runtime(_api)?\\.h|cublas[^/\\\\]*\\.h|cuda\\.h|cuda_fp16\\.h|cuda_bf16\\.h)")
    message("${build_log}")
    message(FATAL_ERROR "the host headers included a CUDA header: ${CMAKE_MATCH_0}")
  endif()
  string(REGEX MATCHALL "\n\\.+ [^\n]*" _headers "${build_log}")
  list(LENGTH _headers _n)
  message(STATUS "[packaging] -H trace: ${_n} headers, no CUDA runtime/cuBLAS header among them")
endif()

if(NOT CONSUMER_EXE)
  set(CONSUMER_EXE consumer)
endif()
set(exe "${CONSUMER_BINARY}/${CONSUMER_EXE}")
if(NOT EXISTS "${exe}" AND EXISTS "${CONSUMER_BINARY}/Release/${CONSUMER_EXE}")
  set(exe "${CONSUMER_BINARY}/Release/${CONSUMER_EXE}")  # multi-config generators
endif()
message(STATUS "[packaging] run: ${exe}")
execute_process(COMMAND "${exe}" RESULT_VARIABLE rc)
if(rc EQUAL 77)
  message("SWITCHYARD_PACKAGING_SKIPPED: the consumer was built; running it needs a CUDA device")
  if(CMAKE_VERSION VERSION_GREATER_EQUAL 3.29)
    cmake_language(EXIT 77)
  endif()
  return()
endif()
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "[packaging] consumer exited with ${rc}")
endif()
message(STATUS "[packaging] consumer passed")
