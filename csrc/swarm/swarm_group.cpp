#include "swarm/swarm_group.h"

#include <sodium.h>

#include <charconv>
#include <cstdint>
#include <sstream>

namespace hivemind::swarm {
namespace {

constexpr std::string_view kGroupMagic = "hivemind-swarm-group-v1";
constexpr size_t kMaxMembers = 4096;

Status Malformed(const std::string& what) {
  return Status(StatusCode::kProtocolError, "malformed swarm group description: " + what);
}

bool ParseInt(std::string_view text, int& value) {
  auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
  return error == std::errc() && end == text.data() + text.size();
}

std::vector<std::string_view> Split(std::string_view text, char separator) {
  std::vector<std::string_view> parts;
  size_t start = 0;
  while (true) {
    size_t end = text.find(separator, start);
    if (end == std::string_view::npos) {
      parts.push_back(text.substr(start));
      return parts;
    }
    parts.push_back(text.substr(start, end - start));
    start = end + 1;
  }
}

}  // namespace

std::string HexId(std::string_view bytes) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out;
  out.reserve(bytes.size() * 2);
  for (unsigned char c : bytes) {
    out.push_back(kDigits[c >> 4]);
    out.push_back(kDigits[c & 15]);
  }
  return out;
}

std::string SwarmMember::Describe() const {
  return "rank " + std::to_string(rank) + " of launch " + launch_id.substr(0, 8) + " (peer " +
         address.peer_id.ShortString() + ")";
}

std::string EncodeMembers(const std::vector<SwarmMember>& members) {
  std::ostringstream out;
  for (const auto& member : members) {
    out << member.launch_id << '\t' << member.rank << '\t' << member.launch_size << '\t'
        << member.address.ToString() << '\n';
  }
  return out.str();
}

Result<std::vector<SwarmMember>> DecodeMembers(std::string_view text) {
  std::vector<SwarmMember> members;
  for (std::string_view line : Split(text, '\n')) {
    if (line.empty()) continue;
    if (members.size() == kMaxMembers) return Malformed("more than 4096 members");
    auto fields = Split(line, '\t');
    if (fields.size() != 4)
      return Malformed("a member line has " + std::to_string(fields.size()) +
                       " fields instead of 4");
    SwarmMember member;
    member.launch_id = std::string(fields[0]);
    if (member.launch_id.empty() || member.launch_id.size() > 64) {
      return Malformed("bad launch id");
    }
    if (!ParseInt(fields[1], member.rank) || member.rank < 0 ||
        !ParseInt(fields[2], member.launch_size) || member.launch_size <= 0 ||
        member.rank >= member.launch_size) {
      return Malformed("bad rank or launch size in '" + std::string(line.substr(0, 80)) + "'");
    }
    auto address = net::PeerAddress::ParseList(fields[3]);
    if (!address.ok()) return Malformed(address.status().message());
    member.address = std::move(address).value();
    members.push_back(std::move(member));
  }
  return members;
}

std::string SwarmGroup::Fingerprint() const {
  crypto_generichash_state state;
  unsigned char digest[16];
  crypto_generichash_init(&state, nullptr, 0, sizeof(digest));
  // Length-prefixed fields, so that no two different groups hash the same bytes.
  auto add = [&state](std::string_view field) {
    const uint64_t size = field.size();
    crypto_generichash_update(&state, reinterpret_cast<const unsigned char*>(&size), sizeof(size));
    crypto_generichash_update(&state, reinterpret_cast<const unsigned char*>(field.data()),
                              field.size());
  };
  add(id);
  for (const SwarmMember& member : members) add(member.address.peer_id.raw());
  crypto_generichash_final(&state, digest, sizeof(digest));
  return HexId(std::string_view(reinterpret_cast<const char*>(digest), sizeof(digest)));
}

std::string SwarmGroup::Encode() const {
  return std::string(kGroupMagic) + '\n' + id + '\n' + EncodeMembers(members);
}

Result<SwarmGroup> SwarmGroup::Decode(std::string_view text, const net::PeerId& me) {
  size_t first = text.find('\n');
  if (first == std::string_view::npos || text.substr(0, first) != kGroupMagic) {
    return Malformed("missing header");
  }
  size_t second = text.find('\n', first + 1);
  if (second == std::string_view::npos) return Malformed("missing group id");
  SwarmGroup group;
  group.id = std::string(text.substr(first + 1, second - first - 1));
  if (group.id.empty() || group.id.size() > 128) return Malformed("bad group id");
  auto members = DecodeMembers(text.substr(second + 1));
  if (!members.ok()) return members.status();
  group.members = std::move(members).value();
  for (size_t i = 0; i < group.members.size(); ++i) {
    if (group.members[i].address.peer_id == me) {
      if (group.my_index >= 0) return Malformed("a peer is listed twice");
      group.my_index = static_cast<int>(i);
    }
  }
  if (group.my_index < 0) return Malformed("this peer is not a member");
  return group;
}

}  // namespace hivemind::swarm
