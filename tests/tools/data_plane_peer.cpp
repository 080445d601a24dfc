// The other process of the data-plane tests (tests/unit/runtime/data_plane_test.cpp): a
// data_plane that echoes every frame it is sent, so that the test checks bytes both ways.
//
//   moe_data_plane_peer --tls tcp|sm|... --listen 1|0 --detect-peer-failure 1|0 [--crash]
//
// Talks over stdin/stdout: prints "ADDR <its address>", then reads
// "<test's address> <size>,<size>,..." (sizes in bytes). It receives frame i (tag sequence i+1
// of the test's plane) into a buffer of exactly that size and sends it back with tag sequence
// i+1 of its own plane. With --crash it then sends one 64 MiB frame (sequence 100) and kills
// itself while that is in flight. Otherwise it waits for EOF on stdin, stops, and exits 0 when
// every frame went both ways. Every wait is bounded: a broken test never leaves it behind.
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <iostream>
#include <mutex>
#include <signal.h>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "runtime/data_plane.hpp"

namespace {

using moe::runtime::data_plane;
namespace tag = moe::runtime::data_plane_tag;

int fail(const std::string& why) {
  std::fprintf(stderr, "data_plane_peer: %s\n", why.c_str());
  return 1;
}

uint32_t plane_in(const std::string& address) {
  return static_cast<uint32_t>(std::stoul(address.substr(address.rfind('/') + 1), nullptr, 16));
}

}  // namespace

int main(int argc, char** argv) {
  moe::runtime::data_plane_options opts;
  bool crash = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--tls" && i + 1 < argc) {
      opts.tls = argv[++i];
    } else if (a == "--listen" && i + 1 < argc) {
      opts.listen = std::string(argv[++i]) == "1";
    } else if (a == "--detect-peer-failure" && i + 1 < argc) {
      opts.detect_peer_failure = std::string(argv[++i]) == "1";
    } else if (a == "--crash") {
      crash = true;
    } else {
      return fail("unknown argument " + a);
    }
  }
  opts.drain_timeout = std::chrono::seconds(5);
  auto plane = data_plane::start(opts);
  if (!plane) return fail(moe::error_text(plane.error()));
  std::cout << "ADDR " << (*plane)->address() << std::endl;

  std::string line, test_address, size_list;
  if (!std::getline(std::cin, line)) return fail("no peer address on stdin");
  std::istringstream in(line);
  in >> test_address >> size_list;
  std::vector<size_t> sizes;
  for (std::istringstream s(size_list); std::getline(s, line, ',');)
    sizes.push_back(std::stoull(line));
  auto peer = (*plane)->connect(test_address);
  if (!peer) return fail(moe::error_text(peer.error()));
  const uint32_t test_plane = plane_in(test_address);

  std::mutex mutex;
  std::condition_variable cv;
  size_t num_echoed = 0;
  std::string first_error;
  auto note = [&](const caf::error& e) {
    std::lock_guard guard(mutex);
    if (e && first_error.empty()) first_error = moe::error_text(e);
    ++num_echoed;
    cv.notify_all();
  };
  std::vector<std::vector<std::byte>> buffers;
  for (size_t n : sizes) buffers.emplace_back(n);
  for (size_t i = 0; i < sizes.size(); ++i) {
    auto* buffer = &buffers[i];
    auto err =
        (*plane)->post_receive(tag::make(test_plane, i + 1), *buffer,
                               [&, i, buffer](caf::expected<moe::protocol::tensor_frame_header> h) {
                                 if (!h) return note(h.error());
                                 h->transfer_tag = tag::make((*plane)->plane_id(), i + 1);
                                 if (auto e = (*plane)->send(*peer, *h, *buffer, note)) note(e);
                               });
    if (err) return fail(moe::error_text(err));
  }
  {
    std::unique_lock lock(mutex);
    if (!cv.wait_for(lock, std::chrono::seconds(60), [&] { return num_echoed == sizes.size(); }))
      return fail("timed out echoing");
    if (!first_error.empty()) return fail(first_error);
  }

  if (crash) {
    static std::vector<std::byte> big(64 << 20, std::byte{0x5a});
    moe::protocol::tensor_frame_header h;
    h.shape = {big.size()};
    h.dt = moe::kernels::dtype::u8;
    h.byte_length = big.size();
    h.transfer_tag = tag::make((*plane)->plane_id(), 100);
    if (auto e = (*plane)->send(*peer, h, big, [](caf::error) {})) return fail(moe::error_text(e));
    // Give the transfer a moment to get going (not needed for correctness: any moment is a
    // valid crash), then die without stop(): what a crash looks like to the peer.
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    ::raise(SIGKILL);  // mid-transfer, without stop(): what a crash looks like to the peer
  }
  while (std::getline(std::cin, line)) {
  }
  (*plane)->stop();
  return 0;
}
