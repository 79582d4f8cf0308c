# SPDX-License-Identifier: Apache-2.0
# Runs `conan create . --build=missing` for the recipe at the repository root, as CTest test
# packaging.conan. Offline and isolated: CONAN_HOME lives in the build tree (the user's
# ~/.conan2 is untouched), a default profile is detected there, and its remotes are disabled
# (the recipe requires nothing). The recipe, its sources and test_package/ are staged into the
# build tree first so that test_package's build folder never lands in the source tree.
#   -DCONAN=<conan executable> -DSOURCE_DIR=<repo root> -DWORK_DIR=<dir in the build tree>
#   -DGENERATOR=... -DCXX_COMPILER=...
cmake_minimum_required(VERSION 3.25)

function(conan_step)
  message(STATUS "[packaging] conan ${ARGN}")
  execute_process(COMMAND "${CONAN}" ${ARGN} RESULT_VARIABLE rc WORKING_DIRECTORY "${WORK_DIR}/stage")
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "[packaging] conan ${ARGN} failed (${rc})")
  endif()
endfunction()

set(ENV{CONAN_HOME} "${WORK_DIR}/conan_home")
set(ENV{CXX} "${CXX_COMPILER}")
# Conan runs `cmake` from PATH: make it the CMake driving this build.
get_filename_component(_cmake_dir "${CMAKE_COMMAND}" DIRECTORY)
set(ENV{PATH} "${_cmake_dir}:$ENV{PATH}")

file(REMOVE_RECURSE "${WORK_DIR}/stage")
file(MAKE_DIRECTORY "${WORK_DIR}/stage")
file(GLOB _license "${SOURCE_DIR}/LICENSE*")
file(COPY "${SOURCE_DIR}/conanfile.py" "${SOURCE_DIR}/CMakeLists.txt" "${SOURCE_DIR}/include"
          "${SOURCE_DIR}/cmake" ${_license} DESTINATION "${WORK_DIR}/stage")
file(COPY "${SOURCE_DIR}/test_package" DESTINATION "${WORK_DIR}/stage" PATTERN "build" EXCLUDE
     PATTERN "CMakeUserPresets.json" EXCLUDE)

conan_step(profile detect --exist-ok)
conan_step(remote disable "*")  # offline: the recipe and test_package require nothing

set(_conf -c "tools.cmake.cmaketoolchain:generator=${GENERATOR}")
conan_step(create . --build=missing ${_conf})
message(STATUS "[packaging] conan create passed")
