#pragma once

#include <optional>
#include <string>
#include <string_view>

namespace hivemind::net {

// Bitcoin's base58 alphabet (no 0, O, I, l), as used for libp2p peer ids.
std::string Base58Encode(std::string_view bytes);
// nullopt if `text` holds a character outside the alphabet.
std::optional<std::string> Base58Decode(std::string_view text);

}  // namespace hivemind::net
