#include "runtime/tensor_exchange.hpp"

#include <spdlog/spdlog.h>

namespace moe::runtime {

namespace {

// A shape from the network is checked before anything is allocated for it.
constexpr size_t max_tensor_elements = size_t{1} << 32;  // 16 GiB of f32

caf::expected<size_t> element_count(const std::vector<int64_t>& shape) {
  size_t n = 1;
  for (auto d : shape) {
    if (d < 0) return make_error(data_plane_errc::invalid_argument, "negative dimension in tensor shape");
    if (d > 0 && n > max_tensor_elements / static_cast<size_t>(d))
      return make_error(data_plane_errc::invalid_argument, "tensor shape beyond 2^32 elements");
    n *= static_cast<size_t>(d);
  }
  return n;
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + ")";
}

}  // namespace

caf::expected<std::shared_ptr<tensor_exchange>> tensor_exchange::start(data_plane_options options) {
  auto plane = data_plane::start(std::move(options));
  if (!plane) return plane.error();
  return std::shared_ptr<tensor_exchange>(new tensor_exchange(std::move(*plane)));
}

tensor_exchange::~tensor_exchange() { plane_->stop(); }

const std::string& tensor_exchange::address() const noexcept { return plane_->address(); }

void tensor_exchange::add_peer(const caf::node_id& node, std::string address) {
  std::lock_guard guard(mutex_);
  peers_[node] = std::move(address);
}

bool tensor_exchange::knows(const caf::node_id& node) const {
  std::lock_guard guard(mutex_);
  return peers_.count(node) != 0;
}

caf::expected<uint64_t> tensor_exchange::push(const caf::node_id& to, std::shared_ptr<const buffer> values,
                                              const std::vector<int64_t>& shape,
                                              const tensor_frame_meta& meta) {
  auto n = element_count(shape);
  if (!n) return n.error();
  if (!values || values->size() != *n || *n == 0)
    return make_error(data_plane_errc::invalid_argument,
                      "push: the buffer does not hold a non-empty tensor of shape " + shape_text(shape));
  std::string address;
  {
    std::lock_guard guard(mutex_);
    auto it = peers_.find(to);
    if (it == peers_.end())
      return make_error(data_plane_errc::invalid_argument,
                        "push: no data plane address for process " + to_string(to));
    address = it->second;
  }
  auto peer = plane_->connect(address);
  if (!peer) return peer.error();
  protocol::tensor_frame_header h;
  h.kind = meta.kind;
  h.dt = kernels::dtype::f32;
  h.shape.assign(shape.begin(), shape.end());
  h.layer = meta.layer;
  h.step = meta.step;
  h.placement_version = meta.placement_version;
  h.transfer_tag = plane_->next_transfer_tag();
  h.byte_length = *n * sizeof(float);
  const std::span<const std::byte> payload{reinterpret_cast<const std::byte*>(values->data()), h.byte_length};
  // The callback owns the buffer until UCX is done with it.
  auto err = plane_->send(*peer, h, payload, [values, address](caf::error e) {
    if (e) spdlog::warn("data plane: a tensor for {} was not sent: {}", address, error_text(e));
  });
  if (err) return err;
  return h.transfer_tag;
}

caf::error tensor_exchange::pull(uint64_t transfer_tag, const std::vector<int64_t>& shape, pull_callback done) {
  auto n = element_count(shape);
  if (!n) return n.error();
  auto out = std::make_shared<buffer>(*n);
  const std::span<std::byte> bytes{reinterpret_cast<std::byte*>(out->data()), *n * sizeof(float)};
  return plane_->post_receive(
      transfer_tag, bytes,
      [out, shape, done = std::move(done)](caf::expected<protocol::tensor_frame_header> h) {
        if (!h) return done(h.error());
        const bool same_shape = std::equal(h->shape.begin(), h->shape.end(), shape.begin(), shape.end(),
                                           [](uint64_t a, int64_t b) { return a == static_cast<uint64_t>(b); });
        if (h->dt != kernels::dtype::f32 || !same_shape)
          return done(make_error(data_plane_errc::rejected_frame,
                                 "tensor frame does not match its message: expected f32 " + shape_text(shape)));
        done(out);
      });
}

}  // namespace moe::runtime
