#include "common/huge_pages.h"

#include <sys/mman.h>

#include <cstdint>

namespace hivemind {
namespace {

constexpr uintptr_t kHugePageBytes = uintptr_t{2} << 20;

// The 2 MiB-aligned pages inside [data, data + bytes): the ends share pages with other memory.
void AdviseHugePages(const void* data, size_t bytes) {
  const auto start = reinterpret_cast<uintptr_t>(data);
  const uintptr_t begin = (start + kHugePageBytes - 1) & ~(kHugePageBytes - 1);
  const uintptr_t end = (start + bytes) & ~(kHugePageBytes - 1);
  // Advice only: an error (THP compiled out, an old kernel) leaves ordinary pages.
  if (end > begin) (void)::madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
}

}  // namespace

void ReserveOnHugePages(std::vector<float>& values, size_t capacity) {
  if (capacity <= values.capacity()) return;
  if (capacity * sizeof(float) < kHugePageMinBytes) {
    values.reserve(capacity);
    return;
  }
  // Fresh memory, advised before the copy below (or the caller's resize) touches it. Allocations
  // this large come from mmap, so none of their pages has been touched yet.
  std::vector<float> fresh;
  fresh.reserve(capacity);
  AdviseHugePages(fresh.data(), capacity * sizeof(float));
  fresh.assign(values.begin(), values.end());
  values.swap(fresh);
}

}  // namespace hivemind
