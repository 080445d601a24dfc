// Hopper's TMA copies and shared-memory barriers (kernels/cuda/tma.cuh) for the CUDA emulator;
// cuda_emulator.hpp includes this at its end, and host code gets the driver's tensor-map encoder
// from it (encode_tiled, through cudaGetDriverEntryPointByVersion: the macro below for the
// kernel tests, fake_cudart.cpp for the engine's). What the kernels use and nothing more: 2-D
// bf16 tensor maps with the 128-byte swizzle or none, zero-filled out of bounds; another
// configuration is refused by the encoder rather than run untested.
//
// A tensor map here is the encoder's arguments in the 128 opaque bytes of a CUtensorMap. A copy
// reads its box from global memory when issued and, by default, lands in shared memory when a
// thread first waits on its barrier (the latest a waiter may see it), so a reader that does not
// wait sees the old bytes; with EMU_ASYNC=early it lands at issue, the earliest, so a stage
// refilled while a pending wgmma still reads it shows (wmma_emulator.hpp). The barrier's phase
// completes when its arrivals and its expected bytes are all in; an arrival lets the block's
// other fibers run before its thread goes on (what it released may happen first); a wait spins
// (yielding to them) until the phase of its parity has completed, so a wait nothing will
// complete deadlocks and the emulator says which barriers and threads are stuck.
#pragma once

#include <cuda.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <utility>
#include <vector>

#include "wgmma_emulator.hpp"  // shared_base, and the records this extends

namespace emu {

struct fake_tensor_map {
  static constexpr uint64_t tag = 0x6d6f652d746d6170ull;  // "moe-tmap"
  uint64_t magic;
  const unsigned char* base;
  uint64_t dims[2];    // elements along a row, rows
  uint64_t row_bytes;  // bytes from one row to the next
  uint32_t box[2];     // the box's elements along a row, rows
  uint32_t swizzle_128;
};
static_assert(sizeof(fake_tensor_map) <= sizeof(CUtensorMap));

// cuTensorMapEncodeTiled's checks for what is emulated (the driver's own are wider).
inline CUresult CUDAAPI encode_tiled(CUtensorMap* map, CUtensorMapDataType type, cuuint32_t rank,
                                     void* address, const cuuint64_t* dims,
                                     const cuuint64_t* strides, const cuuint32_t* box,
                                     const cuuint32_t* element_strides,
                                     CUtensorMapInterleave interleave, CUtensorMapSwizzle swizzle,
                                     CUtensorMapL2promotion, CUtensorMapFloatOOBfill oob) {
  if (map == nullptr || type != CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 || rank != 2 ||
      address == nullptr || reinterpret_cast<uintptr_t>(address) % 16 != 0 ||
      interleave != CU_TENSOR_MAP_INTERLEAVE_NONE || oob != CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE ||
      (swizzle != CU_TENSOR_MAP_SWIZZLE_NONE && swizzle != CU_TENSOR_MAP_SWIZZLE_128B))
    return CUDA_ERROR_INVALID_VALUE;
  if (dims[0] == 0 || dims[1] == 0 || strides[0] % 16 != 0 || strides[0] < dims[0] * 2 ||
      box[0] == 0 || box[1] == 0 || box[0] > 256 || box[1] > 256 || box[0] * 2 % 16 != 0 ||
      element_strides[0] != 1 || element_strides[1] != 1)
    return CUDA_ERROR_INVALID_VALUE;
  if (swizzle == CU_TENSOR_MAP_SWIZZLE_128B && box[0] * 2 > 128) return CUDA_ERROR_INVALID_VALUE;
  fake_tensor_map f{};
  f.magic = fake_tensor_map::tag;
  f.base = static_cast<const unsigned char*>(address);
  f.dims[0] = dims[0];
  f.dims[1] = dims[1];
  f.row_bytes = strides[0];
  f.box[0] = box[0];
  f.box[1] = box[1];
  f.swizzle_128 = swizzle == CU_TENSOR_MAP_SWIZZLE_128B ? 1 : 0;
  std::memset(static_cast<void*>(map), 0, sizeof(CUtensorMap));
  std::memcpy(static_cast<void*>(map), &f, sizeof(f));
  return CUDA_SUCCESS;
}

// What cudaGetDriverEntryPointByVersion gives for the one driver function emulated.
inline cudaError_t driver_entry_point(const char* symbol, void** fn,
                                      cudaDriverEntryPointQueryResult* status) {
  const bool known = std::strcmp(symbol, "cuTensorMapEncodeTiled") == 0;
  *fn = known ? reinterpret_cast<void*>(&encode_tiled) : nullptr;
  if (status != nullptr)
    *status = known ? cudaDriverEntryPointSuccess : cudaDriverEntryPointSymbolNotFound;
  return cudaSuccess;
}

namespace tma_detail {

inline mbarrier_state& barrier(uint32_t bar) {
  const auto it = mbarriers.find(bar);
  if (it == mbarriers.end()) emu_fail("mbarrier: not initialised (or not this block's)");
  return it->second;
}

inline void complete_if_done(mbarrier_state& b) {
  if (b.pending == 0 && b.tx == 0) {
    b.parity ^= 1u;
    b.pending = b.arrivals;
  }
}

inline void land(const tma_copy& c) {
  expect_no_pending_reader(c.dst, c.bytes.size());
  std::memcpy(dynamic_smem.data() + c.dst, c.bytes.data(), c.bytes.size());
  auto& b = barrier(c.bar);
  b.tx -= static_cast<int64_t>(c.bytes.size());
  ++events;
  complete_if_done(b);
}

// Lands every copy in flight on `bar`, in issue order.
inline void land_all(uint32_t bar) {
  size_t kept = 0;
  for (size_t i = 0; i < tma_in_flight.size(); ++i) {
    if (tma_in_flight[i].bar == bar)
      land(tma_in_flight[i]);
    else if (kept++ != i)  // a vector moved onto itself would be left empty
      tma_in_flight[kept - 1] = std::move(tma_in_flight[i]);
  }
  tma_in_flight.resize(kept);
}

}  // namespace tma_detail

inline void mbarrier_init(uint32_t bar, uint32_t arrivals) {
  if (bar % 8 != 0 || bar < shared_base || bar + 8 > shared_base + dynamic_smem_bytes)
    emu_fail("mbarrier_init: not an 8-byte aligned address of the dynamic shared memory");
  if (arrivals == 0) emu_fail("mbarrier_init: no arrivals");
  mbarriers[bar] = mbarrier_state{arrivals, arrivals, 0, 0};
  ++events;
}

// An arrival, after adding `bytes` to what the phase expects (arrive.expect_tx; 0: arrive).
inline void mbarrier_arrive(uint32_t bar, uint32_t bytes) {
  auto& b = tma_detail::barrier(bar);
  if (b.pending == 0) emu_fail("mbarrier_arrive: more arrivals than the phase has");
  b.tx += bytes;
  --b.pending;
  ++events;
  tma_detail::complete_if_done(b);
  // A scheduling point: what the arrival releases (a producer refilling the stage, say) may run
  // before this thread goes on, as it may on the card.
  yield();
}

// What each thread waits for, for the deadlock report.
inline std::map<unsigned, std::pair<uint32_t, uint32_t>> mbarrier_waiters;

inline void describe_mbarriers() {
  for (const auto& [bar, b] : mbarriers)
    std::fprintf(stderr,
                 "emu: mbarrier %u: phase parity %u, %u of %u arrivals and %lld bytes due\n", bar,
                 b.parity, b.pending, b.arrivals, static_cast<long long>(b.tx));
  for (const auto& [tid, w] : mbarrier_waiters)
    std::fprintf(stderr, "emu: thread %u waits for mbarrier %u's phase of parity %u\n", tid,
                 w.first, w.second);
}

// A phase of the other parity than the current one counts as complete, as on the card (the
// preceding phase): such a wait returns at once, before any copy in flight lands.
inline void mbarrier_wait(uint32_t bar, uint32_t parity) {
  if (tma_detail::barrier(bar).parity != (parity & 1u)) return;
  tma_detail::land_all(bar);
  if (tma_detail::barrier(bar).parity != (parity & 1u)) return;
  describe_waits = &describe_mbarriers;
  mbarrier_waiters[cur->tid.x] = {bar, parity};
  while (tma_detail::barrier(bar).parity == (parity & 1u)) {
    yield();
    tma_detail::land_all(bar);
  }
  mbarrier_waiters.erase(cur->tid.x);
}

inline void tma_load_2d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int32_t c0,
                        int32_t c1) {
  fake_tensor_map f;
  std::memcpy(&f, static_cast<const void*>(map), sizeof(f));
  if (f.magic != fake_tensor_map::tag) emu_fail("tma_load_2d: not an encoded tensor map");
  tma_detail::barrier(bar);  // must exist
  const uint32_t row_bytes = f.box[0] * 2, bytes = row_bytes * f.box[1];
  if (dst % 128 != 0 || dst < shared_base || dst + bytes > shared_base + dynamic_smem_bytes)
    emu_fail("tma_load_2d: destination not 128-byte aligned in the dynamic shared memory");
  if (f.swizzle_128 != 0 && row_bytes != 128)
    emu_fail("tma_load_2d: the 128-byte swizzle is emulated for 128-byte box rows only");
  tma_copy c;
  c.bar = bar;
  c.dst = dst - shared_base;
  c.bytes.assign(bytes, 0);
  for (uint32_t r = 0; r < f.box[1]; ++r)
    for (uint32_t e = 0; e < f.box[0]; ++e) {
      const int64_t row = int64_t{c1} + r, col = int64_t{c0} + e;
      uint32_t at = r * row_bytes + e * 2;  // from dst
      if (f.swizzle_128 != 0) at = swizzle128(dst + at) - dst;
      if (row < 0 || col < 0 || static_cast<uint64_t>(row) >= f.dims[1] ||
          static_cast<uint64_t>(col) >= f.dims[0])
        continue;  // zero fill
      std::memcpy(c.bytes.data() + at, f.base + static_cast<uint64_t>(row) * f.row_bytes + col * 2,
                  2);
    }
  if (async_copies_early())
    tma_detail::land(c);
  else
    tma_in_flight.push_back(std::move(c));
}

}  // namespace emu

#ifndef MOE_EMU_FAKE_CUDART
#define cudaGetDriverEntryPointByVersion(symbol, fn, version, flags, status) \
  ::emu::driver_entry_point((symbol), (fn), (status))
#endif
