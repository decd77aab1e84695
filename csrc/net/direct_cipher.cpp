#include "net/direct_cipher.h"

#include <algorithm>
#include <cstring>

namespace hivemind::net {

bool DirectCipher::AesAvailable() {
  static const bool available = sodium_init() >= 0 && crypto_aead_aes256gcm_is_available() == 1;
  return available;
}

wire::DirectCipherKind DirectCipher::Choose(bool peer_runs_aes) {
  return peer_runs_aes && AesAvailable() ? wire::DIRECT_AES256GCM : wire::DIRECT_CHACHA20POLY1305;
}

std::string DirectCipher::NewKey() {
  std::string key(kKeyBytes, '\0');
  randombytes_buf(key.data(), key.size());
  return key;
}

DirectCipher::DirectCipher(wire::DirectCipherKind kind, const std::string& key, bool caller)
    : kind_(kind), caller_(caller) {
  std::memcpy(key_, key.data(), std::min(key.size(), kKeyBytes));
  if (key.size() < kKeyBytes) std::memset(key_ + key.size(), 0, kKeyBytes - key.size());
  if (kind_ == wire::DIRECT_AES256GCM) crypto_aead_aes256gcm_beforenm(&aes_, key_);
}

DirectCipher::~DirectCipher() {
  sodium_memzero(key_, sizeof(key_));
  sodium_memzero(&aes_, sizeof(aes_));
}

void DirectCipher::Nonce(bool sending, uint8_t* nonce) {
  // 12 bytes: which end sealed the record, then the record's number in that direction.
  static_assert(crypto_aead_aes256gcm_NPUBBYTES == 12);
  static_assert(crypto_aead_chacha20poly1305_ietf_NPUBBYTES == 12);
  std::memset(nonce, 0, 12);
  const bool sealed_by_caller = sending == caller_;
  nonce[0] = sealed_by_caller ? 1 : 2;
  uint64_t counter = sending ? sealed_++ : opened_++;
  for (int i = 0; i < 8; ++i) nonce[4 + i] = static_cast<uint8_t>(counter >> (8 * i));
}

void DirectCipher::Seal(const uint8_t* in, size_t size, uint8_t* out, uint8_t* tag) {
  uint8_t nonce[12];
  Nonce(true, nonce);
  unsigned long long tag_bytes = 0;
  if (kind_ == wire::DIRECT_AES256GCM) {
    crypto_aead_aes256gcm_encrypt_detached_afternm(out, tag, &tag_bytes, in, size, nullptr, 0,
                                                   nullptr, nonce, &aes_);
  } else {
    crypto_aead_chacha20poly1305_ietf_encrypt_detached(out, tag, &tag_bytes, in, size, nullptr, 0,
                                                       nullptr, nonce, key_);
  }
}

bool DirectCipher::Open(uint8_t* data, size_t size, const uint8_t* tag) {
  uint8_t nonce[12];
  Nonce(false, nonce);
  if (kind_ == wire::DIRECT_AES256GCM) {
    return crypto_aead_aes256gcm_decrypt_detached_afternm(data, nullptr, data, size, tag, nullptr,
                                                          0, nonce, &aes_) == 0;
  }
  return crypto_aead_chacha20poly1305_ietf_decrypt_detached(data, nullptr, data, size, tag, nullptr,
                                                            0, nonce, key_) == 0;
}

}  // namespace hivemind::net
