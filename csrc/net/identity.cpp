#include "net/identity.h"

#include <fcntl.h>
#include <sodium.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include "net/base58.h"

namespace hivemind::net {
namespace {

// One line: a format tag, then the 32-byte seed in base58. The seed is all that is secret.
constexpr char kFileTag[] = "hivemind-identity-v1";

std::string ErrnoText() { return std::strerror(errno); }

}  // namespace

void EnsureSodiumInitialized() {
  static const int result = sodium_init();
  if (result < 0) throw std::runtime_error("libsodium failed to initialize");
}

Identity Identity::FromSeed(const std::array<uint8_t, 32>& seed) {
  EnsureSodiumInitialized();
  Identity identity;
  identity.seed_ = seed;
  PeerId::Bytes public_key;
  crypto_sign_seed_keypair(public_key.data(), identity.sign_secret_.data(), seed.data());
  identity.peer_id_ = PeerId(public_key);
  // Both conversions succeed for keys made by crypto_sign_seed_keypair; a failure is a libsodium
  // bug.
  if (crypto_sign_ed25519_pk_to_curve25519(identity.curve_public_.data(), public_key.data()) != 0 ||
      crypto_sign_ed25519_sk_to_curve25519(identity.curve_secret_.data(),
                                           identity.sign_secret_.data()) != 0) {
    throw std::runtime_error("libsodium could not map an Ed25519 key to X25519");
  }
  return identity;
}

Identity Identity::Generate() {
  EnsureSodiumInitialized();
  std::array<uint8_t, 32> seed;
  randombytes_buf(seed.data(), seed.size());
  return FromSeed(seed);
}

Result<Identity> Identity::Load(const std::string& path) {
  struct stat info;
  if (::stat(path.c_str(), &info) != 0) {
    return Status(errno == ENOENT ? StatusCode::kNotFound : StatusCode::kInvalidArgument,
                  "cannot read identity file " + path + ": " + ErrnoText());
  }
  if ((info.st_mode & (S_IRWXG | S_IRWXO)) != 0) {
    char mode[8];
    std::snprintf(mode, sizeof(mode), "%04o", static_cast<unsigned>(info.st_mode & 07777));
    return Status(StatusCode::kPermissionDenied, "identity file " + path + " has mode " + mode +
                                                     ", so others may read the secret key; run "
                                                     "'chmod 600 " +
                                                     path + "'");
  }
  std::ifstream file(path);
  std::string tag, seed_text, extra;
  if (!(file >> tag >> seed_text) || tag != kFileTag || (file >> extra)) {
    return Status(StatusCode::kInvalidArgument,
                  "identity file " + path + " is not in the '" + kFileTag + " <seed>' format");
  }
  auto seed_bytes = Base58Decode(seed_text);
  if (!seed_bytes || seed_bytes->size() != 32) {
    return Status(StatusCode::kInvalidArgument,
                  "identity file " + path + " holds a damaged key (expected 32 bytes in base58)");
  }
  std::array<uint8_t, 32> seed;
  std::memcpy(seed.data(), seed_bytes->data(), seed.size());
  return FromSeed(seed);
}

Status Identity::Save(const std::string& path) const {
  std::string temporary = path + ".tmp." + std::to_string(::getpid());
  int fd = ::open(temporary.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) {
    return Status(StatusCode::kInvalidArgument,
                  "cannot write identity file " + temporary + ": " + ErrnoText());
  }
  std::string text =
      std::string(kFileTag) + " " +
      Base58Encode(std::string_view(reinterpret_cast<const char*>(seed_.data()), seed_.size())) +
      "\n";
  bool written = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size());
  written = (::fsync(fd) == 0) && written;
  ::close(fd);
  if (!written || ::rename(temporary.c_str(), path.c_str()) != 0) {
    std::string error = ErrnoText();
    ::unlink(temporary.c_str());
    return Status(StatusCode::kInvalidArgument,
                  "cannot write identity file " + path + ": " + error);
  }
  return Status::Ok();
}

Result<Identity> Identity::LoadOrCreate(const std::string& path) {
  auto loaded = Load(path);
  if (loaded.ok() || loaded.status().code() != StatusCode::kNotFound) return loaded;
  Identity created = Generate();
  Status saved = created.Save(path);
  if (!saved.ok()) return saved;
  return created;
}

std::string Identity::Sign(std::string_view message) const {
  std::string signature(crypto_sign_BYTES, '\0');
  crypto_sign_detached(reinterpret_cast<unsigned char*>(signature.data()), nullptr,
                       reinterpret_cast<const unsigned char*>(message.data()), message.size(),
                       sign_secret_.data());
  return signature;
}

bool Identity::Verify(const PeerId& signer, std::string_view message, std::string_view signature) {
  EnsureSodiumInitialized();
  if (signature.size() != crypto_sign_BYTES) return false;
  return crypto_sign_verify_detached(reinterpret_cast<const unsigned char*>(signature.data()),
                                     reinterpret_cast<const unsigned char*>(message.data()),
                                     message.size(), signer.bytes().data()) == 0;
}

}  // namespace hivemind::net
