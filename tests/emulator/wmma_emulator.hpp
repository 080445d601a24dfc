// WMMA (nvcuda::wmma, <mma.h>) and the cp.async pipeline primitives
// (<cuda_pipeline_primitives.h>) for the CUDA emulator; cuda_emulator.hpp includes this at its
// end. What grouped_gemm.cu uses and nothing more: 16x16x16 fragments of bf16 A and B with
// float32 accumulators. Another shape or type does not compile (the primary template is only
// declared), rather than run something untested.
//
// CUDA's own headers declare these for nvcc's device code only (and the pipeline header's host
// spelling would clash with the one here): their include guards are taken first, so a kernel's
// #include <mma.h> or <cuda_pipeline_primitives.h> adds nothing.
#pragma once
#define __CUDA_MMA_H__
#define _CUDA_PIPELINE_PRIMITIVES_H_

#include <cuda_bf16.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <map>
#include <type_traits>
#include <vector>

namespace emu {

// What each CUDA thread of the running block has done that no rendezvous checks as it happens:
// its WMMA calls (every lane of a warp must make the same ones, with the same pointers and
// strides: a divergent or lane-dependent call is undefined on the GPU) and its cp.async copies.
struct async_copy {
  unsigned char* dst;
  unsigned char bytes[16];
  unsigned size;
  uint64_t group;  // the commit group it belongs to (the number of commits before it)
};
// A wgmma issued and not yet computed (wgmma_emulator.hpp): its thread's accumulators, the
// operands' descriptors, and the commit group it belongs to.
struct pending_wgmma {
  float* d;
  int n;
  uint64_t a, b;
  uint64_t group;
};
struct thread_collectives {
  uint64_t wmma_calls = 0;
  uint64_t wmma_signature = 0;
  uint64_t committed = 0;           // pipeline groups committed
  std::vector<async_copy> pending;  // issued, not yet written to shared memory
  // wgmma: the calls (every thread of a warpgroup must make the same), whether a wgmma.fence
  // came since the last wait, the groups committed and the products not yet computed.
  uint64_t wgmma_calls = 0;
  uint64_t wgmma_signature = 0;
  bool wgmma_fenced = false;
  uint64_t wgmma_committed = 0;
  std::vector<pending_wgmma> wgmma_pending;
  // 16-byte chunks of dynamic shared memory this thread's cp.async wrote since its last
  // fence.proxy.async: wgmma (the async proxy) must not read them yet.
  std::vector<size_t> unfenced;
};
inline std::vector<thread_collectives> collectives;
// Per 16-byte chunk of dynamic shared memory: written by some thread's cp.async, not yet fenced.
inline std::vector<unsigned char> unfenced_chunks;

// The block's mbarriers and its TMA copies not yet landed (tma_emulator.hpp), by the barrier's
// shared address.
struct mbarrier_state {
  uint32_t arrivals = 0;  // a phase's, as initialised
  uint32_t pending = 0;   // arrivals the current phase still waits for
  int64_t tx = 0;         // bytes it still expects
  uint32_t parity = 0;    // the current phase's parity
};
struct tma_copy {
  uint32_t bar;                      // the barrier it completes on
  size_t dst;                        // offset in dynamic shared memory
  std::vector<unsigned char> bytes;  // what lands there, swizzled already
};
inline std::map<uint32_t, mbarrier_state> mbarriers;
inline std::vector<tma_copy> tma_in_flight;

inline thread_collectives& my_collectives() {
  return collectives[cur->tid.x];
}

inline void collective_begin(unsigned nthreads) {
  if (collectives.size() < nthreads) collectives.resize(nthreads);
  for (unsigned t = 0; t < nthreads; ++t) {
    auto& c = collectives[t];
    c.wmma_calls = c.wmma_signature = c.committed = 0;
    c.pending.clear();  // a copy never waited for dies with the block's shared memory
    c.wgmma_calls = c.wgmma_signature = c.wgmma_committed = 0;
    c.wgmma_fenced = false;
    c.wgmma_pending.clear();
    c.unfenced.clear();
  }
  unfenced_chunks.assign(dynamic_smem.size() / 16 + 1, 0);
  mbarriers.clear();
  tma_in_flight.clear();
}

// Every lane must have made the same WMMA calls as its warp's lane 0 (same order, pointers,
// strides and layouts). Checked once per block: it catches a call that only some lanes make or
// make differently, not two sequences that differ only in how they interleave with barriers.
// The same for wgmma over each warpgroup (128 threads), and no wgmma may be left unwaited.
inline void collective_end(unsigned block, unsigned nthreads) {
  using record = thread_collectives;
  const auto expect_same = [block](unsigned t, unsigned unit, uint64_t record::*calls,
                                   uint64_t record::*signature, const char* what) {
    const record &mine = collectives[t], &first = collectives[t - t % unit];
    if (mine.*calls == first.*calls && mine.*signature == first.*signature) return;
    std::fprintf(stderr,
                 "emu: block %u: thread %u made %llu %s calls, the first of its %u threads %llu, "
                 "or with other arguments (a divergent or thread-dependent collective call)\n",
                 block, t, static_cast<unsigned long long>(mine.*calls), what, unit,
                 static_cast<unsigned long long>(first.*calls));
    std::abort();
  };
  if (!tma_in_flight.empty()) {
    std::fprintf(stderr, "emu: block %u exited with a TMA copy no thread waited for\n", block);
    std::abort();
  }
  for (unsigned t = 0; t < nthreads; ++t) {
    expect_same(t, 32, &record::wmma_calls, &record::wmma_signature, "WMMA");
    expect_same(t, 128, &record::wgmma_calls, &record::wgmma_signature, "wgmma");
    const auto& mine = collectives[t];
    if (!mine.wgmma_pending.empty()) {
      std::fprintf(stderr, "emu: block %u thread %u exited with a wgmma never waited for\n", block,
                   t);
      std::abort();
    }
  }
}

// Folds a call's kind and arguments into a thread's running signature of its calls.
inline void note_call(uint64_t& calls, uint64_t& signature, std::initializer_list<uint64_t> call) {
  ++calls;
  for (const uint64_t v : call)
    signature = (signature ^ v) * 0x100000001b3ull + 0x9e3779b97f4a7c15ull;
}

inline void note_wmma_call(uint64_t kind, const void* p = nullptr, uint64_t ldm = 0,
                           uint64_t layout = 0) {
  auto& c = my_collectives();
  note_call(c.wmma_calls, c.wmma_signature,
            {kind, static_cast<uint64_t>(reinterpret_cast<uintptr_t>(p)), ldm, layout});
}

[[noreturn]] inline void emu_fail(const char* what) {
  std::fprintf(stderr, "emu: %s\n", what);
  std::abort();
}

inline float bf16_to_float(__nv_bfloat16 v) {
  uint16_t h;
  std::memcpy(&h, &v, 2);
  const uint32_t b = uint32_t{h} << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

}  // namespace emu

namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
class fragment;

// Where the elements live. A and B: every lane holds the whole 16x16 operand (the hardware
// spreads it over the lanes; here each lane's load repeats the warp's), A as x[row * 16 + k], B
// as x[col * 16 + k]. Accumulators: 8 elements per lane where sm_80+ tensor cores keep them
// (mma.sync's m16n8k16 layout, twice): with g = lane / 4, t = lane % 4, x[2h + j + 4 n] is row
// g + 8 h, column 2 t + j + 8 n. So, as on the GPU, a lane stores only its own elements, and a
// kernel that reads the tile back in any simpler pattern (a row per lane, lane + 32 i) needs a
// __syncwarp after store_matrix_sync, and another before the next store overwrites what other
// lanes still read; the fiber orders of EMU_ORDER then catch either one missing. Fragment
// layouts are opaque in CUDA: elementwise use of x[] (scaling, conversion) is right under any.
template <class Layout>
class fragment<matrix_a, 16, 16, 16, __nv_bfloat16, Layout> {
 public:
  static constexpr int num_elements = 256;
  __nv_bfloat16 x[num_elements];
};
template <class Layout>
class fragment<matrix_b, 16, 16, 16, __nv_bfloat16, Layout> {
 public:
  static constexpr int num_elements = 256;
  __nv_bfloat16 x[num_elements];
};
template <>
class fragment<accumulator, 16, 16, 16, float, void> {
 public:
  static constexpr int num_elements = 8;
  float x[num_elements];
};
using float_accumulator = fragment<accumulator, 16, 16, 16, float, void>;

namespace detail {
enum call : uint64_t { load_a = 1, load_b, load_c, store_c, mma };
// The GPU's requirements of every load and store: a 256-bit aligned pointer and a stride of a
// multiple of 16 bytes.
inline void check(const void* p, unsigned ldm, size_t element_bytes) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) ::emu::emu_fail("WMMA pointer not 32-byte aligned");
  if (ldm * element_bytes % 16 != 0) ::emu::emu_fail("WMMA ldm not a multiple of 16 bytes");
}
inline int acc_row(int lane, int i) {
  return lane / 4 + 8 * ((i / 2) % 2);
}
inline int acc_col(int lane, int i) {
  return 2 * (lane % 4) + i % 2 + 8 * (i / 4);
}
}  // namespace detail

template <class Use, class T, class Layout>
inline void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, const T& v) {
  for (auto& e : f.x) e = v;
}

template <class Layout>
inline void load_matrix_sync(fragment<matrix_a, 16, 16, 16, __nv_bfloat16, Layout>& a,
                             const __nv_bfloat16* p, unsigned ldm) {
  constexpr bool row = std::is_same_v<Layout, row_major>;
  static_assert(row || std::is_same_v<Layout, col_major>);
  detail::check(p, ldm, 2);
  ::emu::note_wmma_call(detail::load_a, p, ldm, row);
  for (int r = 0; r < 16; ++r)
    for (int k = 0; k < 16; ++k) a.x[r * 16 + k] = row ? p[r * ldm + k] : p[k * ldm + r];
}
template <class Layout>
inline void load_matrix_sync(fragment<matrix_b, 16, 16, 16, __nv_bfloat16, Layout>& b,
                             const __nv_bfloat16* p, unsigned ldm) {
  constexpr bool col = std::is_same_v<Layout, col_major>;
  static_assert(col || std::is_same_v<Layout, row_major>);
  detail::check(p, ldm, 2);
  ::emu::note_wmma_call(detail::load_b, p, ldm, col);
  for (int c = 0; c < 16; ++c)
    for (int k = 0; k < 16; ++k) b.x[c * 16 + k] = col ? p[c * ldm + k] : p[k * ldm + c];
}
inline void load_matrix_sync(float_accumulator& f, const float* p, unsigned ldm, layout_t layout) {
  detail::check(p, ldm, 4);
  ::emu::note_wmma_call(detail::load_c, p, ldm, layout);
  const int l = ::emu::lane();
  for (int i = 0; i < float_accumulator::num_elements; ++i) {
    const int r = detail::acc_row(l, i), c = detail::acc_col(l, i);
    f.x[i] = layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
  }
}
inline void store_matrix_sync(float* p, const float_accumulator& f, unsigned ldm, layout_t layout) {
  detail::check(p, ldm, 4);
  ::emu::note_wmma_call(detail::store_c, p, ldm, layout);
  const int l = ::emu::lane();
  for (int i = 0; i < float_accumulator::num_elements; ++i) {
    const int r = detail::acc_row(l, i), c = detail::acc_col(l, i);
    (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[i];
  }
}

// d = a . b + c. The arithmetic the test tolerances assume of the tensor cores: each product of
// two bf16 values is exact in float32 (8 + 8 significant bits), the 16 products of a step are
// summed in double (exactly, unless their magnitudes span more than 2^37) and rounded once to
// float32, then added to the float32 accumulator with one more rounding. The hardware's own
// addition order and its truncating alignment are not modelled: the tests' bounds allow for them.
template <class LA, class LB>
inline void mma_sync(float_accumulator& d,
                     const fragment<matrix_a, 16, 16, 16, __nv_bfloat16, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, __nv_bfloat16, LB>& b,
                     const float_accumulator& c) {
  ::emu::note_wmma_call(detail::mma);
  const int l = ::emu::lane();
  for (int i = 0; i < float_accumulator::num_elements; ++i) {
    const int r = detail::acc_row(l, i), col = detail::acc_col(l, i);
    double step = 0.0;
    for (int k = 0; k < 16; ++k)
      step += static_cast<double>(::emu::bf16_to_float(a.x[r * 16 + k]) *
                                  ::emu::bf16_to_float(b.x[col * 16 + k]));
    d.x[i] = c.x[i] + static_cast<float>(step);  // c and d may be one fragment
  }
}

}  // namespace nvcuda::wmma

// cp.async as cuda_pipeline_primitives.h spells it. A copy reads its source when issued and, by
// default, writes its destination when a __pipeline_wait_prior covers its group: the latest the
// hardware may, so a thread that reads a destination before waiting sees the old bytes (the NaN
// poison or the previous stage) and the results show it. EMU_ASYNC=early writes it at issue
// instead, the earliest the hardware may: a copy queued into a stage that another thread, or a
// pending wgmma, still reads (a missing barrier or wgmma wait before reusing a stage) then
// overwrites it under that reader. Each is one schedule, not all of them: a kernel that writes a
// copy's source, or stores to its destination, between issue and wait (a race on the GPU) gets
// one outcome here; and another thread reading the destination after the issuing thread's wait
// but without the barrier that should follow is caught only in the fiber orders that run it
// first (EMU_ORDER).
namespace emu {
inline bool async_copies_early() {
  static const bool early = [] {
    const char* e = std::getenv("EMU_ASYNC");
    return e != nullptr && std::strcmp(e, "early") == 0;
  }();
  return early;
}
// Fails when bytes [offset, offset + size) of dynamic shared memory hold an operand of a wgmma
// not yet complete (wgmma_emulator.hpp): a copy landing there races with the tensor cores.
inline void expect_no_pending_reader(size_t offset, size_t size);

// The copy lands: into dynamic shared memory, the async proxy (wgmma) may not read it before
// the issuing thread's fence.proxy.async.
inline void land(const async_copy& c, thread_collectives& mine) {
  const auto* base = dynamic_smem.data();
  if (c.dst >= base && c.dst < base + dynamic_smem.size())
    expect_no_pending_reader(static_cast<size_t>(c.dst - base), c.size);
  std::memcpy(c.dst, c.bytes, c.size);
  if (c.dst >= base && c.dst < base + dynamic_smem.size()) {
    const auto chunk = static_cast<size_t>(c.dst - base) / 16;
    unfenced_chunks[chunk] = 1;
    mine.unfenced.push_back(chunk);
  }
}
}  // namespace emu

inline void __pipeline_memcpy_async(void* dst, const void* src, size_t size_and_align,
                                    size_t zfill = 0) {
  if ((size_and_align != 4 && size_and_align != 8 && size_and_align != 16) ||
      zfill > size_and_align)
    ::emu::emu_fail("__pipeline_memcpy_async: size not 4, 8 or 16, or zfill past it");
  if (reinterpret_cast<uintptr_t>(dst) % size_and_align != 0 ||
      reinterpret_cast<uintptr_t>(src) % size_and_align != 0)
    ::emu::emu_fail("__pipeline_memcpy_async: an address not aligned to the size");
  auto& mine = ::emu::my_collectives();
  ::emu::async_copy c;
  c.dst = static_cast<unsigned char*>(dst);
  c.size = static_cast<unsigned>(size_and_align);
  c.group = mine.committed;
  std::memcpy(c.bytes, src, size_and_align - zfill);
  std::memset(c.bytes + (size_and_align - zfill), 0, zfill);
  if (::emu::async_copies_early())
    ::emu::land(c, mine);
  else
    mine.pending.push_back(c);
}
inline void __pipeline_commit() {
  ++::emu::my_collectives().committed;
}
// Writes the copies of every committed group but the newest `prior`, in issue order.
inline void __pipeline_wait_prior(size_t prior) {
  auto& mine = ::emu::my_collectives();
  const uint64_t complete = mine.committed > prior ? mine.committed - prior : 0;
  size_t kept = 0;
  for (auto& c : mine.pending) {
    if (c.group < complete)
      ::emu::land(c, mine);
    else
      mine.pending[kept++] = c;
  }
  mine.pending.resize(kept);
}
