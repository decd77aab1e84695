#include "averaging/partition.h"

#include <sodium.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>

#include "averaging/load_balance.h"

namespace hivemind::averaging {

const char* MemberModeName(MemberMode mode) {
  switch (mode) {
    case MemberMode::kNormal:
      return "normal";
    case MemberMode::kClient:
      return "client";
    case MemberMode::kAuxiliary:
      return "auxiliary";
  }
  return "unknown";
}

bool IsValidBandwidth(double bandwidth) {
  return bandwidth == kUndeclaredBandwidth || (std::isfinite(bandwidth) && bandwidth >= 0);
}

Status Group::Validate() const {
  auto invalid = [](const std::string& what) {
    return Status(StatusCode::kInvalidArgument, "invalid averaging group: " + what);
  };
  if (id.empty() || id.size() > kMaxIdBytes) {
    return invalid("group id must have 1.." + std::to_string(kMaxIdBytes) + " bytes");
  }
  if (members.empty() || members.size() > kMaxMembers) {
    return invalid("a group has 1.." + std::to_string(kMaxMembers) + " members, not " +
                   std::to_string(members.size()));
  }
  if (my_index < 0 || static_cast<size_t>(my_index) >= members.size()) {
    return invalid("my_index " + std::to_string(my_index) + " is not a member index");
  }
  bool any_reducer = false;
  for (size_t i = 0; i < members.size(); ++i) {
    double b = members[i].bandwidth;
    if (!IsValidBandwidth(b)) {
      return invalid("member " + std::to_string(i) + " has bandwidth " + std::to_string(b) +
                     " (must be finite and >= 0)");
    }
    for (size_t j = 0; j < i; ++j) {
      if (members[j].address.peer_id == members[i].address.peer_id) {
        return invalid("peer " + members[i].address.peer_id.ToString() + " is listed twice");
      }
    }
    any_reducer = any_reducer || members[i].can_reduce();
  }
  if (!any_reducer) {
    return invalid(
        "cannot run all-reduce without reducers (every member is a client or has "
        "bandwidth 0)");
  }
  return Status::Ok();
}

std::string Group::Digest() const {
  crypto_generichash_state state;
  crypto_generichash_init(&state, nullptr, 0, 32);
  auto feed = [&](const void* data, size_t size) {
    crypto_generichash_update(&state, static_cast<const unsigned char*>(data), size);
  };
  uint64_t id_size = id.size();
  feed(&id_size, sizeof(id_size));
  feed(id.data(), id.size());
  for (const auto& member : members) {
    feed(member.address.peer_id.bytes().data(), net::PeerId::kSize);
    uint8_t mode = static_cast<uint8_t>(member.mode);
    feed(&mode, 1);
    feed(&member.bandwidth, sizeof(double));
  }
  std::string digest(32, '\0');
  crypto_generichash_final(&state, reinterpret_cast<unsigned char*>(digest.data()), 32);
  return digest;
}

std::vector<int> Group::ReducerOrder() const {
  std::vector<int> order;
  for (size_t i = 0; i < members.size(); ++i) {
    if (members[i].can_reduce()) order.push_back(static_cast<int>(i));
  }
  return order;
}

std::vector<size_t> SplitProportionally(size_t total, const std::vector<double>& weights) {
  std::vector<size_t> sizes(weights.size(), 0);
  double sum = std::accumulate(weights.begin(), weights.end(), 0.0);
  if (weights.empty() || !(sum > 0)) return sizes;
  // Floor of each exact quota, then the leftover elements one by one to the largest remainders.
  std::vector<double> remainder(weights.size(), 0.0);
  size_t assigned = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    double quota = static_cast<double>(total) * (weights[i] / sum);
    double floor = std::floor(quota);
    sizes[i] = std::min(static_cast<size_t>(floor), total - assigned);
    assigned += sizes[i];
    remainder[i] = weights[i] > 0 ? quota - floor : -1.0;  // weight 0 never gets leftovers
  }
  std::vector<size_t> order(weights.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return remainder[a] > remainder[b]; });
  for (size_t k = 0; assigned < total; k = (k + 1) % order.size()) {
    if (weights[order[k]] <= 0) continue;
    ++sizes[order[k]];
    ++assigned;
  }
  return sizes;
}

Result<Partition> Partition::Make(const Group& group, size_t total_elements, size_t part_elements) {
  Status valid = group.Validate();
  if (!valid.ok()) return valid;
  if (part_elements == 0) {
    return Status(StatusCode::kInvalidArgument, "part_elements must be positive");
  }
  size_t n = group.members.size();
  Partition partition;
  partition.total_ = total_elements;
  partition.part_elements_ = part_elements;
  partition.share_size_ = SplitProportionally(total_elements, BalancedShareFractions(group));
  partition.share_begin_.resize(n);
  partition.first_part_.resize(n);
  partition.num_parts_.resize(n);
  size_t offset = 0;
  for (size_t m = 0; m < n; ++m) {
    partition.share_begin_[m] = offset;
    partition.first_part_[m] = partition.parts_.size();
    size_t size = partition.share_size_[m];
    for (size_t done = 0; done < size; done += part_elements) {
      partition.parts_.push_back(
          Part{offset + done, std::min(part_elements, size - done), static_cast<int>(m)});
    }
    partition.num_parts_[m] = partition.parts_.size() - partition.first_part_[m];
    offset += size;
  }
  return partition;
}

std::string Partition::Digest() const {
  crypto_generichash_state state;
  crypto_generichash_init(&state, nullptr, 0, 32);
  auto feed = [&](uint64_t value) {
    unsigned char bytes[8];
    for (int i = 0; i < 8; ++i) bytes[i] = static_cast<unsigned char>(value >> (8 * i));
    crypto_generichash_update(&state, bytes, sizeof(bytes));
  };
  feed(total_);
  feed(part_elements_);
  for (size_t size : share_size_) feed(size);
  std::string digest(32, '\0');
  crypto_generichash_final(&state, reinterpret_cast<unsigned char*>(digest.data()), 32);
  return digest;
}

}  // namespace hivemind::averaging
