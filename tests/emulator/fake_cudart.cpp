// A stand-in for the CUDA runtime library (libcudart) on the host, for host code that calls the
// runtime API itself (the GPU engine, runtime/cuda_memory.cpp, kernels/cuda/gemm.cpp): it is
// compiled against CUDA's own cuda_runtime_api.h and defines, with C linkage and CUDA 13's
// signatures, the functions that code calls. Device memory is host memory; kernels run in the
// emulator (cuda_emulator.hpp), whose launches come here through emu::launch_hook.
//
// What it keeps of CUDA's semantics, because the engine depends on them or a bug would hide
// behind their absence:
//  - streams run their work in order; by default at once (MOE_EMU_STREAMS=deferred: only at the
//    stream's next synchronisation point, so that a host read before a synchronisation sees
//    stale data, as it may on a card);
//  - graph capture records, it does not run: kernel launches, cuBLASLt products, asynchronous
//    copies and memsets queued on a capturing stream become the graph's nodes (a launch keeps a
//    copy of its arguments; a copy reads its source when replayed), and cudaGraphLaunch replays
//    them in order. Calls CUDA refuses during a capture fail as CUDA fails them: synchronising
//    or querying the capturing stream, and the "potentially unsafe" calls (cudaMalloc, cudaFree,
//    cudaHostAlloc, synchronous copies, cudaDeviceSynchronize) from a thread with a capture in
//    progress, with cudaErrorStreamCaptureUnsupported; the capture is then invalidated
//    (further work on it and cudaStreamEndCapture fail with cudaErrorStreamCaptureInvalidated);
//  - the thread's last error (cudaGetLastError / cudaPeekAtLastError) is every failed call's;
//  - cudaMalloc'd memory is filled with 0xff bytes (NaN in f32 and bf16), so a read of memory
//    never written shows up; copies and memsets are checked against the allocations they touch
//    (a copy running past the end of one, or a direction that contradicts its pointers, is
//    cudaErrorInvalidValue, which CUDA leaves undefined) and handles against the live ones;
//  - a stream belongs to the device current when it was made, and a kernel launched on it from
//    a thread whose current device is another fails (cudaErrorInvalidResourceHandle), as CUDA's
//    does: a thread driving several devices must set each one before its launches.
// And, for tests of what a failed kernel leaves behind, emu::fail_launches (fake_cudart.hpp)
// refuses a device's next launches as CUDA refuses a launch it cannot configure.
// One device by default (compute capability 9.0; MOE_EMU_DEVICES shows more, all sharing the
// host's memory). Not modelled: concurrency between streams (each runs in
// order; a wait on an event first runs the work recorded before it), memory limits, timing
// (elapsed times are host time).
//
// Thread safety: every call takes one lock; kernels run under it.
#include "tests/emulator/fake_cudart.hpp"

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <unistd.h>
#include <utility>
#include <vector>

#include "tests/emulator/cuda_emulator.hpp"

#undef cudaFuncSetAttribute

struct CUstream_st {
  unsigned flags = cudaStreamDefault;
  int device = 0;  // current when it was created: the device its kernels run on
  bool capturing = false;
  bool invalidated = false;
  cudaStreamCaptureMode mode = cudaStreamCaptureModeGlobal;
  std::thread::id capture_thread;
  std::vector<std::function<void()>> captured;
  std::vector<std::function<void()>> pending;  // MOE_EMU_STREAMS=deferred
  // A stream that waited on an event recorded in another's capture joins that capture: its work
  // goes into origin's graph (in the order the host queues it, which is a valid order of the
  // graph's dependencies) until the capture ends, which fails with cudaErrorStreamCaptureUnjoined
  // unless origin waited on an event recorded here after this stream's last work.
  CUstream_st* origin = nullptr;
  size_t joined_work = 0;  // work queued while joined
  size_t waited_work = 0;  // of which origin has waited for this much
};
struct CUgraph_st {
  std::vector<std::function<void()>> nodes;
};
struct CUgraphExec_st {
  std::vector<std::function<void()>> nodes;
};
struct CUevent_st {
  unsigned flags = cudaEventDefault;
  bool recorded = false;
  bool captured = false;  // last recorded in a capturing stream
  size_t joined_work = 0;  // recorded in a joined stream: the work before it
  CUstream_st* stream = nullptr;
  std::chrono::steady_clock::time_point when;
};

namespace {

using node = std::function<void()>;

std::recursive_mutex& lock_of_all() {
  static std::recursive_mutex m;
  return m;
}
using guard = std::lock_guard<std::recursive_mutex>;

bool deferred() {
  static const bool d = [] {
    const char* e = std::getenv("MOE_EMU_STREAMS");
    return e != nullptr && std::strcmp(e, "deferred") == 0;
  }();
  return d;
}

thread_local cudaError_t last_error = cudaSuccess;
thread_local int current_device = 0;

/// MOE_EMU_DEVICES (1 to 16, default 1): how many devices the emulator shows, e.g. for a world
/// of NCCL ranks (fake_nccl.cpp), each on its own device. They share the host's memory.
int device_count() {
  static const int n = [] {
    const char* e = std::getenv("MOE_EMU_DEVICES");
    const int v = e != nullptr ? std::atoi(e) : 1;
    return v >= 1 && v <= 16 ? v : 1;
  }();
  return n;
}

// emu::fail_launches: how many of each device's next kernel launches (of one kernel, or any)
// fail, and with what.
struct launch_failures {
  int count = 0;
  cudaError_t error = cudaSuccess;
  std::string kernel;  // empty: any
};
std::map<int, launch_failures>& launches_to_fail() {
  static std::map<int, launch_failures> m;
  return m;
}

bool no_such_device(int device) {
  return device < 0 || device >= device_count();
}

cudaError_t fail(cudaError_t e) {
  last_error = e;
  return e;
}

// Live handles and allocations.
CUstream_st legacy_stream;
std::set<CUstream_st*>& streams() {
  static std::set<CUstream_st*> s;
  return s;
}
std::set<CUevent_st*>& events() {
  static std::set<CUevent_st*> s;
  return s;
}
std::set<CUgraph_st*>& graphs() {
  static std::set<CUgraph_st*> s;
  return s;
}
std::set<CUgraphExec_st*>& execs() {
  static std::set<CUgraphExec_st*> s;
  return s;
}
struct allocation_map {
  std::map<uintptr_t, size_t> blocks;  // base -> bytes
  /// The allocation holding p: its base and size, or {0, 0}.
  [[nodiscard]] std::pair<uintptr_t, size_t> find(const void* p) const {
    const auto a = reinterpret_cast<uintptr_t>(p);
    auto it = blocks.upper_bound(a);
    if (it == blocks.begin()) return {0, 0};
    --it;
    const size_t extent = it->second == 0 ? 1 : it->second;
    if (a - it->first >= extent) return {0, 0};
    return {it->first, it->second};
  }
};
allocation_map& device_memory() {
  static allocation_map m;
  return m;
}
allocation_map& pinned_memory() {
  static allocation_map m;
  return m;
}

/// The stream a handle names, null for one that is not live.
CUstream_st* resolve(cudaStream_t s) {
  if (s == nullptr || s == cudaStreamLegacy || s == cudaStreamPerThread) return &legacy_stream;
  return streams().count(s) != 0 ? s : nullptr;
}

void flush(CUstream_st* s) {
  // Work may be queued while this runs only from another call, which cannot happen under the
  // lock; swap first anyway so that a node is never run twice.
  std::vector<node> work;
  work.swap(s->pending);
  for (auto& w : work) w();
}
void flush_all() {
  flush(&legacy_stream);
  for (CUstream_st* s : streams()) flush(s);
}

/// A capture CUDA counts against an unsafe call of this thread: one this thread began, not in
/// relaxed mode, or another thread's in global mode.
bool forbidding(const CUstream_st* s) {
  if (!s->capturing || s->mode == cudaStreamCaptureModeRelaxed) return false;
  return s->capture_thread == std::this_thread::get_id() || s->mode == cudaStreamCaptureModeGlobal;
}

/// cudaErrorStreamCaptureUnsupported (and the captures it breaks invalidated) when a capture
/// forbids this thread's potentially unsafe calls; cudaSuccess otherwise.
cudaError_t refuse_if_capturing() {
  bool refused = false;
  for (CUstream_st* s : streams()) {
    if (!forbidding(s)) continue;
    refused = true;
    if (s->capture_thread == std::this_thread::get_id()) s->invalidated = true;
  }
  return refused ? fail(cudaErrorStreamCaptureUnsupported) : cudaSuccess;
}

cudaError_t invalid(const char* what, const void* p, size_t n) {
  std::fprintf(stderr, "emu (fake cudart): %s (pointer %p, %zu bytes)\n", what, p, n);
  return fail(cudaErrorInvalidValue);
}

/// [p, p + n) must lie inside the allocation holding p, if any; `device`: must be device memory
/// (1), must not be (0), either (-1).
cudaError_t check_range(const void* p, size_t n, int device, const char* what) {
  if (p == nullptr) return invalid(what, p, n);
  const auto [base, size] = device_memory().find(p);
  if (device == 1 && base == 0) return invalid("device pointer expected", p, n);
  if (device == 0 && base != 0) return invalid("host pointer expected, device pointer given", p, n);
  auto check = [&](std::pair<uintptr_t, size_t> block) -> cudaError_t {
    if (block.first != 0 && reinterpret_cast<uintptr_t>(p) - block.first + n > block.second) {
      std::fprintf(stderr, "emu (fake cudart): %s runs past the end of a %zu-byte allocation\n", what,
                   block.second);
      return invalid(what, p, n);
    }
    return cudaSuccess;
  };
  if (auto e = check({base, size}); e != cudaSuccess) return e;
  return check(pinned_memory().find(p));
}

cudaError_t check_copy(void* dst, const void* src, size_t n, cudaMemcpyKind kind) {
  int dst_device = -1, src_device = -1;
  switch (kind) {
    case cudaMemcpyHostToHost: dst_device = src_device = 0; break;
    case cudaMemcpyHostToDevice: dst_device = 1; src_device = 0; break;
    case cudaMemcpyDeviceToHost: dst_device = 0; src_device = 1; break;
    case cudaMemcpyDeviceToDevice: dst_device = src_device = 1; break;
    case cudaMemcpyDefault: break;
    default: return invalid("unknown cudaMemcpyKind", dst, n);
  }
  if (auto e = check_range(dst, n, dst_device, "copy destination"); e != cudaSuccess) return e;
  return check_range(src, n, src_device, "copy source");
}

bool pageable(const void* p) {
  return device_memory().find(p).first == 0 && pinned_memory().find(p).first == 0;
}

cudaError_t submit_locked(cudaStream_t stream, node work) {
  CUstream_st* s = resolve(stream);
  if (s == nullptr) return fail(cudaErrorInvalidResourceHandle);
  if (s->origin != nullptr) {
    if (s->origin->invalidated) return fail(cudaErrorStreamCaptureInvalidated);
    s->origin->captured.push_back(std::move(work));
    ++s->joined_work;
    return cudaSuccess;
  }
  if (s->capturing) {
    if (s->invalidated) return fail(cudaErrorStreamCaptureInvalidated);
    s->captured.push_back(std::move(work));
    return cudaSuccess;
  }
  // Work on the legacy stream would join a capture of a blocking stream: CUDA refuses it.
  if (s == &legacy_stream)
    for (CUstream_st* c : streams())
      if (c->capturing && (c->flags & cudaStreamNonBlocking) == 0) {
        c->invalidated = true;
        return fail(cudaErrorStreamCaptureImplicit);
      }
  if (deferred()) {
    s->pending.push_back(std::move(work));
  } else {
    work();
  }
  return cudaSuccess;
}

void launch_through_runtime(cudaStream_t stream, const char* kernel, std::function<void()> launch) {
  {
    guard g(lock_of_all());
    // CUDA: a kernel launch fails if it is issued to a stream that is not associated with the
    // current device (a thread driving several devices must cudaSetDevice before each one's).
    const CUstream_st* s = resolve(stream);
    if (s != nullptr && s != &legacy_stream && s->device != current_device) {
      (void)fail(cudaErrorInvalidResourceHandle);
      return;
    }
    auto it = launches_to_fail().find(current_device);
    if (it != launches_to_fail().end() &&
        (it->second.kernel.empty() || it->second.kernel == kernel)) {
      const cudaError_t error = it->second.error;
      if (--it->second.count == 0) launches_to_fail().erase(it);
      (void)fail(error);
      return;
    }
  }
  (void)emu::submit(stream, std::move(launch));
}

const bool hook_installed = [] {
  emu::launch_hook = &launch_through_runtime;
  return true;
}();

void* aligned_block(size_t n) {
  // cudaMalloc's alignment is 256 bytes.
  const size_t rounded = (n + 255) / 256 * 256;
  return std::aligned_alloc(256, rounded == 0 ? 256 : rounded);
}

}  // namespace

namespace emu {

cudaError_t submit(cudaStream_t stream, std::function<void()> work) {
  guard g(lock_of_all());
  (void)hook_installed;
  return submit_locked(stream, std::move(work));
}

bool is_device_range(const void* p, size_t bytes) {
  guard g(lock_of_all());
  const auto [base, size] = device_memory().find(p);
  return base != 0 && reinterpret_cast<uintptr_t>(p) - base + bytes <= size;
}

void fail_launches(int device, int count, cudaError_t error, std::string kernel) {
  guard g(lock_of_all());
  if (count > 0)
    launches_to_fail()[device] = {count, error, std::move(kernel)};
  else
    launches_to_fail().erase(device);
}

}  // namespace emu

extern "C" {

// ---------------------------------------------------------------------------------------------
// Errors and devices.

cudaError_t CUDARTAPI cudaGetLastError(void) {
  return std::exchange(last_error, cudaSuccess);
}

cudaError_t CUDARTAPI cudaPeekAtLastError(void) { return last_error; }

const char* CUDARTAPI cudaGetErrorName(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorNotReady: return "cudaErrorNotReady";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
    case cudaErrorIllegalState: return "cudaErrorIllegalState";
    case cudaErrorStreamCaptureUnsupported: return "cudaErrorStreamCaptureUnsupported";
    case cudaErrorStreamCaptureInvalidated: return "cudaErrorStreamCaptureInvalidated";
    case cudaErrorStreamCaptureImplicit: return "cudaErrorStreamCaptureImplicit";
    case cudaErrorStreamCaptureWrongThread: return "cudaErrorStreamCaptureWrongThread";
    case cudaErrorStreamCaptureUnjoined: return "cudaErrorStreamCaptureUnjoined";
    case cudaErrorCapturedEvent: return "cudaErrorCapturedEvent";
    default: return "cudaErrorUnknown";
  }
}

const char* CUDARTAPI cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorNotReady: return "device not ready";
    case cudaErrorNotSupported: return "operation not supported";
    case cudaErrorIllegalState: return "the operation cannot be performed in the present state";
    case cudaErrorStreamCaptureUnsupported: return "operation not permitted when stream is capturing";
    case cudaErrorStreamCaptureInvalidated:
      return "operation failed due to a previous error during capture";
    case cudaErrorStreamCaptureImplicit:
      return "operation would make the legacy stream depend on a capturing blocking stream";
    case cudaErrorStreamCaptureWrongThread:
      return "attempt to terminate a thread-local capture sequence from another thread";
    case cudaErrorStreamCaptureUnjoined:
      return "capture sequence contains a fork that was not joined to the primary stream";
    case cudaErrorCapturedEvent:
      return "operation not permitted on an event last recorded in a capturing stream";
    default: return "unknown error (emulated CUDA runtime)";
  }
}

cudaError_t CUDARTAPI cudaGetDeviceCount(int* count) {
  if (count == nullptr) return fail(cudaErrorInvalidValue);
  *count = device_count();
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaSetDevice(int device) {
  if (no_such_device(device)) return fail(cudaErrorInvalidDevice);
  current_device = device;
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaGetDevice(int* device) {
  if (device == nullptr) return fail(cudaErrorInvalidValue);
  *device = current_device;
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (value == nullptr) return fail(cudaErrorInvalidValue);
  if (no_such_device(device)) return fail(cudaErrorInvalidDevice);
  switch (attr) {  // an H100/H200
    case cudaDevAttrComputeCapabilityMajor: *value = 9; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = 132; return cudaSuccess;
    case cudaDevAttrWarpSize: *value = 32; return cudaSuccess;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 48 * 1024; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = 227 * 1024; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = 228 * 1024; return cudaSuccess;
    case cudaDevAttrL2CacheSize: *value = 50 * 1024 * 1024; return cudaSuccess;
    default:
      std::fprintf(stderr, "emu (fake cudart): device attribute %d is not emulated\n",
                   static_cast<int>(attr));
      return fail(cudaErrorInvalidValue);
  }
}

// The driver functions the engine's code looks up: the tensor-map encoder (tma_emulator.hpp).
cudaError_t CUDARTAPI cudaGetDriverEntryPointByVersion(const char* symbol, void** fn, unsigned int,
                                                       unsigned long long,
                                                       cudaDriverEntryPointQueryResult* status) {
  if (symbol == nullptr || fn == nullptr) return fail(cudaErrorInvalidValue);
  return ::emu::driver_entry_point(symbol, fn, status);
}

// The versions of the headers it was built with: the stand-in is runtime and driver both.
cudaError_t CUDARTAPI cudaRuntimeGetVersion(int* version) {
  if (version == nullptr) return fail(cudaErrorInvalidValue);
  *version = CUDART_VERSION;
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaDriverGetVersion(int* version) {
  if (version == nullptr) return fail(cudaErrorInvalidValue);
  *version = CUDART_VERSION;
  return cudaSuccess;
}

// The fields runtime/devices.cpp reads, from the attributes above; memory: the host's.
cudaError_t CUDARTAPI cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (prop == nullptr) return fail(cudaErrorInvalidValue);
  if (no_such_device(device)) return fail(cudaErrorInvalidDevice);
  const auto attribute = [](cudaDeviceAttr attr) {
    int v = 0;
    (void)cudaDeviceGetAttribute(&v, attr, 0);
    return v;
  };
  *prop = cudaDeviceProp{};
  std::snprintf(prop->name, sizeof(prop->name), "%s", "emulated sm_90 (tests/emulator)");
  prop->major = attribute(cudaDevAttrComputeCapabilityMajor);
  prop->minor = attribute(cudaDevAttrComputeCapabilityMinor);
  prop->multiProcessorCount = attribute(cudaDevAttrMultiProcessorCount);
  prop->warpSize = attribute(cudaDevAttrWarpSize);
  prop->maxThreadsPerBlock = attribute(cudaDevAttrMaxThreadsPerBlock);
  prop->sharedMemPerBlock = static_cast<size_t>(attribute(cudaDevAttrMaxSharedMemoryPerBlock));
  prop->sharedMemPerBlockOptin =
      static_cast<size_t>(attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin));
  prop->l2CacheSize = attribute(cudaDevAttrL2CacheSize);
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  prop->totalGlobalMem =
      pages > 0 && page > 0 ? static_cast<size_t>(pages) * static_cast<size_t>(page) : 0;
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaDeviceSynchronize(void) {
  guard g(lock_of_all());
  if (auto e = refuse_if_capturing(); e != cudaSuccess) return e;
  flush_all();
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (func == nullptr) return fail(cudaErrorInvalidValue);
  (void)attr;
  (void)value;
  return cudaSuccess;
}

// ---------------------------------------------------------------------------------------------
// Memory.

cudaError_t CUDARTAPI cudaMalloc(void** devPtr, size_t size) {
  guard g(lock_of_all());
  if (devPtr == nullptr) return fail(cudaErrorInvalidValue);
  if (auto e = refuse_if_capturing(); e != cudaSuccess) return e;
  *devPtr = nullptr;
  if (size == 0) return cudaSuccess;
  if (size > (size_t{1} << 38)) return fail(cudaErrorMemoryAllocation);
  void* p = aligned_block(size);
  if (p == nullptr) return fail(cudaErrorMemoryAllocation);
  std::memset(p, 0xff, size);
  device_memory().blocks[reinterpret_cast<uintptr_t>(p)] = size;
  *devPtr = p;
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaFree(void* devPtr) {
  guard g(lock_of_all());
  if (devPtr == nullptr) return cudaSuccess;
  if (auto e = refuse_if_capturing(); e != cudaSuccess) return e;
  auto& blocks = device_memory().blocks;
  auto it = blocks.find(reinterpret_cast<uintptr_t>(devPtr));
  if (it == blocks.end()) return invalid("cudaFree of a pointer cudaMalloc did not return", devPtr, 0);
  flush_all();  // cudaFree synchronises the device
  blocks.erase(it);
  std::free(devPtr);
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaHostAlloc(void** pHost, size_t size, unsigned int flags) {
  guard g(lock_of_all());
  (void)flags;
  if (pHost == nullptr) return fail(cudaErrorInvalidValue);
  if (auto e = refuse_if_capturing(); e != cudaSuccess) return e;
  *pHost = nullptr;
  if (size > (size_t{1} << 38)) return fail(cudaErrorMemoryAllocation);
  void* p = aligned_block(size);
  if (p == nullptr) return fail(cudaErrorMemoryAllocation);
  std::memset(p, 0xff, size);
  pinned_memory().blocks[reinterpret_cast<uintptr_t>(p)] = size;
  *pHost = p;
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaMallocHost(void** ptr, size_t size) {
  return cudaHostAlloc(ptr, size, cudaHostAllocDefault);
}

cudaError_t CUDARTAPI cudaFreeHost(void* ptr) {
  guard g(lock_of_all());
  if (ptr == nullptr) return cudaSuccess;
  if (auto e = refuse_if_capturing(); e != cudaSuccess) return e;
  auto& blocks = pinned_memory().blocks;
  auto it = blocks.find(reinterpret_cast<uintptr_t>(ptr));
  if (it == blocks.end()) return invalid("cudaFreeHost of a pointer cudaHostAlloc did not return", ptr, 0);
  flush_all();
  blocks.erase(it);
  std::free(ptr);
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaMemcpy(void* dst, const void* src, size_t count, cudaMemcpyKind kind) {
  guard g(lock_of_all());
  if (count == 0) return cudaSuccess;
  if (auto e = refuse_if_capturing(); e != cudaSuccess) return e;
  if (auto e = check_copy(dst, src, count, kind); e != cudaSuccess) return e;
  // A synchronous copy waits for the legacy stream, which waits for every blocking stream.
  flush(&legacy_stream);
  for (CUstream_st* s : streams())
    if ((s->flags & cudaStreamNonBlocking) == 0) flush(s);
  std::memmove(dst, src, count);
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaMemcpyAsync(void* dst, const void* src, size_t count, cudaMemcpyKind kind,
                                      cudaStream_t stream) {
  guard g(lock_of_all());
  if (count == 0) return cudaSuccess;
  if (auto e = check_copy(dst, src, count, kind); e != cudaSuccess) return e;
  CUstream_st* s = resolve(stream);
  if (s == nullptr) return fail(cudaErrorInvalidResourceHandle);
  if (deferred() && !s->capturing) {
    // Pageable host memory: CUDA stages the source before returning, and a copy into pageable
    // memory has completed when the call returns.
    if (pageable(src)) {
      auto bytes = std::make_shared<std::vector<unsigned char>>(
          static_cast<const unsigned char*>(src), static_cast<const unsigned char*>(src) + count);
      return submit_locked(stream, [dst, bytes] { std::memcpy(dst, bytes->data(), bytes->size()); });
    }
    if (pageable(dst)) {
      flush(s);
      std::memmove(dst, src, count);
      return cudaSuccess;
    }
  }
  return submit_locked(stream, [dst, src, count] { std::memmove(dst, src, count); });
}

cudaError_t CUDARTAPI cudaMemset(void* devPtr, int value, size_t count) {
  guard g(lock_of_all());
  if (count == 0) return cudaSuccess;
  if (auto e = refuse_if_capturing(); e != cudaSuccess) return e;
  if (auto e = check_range(devPtr, count, 1, "cudaMemset"); e != cudaSuccess) return e;
  flush(&legacy_stream);
  for (CUstream_st* s : streams())
    if ((s->flags & cudaStreamNonBlocking) == 0) flush(s);
  std::memset(devPtr, value, count);
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaMemsetAsync(void* devPtr, int value, size_t count, cudaStream_t stream) {
  guard g(lock_of_all());
  if (count == 0) return cudaSuccess;
  if (auto e = check_range(devPtr, count, 1, "cudaMemsetAsync"); e != cudaSuccess) return e;
  return submit_locked(stream, [devPtr, value, count] { std::memset(devPtr, value, count); });
}

// ---------------------------------------------------------------------------------------------
// Streams and events.

cudaError_t CUDARTAPI cudaStreamCreateWithFlags(cudaStream_t* pStream, unsigned int flags) {
  guard g(lock_of_all());
  if (pStream == nullptr) return fail(cudaErrorInvalidValue);
  auto* s = new CUstream_st;
  s->flags = flags;
  s->device = current_device;
  streams().insert(s);
  *pStream = s;
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaStreamCreate(cudaStream_t* pStream) {
  return cudaStreamCreateWithFlags(pStream, cudaStreamDefault);
}

cudaError_t CUDARTAPI cudaStreamDestroy(cudaStream_t stream) {
  guard g(lock_of_all());
  CUstream_st* s = resolve(stream);
  if (s == nullptr || s == &legacy_stream) return fail(cudaErrorInvalidResourceHandle);
  flush(s);  // queued work still completes
  for (CUevent_st* e : events())
    if (e->stream == s) e->stream = nullptr;
  streams().erase(s);
  delete s;
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaStreamSynchronize(cudaStream_t stream) {
  guard g(lock_of_all());
  CUstream_st* s = resolve(stream);
  if (s == nullptr) return fail(cudaErrorInvalidResourceHandle);
  if (s->origin != nullptr) {
    s->origin->invalidated = true;
    return fail(cudaErrorStreamCaptureUnsupported);
  }
  if (s->capturing) {
    s->invalidated = true;
    return fail(cudaErrorStreamCaptureUnsupported);
  }
  flush(s);
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaStreamQuery(cudaStream_t stream) {
  guard g(lock_of_all());
  CUstream_st* s = resolve(stream);
  if (s == nullptr) return fail(cudaErrorInvalidResourceHandle);
  if (s->origin != nullptr) {
    s->origin->invalidated = true;
    return fail(cudaErrorStreamCaptureUnsupported);
  }
  if (s->capturing) {
    s->invalidated = true;
    return fail(cudaErrorStreamCaptureUnsupported);
  }
  flush(s);
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned int flags) {
  guard g(lock_of_all());
  (void)flags;
  CUstream_st* s = resolve(stream);
  if (s == nullptr || events().count(event) == 0) return fail(cudaErrorInvalidResourceHandle);
  if (event->captured && event->stream != nullptr) {
    CUstream_st* from = event->stream;
    CUstream_st* capture = from->origin != nullptr ? from->origin : from;
    if (s == capture) {
      // The capture's own stream waits for a joined one: that much of its work is joined.
      if (from != s) from->waited_work = std::max(from->waited_work, event->joined_work);
    } else if (s->origin == nullptr && !s->capturing) {
      s->origin = capture;
      s->joined_work = s->waited_work = 0;
    }
    return cudaSuccess;
  }
  // Streams run one after the other here: the work before the event runs first.
  if (event->stream != nullptr && event->stream != s && !event->captured) flush(event->stream);
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int flags) {
  guard g(lock_of_all());
  if (event == nullptr) return fail(cudaErrorInvalidValue);
  auto* e = new CUevent_st;
  e->flags = flags;
  events().insert(e);
  *event = e;
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaEventCreate(cudaEvent_t* event) {
  return cudaEventCreateWithFlags(event, cudaEventDefault);
}

cudaError_t CUDARTAPI cudaEventDestroy(cudaEvent_t event) {
  guard g(lock_of_all());
  if (events().erase(event) == 0) return fail(cudaErrorInvalidResourceHandle);
  delete event;
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  guard g(lock_of_all());
  CUstream_st* s = resolve(stream);
  if (s == nullptr || events().count(event) == 0) return fail(cudaErrorInvalidResourceHandle);
  event->stream = s;
  event->recorded = true;
  event->captured = s->capturing || s->origin != nullptr;
  event->joined_work = s->joined_work;
  if (event->captured) return cudaSuccess;
  return submit_locked(stream, [event] { event->when = std::chrono::steady_clock::now(); });
}

cudaError_t CUDARTAPI cudaEventSynchronize(cudaEvent_t event) {
  guard g(lock_of_all());
  if (events().count(event) == 0) return fail(cudaErrorInvalidResourceHandle);
  if (event->captured) return fail(cudaErrorCapturedEvent);
  if (event->stream != nullptr) flush(event->stream);
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
  guard g(lock_of_all());
  if (ms == nullptr) return fail(cudaErrorInvalidValue);
  if (events().count(start) == 0 || events().count(end) == 0) return fail(cudaErrorInvalidResourceHandle);
  if (((start->flags | end->flags) & cudaEventDisableTiming) != 0 || !start->recorded || !end->recorded)
    return fail(cudaErrorInvalidResourceHandle);
  if (start->captured || end->captured) return fail(cudaErrorCapturedEvent);
  for (CUevent_st* e : {start, end})
    if (e->stream != nullptr && !e->stream->pending.empty()) return fail(cudaErrorNotReady);
  *ms = std::chrono::duration<float, std::milli>(end->when - start->when).count();
  return cudaSuccess;
}

// ---------------------------------------------------------------------------------------------
// Graphs.

cudaError_t CUDARTAPI cudaStreamBeginCapture(cudaStream_t stream, cudaStreamCaptureMode mode) {
  guard g(lock_of_all());
  CUstream_st* s = resolve(stream);
  if (s == nullptr) return fail(cudaErrorInvalidResourceHandle);
  if (s == &legacy_stream) return fail(cudaErrorStreamCaptureUnsupported);
  if (s->capturing) return fail(cudaErrorIllegalState);
  s->capturing = true;
  s->invalidated = false;
  s->mode = mode;
  s->capture_thread = std::this_thread::get_id();
  s->captured.clear();
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaStreamEndCapture(cudaStream_t stream, cudaGraph_t* pGraph) {
  guard g(lock_of_all());
  if (pGraph == nullptr) return fail(cudaErrorInvalidValue);
  CUstream_st* s = resolve(stream);
  if (s == nullptr) return fail(cudaErrorInvalidResourceHandle);
  if (!s->capturing) return fail(cudaErrorIllegalState);
  if (s->mode != cudaStreamCaptureModeRelaxed && s->capture_thread != std::this_thread::get_id())
    return fail(cudaErrorStreamCaptureWrongThread);
  s->capturing = false;
  // The streams that joined this capture leave it; one with work the capture never waited for
  // breaks it.
  for (CUstream_st* joined : streams()) {
    if (joined->origin != s) continue;
    if (joined->joined_work > joined->waited_work && !s->invalidated) {
      s->invalidated = true;
      std::vector<node>().swap(s->captured);
      joined->origin = nullptr;
      *pGraph = nullptr;
      return fail(cudaErrorStreamCaptureUnjoined);
    }
    joined->origin = nullptr;
  }
  std::vector<node> nodes;
  nodes.swap(s->captured);
  if (s->invalidated) {
    s->invalidated = false;
    *pGraph = nullptr;
    return fail(cudaErrorStreamCaptureInvalidated);
  }
  auto* graph = new CUgraph_st{std::move(nodes)};
  graphs().insert(graph);
  *pGraph = graph;
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaStreamIsCapturing(cudaStream_t stream, cudaStreamCaptureStatus* pCaptureStatus) {
  guard g(lock_of_all());
  if (pCaptureStatus == nullptr) return fail(cudaErrorInvalidValue);
  CUstream_st* s = resolve(stream);
  if (s == nullptr) return fail(cudaErrorInvalidResourceHandle);
  const CUstream_st* capture = s->origin != nullptr ? s->origin : s;
  *pCaptureStatus = !capture->capturing    ? cudaStreamCaptureStatusNone
                    : capture->invalidated ? cudaStreamCaptureStatusInvalidated
                                           : cudaStreamCaptureStatusActive;
  return cudaSuccess;
}

// The count only: the emulator's nodes have no handles to give out.
cudaError_t CUDARTAPI cudaGraphGetNodes(cudaGraph_t graph, cudaGraphNode_t* nodes,
                                        size_t* numNodes) {
  guard g(lock_of_all());
  if (numNodes == nullptr || graphs().count(graph) == 0) return fail(cudaErrorInvalidValue);
  if (nodes != nullptr) return fail(cudaErrorNotSupported);
  *numNodes = graph->nodes.size();
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaGraphInstantiate(cudaGraphExec_t* pGraphExec, cudaGraph_t graph,
                                           unsigned long long flags) {
  guard g(lock_of_all());
  (void)flags;
  if (pGraphExec == nullptr || graphs().count(graph) == 0) return fail(cudaErrorInvalidValue);
  auto* exec = new CUgraphExec_st{graph->nodes};
  execs().insert(exec);
  *pGraphExec = exec;
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaGraphLaunch(cudaGraphExec_t graphExec, cudaStream_t stream) {
  guard g(lock_of_all());
  if (execs().count(graphExec) == 0) return fail(cudaErrorInvalidResourceHandle);
  if (resolve(stream) == nullptr) return fail(cudaErrorInvalidResourceHandle);
  for (const node& n : graphExec->nodes)
    if (auto e = submit_locked(stream, n); e != cudaSuccess) return e;
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaGraphExecDestroy(cudaGraphExec_t graphExec) {
  guard g(lock_of_all());
  if (execs().erase(graphExec) == 0) return fail(cudaErrorInvalidValue);
  delete graphExec;
  return cudaSuccess;
}

cudaError_t CUDARTAPI cudaGraphDestroy(cudaGraph_t graph) {
  guard g(lock_of_all());
  if (graphs().erase(graph) == 0) return fail(cudaErrorInvalidValue);
  delete graph;
  return cudaSuccess;
}

}  // extern "C"
