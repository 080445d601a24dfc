// What the emulator's stand-in CUDA runtime (fake_cudart.cpp) offers the other stand-ins
// (fake_cublaslt.cpp, the kernel launcher of cuda_emulator.hpp): work queued on a stream as CUDA
// queues it. Test code only.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <functional>
#include <string>

namespace emu {

/// Queues `work` on `stream` (null: the legacy default stream): it runs at once (or, with
/// MOE_EMU_STREAMS=deferred, at the stream's next synchronisation point), or is kept for the
/// graph the stream is capturing. Returns cudaSuccess, or the error CUDA gives (an unknown or
/// destroyed stream, an invalidated capture), which also becomes the thread's last error.
cudaError_t submit(cudaStream_t stream, std::function<void()> work);

/// Makes the next `count` kernel launches on `device` (of the kernel named `kernel`, as its source
/// spells it without template arguments; empty: of any) fail with `error`: nothing runs and the
/// launching thread's last error is set, as CUDA fails a launch it cannot configure. count 0
/// clears it. For tests of what a failed kernel leaves behind.
void fail_launches(int device, int count, cudaError_t error, std::string kernel = {});

/// True when [p, p + bytes) lies inside one live cudaMalloc allocation.
bool is_device_range(const void* p, size_t bytes);

}  // namespace emu
