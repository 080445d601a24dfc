# Sanitizer and fuzzing builds: scripts/test.sh's sanitizer stage configures one clang tree with
# both (docs/development.md).
#
#   MOE_SANITIZE=address,undefined  compiles and links every C/C++ target with these sanitizers.
#     UB is fatal (-fno-sanitize-recover) so a finding fails its test instead of scrolling by.
#   MOE_FUZZ=ON                     builds the libFuzzer targets of tests/fuzz (one per decoder of
#     untrusted bytes). Needs clang and MOE_SANITIZE containing address: a fuzz target without
#     ASan finds only crashes, not the overreads that make a decoder unsafe.
#
# The options are added before any component is declared, so every target (tests, `moe`, the
# tools the tests spawn) carries them: a sanitized test that runs an unsanitized `moe` would not
# check the process that parses the bytes.
set(MOE_SANITIZE "" CACHE STRING
    "Sanitizers for every target, as for -fsanitize= (e.g. address,undefined); empty for none")
option(MOE_FUZZ "Build the libFuzzer targets in tests/fuzz (clang, with MOE_SANITIZE=address,...)" OFF)

if(MOE_SANITIZE)
  if(NOT CMAKE_CXX_COMPILER_ID MATCHES "Clang|GNU")
    message(FATAL_ERROR "MOE_SANITIZE needs clang or gcc (got ${CMAKE_CXX_COMPILER_ID})")
  endif()
  if(MOE_HAVE_CUDA)
    # nvcc does not take -fsanitize, and device code would not be checked anyway.
    message(FATAL_ERROR "MOE_SANITIZE needs -DMOE_CUDA=OFF")
  endif()
  set(moe_sanitize_flags -fsanitize=${MOE_SANITIZE} -fno-omit-frame-pointer)
  if(MOE_SANITIZE MATCHES "undefined")
    list(APPEND moe_sanitize_flags -fno-sanitize-recover=undefined)
    if(CMAKE_CXX_COMPILER_ID MATCHES "Clang")
      # Third-party header functions with known undefined behaviour (each entry says which).
      list(APPEND moe_sanitize_flags
           -fsanitize-ignorelist=${PROJECT_SOURCE_DIR}/tests/sanitizers/ubsan_ignorelist.txt)
    endif()
  endif()
  add_compile_options("$<$<COMPILE_LANGUAGE:C,CXX>:${moe_sanitize_flags}>")
  add_link_options(${moe_sanitize_flags})
  message(STATUS "moe: sanitizers ${MOE_SANITIZE}")
endif()

if(MOE_FUZZ)
  if(NOT CMAKE_CXX_COMPILER_ID MATCHES "Clang")
    message(FATAL_ERROR "MOE_FUZZ needs clang (libFuzzer): configure with CXX=clang++ CC=clang")
  endif()
  if(NOT MOE_SANITIZE MATCHES "address")
    message(FATAL_ERROR "MOE_FUZZ needs MOE_SANITIZE with address (e.g. address,undefined)")
  endif()
  if(NOT MOE_BUILD_TESTS)
    message(FATAL_ERROR "MOE_FUZZ needs MOE_BUILD_TESTS=ON (the fuzz targets are ctest tests)")
  endif()
endif()

# Coverage instrumentation for libFuzzer on the source files of the decoders the fuzz targets
# drive (tests/fuzz/CMakeLists.txt names them), e.g. moe_fuzz_instrument(model config.cpp).
# Files, not whole libraries: the comparison tracing in a kernel's or a training block's inner
# loop made the sanitized unit tests and `moe demo` run about 30 times slower, for coverage
# nobody reads. The ASan runtime supplies the coverage callbacks for the executables that are
# not fuzz targets.
function(moe_fuzz_instrument dir)
  set(files ${ARGN})
  list(TRANSFORM files PREPEND ${PROJECT_SOURCE_DIR}/${dir}/)
  set_property(SOURCE ${files} DIRECTORY ${PROJECT_SOURCE_DIR}/${dir}
               APPEND PROPERTY COMPILE_OPTIONS -fsanitize=fuzzer-no-link)
endfunction()

# Called once every target exists (end of the top-level CMakeLists.txt). In a sanitizer build,
# the targets under MOE_SANITIZE_O0_DIRS compile at -O0: their cost is CAF's templates (an actor
# file takes about 2.4x longer at -O1 with both sanitizers than at -O0) while the tests spend
# their CPU in kernels/ and model/, which keep the build type's -O1. The sanitizers check -O0
# code just as well; the stage's build time is what this buys.
set(MOE_SANITIZE_O0_DIRS "actors;cli;client;monitoring;tests" CACHE STRING
    "Directories (relative to the source root, with their subdirectories) compiled at -O0 when MOE_SANITIZE is set")

function(moe_sanitize_o0_directory dir)
  get_property(targets DIRECTORY ${dir} PROPERTY BUILDSYSTEM_TARGETS)
  foreach(target IN LISTS targets)
    get_target_property(type ${target} TYPE)
    if(type MATCHES "^(STATIC_LIBRARY|SHARED_LIBRARY|OBJECT_LIBRARY|EXECUTABLE)$")
      target_compile_options(${target} PRIVATE "$<$<COMPILE_LANGUAGE:C,CXX>:-O0>")
    endif()
  endforeach()
  get_property(subdirs DIRECTORY ${dir} PROPERTY SUBDIRECTORIES)
  foreach(subdir IN LISTS subdirs)
    moe_sanitize_o0_directory(${subdir})
  endforeach()
endfunction()

function(moe_sanitize_finish)
  if(NOT MOE_SANITIZE)
    return()
  endif()
  foreach(dir IN LISTS MOE_SANITIZE_O0_DIRS)
    if(EXISTS ${PROJECT_SOURCE_DIR}/${dir})
      moe_sanitize_o0_directory(${PROJECT_SOURCE_DIR}/${dir})
    endif()
  endforeach()
endfunction()
