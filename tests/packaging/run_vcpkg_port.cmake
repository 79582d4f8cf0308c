# SPDX-License-Identifier: Apache-2.0
# packaging.vcpkg: the vcpkg tool cannot be installed on our machines, so this proves the
# overlay port ports/switchyard/ by running its portfile.cmake itself (cmake -P) with vcpkg's
# helpers emulated (vcpkg_cmake_configure/-install/-config_fixup, vcpkg_install_copyright: the
# same steps, release only), checking what vcpkg's post-build checks check, copying the package
# into a vcpkg-like installed tree <WORK_DIR>/installed/x64-linux, and building a consumer whose
# CMakeLists.txt is made of the usage file's lines, against that tree (CMAKE_PREFIX_PATH, as
# vcpkg's toolchain file sets it).
#   -DPORT_DIR=<ports/switchyard> -DWORK_DIR=<dir> -DCOMMON_DIR=<consumers/common>
#   -DGENERATOR=... [-DMAKE_PROGRAM=...] -DCXX_COMPILER=... [-DCXX_LAUNCHER=...]
cmake_minimum_required(VERSION 3.25)

set(PORT switchyard)
set(TARGET_TRIPLET x64-linux)
set(CURRENT_BUILDTREES_DIR "${WORK_DIR}/buildtrees/${PORT}")
set(CURRENT_PACKAGES_DIR "${WORK_DIR}/packages/${PORT}_${TARGET_TRIPLET}")
set(CURRENT_INSTALLED_DIR "${WORK_DIR}/installed/${TARGET_TRIPLET}")
file(REMOVE_RECURSE "${WORK_DIR}")
file(MAKE_DIRECTORY "${CURRENT_BUILDTREES_DIR}" "${CURRENT_PACKAGES_DIR}" "${CURRENT_INSTALLED_DIR}")

function(_vcpkg_run what)
  message(STATUS "[vcpkg emulation] ${what}")
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE out)
  if(NOT rc EQUAL 0)
    message("${out}")
    message(FATAL_ERROR "[vcpkg emulation] ${what} failed (${rc})")
  endif()
endfunction()

# --- vcpkg's helpers, emulated (release configuration only) ----------------------------------
function(vcpkg_from_git)
  message(FATAL_ERROR "vcpkg_from_git is not emulated: the overlay port builds its own checkout")
endfunction()

function(vcpkg_cmake_configure)
  cmake_parse_arguments(PARSE_ARGV 0 arg "" "SOURCE_PATH" "OPTIONS;OPTIONS_RELEASE;OPTIONS_DEBUG")
  if(NOT VCPKG_BUILD_TYPE STREQUAL "release")
    message(FATAL_ERROR "emulation builds release only: a header-only port sets VCPKG_BUILD_TYPE release")
  endif()
  set(build "${CURRENT_BUILDTREES_DIR}/${TARGET_TRIPLET}-rel")
  # The options vcpkg_cmake_configure always passes (those that matter off Windows).
  set(args -S "${arg_SOURCE_PATH}" -B "${build}" -G "${GENERATOR}" -DCMAKE_BUILD_TYPE=Release
      "-DCMAKE_INSTALL_PREFIX=${CURRENT_PACKAGES_DIR}" "-DCMAKE_PREFIX_PATH=${CURRENT_INSTALLED_DIR}"
      "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}" -DCMAKE_INSTALL_LIBDIR:STRING=lib
      -DCMAKE_INSTALL_BINDIR:STRING=bin -DFETCHCONTENT_FULLY_DISCONNECTED=ON
      -DCMAKE_EXPORT_NO_PACKAGE_REGISTRY=ON -DCMAKE_FIND_PACKAGE_NO_PACKAGE_REGISTRY=ON
      -DCMAKE_FIND_PACKAGE_NO_SYSTEM_PACKAGE_REGISTRY=ON -DCMAKE_INSTALL_SYSTEM_RUNTIME_LIBS_SKIP=TRUE
      "-DVCPKG_TARGET_TRIPLET=${TARGET_TRIPLET}" ${arg_OPTIONS} ${arg_OPTIONS_RELEASE})
  if(MAKE_PROGRAM)
    list(APPEND args "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}")
  endif()
  _vcpkg_run("vcpkg_cmake_configure" "${CMAKE_COMMAND}" ${args})
  set_property(GLOBAL PROPERTY _vcpkg_build_dir "${build}")
endfunction()

function(vcpkg_cmake_install)
  get_property(build GLOBAL PROPERTY _vcpkg_build_dir)
  _vcpkg_run("vcpkg_cmake_install" "${CMAKE_COMMAND}" --build "${build}" --target install)
endfunction()

# Moves CONFIG_PATH to share/<PACKAGE_NAME> and rewrites the relative prefix computations for
# the new depth, with the same regular expressions as vcpkg_cmake_config_fixup.
function(vcpkg_cmake_config_fixup)
  cmake_parse_arguments(PARSE_ARGV 0 arg "" "PACKAGE_NAME;CONFIG_PATH" "")
  if(NOT arg_PACKAGE_NAME)
    set(arg_PACKAGE_NAME "${PORT}")
  endif()
  if(NOT arg_CONFIG_PATH)
    set(arg_CONFIG_PATH "share/${arg_PACKAGE_NAME}")
  endif()
  set(release_share "${CURRENT_PACKAGES_DIR}/share/${arg_PACKAGE_NAME}")
  set(release_config "${CURRENT_PACKAGES_DIR}/${arg_CONFIG_PATH}")
  if(NOT IS_DIRECTORY "${release_config}")
    message(FATAL_ERROR "'${release_config}' does not exist.")
  endif()
  if(NOT arg_CONFIG_PATH STREQUAL "share/${arg_PACKAGE_NAME}")
    file(GLOB files "${release_config}/*")
    file(COPY ${files} DESTINATION "${release_share}")
    file(REMOVE_RECURSE "${release_config}")
    get_filename_component(parent "${release_config}" DIRECTORY)
    file(GLOB parent_contents "${parent}/*")
    if(NOT parent_contents)
      file(REMOVE_RECURSE "${parent}")
    endif()
  endif()
  file(GLOB_RECURSE cmake_files "${release_share}/*.cmake")
  foreach(f IN LISTS cmake_files)
    file(READ "${f}" contents)
    string(REGEX REPLACE "get_filename_component\\(_IMPORT_PREFIX \"\\\${CMAKE_CURRENT_LIST_FILE}\" PATH\\)(\nget_filename_component\\(_IMPORT_PREFIX \"\\\${_IMPORT_PREFIX}\" PATH\\))*"
           "get_filename_component(_IMPORT_PREFIX \"\${CMAKE_CURRENT_LIST_FILE}\" PATH)\nget_filename_component(_IMPORT_PREFIX \"\${_IMPORT_PREFIX}\" PATH)\nget_filename_component(_IMPORT_PREFIX \"\${_IMPORT_PREFIX}\" PATH)"
           contents "${contents}")
    string(REGEX REPLACE "get_filename_component\\(PACKAGE_PREFIX_DIR \"\\\${CMAKE_CURRENT_LIST_DIR}/\\.\\./(\\.\\./)*\" ABSOLUTE\\)"
           "get_filename_component(PACKAGE_PREFIX_DIR \"\${CMAKE_CURRENT_LIST_DIR}/../../\" ABSOLUTE)"
           contents "${contents}")
    string(REPLACE "${CURRENT_PACKAGES_DIR}" "\${_IMPORT_PREFIX}" contents "${contents}")
    file(WRITE "${f}" "${contents}")
  endforeach()
  message(STATUS "[vcpkg emulation] vcpkg_cmake_config_fixup: ${arg_CONFIG_PATH} -> share/${arg_PACKAGE_NAME}")
endfunction()

function(vcpkg_install_copyright)
  cmake_parse_arguments(PARSE_ARGV 0 arg "" "" "FILE_LIST")
  set(text "")
  foreach(f IN LISTS arg_FILE_LIST)
    file(READ "${f}" c)
    string(APPEND text "${c}")
  endforeach()
  file(WRITE "${CURRENT_PACKAGES_DIR}/share/${PORT}/copyright" "${text}")
endfunction()

# --- The manifest, then the portfile itself --------------------------------------------------
file(READ "${PORT_DIR}/vcpkg.json" manifest)
string(JSON name GET "${manifest}" name)
string(JSON version GET "${manifest}" version)
string(JSON ndeps LENGTH "${manifest}" dependencies)
set(deps "")
math(EXPR last "${ndeps} - 1")
foreach(i RANGE ${last})
  string(JSON type TYPE "${manifest}" dependencies ${i})
  if(type STREQUAL "STRING")
    string(JSON d GET "${manifest}" dependencies ${i})
  else()
    string(JSON d GET "${manifest}" dependencies ${i} name)
  endif()
  list(APPEND deps "${d}")
endforeach()
get_filename_component(source_root "${PORT_DIR}/../.." ABSOLUTE)
file(READ "${source_root}/CMakeLists.txt" top)
string(REGEX MATCH "project\\(switchyard VERSION ([0-9.]+)" _ "${top}")
if(NOT name STREQUAL PORT OR NOT version STREQUAL CMAKE_MATCH_1)
  message(FATAL_ERROR "vcpkg.json says ${name} ${version}; CMakeLists.txt says switchyard ${CMAKE_MATCH_1}")
endif()
foreach(d cuda vcpkg-cmake vcpkg-cmake-config)
  if(NOT d IN_LIST deps)
    message(FATAL_ERROR "vcpkg.json must depend on ${d} (has: ${deps})")
  endif()
endforeach()
if(deps MATCHES "cccl")
  message(FATAL_ERROR "vcpkg.json must not depend on a CCCL port: CCCL comes from the CUDA toolkit")
endif()

include("${PORT_DIR}/portfile.cmake")

# --- A subset of vcpkg's post-build checks ---------------------------------------------------
foreach(required include/switchyard/switchyard.hpp share/${PORT}/switchyard-config.cmake
                 share/${PORT}/switchyard-config-version.cmake share/${PORT}/switchyardTargets.cmake
                 share/${PORT}/copyright share/${PORT}/usage)
  if(NOT EXISTS "${CURRENT_PACKAGES_DIR}/${required}")
    message(FATAL_ERROR "the port did not install ${required}")
  endif()
endforeach()
foreach(forbidden debug lib bin)
  if(EXISTS "${CURRENT_PACKAGES_DIR}/${forbidden}")
    message(FATAL_ERROR "a header-only port leaves no ${forbidden}/ directory")
  endif()
endforeach()
file(GLOB_RECURSE cmake_files "${CURRENT_PACKAGES_DIR}/share/*.cmake")
foreach(f IN LISTS cmake_files)
  file(READ "${f}" c)
  foreach(abs "${CURRENT_PACKAGES_DIR}" "${CURRENT_BUILDTREES_DIR}" "${source_root}")
    string(FIND "${c}" "${abs}" at)
    if(NOT at EQUAL -1)
      message(FATAL_ERROR "${f} contains the absolute path ${abs}")
    endif()
  endforeach()
endforeach()

# --- "vcpkg install": the package into the installed tree -------------------------------------
file(COPY "${CURRENT_PACKAGES_DIR}/" DESTINATION "${CURRENT_INSTALLED_DIR}")
message(STATUS "[vcpkg emulation] installed into ${CURRENT_INSTALLED_DIR}")

# --- A consumer made of the usage file's first block of CMake lines ---------------------------
file(STRINGS "${CURRENT_INSTALLED_DIR}/share/${PORT}/usage" usage_lines)
set(block "")
set(in_block FALSE)
foreach(line IN LISTS usage_lines)
  if(line MATCHES "^    (.*)$")
    string(APPEND block "${CMAKE_MATCH_1}\n")
    set(in_block TRUE)
  elseif(in_block)
    break()
  endif()
endforeach()
if(NOT block MATCHES "find_package\\(switchyard" OR NOT block MATCHES "target_link_libraries\\(main")
  message(FATAL_ERROR "the usage file has no find_package/target_link_libraries(main ...) block:\n${block}")
endif()
set(consumer "${WORK_DIR}/consumer")
file(WRITE "${consumer}/CMakeLists.txt" "cmake_minimum_required(VERSION 3.25)
project(switchyard_consumer_vcpkg LANGUAGES CXX)
add_executable(main \"${COMMON_DIR}/main.cpp\")
target_compile_definitions(main PRIVATE SWITCHYARD_ROUTE=\"vcpkg-emulated\")
# --- from share/${PORT}/usage:
${block}")
message(STATUS "[vcpkg emulation] consumer from the usage file:\n${block}")
set(CONSUMER_SOURCE "${consumer}")
set(CONSUMER_BINARY "${WORK_DIR}/consumer-build")
set(CONSUMER_EXE main)
set(CONFIGURE_ARGS "-DCMAKE_PREFIX_PATH=${CURRENT_INSTALLED_DIR}")
unset(INSTALL_FROM)
include("${CMAKE_CURRENT_LIST_DIR}/run_consumer.cmake")
