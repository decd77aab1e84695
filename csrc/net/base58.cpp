#include "net/base58.h"

#include <cstdint>
#include <vector>

namespace hivemind::net {
namespace {

constexpr char kAlphabet[] = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";

}  // namespace

std::string Base58Encode(std::string_view bytes) {
  size_t leading_zeros = 0;
  while (leading_zeros < bytes.size() && bytes[leading_zeros] == 0) ++leading_zeros;
  // Repeated division of the big-endian number by 58; digits come out least significant first.
  std::vector<uint8_t> digits;
  for (size_t i = leading_zeros; i < bytes.size(); ++i) {
    uint32_t carry = static_cast<uint8_t>(bytes[i]);
    for (auto& digit : digits) {
      carry += static_cast<uint32_t>(digit) << 8;
      digit = carry % 58;
      carry /= 58;
    }
    while (carry > 0) {
      digits.push_back(carry % 58);
      carry /= 58;
    }
  }
  std::string text(leading_zeros, '1');
  for (auto it = digits.rbegin(); it != digits.rend(); ++it) text.push_back(kAlphabet[*it]);
  return text;
}

std::optional<std::string> Base58Decode(std::string_view text) {
  size_t leading_ones = 0;
  while (leading_ones < text.size() && text[leading_ones] == '1') ++leading_ones;
  std::vector<uint8_t> bytes;  // little-endian while accumulating
  for (size_t i = leading_ones; i < text.size(); ++i) {
    const char* position = nullptr;
    for (const char* c = kAlphabet; *c; ++c) {
      if (*c == text[i]) position = c;
    }
    if (position == nullptr) return std::nullopt;
    uint32_t carry = static_cast<uint32_t>(position - kAlphabet);
    for (auto& byte : bytes) {
      carry += static_cast<uint32_t>(byte) * 58;
      byte = carry & 0xff;
      carry >>= 8;
    }
    while (carry > 0) {
      bytes.push_back(carry & 0xff);
      carry >>= 8;
    }
  }
  std::string decoded(leading_ones, '\0');
  for (auto it = bytes.rbegin(); it != bytes.rend(); ++it)
    decoded.push_back(static_cast<char>(*it));
  return decoded;
}

}  // namespace hivemind::net
