// Recycles the large float buffers of all-reduce rounds (inputs, results, reduced shares), so a
// process that averages the same sizes round after round stops paying for fresh pages: a new
// 64 MiB buffer costs 16 Ki page faults and zeroing, about a third of a loopback round
// (docs/benchmarks.md, "Averaging").
#pragma once

#include <cstddef>
#include <memory>
#include <mutex>
#include <vector>

namespace hivemind::averaging {

class BufferPool : public std::enable_shared_from_this<BufferPool> {
 public:
  // Keeps at most `max_buffers` idle buffers and `max_bytes` of idle capacity, dropping the
  // oldest idle ones first.
  static std::shared_ptr<BufferPool> Create(size_t max_buffers, size_t max_bytes);

  // A buffer of `size` elements with unspecified contents. Its memory comes back to the pool
  // when the last reference drops (from any thread), or is freed if the pool is gone or full.
  std::shared_ptr<std::vector<float>> Take(size_t size);
  // Takes over `buffer` (no copy): it comes to the pool like a taken one when released.
  std::shared_ptr<std::vector<float>> Adopt(std::vector<float>&& buffer);

  size_t idle_buffers() const;

 private:
  BufferPool(size_t max_buffers, size_t max_bytes)
      : max_buffers_(max_buffers), max_bytes_(max_bytes) {}
  void Give(std::vector<float>* buffer);
  std::shared_ptr<std::vector<float>> Manage(std::unique_ptr<std::vector<float>> buffer);

  const size_t max_buffers_;
  const size_t max_bytes_;
  mutable std::mutex mutex_;
  std::vector<std::vector<float>> idle_;  // oldest first
  size_t idle_bytes_ = 0;
};

}  // namespace hivemind::averaging
