#include "kernels/cpu/gather.hpp"

#include <algorithm>

namespace moe::kernels::cpu {
namespace {

template <class Index>
bool ids_in_range(const Index* ids, size_t num_ids, size_t num_rows) noexcept {
  for (size_t i = 0; i < num_ids; ++i)
    if (ids[i] < 0 || static_cast<uint64_t>(ids[i]) >= num_rows) return false;
  return true;
}

template <class Index>
kernel_status gather(const float* table, size_t num_rows, size_t dim, const Index* ids,
                     size_t num_ids, float* out) noexcept {
  if (num_ids == 0 || dim == 0) return kernel_status::ok;
  if (table == nullptr || ids == nullptr || out == nullptr) return kernel_status::unsupported_shape;
  if (!ids_in_range(ids, num_ids, num_rows)) return kernel_status::unsupported_shape;
  for (size_t i = 0; i < num_ids; ++i) {
    const float* row = table + static_cast<size_t>(ids[i]) * dim;
    std::copy(row, row + dim, out + i * dim);
  }
  return kernel_status::ok;
}

}  // namespace

kernel_status gather_rows(const float* table, size_t num_rows, size_t dim, const int64_t* ids,
                          size_t num_ids, float* out) noexcept {
  return gather(table, num_rows, dim, ids, num_ids, out);
}

kernel_status gather_rows(const float* table, size_t num_rows, size_t dim, const int32_t* ids,
                          size_t num_ids, float* out) noexcept {
  return gather(table, num_rows, dim, ids, num_ids, out);
}

kernel_status scatter_add_rows(const float* src, size_t dim, const int32_t* ids,
                               const float* weights, size_t num_ids, float* out,
                               size_t num_rows) noexcept {
  if (num_ids == 0 || dim == 0) return kernel_status::ok;
  if (src == nullptr || ids == nullptr || out == nullptr) return kernel_status::unsupported_shape;
  if (!ids_in_range(ids, num_ids, num_rows)) return kernel_status::unsupported_shape;
  for (size_t i = 0; i < num_ids; ++i) {
    const float w = weights != nullptr ? weights[i] : 1.0f;
    const float* s = src + i * dim;
    float* o = out + static_cast<size_t>(ids[i]) * dim;
    for (size_t j = 0; j < dim; ++j) o[j] += w * s[j];
  }
  return kernel_status::ok;
}

}  // namespace moe::kernels::cpu
