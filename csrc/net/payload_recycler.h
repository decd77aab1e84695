// Receive buffers that are used again once their payloads are released. A stream of 1 MiB
// messages would otherwise allocate (and, after glibc returns freed heap to the system, page-fault
// into) a fresh buffer per message: about a tenth of a large all-reduce's CPU before direct
// streams kept their buffers (docs/benchmarks.md). Large buffers are mapped directly rather than
// taken from malloc, whose per-thread arenas would each keep their own peak of freed memory.
#pragma once

#include <sys/mman.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <new>
#include <vector>

#include "net/message.h"

namespace hivemind::net {

class PayloadRecycler : public std::enable_shared_from_this<PayloadRecycler> {
 public:
  // Keeps at most `max_bytes` of released buffers for reuse; the rest are freed.
  static std::shared_ptr<PayloadRecycler> Create(size_t max_bytes) {
    return std::shared_ptr<PayloadRecycler>(new PayloadRecycler(max_bytes));
  }

  // An uninitialized buffer of `size` bytes for the caller to fill through mutable_data(): a kept
  // one of that exact size when there is one. It comes back here when its last owner lets go,
  // even after the recycler is gone (then it is freed).
  Payload Take(size_t size) {
    Buffer buffer;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (size_t i = 0; i < kept_.size(); ++i) {
        if (kept_[i].size() != size) continue;
        buffer = std::move(kept_[i]);
        kept_bytes_ -= size;
        kept_[i] = std::move(kept_.back());
        kept_.pop_back();
        break;
      }
    }
    if (!buffer.data()) buffer = Buffer(size);
    uint8_t* data = buffer.data();
    std::weak_ptr<PayloadRecycler> home = weak_from_this();
    auto held = std::make_shared<Buffer>(std::move(buffer));
    std::shared_ptr<const void> owner(data, [home, held](const void*) {
      if (auto recycler = home.lock()) recycler->Keep(std::move(*held));
    });
    return Payload(data, size, std::move(owner));
  }

 private:
  // One buffer: mapped when large, from the heap when small.
  class Buffer {
   public:
    Buffer() = default;
    explicit Buffer(size_t size) : size_(size), mapped_(size >= kMapBytes) {
      if (mapped_) {
        void* at =
            ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (at == MAP_FAILED) throw std::bad_alloc();
        data_ = static_cast<uint8_t*>(at);
      } else {
        data_ = new uint8_t[size == 0 ? 1 : size];
      }
    }
    Buffer(Buffer&& other) noexcept { *this = std::move(other); }
    Buffer& operator=(Buffer&& other) noexcept {
      Release();
      data_ = other.data_;
      size_ = other.size_;
      mapped_ = other.mapped_;
      other.data_ = nullptr;
      return *this;
    }
    ~Buffer() { Release(); }
    uint8_t* data() const { return data_; }
    size_t size() const { return size_; }

   private:
    void Release() {
      if (data_ == nullptr) return;
      if (mapped_) {
        ::munmap(data_, size_);
      } else {
        delete[] data_;
      }
      data_ = nullptr;
    }
    uint8_t* data_ = nullptr;
    size_t size_ = 0;
    bool mapped_ = false;
  };
  static constexpr size_t kMapBytes = size_t{256} << 10;

  explicit PayloadRecycler(size_t max_bytes) : max_bytes_(max_bytes) {}

  void Keep(Buffer buffer) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (kept_bytes_ + buffer.size() > max_bytes_) return;  // freed as `buffer` goes out of scope
    kept_bytes_ += buffer.size();
    kept_.push_back(std::move(buffer));
  }

  const size_t max_bytes_;
  std::mutex mutex_;
  size_t kept_bytes_ = 0;
  std::vector<Buffer> kept_;
};

}  // namespace hivemind::net
