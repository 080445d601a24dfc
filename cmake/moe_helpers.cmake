# One-line helpers: a component library and a test.
#
#   moe_add_component(scheduler
#     DEPS PUBLIC moe::protocol PRIVATE moe::runtime
#     SOURCES placement.cpp replication.cpp)
# builds the static library moe_scheduler, aliased moe::scheduler, from sources relative to the
# calling directory. Every component sees the repository root as its include root, so headers
# are included as "scheduler/placement.hpp"; the link dependencies carry the layering.
#
#   moe_add_test(scheduler_placement LABELS unit SOURCES placement_test.cpp DEPS moe::scheduler)
# builds a GoogleTest executable and registers each of its test cases with ctest under the
# given labels. GTEST_SKIP() shows up as a skipped ctest test with its reason in the log.

function(moe_set_warnings target)
  if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    target_compile_options(${target} PRIVATE
      $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wpedantic -Wno-unused-parameter>)
    if(MOE_WARNINGS_AS_ERRORS)
      target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-Werror>)
    endif()
  endif()
endfunction()

function(moe_add_component name)
  cmake_parse_arguments(arg "INTERFACE" "" "SOURCES;DEPS" ${ARGN})
  set(target moe_${name})
  if(arg_INTERFACE)
    add_library(${target} INTERFACE)
    target_include_directories(${target} INTERFACE ${PROJECT_SOURCE_DIR} ${PROJECT_BINARY_DIR})
    if(arg_DEPS)
      target_link_libraries(${target} INTERFACE ${arg_DEPS})
    endif()
  else()
    add_library(${target} STATIC ${arg_SOURCES})
    target_include_directories(${target} PUBLIC ${PROJECT_SOURCE_DIR} ${PROJECT_BINARY_DIR})
    if(arg_DEPS)
      target_link_libraries(${target} ${arg_DEPS})
    endif()
    moe_set_warnings(${target})
  endif()
  add_library(moe::${name} ALIAS ${target})
endfunction()

function(moe_add_test name)
  cmake_parse_arguments(arg "" "TIMEOUT" "SOURCES;DEPS;LABELS" ${ARGN})
  if(NOT arg_LABELS)
    message(FATAL_ERROR "moe_add_test(${name}): give LABELS (unit, golden, integration, fault, gpu)")
  endif()
  if(NOT arg_TIMEOUT)
    set(arg_TIMEOUT 300)
  endif()
  set(target test_${name})
  add_executable(${target} ${arg_SOURCES})
  target_link_libraries(${target} PRIVATE ${arg_DEPS} GTest::gtest GTest::gmock GTest::gtest_main)
  target_compile_definitions(${target} PRIVATE
    MOE_TEST_DATA_DIR="${PROJECT_SOURCE_DIR}/tests/data"
    MOE_BINARY_DIR="${PROJECT_BINARY_DIR}")
  moe_set_warnings(${target})
  # Remembered per label, so a build can be limited to the executables of some suites
  # (tests/CMakeLists.txt: moe_tests_unit_integration, which the sanitizer stage builds).
  foreach(label IN LISTS arg_LABELS)
    set_property(GLOBAL APPEND PROPERTY MOE_TEST_TARGETS_${label} ${target})
  endforeach()
  gtest_discover_tests(${target}
    TEST_PREFIX "${name}."
    PROPERTIES LABELS "${arg_LABELS}" TIMEOUT ${arg_TIMEOUT}
    DISCOVERY_TIMEOUT 60)
endfunction()
