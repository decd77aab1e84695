#include "net/base58.h"

#include <array>
#include <cstdint>
#include <vector>

namespace hivemind::net {
namespace {

constexpr char kAlphabet[] = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";

// Five base58 digits fit in a 32-bit word (58^5 < 2^32), so the big number is kept in 32-bit
// limbs and digits are folded in five at a time: a peer id is decoded in about a twentieth of the
// byte-at-a-time loop's work, which dominated reading a crowded matchmaking key.
constexpr int kDigitsPerChunk = 5;
constexpr uint32_t kChunkBase = 58u * 58u * 58u * 58u * 58u;

constexpr std::array<int8_t, 256> MakeDigitTable() {
  std::array<int8_t, 256> table{};
  for (auto& entry : table) entry = -1;
  for (int i = 0; i < 58; ++i) table[static_cast<uint8_t>(kAlphabet[i])] = static_cast<int8_t>(i);
  return table;
}
constexpr std::array<int8_t, 256> kDigitOf = MakeDigitTable();

// limbs = limbs * factor + addend; limbs are little-endian.
void MultiplyAdd(std::vector<uint32_t>& limbs, uint32_t factor, uint32_t addend) {
  uint64_t carry = addend;
  for (auto& limb : limbs) {
    const uint64_t value = static_cast<uint64_t>(limb) * factor + carry;
    limb = static_cast<uint32_t>(value);
    carry = value >> 32;
  }
  if (carry > 0) limbs.push_back(static_cast<uint32_t>(carry));
}

// limbs = limbs / divisor; returns the remainder and drops the limbs that became zero on top.
uint32_t DivideInPlace(std::vector<uint32_t>& limbs, uint32_t divisor) {
  uint64_t remainder = 0;
  for (auto it = limbs.rbegin(); it != limbs.rend(); ++it) {
    const uint64_t value = (remainder << 32) | *it;
    *it = static_cast<uint32_t>(value / divisor);
    remainder = value % divisor;
  }
  while (!limbs.empty() && limbs.back() == 0) limbs.pop_back();
  return static_cast<uint32_t>(remainder);
}

}  // namespace

std::string Base58Encode(std::string_view bytes) {
  size_t leading_zeros = 0;
  while (leading_zeros < bytes.size() && bytes[leading_zeros] == 0) ++leading_zeros;
  std::vector<uint32_t> limbs;
  for (size_t i = leading_zeros; i < bytes.size(); ++i) {
    MultiplyAdd(limbs, 256, static_cast<uint8_t>(bytes[i]));
  }
  // Digits come out least significant first, five per division.
  std::string reversed;
  while (!limbs.empty()) {
    uint32_t chunk = DivideInPlace(limbs, kChunkBase);
    for (int d = 0; d < kDigitsPerChunk; ++d) {
      reversed.push_back(kAlphabet[chunk % 58]);
      chunk /= 58;
    }
  }
  // The top chunk's padding would read as leading zero bytes.
  while (!reversed.empty() && reversed.back() == kAlphabet[0]) reversed.pop_back();
  std::string text(leading_zeros, kAlphabet[0]);
  text.append(reversed.rbegin(), reversed.rend());
  return text;
}

std::optional<std::string> Base58Decode(std::string_view text) {
  size_t leading_ones = 0;
  while (leading_ones < text.size() && text[leading_ones] == kAlphabet[0]) ++leading_ones;
  std::vector<uint32_t> limbs;
  uint32_t chunk = 0;
  uint32_t chunk_base = 1;
  for (size_t i = leading_ones; i < text.size(); ++i) {
    const int digit = kDigitOf[static_cast<uint8_t>(text[i])];
    if (digit < 0) return std::nullopt;
    chunk = chunk * 58 + static_cast<uint32_t>(digit);
    chunk_base *= 58;
    if (chunk_base == kChunkBase || i + 1 == text.size()) {
      MultiplyAdd(limbs, chunk_base, chunk);
      chunk = 0;
      chunk_base = 1;
    }
  }
  while (!limbs.empty() && limbs.back() == 0) limbs.pop_back();
  std::string decoded(leading_ones, '\0');
  // Big-endian, without the top limb's leading zero bytes.
  bool started = false;
  for (auto it = limbs.rbegin(); it != limbs.rend(); ++it) {
    for (int shift = 24; shift >= 0; shift -= 8) {
      const auto byte = static_cast<char>((*it >> shift) & 0xff);
      if (!started && byte == 0) continue;
      started = true;
      decoded.push_back(byte);
    }
  }
  return decoded;
}

}  // namespace hivemind::net
