// Hopper's warpgroup MMA (kernels/cuda/wgmma.cuh) for the CUDA emulator; cuda_emulator.hpp
// includes this at its end. It extends wmma_emulator.hpp's per-thread records. What the kernels
// use and nothing more: bf16 operands in shared memory, K-major with the 128-byte swizzle,
// float32 accumulators; another swizzle or a base offset fails rather than run untested.
//
// Shared addresses: dynamic shared memory starts at shared address `shared_base`, 128 and not
// 1024, as it may on the GPU behind a kernel's static arrays, so a kernel that assumes its
// dynamic buffer 1024-byte aligned gets the swizzle wrong here. Static __shared__ arrays are
// host globals here and have no shared address (shared_offset fails).
//
// The asynchrony, as strictly as one schedule allows: a wgmma reads its operands and writes its
// thread's accumulators only when a wgmma_wait covers its group (the latest the hardware may),
// so a kernel that overwrites an operand's stage, or reads the accumulators, before waiting gets
// wrong results. A wgmma without a wgmma.fence since the thread's last wait fails, and so does
// one whose operands hold bytes some thread's cp.async wrote and did not fence.proxy.async yet.
// The arithmetic is WMMA's here (wmma_emulator.hpp): each 16-long dot product exact in double,
// rounded once to float32, added to the accumulator.
#pragma once

#include <cstdint>
#include <cstring>

#include "wmma_emulator.hpp"  // the per-thread records this extends

namespace emu {

inline constexpr uint32_t shared_base = 128;

inline uint32_t shared_offset(const void* p) {
  const auto* c = static_cast<const unsigned char*>(p);
  if (c < dynamic_smem.data() || c > dynamic_smem.data() + dynamic_smem.size())
    emu_fail("shared_offset: not a pointer into the launch's dynamic shared memory");
  return shared_base + static_cast<uint32_t>(c - dynamic_smem.data());
}

// The 128-byte swizzle on a shared address, as the tensor cores read and TMA writes it: address
// bits 4-6 ^= bits 7-9.
inline uint32_t swizzle128(uint32_t address) {
  return address ^ (((address >> 7) & 7u) << 4);
}

inline void fence_proxy_async() {
  auto& mine = my_collectives();
  for (const size_t chunk : mine.unfenced) unfenced_chunks[chunk] = 0;
  mine.unfenced.clear();
}

namespace wgmma_detail {

enum call : uint64_t { fence = 11, mma, commit, wait };

inline void note(uint64_t kind, uint64_t a = 0, uint64_t b = 0, uint64_t c = 0) {
  auto& m = my_collectives();
  note_call(m.wgmma_calls, m.wgmma_signature, {kind, a, b, c});
}

// The byte offset in dynamic shared memory of element (row, k) of a K-major, 128-byte swizzled
// bf16 operand: rows of 128 bytes in groups of 8, `stride` bytes between groups, the swizzle
// applied to the shared address (bits 4-6 ^= bits 7-9).
struct operand {
  uint32_t start, stride;
  explicit operand(uint64_t desc) {
    start = static_cast<uint32_t>(desc & 0x3fff) << 4;
    stride = static_cast<uint32_t>((desc >> 32) & 0x3fff) << 4;
    if ((desc >> 62) != 1) emu_fail("wgmma: only the 128-byte swizzle is emulated");
    if (((desc >> 49) & 7) != 0) emu_fail("wgmma: a base offset is not emulated");
    // A k16 slice (32 bytes) must stay within its 128-byte row.
    if (start % 128 + 32 > 128) emu_fail("wgmma: a k16 slice crosses its 128-byte row");
  }
  size_t at(int row, int k) const {
    const uint32_t logical = start + static_cast<uint32_t>(row / 8) * stride +
                             static_cast<uint32_t>(row % 8) * 128 + static_cast<uint32_t>(k) * 2;
    const uint32_t physical = swizzle128(logical);
    if (physical < shared_base || physical + 2 > shared_base + dynamic_smem_bytes)
      emu_fail("wgmma: an operand outside the launch's dynamic shared memory");
    return physical - shared_base;
  }
  float value(int row, int k) const {
    __nv_bfloat16 v;
    std::memcpy(&v, dynamic_smem.data() + at(row, k), 2);
    return bf16_to_float(v);
  }
  // Whether any byte of rows [0, rows) x k [0, 16) was written by a cp.async not yet fenced.
  bool unfenced(int rows) const {
    for (int r = 0; r < rows; ++r)
      for (int k = 0; k < 16; k += 8)
        if (unfenced_chunks[at(r, k) / 16] != 0) return true;
    return false;
  }
};

// This thread's share of d += a . b^T (m64, n columns, k16), in the accumulator layout of
// wgmma.cuh's wgmma_m64n256k16_bf16.
inline void compute(const pending_wgmma& p) {
  const operand a(p.a), b(p.b);
  const int t = static_cast<int>(cur->tid.x % 128), w = t / 32, l = t % 32;
  for (int j = 0; j < p.n / 8; ++j)
    for (int h = 0; h < 2; ++h)
      for (int c = 0; c < 2; ++c) {
        const int row = 16 * w + l / 4 + 8 * h, col = 8 * j + 2 * (l % 4) + c;
        double sum = 0.0;
        for (int k = 0; k < 16; ++k) sum += static_cast<double>(a.value(row, k) * b.value(col, k));
        p.d[4 * j + 2 * h + c] += static_cast<float>(sum);
      }
}

}  // namespace wgmma_detail

// A pending wgmma's operands span whole 128-byte rows: [row of start, + rows / 8 groups). Each
// warpgroup's threads issue the same products, so its first thread's records stand for it.
inline void expect_no_pending_reader(size_t offset, size_t size) {
  const uint64_t lo = shared_base + offset, hi = lo + size;
  for (size_t t = 0; t < collectives.size() && t < block_dim.x; t += 128)
    for (const auto& p : collectives[t].wgmma_pending) {
      const auto overlaps = [&](uint64_t desc, int rows) {
        const wgmma_detail::operand o(desc);
        const uint64_t first = o.start - o.start % 128;
        return lo < first + static_cast<uint64_t>(rows / 8) * o.stride && first < hi;
      };
      if (overlaps(p.a, 64) || overlaps(p.b, p.n))
        emu_fail("an asynchronous copy landed on an operand of a wgmma not yet waited for");
    }
}

inline void wgmma_fence() {
  wgmma_detail::note(wgmma_detail::fence);
  my_collectives().wgmma_fenced = true;
}

inline void wgmma_bf16(float* d, int n, uint64_t a, uint64_t b) {
  auto& mine = my_collectives();
  wgmma_detail::note(wgmma_detail::mma, a, b, static_cast<uint64_t>(n));
  if (block_dim.x % 128 != 0) emu_fail("wgmma: the block is not whole warpgroups");
  if (!mine.wgmma_fenced) emu_fail("wgmma: no wgmma.fence since this thread's last wait");
  // Checked once per warpgroup: every thread of it passes the same descriptors.
  if (cur->tid.x % 128 == 0 &&
      (wgmma_detail::operand(a).unfenced(64) || wgmma_detail::operand(b).unfenced(n)))
    emu_fail("wgmma: an operand holds cp.async writes not yet fenced by fence.proxy.async");
  mine.wgmma_pending.push_back({d, n, a, b, mine.wgmma_committed});
}

inline void wgmma_commit() {
  wgmma_detail::note(wgmma_detail::commit);
  ++my_collectives().wgmma_committed;
}

// Computes, in issue order, every product of all committed groups but the newest `pending`.
inline void wgmma_wait(int pending) {
  auto& mine = my_collectives();
  wgmma_detail::note(wgmma_detail::wait, static_cast<uint64_t>(pending));
  const uint64_t keep = static_cast<uint64_t>(pending);
  const uint64_t complete = mine.wgmma_committed > keep ? mine.wgmma_committed - keep : 0;
  size_t kept = 0;
  for (auto& p : mine.wgmma_pending) {
    if (p.group < complete)
      wgmma_detail::compute(p);
    else
      mine.wgmma_pending[kept++] = p;
  }
  mine.wgmma_pending.resize(kept);
  mine.wgmma_fenced = false;
}

}  // namespace emu
