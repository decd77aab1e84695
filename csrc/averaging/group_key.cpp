#include "averaging/group_key.h"

#include <algorithm>
#include <numeric>
#include <utility>

namespace hivemind::averaging {
namespace {

// Portable on purpose: std::uniform_int_distribution and std::hash differ between standard
// libraries, and every member of a group must derive the very same coordinates.
uint64_t Fnv1a64(const std::string& bytes) {
  uint64_t hash = 1469598103934665603ull;
  for (unsigned char c : bytes) {
    hash ^= c;
    hash *= 1099511628211ull;
  }
  return hash;
}

uint64_t SplitMix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

std::string Hex(const std::string& bytes, size_t max_bytes) {
  static const char kDigits[] = "0123456789abcdef";
  std::string out;
  for (size_t i = 0; i < bytes.size() && i < max_bytes; ++i) {
    const auto c = static_cast<unsigned char>(bytes[i]);
    out.push_back(kDigits[c >> 4]);
    out.push_back(kDigits[c & 15]);
  }
  return out;
}

}  // namespace

std::string MakeGroupKey(const std::string& prefix, const std::string& schema_hash,
                         const std::vector<int>& coordinates) {
  std::string key = prefix + ".s" + Hex(schema_hash, 16) + ".g";
  for (size_t i = 0; i < coordinates.size(); ++i) {
    if (i > 0) key += '.';
    key += std::to_string(coordinates[i]);
  }
  return key;
}

std::vector<int> NextCoordinates(const std::string& group_id, int group_size, int grid_side) {
  if (group_size <= 0 || grid_side <= 0) return {};
  // A partial Fisher-Yates shuffle of [0, pool): the first group_size entries are distinct. The
  // pool is larger than the side only for an oversized group, whose extra members must share.
  const int pool = std::max(grid_side, group_size);
  std::vector<int> values(pool);
  std::iota(values.begin(), values.end(), 0);
  uint64_t state = Fnv1a64(group_id);
  for (int i = 0; i < group_size; ++i) {
    const int j = i + static_cast<int>(SplitMix64(state) % static_cast<uint64_t>(pool - i));
    std::swap(values[i], values[j]);
  }
  values.resize(group_size);
  for (int& v : values) v %= grid_side;
  return values;
}

std::vector<int> GroupKeyManager::BalancedCoordinates(int64_t rank, int grid_side, int grid_dims) {
  std::vector<int> coordinates(std::max(grid_dims - 1, 0));
  if (grid_side <= 0) return coordinates;
  uint64_t cell = static_cast<uint64_t>(rank < 0 ? -rank : rank);
  // Least significant digit last: consecutive ranks differ in the last coordinate first.
  for (size_t i = coordinates.size(); i-- > 0;) {
    coordinates[i] = static_cast<int>(cell % static_cast<uint64_t>(grid_side));
    cell /= static_cast<uint64_t>(grid_side);
  }
  return coordinates;
}

Result<GroupKeyManager> GroupKeyManager::Create(GroupKeyOptions options) {
  if (options.prefix.empty() || options.prefix.find('.') != std::string::npos) {
    return Status(
        StatusCode::kInvalidArgument,
        "group key prefix must be non-empty and contain no '.', got '" + options.prefix + "'");
  }
  if (options.grid_side < 1 || options.grid_dims < 1 || options.grid_dims > 64) {
    return Status(StatusCode::kInvalidArgument,
                  "grid needs grid_side >= 1 and 1 <= grid_dims <= 64, got side " +
                      std::to_string(options.grid_side) + ", dims " +
                      std::to_string(options.grid_dims));
  }
  const size_t want = static_cast<size_t>(options.grid_dims - 1);
  if (options.initial_coordinates.empty()) {
    options.initial_coordinates =
        BalancedCoordinates(options.rank, options.grid_side, options.grid_dims);
  }
  if (options.initial_coordinates.size() != want) {
    return Status(StatusCode::kInvalidArgument,
                  "a grid with " + std::to_string(options.grid_dims) + " dimensions needs " +
                      std::to_string(want) + " initial coordinates, got " +
                      std::to_string(options.initial_coordinates.size()));
  }
  for (int c : options.initial_coordinates) {
    if (c < 0 || c >= options.grid_side) {
      return Status(StatusCode::kInvalidArgument, "grid coordinate " + std::to_string(c) +
                                                      " is outside [0, " +
                                                      std::to_string(options.grid_side) + ")");
    }
  }
  return GroupKeyManager(std::move(options));
}

GroupKeyManager::GroupKeyManager(GroupKeyOptions options)
    : options_(std::move(options)), coordinates_(options_.initial_coordinates) {
  Rebuild();
}

void GroupKeyManager::Rebuild() {
  key_ = MakeGroupKey(options_.prefix, options_.schema_hash, coordinates_);
}

Status GroupKeyManager::OnGroupAssembled(const std::string& group_id, int my_index,
                                         int group_size) {
  if (group_size < 1 || my_index < 0 || my_index >= group_size) {
    return Status(StatusCode::kInvalidArgument, "my_index " + std::to_string(my_index) +
                                                    " is not in a group of " +
                                                    std::to_string(group_size));
  }
  if (coordinates_.empty()) return Status::Ok();
  const int next = NextCoordinates(group_id, group_size, options_.grid_side)[my_index];
  // Shift register: the coordinate this group shared the longest ago falls out.
  coordinates_.erase(coordinates_.begin());
  coordinates_.push_back(next);
  Rebuild();
  return Status::Ok();
}

}  // namespace hivemind::averaging
