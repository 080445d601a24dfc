// A stand-in for libnccl, for the emulator's tests (runtime_nccl_emulated and
// engine_expert_parallel_emulated): a world of ranks in one process, one thread per rank, each on
// its own emulated device (MOE_EMU_DEVICES), so that the expert exchange of
// runtime/nccl_all_to_all.cpp runs with two, three or four ranks in CI,
// which has no GPU (a card run with one GPU only ever forms a world of one).
//
// What it keeps of NCCL's contract: communicators made by ncclCommInitAll or by ncclCommInitRank
// through a unique id (blocking until every rank has joined; two ranks of a world on one device
// refused as "Duplicate GPU"), send/receive pairs matched by peer and by order, fused by
// ncclGroupStart/End, ncclAllReduce with ncclSum. Where NCCL leaves a broken program undefined or
// hanging, this one fails the call and says why through ncclGetLastError: a receive whose peer
// sent another count or type, a buffer outside any cudaMalloc allocation, a peer that never sends
// (after 30 s), NCCL work queued on a stream that is capturing a graph.
//
// What it does not keep: NCCL works asynchronously on the streams; here a call (a group's end)
// first waits for its streams' earlier work (cudaStreamSynchronize) and then moves the bytes on the
// host before it returns, so a caller that forgot to order later work after the collective is
// not caught. The all-reduce sums in rank order in float32 (float64 and integers exactly) and
// rounds once; NCCL's ring or tree sums in another order and, for bf16, rounds on the way.
// Test code only.
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>
#include <nccl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "tests/emulator/fake_cudart.hpp"

namespace {

constexpr auto peer_timeout = std::chrono::seconds(30);

thread_local std::string last_error;

ncclResult_t fail(ncclResult_t code, std::string why) {
  last_error = std::move(why);
  return code;
}

size_t type_bytes(ncclDataType_t t) {
  switch (t) {
    case ncclInt8:
    case ncclUint8:
    case ncclFloat8e4m3:
    case ncclFloat8e5m2: return 1;
    case ncclFloat16:
    case ncclBfloat16: return 2;
    case ncclInt32:
    case ncclUint32:
    case ncclFloat32: return 4;
    case ncclInt64:
    case ncclUint64:
    case ncclFloat64: return 8;
    default: return 0;
  }
}

/// One message in flight from a rank to a peer.
struct message {
  std::vector<std::byte> bytes;
  ncclDataType_t type;
};

/// The contributions to one all-reduce, in rank order; freed once every rank has read the sum.
struct reduce_round {
  std::vector<std::vector<std::byte>> inputs;
  int arrived = 0;
  int done = 0;
  size_t count = 0;
  ncclDataType_t type = ncclFloat32;
};

/// What the ranks of one world share.
struct world {
  explicit world(int n) : size(n), devices(static_cast<size_t>(n), -1) {}
  const int size;
  std::mutex mu;
  std::condition_variable cv;
  std::vector<int> devices;  // by rank; -1 until the rank has joined
  int joined = 0;
  std::map<std::pair<int, int>, std::deque<message>> mail;  // (from, to) -> in order
  std::map<uint64_t, reduce_round> rounds;
};

}  // namespace

struct ncclComm {
  std::shared_ptr<world> w;
  int rank = 0;
  int device = 0;
  uint64_t next_round = 0;  // the all-reduces this rank has joined
};

namespace {

/// Worlds being formed through ncclCommInitRank, by unique id.
std::mutex registry_mu;
std::map<std::string, std::shared_ptr<world>>& registry() {
  static std::map<std::string, std::shared_ptr<world>> r;
  return r;
}

struct pending_op {
  bool send = false;
  ncclComm_t comm = nullptr;
  std::byte* buffer = nullptr;
  size_t bytes = 0;
  ncclDataType_t type = ncclUint8;
  int peer = 0;
  cudaStream_t stream = nullptr;
};

thread_local int group_depth = 0;
thread_local std::vector<pending_op> group_ops;
thread_local ncclResult_t group_error = ncclSuccess;  // the first call a group refused

ncclResult_t check_comm(ncclComm_t comm) {
  return comm == nullptr ? fail(ncclInvalidArgument, "null communicator") : ncclSuccess;
}

/// Waits for every stream the ops run on: the bytes they move are then those the stream's
/// earlier work left.
ncclResult_t wait_for_streams(const std::vector<pending_op>& ops) {
  std::set<cudaStream_t> done;
  for (const auto& op : ops) {
    if (!done.insert(op.stream).second) continue;
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(op.stream, &capture) != cudaSuccess)
      return fail(ncclInvalidArgument, "not a live stream");
    if (capture != cudaStreamCaptureStatusNone)
      return fail(ncclInvalidUsage, "the emulator's NCCL cannot run inside a captured graph");
    if (cudaStreamSynchronize(op.stream) != cudaSuccess)
      return fail(ncclUnhandledCudaError, "cudaStreamSynchronize before the collective failed");
  }
  return ncclSuccess;
}

/// Posts every send, then takes every receive in order, waiting for the peers' sends.
ncclResult_t run_ops(const std::vector<pending_op>& ops) {
  if (auto st = wait_for_streams(ops); st != ncclSuccess) return st;
  for (const auto& op : ops) {
    if (!op.send) continue;
    world& w = *op.comm->w;
    message m{std::vector<std::byte>(op.buffer, op.buffer + op.bytes), op.type};
    std::lock_guard<std::mutex> lk(w.mu);
    w.mail[{op.comm->rank, op.peer}].push_back(std::move(m));
    w.cv.notify_all();
  }
  for (const auto& op : ops) {
    if (op.send) continue;
    world& w = *op.comm->w;
    std::unique_lock<std::mutex> lk(w.mu);
    auto& box = w.mail[{op.peer, op.comm->rank}];
    if (!w.cv.wait_for(lk, peer_timeout, [&] { return !box.empty(); }))
      return fail(ncclSystemError, "rank " + std::to_string(op.comm->rank) + " waited " +
                                       std::to_string(peer_timeout.count()) +
                                       " s for a send from rank " + std::to_string(op.peer) +
                                       " that never came");
    message m = std::move(box.front());
    box.pop_front();
    lk.unlock();
    if (m.bytes.size() != op.bytes || m.type != op.type)
      return fail(ncclInvalidUsage,
                  "rank " + std::to_string(op.comm->rank) + " receives " +
                      std::to_string(op.bytes) + " bytes (type " + std::to_string(op.type) +
                      ") from rank " + std::to_string(op.peer) + ", which sent " +
                      std::to_string(m.bytes.size()) + " (type " + std::to_string(m.type) + ")");
    std::copy(m.bytes.begin(), m.bytes.end(), op.buffer);
  }
  return ncclSuccess;
}

ncclResult_t queue_op(pending_op op) {
  if (auto st = check_comm(op.comm); st != ncclSuccess) return st;
  const size_t element = type_bytes(op.type);
  if (element == 0)
    return fail(ncclInvalidArgument, "unknown data type " + std::to_string(op.type));
  if (op.peer < 0 || op.peer >= op.comm->w->size)
    return fail(ncclInvalidArgument, "peer " + std::to_string(op.peer) + " outside a world of " +
                                         std::to_string(op.comm->w->size));
  if (op.bytes > 0 && !emu::is_device_range(op.buffer, op.bytes))
    return fail(ncclInvalidArgument, std::string(op.send ? "send" : "receive") +
                                         " buffer is not device memory (cudaMalloc) of that size");
  if (group_depth > 0) {
    group_ops.push_back(op);
    return ncclSuccess;
  }
  return run_ops({op});
}

template <class T>
void sum_into(const std::vector<std::vector<std::byte>>& inputs, size_t count, std::byte* out) {
  for (size_t i = 0; i < count; ++i) {
    T acc{};
    for (const auto& in : inputs) {
      T v;
      std::memcpy(&v, in.data() + i * sizeof(T), sizeof(T));
      acc += v;
    }
    std::memcpy(out + i * sizeof(T), &acc, sizeof(T));
  }
}

template <class T, class ToFloat, class FromFloat>
void sum_narrow_into(const std::vector<std::vector<std::byte>>& inputs, size_t count,
                     std::byte* out, ToFloat to_float, FromFloat from_float) {
  for (size_t i = 0; i < count; ++i) {
    float acc = 0.0f;
    for (const auto& in : inputs) {
      T v;
      std::memcpy(&v, in.data() + i * sizeof(T), sizeof(T));
      acc += to_float(v);
    }
    const T r = from_float(acc);
    std::memcpy(out + i * sizeof(T), &r, sizeof(T));
  }
}

bool sum_of(const reduce_round& r, std::byte* out) {
  switch (r.type) {
    case ncclFloat32: sum_into<float>(r.inputs, r.count, out); return true;
    case ncclFloat64: sum_into<double>(r.inputs, r.count, out); return true;
    case ncclInt32: sum_into<int32_t>(r.inputs, r.count, out); return true;
    case ncclUint32: sum_into<uint32_t>(r.inputs, r.count, out); return true;
    case ncclInt64: sum_into<int64_t>(r.inputs, r.count, out); return true;
    case ncclUint64: sum_into<uint64_t>(r.inputs, r.count, out); return true;
    case ncclBfloat16:
      sum_narrow_into<__nv_bfloat16>(
          r.inputs, r.count, out, [](__nv_bfloat16 v) { return __bfloat162float(v); },
          [](float v) { return __float2bfloat16(v); });
      return true;
    default: return false;
  }
}

}  // namespace

extern "C" {

ncclResult_t ncclGetVersion(int* version) {
  if (version == nullptr) return fail(ncclInvalidArgument, "null version");
  *version = NCCL_VERSION_CODE;
  return ncclSuccess;
}

const char* ncclGetErrorString(ncclResult_t result) {
  switch (result) {
    case ncclSuccess: return "no error";
    case ncclUnhandledCudaError:
      return "unhandled cuda error (run with NCCL_DEBUG=INFO for details)";
    case ncclSystemError: return "unhandled system error (run with NCCL_DEBUG=INFO for details)";
    case ncclInternalError:
      return "internal error - please report this issue to the NCCL developers";
    case ncclInvalidArgument: return "invalid argument (run with NCCL_DEBUG=WARN for details)";
    case ncclInvalidUsage: return "invalid usage (run with NCCL_DEBUG=WARN for details)";
    case ncclRemoteError: return "remote process exited or there was a network error";
    case ncclInProgress: return "NCCL operation in progress";
    default: return "unknown result code";
  }
}

const char* ncclGetLastError(ncclComm_t) {
  return last_error.c_str();
}

ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
  if (id == nullptr) return fail(ncclInvalidArgument, "null unique id");
  static std::atomic<uint64_t> next{1};
  *id = ncclUniqueId{};
  const std::string text = "emulated-nccl-world-" + std::to_string(next++);
  std::memcpy(id->internal, text.data(), std::min(text.size(), sizeof(id->internal)));
  return ncclSuccess;
}

ncclResult_t ncclCommInitAll(ncclComm_t* comms, int ndev, const int* devlist) {
  if (comms == nullptr || ndev < 1)
    return fail(ncclInvalidArgument, "ncclCommInitAll: no communicators to make");
  int count = 0;
  (void)cudaGetDeviceCount(&count);
  std::set<int> seen;
  for (int i = 0; i < ndev; ++i) {
    const int d = devlist != nullptr ? devlist[i] : i;
    if (d < 0 || d >= count)
      return fail(ncclInvalidArgument,
                  "device " + std::to_string(d) + " of " + std::to_string(count));
    if (!seen.insert(d).second)
      return fail(ncclInvalidUsage, "Duplicate GPU detected: device " + std::to_string(d));
  }
  auto w = std::make_shared<world>(ndev);
  for (int i = 0; i < ndev; ++i) {
    w->devices[static_cast<size_t>(i)] = devlist != nullptr ? devlist[i] : i;
    comms[i] = new ncclComm{w, i, w->devices[static_cast<size_t>(i)], 0};
  }
  w->joined = ndev;
  return ncclSuccess;
}

ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank) {
  if (comm == nullptr) return fail(ncclInvalidArgument, "null communicator");
  if (nranks < 1 || rank < 0 || rank >= nranks)
    return fail(ncclInvalidArgument,
                "rank " + std::to_string(rank) + " of " + std::to_string(nranks));
  int device = 0;
  (void)cudaGetDevice(&device);
  std::shared_ptr<world> w;
  {
    std::lock_guard<std::mutex> lk(registry_mu);
    auto& slot = registry()[std::string(id.internal, sizeof(id.internal))];
    if (!slot) slot = std::make_shared<world>(nranks);
    w = slot;
  }
  std::unique_lock<std::mutex> lk(w->mu);
  if (w->size != nranks)
    return fail(ncclInvalidUsage, "rank " + std::to_string(rank) + " joins a world of " +
                                      std::to_string(nranks) + " that others joined as " +
                                      std::to_string(w->size));
  if (w->devices[static_cast<size_t>(rank)] != -1)
    return fail(ncclInvalidUsage, "rank " + std::to_string(rank) + " joined twice");
  for (int r = 0; r < nranks; ++r)
    if (w->devices[static_cast<size_t>(r)] == device)
      return fail(ncclInvalidUsage, "Duplicate GPU detected : rank " + std::to_string(r) +
                                        " and rank " + std::to_string(rank) +
                                        " both on CUDA device " + std::to_string(device));
  w->devices[static_cast<size_t>(rank)] = device;
  ++w->joined;
  w->cv.notify_all();
  // NCCL's rule: the call returns once every rank has joined.
  if (!w->cv.wait_for(lk, peer_timeout, [&] { return w->joined == w->size; })) {
    w->devices[static_cast<size_t>(rank)] = -1;
    --w->joined;
    return fail(ncclSystemError, "rank " + std::to_string(rank) + " waited " +
                                     std::to_string(peer_timeout.count()) +
                                     " s for the other ranks of its world to join");
  }
  lk.unlock();
  {
    std::lock_guard<std::mutex> rl(registry_mu);
    registry().erase(std::string(id.internal, sizeof(id.internal)));
  }
  *comm = new ncclComm{w, rank, device, 0};
  return ncclSuccess;
}

ncclResult_t ncclCommDestroy(ncclComm_t comm) {
  delete comm;
  return ncclSuccess;
}

ncclResult_t ncclCommCount(const ncclComm_t comm, int* count) {
  if (auto st = check_comm(comm); st != ncclSuccess) return st;
  if (count == nullptr) return fail(ncclInvalidArgument, "null count");
  *count = comm->w->size;
  return ncclSuccess;
}

ncclResult_t ncclCommCuDevice(const ncclComm_t comm, int* device) {
  if (auto st = check_comm(comm); st != ncclSuccess) return st;
  if (device == nullptr) return fail(ncclInvalidArgument, "null device");
  *device = comm->device;
  return ncclSuccess;
}

ncclResult_t ncclCommUserRank(const ncclComm_t comm, int* rank) {
  if (auto st = check_comm(comm); st != ncclSuccess) return st;
  if (rank == nullptr) return fail(ncclInvalidArgument, "null rank");
  *rank = comm->rank;
  return ncclSuccess;
}

ncclResult_t ncclGroupStart() {
  if (group_depth++ == 0) {
    group_ops.clear();
    group_error = ncclSuccess;
  }
  return ncclSuccess;
}

ncclResult_t ncclGroupEnd() {
  if (group_depth == 0) return fail(ncclInvalidUsage, "ncclGroupEnd without ncclGroupStart");
  if (--group_depth > 0) return ncclSuccess;
  std::vector<pending_op> ops;
  ops.swap(group_ops);
  // A group with a refused call queues nothing (NCCL's own rule for a group that failed).
  if (group_error != ncclSuccess) return group_error;
  return run_ops(ops);
}

ncclResult_t ncclSend(const void* sendbuff, size_t count, ncclDataType_t datatype, int peer,
                      ncclComm_t comm, cudaStream_t stream) {
  pending_op op{true,
                comm,
                static_cast<std::byte*>(const_cast<void*>(sendbuff)),
                count * type_bytes(datatype),
                datatype,
                peer,
                stream};
  const ncclResult_t st = queue_op(op);
  if (st != ncclSuccess && group_depth > 0 && group_error == ncclSuccess) group_error = st;
  return st;
}

ncclResult_t ncclRecv(void* recvbuff, size_t count, ncclDataType_t datatype, int peer,
                      ncclComm_t comm, cudaStream_t stream) {
  pending_op op{
      false, comm,  static_cast<std::byte*>(recvbuff), count * type_bytes(datatype), datatype,
      peer,  stream};
  const ncclResult_t st = queue_op(op);
  if (st != ncclSuccess && group_depth > 0 && group_error == ncclSuccess) group_error = st;
  return st;
}

ncclResult_t ncclAllReduce(const void* sendbuff, void* recvbuff, size_t count,
                           ncclDataType_t datatype, ncclRedOp_t op, ncclComm_t comm,
                           cudaStream_t stream) {
  if (auto st = check_comm(comm); st != ncclSuccess) return st;
  if (group_depth > 0)
    return fail(ncclInvalidUsage, "the emulator's NCCL runs ncclAllReduce outside groups only");
  if (op != ncclSum) return fail(ncclInvalidArgument, "the emulator's NCCL sums only (ncclSum)");
  const size_t bytes = count * type_bytes(datatype);
  if (type_bytes(datatype) == 0 || datatype == ncclFloat16 || datatype == ncclInt8 ||
      datatype == ncclUint8 || datatype == ncclFloat8e4m3 || datatype == ncclFloat8e5m2)
    return fail(ncclInvalidArgument,
                "the emulator's NCCL does not sum type " + std::to_string(datatype));
  if (bytes > 0 &&
      (!emu::is_device_range(sendbuff, bytes) || !emu::is_device_range(recvbuff, bytes)))
    return fail(ncclInvalidArgument,
                "all-reduce buffers are not device memory (cudaMalloc) of that size");
  if (auto st = wait_for_streams({pending_op{true, comm, nullptr, 0, datatype, 0, stream}});
      st != ncclSuccess)
    return st;
  world& w = *comm->w;
  const uint64_t id = comm->next_round++;
  const auto* in = static_cast<const std::byte*>(sendbuff);
  std::unique_lock<std::mutex> lk(w.mu);
  reduce_round& r = w.rounds[id];
  if (r.inputs.empty()) {
    r.inputs.resize(static_cast<size_t>(w.size));
    r.count = count;
    r.type = datatype;
  }
  if (r.count != count || r.type != datatype)
    return fail(ncclInvalidUsage,
                "rank " + std::to_string(comm->rank) + " all-reduces " + std::to_string(count) +
                    " values of type " + std::to_string(datatype) + " where another rank gave " +
                    std::to_string(r.count) + " of type " + std::to_string(r.type));
  r.inputs[static_cast<size_t>(comm->rank)].assign(in, in + bytes);
  ++r.arrived;
  w.cv.notify_all();
  if (!w.cv.wait_for(lk, peer_timeout, [&] { return r.arrived == w.size; }))
    return fail(ncclSystemError, "rank " + std::to_string(comm->rank) + " waited " +
                                     std::to_string(peer_timeout.count()) +
                                     " s for the other ranks' all-reduce");
  (void)sum_of(r, static_cast<std::byte*>(recvbuff));
  if (++r.done == w.size) w.rounds.erase(id);
  return ncclSuccess;
}

}  // extern "C"
