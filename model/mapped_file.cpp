#include "model/mapped_file.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "model/model_errc.hpp"

namespace moe::model {

namespace {

struct fd_closer {
  int fd;
  ~fd_closer() {
    if (fd >= 0) ::close(fd);
  }
};

caf::error io_failure(const std::filesystem::path& path, const char* what) {
  return make_error(model_errc::io_error,
                    path.string() + ": " + what + ": " + std::strerror(errno));
}

}  // namespace

void mapped_file::unmapper::operator()(void* address) const noexcept {
  if (address != nullptr) ::munmap(address, size_bytes);
}

caf::expected<mapped_file> mapped_file::open(const std::filesystem::path& path) {
  fd_closer fd{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
  if (fd.fd < 0) return io_failure(path, "cannot open");
  struct stat st {};
  if (::fstat(fd.fd, &st) != 0) return io_failure(path, "cannot stat");
  if (!S_ISREG(st.st_mode)) {
    return make_error(model_errc::io_error, path.string() + ": not a regular file");
  }
  mapped_file out;
  out.path_ = path;
  out.size_bytes_ = static_cast<size_t>(st.st_size);
  if (out.size_bytes_ == 0) return out;  // mmap rejects length 0
  void* address = ::mmap(nullptr, out.size_bytes_, PROT_READ, MAP_PRIVATE, fd.fd, 0);
  if (address == MAP_FAILED) return io_failure(path, "cannot mmap");
  out.mapping_ = std::unique_ptr<void, unmapper>(address, unmapper{out.size_bytes_});
  return out;
}

}  // namespace moe::model
