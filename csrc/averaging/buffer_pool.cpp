#include "averaging/buffer_pool.h"

#include <algorithm>
#include <utility>

#include "common/huge_pages.h"

namespace hivemind::averaging {

std::shared_ptr<BufferPool> BufferPool::Create(size_t max_buffers, size_t max_bytes) {
  return std::shared_ptr<BufferPool>(new BufferPool(max_buffers, max_bytes));
}

std::shared_ptr<std::vector<float>> BufferPool::Take(size_t size) {
  auto buffer = std::make_unique<std::vector<float>>();
  {
    std::lock_guard<std::mutex> lock(mutex_);
    // The smallest idle buffer that fits, so a small request does not take a large one.
    auto best = idle_.end();
    for (auto it = idle_.begin(); it != idle_.end(); ++it) {
      if (it->capacity() >= size && (best == idle_.end() || it->capacity() < best->capacity())) {
        best = it;
      }
    }
    if (best != idle_.end()) {
      idle_bytes_ -= best->capacity() * sizeof(float);
      *buffer = std::move(*best);
      idle_.erase(best);
    }
  }
  // Within the capacity this only writes the elements beyond the old size; no pages are new.
  ReserveOnHugePages(*buffer, size);
  buffer->resize(size);
  return Manage(std::move(buffer));
}

std::shared_ptr<std::vector<float>> BufferPool::Adopt(std::vector<float>&& buffer) {
  return Manage(std::make_unique<std::vector<float>>(std::move(buffer)));
}

std::shared_ptr<std::vector<float>> BufferPool::Manage(std::unique_ptr<std::vector<float>> buffer) {
  std::weak_ptr<BufferPool> pool = weak_from_this();
  return std::shared_ptr<std::vector<float>>(buffer.release(), [pool](std::vector<float>* done) {
    if (auto alive = pool.lock()) {
      alive->Give(done);
    } else {
      delete done;
    }
  });
}

void BufferPool::Give(std::vector<float>* buffer) {
  std::unique_ptr<std::vector<float>> owned(buffer);
  const size_t bytes = owned->capacity() * sizeof(float);
  if (bytes == 0 || bytes > max_bytes_ || max_buffers_ == 0) return;
  std::lock_guard<std::mutex> lock(mutex_);
  // The oldest idle buffers make room: the sizes in use now are the ones worth keeping.
  while (!idle_.empty() && (idle_.size() >= max_buffers_ || idle_bytes_ + bytes > max_bytes_)) {
    idle_bytes_ -= idle_.front().capacity() * sizeof(float);
    idle_.erase(idle_.begin());
  }
  idle_bytes_ += bytes;
  idle_.push_back(std::move(*owned));
}

size_t BufferPool::idle_buffers() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return idle_.size();
}

}  // namespace hivemind::averaging
