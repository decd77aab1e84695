// ReserveOnHugePages: a reserve that keeps the contents, and advises large new memory for
// transparent huge pages (the mapping's VmFlags show "hg") where the kernel has them.
#include "common/huge_pages.h"

#include <gtest/gtest.h>

#include <cstdint>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

namespace hivemind {
namespace {

// The VmFlags of the mapping of this process that contains `address` ("" if none does).
std::string VmFlagsAt(const void* address) {
  const auto at = reinterpret_cast<uintptr_t>(address);
  std::ifstream smaps("/proc/self/smaps");
  std::string line;
  bool inside = false;
  while (std::getline(smaps, line)) {
    uintptr_t begin = 0, end = 0;
    char dash = 0;
    std::istringstream range(line);
    if (range >> std::hex >> begin >> dash >> end && dash == '-') {
      inside = begin <= at && at < end;
      continue;
    }
    if (inside && line.rfind("VmFlags:", 0) == 0) return line;
  }
  return "";
}

bool KernelHasTransparentHugePages() {
  std::ifstream enabled("/sys/kernel/mm/transparent_hugepage/enabled");
  std::string modes;
  std::getline(enabled, modes);
  return modes.find("[never]") == std::string::npos && !modes.empty();
}

TEST(HugePages, ReserveKeepsTheContentsAndAdvisesLargeBuffers) {
  std::vector<float> values = {1.5f, -2.0f, 3.25f};
  const size_t large = 3 * kHugePageMinBytes / sizeof(float);
  ReserveOnHugePages(values, large);
  ASSERT_GE(values.capacity(), large);
  EXPECT_EQ(values, (std::vector<float>{1.5f, -2.0f, 3.25f}));
  values.resize(large);
  EXPECT_EQ(values[2], 3.25f);
  EXPECT_EQ(values[large - 1], 0.0f);
  if (KernelHasTransparentHugePages()) {
    // The middle of the buffer lies in its 2 MiB-aligned interior, which was advised.
    EXPECT_NE(VmFlagsAt(values.data() + large / 2).find(" hg"), std::string::npos)
        << VmFlagsAt(values.data() + large / 2);
  }
}

TEST(HugePages, SmallOrAlreadyLargeEnoughBuffersAreLeftAsTheyAre) {
  std::vector<float> values(10, 7.0f);
  values.reserve(100);
  const float* before = values.data();
  ReserveOnHugePages(values, 50);  // within the capacity: no new memory
  EXPECT_EQ(values.data(), before);
  ReserveOnHugePages(values, 1000);  // small: an ordinary reserve
  EXPECT_GE(values.capacity(), 1000u);
  EXPECT_EQ(values, std::vector<float>(10, 7.0f));
}

}  // namespace
}  // namespace hivemind
