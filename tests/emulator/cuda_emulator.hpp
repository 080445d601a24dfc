// Host emulation of the few CUDA device features our kernels use: every CUDA thread of a block
// is a fiber on one OS thread; __syncthreads, __syncwarp, shuffles and ballots are barriers (a
// divergent barrier deadlocks and aborts). Device memory is host memory. WMMA and the cp.async
// pipeline primitives: wmma_emulator.hpp, included at the end; wgmma: wgmma_emulator.hpp; TMA
// and mbarriers: tma_emulator.hpp.
#pragma once
#include <cuda_runtime_api.h>
#include <cuda_bf16.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <new>
#include <tuple>
#include <vector>
#include <algorithm>

#undef __shared__
#define __shared__ static

// For test code that must know it runs here (e.g. to size its cases for one CPU core).
#define MOE_CUDA_EMULATOR 1

// Fiber switches. glibc's swapcontext makes a system call per switch (it saves and restores the
// signal mask), which cost about as much as the emulated kernels themselves. On x86-64 a switch
// saves what the ABI says survives a call (the callee-saved registers, the SSE and x87 control
// words) on the old stack and swaps stack pointers; the kernels change no signal mask and fibers
// never leave their OS thread, so nothing else needs saving. Elsewhere, or with
// -DMOE_EMU_UCONTEXT, ucontext as before. Not for sanitizer builds (ASan would need to be told
// of every stack switch), which never include this file: they build without CUDA.
#if defined(__x86_64__) && !defined(MOE_EMU_UCONTEXT)
#define MOE_EMU_FAST_SWITCH 1
// Saves the running context on its stack, stores its stack pointer in *save, resumes the
// context whose stack pointer is `to`. Weak: every translation unit that includes this defines it.
extern "C" void moe_emu_switch(void** save, void* to);
asm(R"(
  .text
  .weak moe_emu_switch
  .type moe_emu_switch, @function
moe_emu_switch:
  .cfi_startproc
  endbr64
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .cfi_endproc
  .size moe_emu_switch, .-moe_emu_switch
)");
#endif

namespace emu {
struct dim3e { unsigned x = 0, y = 1, z = 1; };
struct fiber {
#ifdef MOE_EMU_FAST_SWITCH
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  std::vector<char> stack;
  dim3e tid;
  bool done = false;
};
inline dim3e block_idx, block_dim, grid_dim;
inline std::vector<fiber> fibers;
inline fiber* cur = nullptr;
#ifdef MOE_EMU_FAST_SWITCH
inline void* sched_sp = nullptr;
#else
inline ucontext_t sched;
#endif
inline std::function<void()> entry;
inline uint64_t events = 0;
inline int block_arrivals = 0;
inline uint64_t block_gen = 0;
inline int warp_arrivals[32];
inline uint64_t warp_gen[32];
inline uint64_t slots[32][32];

// From the running fiber to the scheduler, and from the scheduler into fiber `f`.
inline void yield() {
#ifdef MOE_EMU_FAST_SWITCH
  moe_emu_switch(&cur->sp, sched_sp);
#else
  swapcontext(&cur->ctx, &sched);
#endif
}
inline void resume(fiber& f) {
#ifdef MOE_EMU_FAST_SWITCH
  moe_emu_switch(&sched_sp, f.sp);
#else
  swapcontext(&sched, &f.ctx);
#endif
}
inline int lane() { return static_cast<int>(cur->tid.x % 32); }
inline int warp() { return static_cast<int>(cur->tid.x / 32); }

inline void syncthreads() {
  const uint64_t g = block_gen;
  ++events;
  if (++block_arrivals == static_cast<int>(block_dim.x)) {
    block_arrivals = 0;
    ++block_gen;
  }
  while (block_gen == g) yield();
}
inline void syncwarp() {
  const int w = warp();
  const uint64_t g = warp_gen[w];
  ++events;
  const int width = std::min<int>(32, static_cast<int>(block_dim.x) - w * 32);
  if (++warp_arrivals[w] == width) {
    warp_arrivals[w] = 0;
    ++warp_gen[w];
  }
  while (warp_gen[w] == g) yield();
}
// Every lane publishes v, then reads lane src's (src taken modulo 32, as with the default width).
template <class T>
T exchange(unsigned mask, T v, int src) {
  if (mask != 0xffffffffu) { std::fprintf(stderr, "emu: partial mask\n"); std::abort(); }
  uint64_t b = 0;
  std::memcpy(&b, &v, sizeof(T));
  slots[warp()][lane()] = b;
  syncwarp();
  T r;
  std::memcpy(&r, &slots[warp()][src & 31], sizeof(T));
  syncwarp();
  return r;
}
template <class T>
T shfl_xor(unsigned mask, T v, int off) {
  return exchange(mask, v, lane() ^ off);
}
template <class T>
T shfl(unsigned mask, T v, int src) {
  return exchange(mask, v, src);
}
inline unsigned ballot(unsigned mask, bool p) {
  if (mask != 0xffffffffu) { std::fprintf(stderr, "emu: partial mask\n"); std::abort(); }
  slots[warp()][lane()] = p ? 1 : 0;
  syncwarp();
  unsigned r = 0;
  for (int l = 0; l < 32; ++l) r |= slots[warp()][l] ? (1u << l) : 0u;
  syncwarp();
  return r;
}

// Per-thread checks of the operations that have no rendezvous here (wmma_emulator.hpp): reset
// when a block starts, checked when it ends.
inline void collective_begin(unsigned nthreads);
inline void collective_end(unsigned block, unsigned nthreads);

// A fiber's first code; never returns (the scheduler does not resume a finished fiber).
inline void trampoline() {
  entry();
  cur->done = true;
  ++events;
  yield();
  std::abort();
}

// Makes `f` start at trampoline() when resumed.
inline void prepare(fiber& f) {
#ifdef MOE_EMU_FAST_SWITCH
  // The frame moe_emu_switch pops, from the lowest address: the control words, r15, r14, r13,
  // r12, rbx, rbp, the return address (trampoline), then a null return address for trampoline
  // itself. The return address slot is 16-byte aligned, so trampoline starts with the stack
  // alignment of a called function.
  auto top = reinterpret_cast<uintptr_t>(f.stack.data() + f.stack.size()) & ~uintptr_t{15};
  auto* sp = reinterpret_cast<uint64_t*>(top);
  *--sp = 0;
  *--sp = reinterpret_cast<uint64_t>(&trampoline);
  for (int i = 0; i < 6; ++i) *--sp = 0;
  uint32_t mxcsr;
  uint16_t fpu_cw;
  asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(mxcsr), "=m"(fpu_cw));
  *--sp = uint64_t{mxcsr} | uint64_t{fpu_cw} << 32;
  f.sp = sp;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack.data();
  f.ctx.uc_stack.ss_size = f.stack.size();
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, trampoline, 0);
#endif
}

inline uint64_t num_blocks_run = 0;
// Says what a deadlocked block's fibers wait for beyond barriers (tma_emulator.hpp's mbarriers).
inline void (*describe_waits)() = nullptr;

// Dynamic shared memory of the current launch: refilled with 0xff bytes (NaN floats) for every
// block, so a read of a never-written element shows up as a NaN in the result. 128-byte aligned
// like the GPU's, which WMMA's 32-byte alignment checks and __align__ declarations rely on.
template <class T>
struct smem_allocator {
  using value_type = T;
  smem_allocator() = default;
  template <class U>
  smem_allocator(const smem_allocator<U>&) {}
  T* allocate(size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{128}));
  }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t{128}); }
  template <class U>
  bool operator==(const smem_allocator<U>&) const { return true; }
  template <class U>
  bool operator!=(const smem_allocator<U>&) const { return false; }
};
inline std::vector<unsigned char, smem_allocator<unsigned char>> dynamic_smem;
inline size_t dynamic_smem_bytes = 0;
// Fiber order per scheduling round: 0 forward, 1 reverse, 2 random (EMU_ORDER=fwd|rev|rand),
// so that a missing barrier shows up as a reader running before its writer.
inline int order_mode() {
  static const int m = [] {
    const char* e = std::getenv("EMU_ORDER");
    if (e == nullptr) return 0;
    if (std::strcmp(e, "rev") == 0) return 1;
    if (std::strcmp(e, "rand") == 0) return 2;
    return 0;
  }();
  return m;
}
inline uint64_t rng_state = 0x9e3779b97f4a7c15ull;
inline uint64_t next_rand() {
  rng_state ^= rng_state << 13; rng_state ^= rng_state >> 7; rng_state ^= rng_state << 17;
  return rng_state;
}

inline void run_block(unsigned b, unsigned nthreads) {
  block_idx.x = b;
  if (dynamic_smem.size() < dynamic_smem_bytes + 16) dynamic_smem.resize(dynamic_smem_bytes + 16);
  std::memset(dynamic_smem.data(), 0xff, dynamic_smem.size());
  if (fibers.size() < nthreads) fibers.resize(nthreads);
  block_arrivals = 0;
  for (auto& a : warp_arrivals) a = 0;
  collective_begin(nthreads);
  for (unsigned t = 0; t < nthreads; ++t) {
    fiber& f = fibers[t];
    if (f.stack.empty()) f.stack.resize(64 * 1024);
    f.done = false;
    f.tid.x = t;
    prepare(f);
  }
  std::vector<unsigned> order(nthreads);
  for (;;) {
    bool all_done = true;
    const uint64_t before = events;
    for (unsigned i = 0; i < nthreads; ++i) order[i] = order_mode() == 1 ? nthreads - 1 - i : i;
    if (order_mode() == 2)
      for (unsigned i = nthreads; i > 1; --i) std::swap(order[i - 1], order[next_rand() % i]);
    for (unsigned i = 0; i < nthreads; ++i) {
      const unsigned t = order[i];
      if (fibers[t].done) continue;
      all_done = false;
      cur = &fibers[t];
      resume(*cur);
    }
    if (all_done) break;
    if (events == before) {
      std::fprintf(stderr, "emu: deadlock in block %u (divergent barrier)\n", b);
      if (describe_waits != nullptr) describe_waits();
      std::abort();
    }
  }
  collective_end(b, nthreads);
  ++num_blocks_run;
}

// The card's launch limits (sm_90), so that a launch the card would refuse fails here too,
// where a host run would otherwise go through: at most 1024 threads a block; grid y and z at
// most 65535, no dimension 0; dynamic shared memory above 48 KiB only for a kernel opted in by
// cudaFuncSetAttribute(MaxDynamicSharedMemorySize) to at least that much, and never above
// 227 KiB. Such a launch is a bug in the caller, not a condition to handle: it aborts.
inline constexpr size_t default_dynamic_smem = 48 * 1024;
inline constexpr size_t max_dynamic_smem = 227 * 1024;
using any_function = void (*)();
inline std::vector<std::pair<any_function, size_t>> dynamic_smem_opt_ins;
inline std::mutex dynamic_smem_opt_ins_lock;  // host threads may launch side by side

template <class F>
cudaError_t func_set_attribute(F* fn, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  if (value < 0 || static_cast<size_t>(value) > max_dynamic_smem) return cudaErrorInvalidValue;
  const auto key = reinterpret_cast<any_function>(fn);
  std::lock_guard<std::mutex> g(dynamic_smem_opt_ins_lock);
  for (auto& [f, bytes] : dynamic_smem_opt_ins)
    if (f == key) return bytes = static_cast<size_t>(value), cudaSuccess;
  dynamic_smem_opt_ins.emplace_back(key, static_cast<size_t>(value));
  return cudaSuccess;
}

template <class F>
void check_launch(F* fn, dim3e grid, unsigned block, size_t smem) {
  auto refuse = [&](const char* why) {
    std::fprintf(stderr, "emu: the card would refuse this launch (grid %u x %u x %u, %u threads, %zu bytes of dynamic shared memory): %s\n",
                 grid.x, grid.y, grid.z, block, smem, why);
    std::abort();
  };
  if (block == 0 || block > 1024) refuse("a block has 1 to 1024 threads");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) refuse("a grid dimension is 0");
  if (grid.y > 65535 || grid.z > 65535) refuse("grid y and z are at most 65535");
  if (smem > max_dynamic_smem) refuse("more than 227 KiB of dynamic shared memory");
  if (smem <= default_dynamic_smem) return;
  const auto key = reinterpret_cast<any_function>(fn);
  std::lock_guard<std::mutex> g(dynamic_smem_opt_ins_lock);
  for (const auto& [f, bytes] : dynamic_smem_opt_ins)
    if (f == key && bytes >= smem) return;
  refuse("more than 48 KiB of dynamic shared memory without cudaFuncSetAttribute(MaxDynamicSharedMemorySize) to as much");
}

// Where launches go when a stand-in CUDA runtime is linked (tests/emulator/fake_cudart.cpp, which
// sets it): it runs the launch at once, keeps it for the graph its stream is capturing (a
// closure holding a copy of the arguments, as CUDA copies them at capture), or refuses it with
// the runtime's last error. Null (the kernel tests' macros): every launch runs at once. `kernel`
// is the kernel's name, as the source spells it without template arguments ("" when unknown).
inline void (*launch_hook)(cudaStream_t stream, const char* kernel,
                           std::function<void()> launch) = nullptr;

template <class... P>
struct launcher {
  void (*fn)(P...);
  dim3e grid;
  unsigned block;
  size_t smem;
  cudaStream_t stream;
  const char* name = "";
  static void run(void (*fn)(P...), dim3e grid, unsigned block, size_t smem,
                  std::tuple<P...>& args) {
    entry = [&] { std::apply(fn, args); };
    grid_dim = grid;
    block_dim.x = block;
    dynamic_smem_bytes = smem;
    for (unsigned z = 0; z < grid.z; ++z) {
      block_idx.z = z;
      for (unsigned y = 0; y < grid.y; ++y) {
        block_idx.y = y;
        for (unsigned b = 0; b < grid.x; ++b) run_block(b, block);
      }
    }
    block_idx.y = block_idx.z = 0;
  }
  template <class... A>
  void operator()(A&&... a) const {
    check_launch(fn, grid, block, smem);
    std::tuple<P...> args(static_cast<P>(a)...);
    if (launch_hook == nullptr) return run(fn, grid, block, smem, args);
    launch_hook(stream, name,
                [f = fn, g = grid, b = block, s = smem, args]() mutable { run(f, g, b, s, args); });
  }
};
template <class... P>
launcher<P...> launch(void (*fn)(P...), unsigned grid, unsigned block, size_t smem = 0,
                      cudaStream_t stream = nullptr) {
  return {fn, dim3e{grid, 1, 1}, block, smem, stream};
}
template <class... P>
launcher<P...> launch(void (*fn)(P...), dim3 grid, unsigned block, size_t smem = 0,
                      cudaStream_t stream = nullptr) {
  return {fn, dim3e{grid.x, grid.y, grid.z}, block, smem, stream};
}
// What launch_syntax.py writes for a `<<<...>>>` launch: the same, with the kernel's name.
template <class... P, class Grid>
launcher<P...> launch_named(const char* name, void (*fn)(P...), Grid grid, unsigned block,
                            size_t smem = 0, cudaStream_t stream = nullptr) {
  launcher<P...> l = launch(fn, grid, block, smem, stream);
  l.name = name;
  return l;
}
// Launch limits mean nothing here: every block runs on the host.
}  // namespace emu

#define threadIdx (::emu::cur->tid)
#define blockIdx (::emu::block_idx)
#define blockDim (::emu::block_dim)
#define gridDim (::emu::grid_dim)
#define __syncthreads() ::emu::syncthreads()
#define __syncwarp(...) ::emu::syncwarp()
#define __shfl_xor_sync(m, v, o) ::emu::shfl_xor((m), (v), (o))
#define __shfl_sync(m, v, s) ::emu::shfl((m), (v), (s))
#define __ballot_sync(m, p) ::emu::ballot((m), (p))
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __int_as_float(int v) { float f; std::memcpy(&f, &v, 4); return f; }
inline float __int_as_float(unsigned v) { float f; std::memcpy(&f, &v, 4); return f; }
inline float __uint_as_float(unsigned v) {
  float f;
  std::memcpy(&f, &v, 4);
  return f;
}
inline unsigned __float_as_uint(float v) {
  unsigned u;
  std::memcpy(&u, &v, 4);
  return u;
}
// Fibers switch only at barriers, so a read-modify-write is never interleaved with another.
inline int atomicAdd(int* p, int v) {
  const int old = *p;
  *p += v;
  return old;
}
// Cache hints mean nothing here.
template <class T>
T __ldg(const T* p) {
  return *p;
}
template <class T>
T __ldcs(const T* p) {
  return *p;
}
// CUDA's rsqrtf is within 2 ulp; the exact value is within that.
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
using std::exp;
using std::isfinite;
using std::isnan;
using std::max;
using std::min;
#define __launch_bounds__(...)
// Variadic: a kernel named with several template arguments has commas in it.
#define cudaFuncSetAttribute(...) ::emu::func_set_attribute(__VA_ARGS__)

#include "tma_emulator.hpp"
#include "wgmma_emulator.hpp"
#include "wmma_emulator.hpp"

// The runtime API, on host memory; MOE_EMU_FAKE_CUDART: fake_cudart.cpp defines the functions
// instead (streams, events, errors and graph capture, for code that uses more than these).
#ifndef MOE_EMU_FAKE_CUDART
#define cudaGetLastError() cudaSuccess
#define cudaMalloc(p, n) (*(p) = std::malloc(n), cudaSuccess)
#define cudaFree(p) (std::free(p), cudaSuccess)
#define cudaMemcpy(d, s, n, k) (std::memcpy((d), (s), (n)), cudaSuccess)
#define cudaMemset(d, v, n) (std::memset((d), (v), (n)), cudaSuccess)
#define cudaDeviceSynchronize() cudaSuccess
#define cudaGetDeviceCount(c) (*(c) = 1, cudaSuccess)
#define cudaGetDevice(d) (*(d) = 0, cudaSuccess)
// An H100/H200 (sm_90), as fake_cudart.cpp says too: the kernels that choose by the card take
// their Hopper paths here.
namespace emu {
inline int device_attribute(cudaDeviceAttr attr) {
  if (attr == cudaDevAttrComputeCapabilityMajor) return 9;
  if (attr == cudaDevAttrComputeCapabilityMinor) return 0;
  std::fprintf(stderr, "emu: device attribute %d is not emulated\n", static_cast<int>(attr));
  std::abort();
}
}  // namespace emu
#define cudaDeviceGetAttribute(v, attr, d) (*(v) = ::emu::device_attribute(attr), cudaSuccess)
#endif  // MOE_EMU_FAKE_CUDART
