# Decides whether the CUDA backend is built and sets MOE_HAVE_CUDA.
# AUTO builds it when nvcc is found; ON fails configuration without it; OFF never builds it.
# The toolkit on the build machine is enough: no GPU or driver is needed to compile.
set(MOE_HAVE_CUDA OFF)
if(NOT MOE_CUDA MATCHES "^(AUTO|ON|OFF)$")
  message(FATAL_ERROR "MOE_CUDA must be AUTO, ON or OFF (got '${MOE_CUDA}')")
endif()

if(NOT MOE_CUDA STREQUAL "OFF")
  if(NOT CMAKE_CUDA_COMPILER AND EXISTS /usr/local/cuda/bin/nvcc)
    set(CMAKE_CUDA_COMPILER /usr/local/cuda/bin/nvcc)
  endif()
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(MOE_HAVE_CUDA ON)
  elseif(MOE_CUDA STREQUAL "ON")
    message(FATAL_ERROR "MOE_CUDA=ON but no CUDA compiler (nvcc) was found")
  endif()
endif()

if(MOE_HAVE_CUDA)
  # sm_90a machine code for Hopper (wgmma/TMA) plus compute_90 PTX so other cards can JIT.
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES 90a-real 90-virtual)
  endif()
  # CMake 3.25 does not know nvcc's C++20 flag; the static runtime collides with libcudart.so.
  set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION -std=c++20)
  set(CMAKE_CUDA20_EXTENSION_COMPILE_OPTION -std=c++20)
  set(CMAKE_CUDA_RUNTIME_LIBRARY Shared)
  enable_language(CUDA)
  set(CMAKE_CUDA_STANDARD 20)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  find_package(CUDAToolkit REQUIRED)

  # NCCL ships no CMake package.
  find_library(MOE_NCCL_LIBRARY nccl HINTS ${CUDAToolkit_LIBRARY_DIR} /usr/local/cuda/lib64)
  find_path(MOE_NCCL_INCLUDE_DIR nccl.h HINTS ${CUDAToolkit_INCLUDE_DIRS} /usr/local/cuda/include)
  if(MOE_NCCL_LIBRARY AND MOE_NCCL_INCLUDE_DIR)
    add_library(moe_nccl UNKNOWN IMPORTED)
    set_target_properties(moe_nccl PROPERTIES IMPORTED_LOCATION ${MOE_NCCL_LIBRARY}
                                              INTERFACE_INCLUDE_DIRECTORIES ${MOE_NCCL_INCLUDE_DIR})
    set(MOE_HAVE_NCCL ON)
  else()
    message(FATAL_ERROR "CUDA was found but NCCL (libnccl, nccl.h) was not")
  endif()
endif()
