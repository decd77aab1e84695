// Large numeric buffers on transparent huge pages. A 64 MiB vector spans 16 Ki pages of 4 KiB:
// every pass over it (a socket copy, the weighted mean, a finiteness check) walks that many TLB
// entries, and filling it faults each page in. On 2 MiB pages, 64 MiB all-reduce rounds ran
// 5-9 % faster on the development VM (docs/benchmarks.md).
#pragma once

#include <cstddef>
#include <vector>

namespace hivemind {

// Buffers from this size on are worth it; smaller ones hold at most a few huge pages.
constexpr size_t kHugePageMinBytes = size_t{4} << 20;

// Like values.reserve(capacity); when that takes new memory of at least kHugePageMinBytes, asks
// the kernel (madvise MADV_HUGEPAGE) to back it with huge pages before anything touches it. Only
// advice: where THP is off, or memory is too fragmented, the pages are ordinary ones.
void ReserveOnHugePages(std::vector<float>& values, size_t capacity);

}  // namespace hivemind
