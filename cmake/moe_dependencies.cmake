# Finds every third-party dependency once and exposes each as a target.
# scripts/setup.sh installs all of them from Debian's packages.
set(THREADS_PREFER_PTHREAD_FLAG ON)
find_package(Threads REQUIRED)
find_package(PkgConfig REQUIRED)

# CAF 0.17 has neither a CMake package nor a pkg-config file.
find_path(MOE_CAF_INCLUDE_DIR caf/all.hpp REQUIRED)
foreach(part core io openssl)
  find_library(MOE_CAF_${part}_LIBRARY caf_${part} REQUIRED)
  add_library(caf::${part} UNKNOWN IMPORTED)
  set_target_properties(caf::${part} PROPERTIES
    IMPORTED_LOCATION ${MOE_CAF_${part}_LIBRARY}
    INTERFACE_INCLUDE_DIRECTORIES ${MOE_CAF_INCLUDE_DIR}
    INTERFACE_LINK_LIBRARIES Threads::Threads)
endforeach()
set_property(TARGET caf::io APPEND PROPERTY INTERFACE_LINK_LIBRARIES caf::core)
set_property(TARGET caf::openssl APPEND PROPERTY INTERFACE_LINK_LIBRARIES caf::io)
# The TLS files of the cluster config are checked with libcrypto before CAF's openssl module
# reads them (runtime/cluster_config.hpp: check_tls_files).
find_package(OpenSSL REQUIRED)

find_package(CapnProto CONFIG REQUIRED)
find_package(ucx CONFIG REQUIRED)
find_package(prometheus-cpp CONFIG REQUIRED)
find_package(nlohmann_json CONFIG REQUIRED)
find_package(yaml-cpp CONFIG REQUIRED)
find_package(CLI11 CONFIG REQUIRED)
find_package(spdlog CONFIG REQUIRED)
find_package(fmt CONFIG REQUIRED)
pkg_check_modules(HTTPLIB REQUIRED IMPORTED_TARGET cpp-httplib)
set(BLA_VENDOR OpenBLAS)
find_package(BLAS REQUIRED)
find_path(MOE_CBLAS_INCLUDE_DIR cblas.h PATH_SUFFIXES openblas-pthread openblas REQUIRED)
add_library(moe_blas INTERFACE)
target_link_libraries(moe_blas INTERFACE BLAS::BLAS)
target_include_directories(moe_blas INTERFACE ${MOE_CBLAS_INCLUDE_DIR})

if(MOE_BUILD_TESTS)
  find_package(GTest CONFIG REQUIRED)
endif()
if(MOE_BUILD_BENCH)
  find_package(benchmark CONFIG REQUIRED)
endif()
