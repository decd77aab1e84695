#include "averaging/part_codec.h"

#include <sodium.h>

#include <algorithm>
#include <cstring>

#include "averaging/reduce_kernels.h"

namespace hivemind::averaging {

namespace {

Status Bad(const std::string& why) { return Status(StatusCode::kInvalidArgument, why); }

std::string Span(size_t begin, size_t count) {
  return "[" + std::to_string(begin) + ", " + std::to_string(begin + count) + ")";
}

}  // namespace

Result<PartCodec> PartCodec::Make(std::vector<CodecRange> ranges, size_t total_elements) {
  PartCodec codec;
  size_t end = 0;
  for (const CodecRange& range : ranges) {
    if (range.begin < end || range.begin > total_elements ||
        range.size > total_elements - range.begin) {
      return Bad("codec range " + Span(range.begin, range.size) +
                 " overlaps the previous one or leaves the vector of " +
                 std::to_string(total_elements) + " elements");
    }
    Status valid = ValidateSpec(range.spec);
    if (!valid.ok()) return valid.WithContext("codec range " + Span(range.begin, range.size));
    end = range.begin + range.size;
    if (range.spec.id != CodecId::kNone && range.size > 0) codec.ranges_.push_back(range);
  }
  if (codec.ranges_.empty()) return codec;
  crypto_generichash_state state;
  crypto_generichash_init(&state, nullptr, 0, 16);
  for (const CodecRange& range : codec.ranges_) {
    uint64_t fields[3] = {range.begin, range.size, range.spec.block_size};
    uint8_t id = static_cast<uint8_t>(range.spec.id);
    crypto_generichash_update(&state, reinterpret_cast<const unsigned char*>(fields),
                              sizeof(fields));
    crypto_generichash_update(&state, &id, 1);
  }
  codec.digest_.assign(16, '\0');
  crypto_generichash_final(&state, reinterpret_cast<unsigned char*>(codec.digest_.data()), 16);
  return codec;
}

std::vector<PartCodec::Piece> PartCodec::Pieces(size_t begin, size_t count) const {
  std::vector<Piece> pieces;
  const size_t end = begin + count;
  // The first range that ends after `begin`.
  auto it = std::upper_bound(ranges_.begin(), ranges_.end(), begin,
                             [](size_t at, const CodecRange& r) { return at < r.begin + r.size; });
  size_t at = begin;
  for (; it != ranges_.end() && it->begin < end; ++it) {
    if (it->begin > at) pieces.push_back({at, it->begin - at, CodecSpec::None()});
    size_t piece_end = std::min(end, it->begin + it->size);
    at = std::max(at, it->begin);
    pieces.push_back({at, piece_end - at, it->spec});
    at = piece_end;
  }
  if (at < end || pieces.empty()) pieces.push_back({at, end - at, CodecSpec::None()});
  return pieces;
}

bool PartCodec::Raw(size_t begin, size_t count) const {
  std::vector<Piece> pieces = Pieces(begin, count);
  return pieces.size() == 1 && pieces[0].spec.id == CodecId::kNone;
}

Result<std::vector<net::Payload>> PartCodec::Encode(const net::Payload& values,
                                                    size_t begin) const {
  const size_t count = values.size() / sizeof(float);
  std::vector<net::Payload> payloads;
  for (const Piece& piece : Pieces(begin, count)) {
    const uint8_t* data = values.data() + (piece.begin - begin) * sizeof(float);
    if (piece.spec.id == CodecId::kNone) {
      payloads.emplace_back(data, piece.count * sizeof(float), values.owner());
      continue;
    }
    TensorView view{data, piece.count, DType::kFloat32};
    auto size = EncodedSize(piece.spec, piece.count, DType::kFloat32);
    if (!size.ok()) return size.status();
    net::Payload encoded = net::Payload::Allocate(*size);
    auto written = EncodeTo(piece.spec, view, encoded.mutable_data(), *size);
    if (!written.ok()) {
      return written.status().WithContext("encoding " + Span(piece.begin, piece.count));
    }
    payloads.push_back(std::move(encoded));
  }
  return payloads;
}

Status PartCodec::DecodeInto(const std::vector<net::Payload>& payloads, size_t begin, size_t count,
                             float* out) const {
  std::vector<Piece> pieces = Pieces(begin, count);
  if (payloads.size() != pieces.size()) {
    return Bad("elements " + Span(begin, count) + " travel in " + std::to_string(pieces.size()) +
               " payloads, got " + std::to_string(payloads.size()));
  }
  for (size_t i = 0; i < pieces.size(); ++i) {
    const Piece& piece = pieces[i];
    const net::Payload& payload = payloads[i];
    float* target = out + (piece.begin - begin);
    if (piece.spec.id == CodecId::kNone) {
      if (payload.size() != piece.count * sizeof(float)) {
        return Bad("elements " + Span(piece.begin, piece.count) + " must be " +
                   std::to_string(piece.count * sizeof(float)) + " raw bytes, got " +
                   std::to_string(payload.size()));
      }
      if (!CopyFinite(reinterpret_cast<const float*>(payload.data()), piece.count, target)) {
        return Bad("elements " + Span(piece.begin, piece.count) + " have non-finite values");
      }
      continue;
    }
    auto info = InspectEncoded(payload.data(), payload.size());
    if (!info.ok()) return Bad(info.status().message());
    if (info->codec != piece.spec.id || info->block_size != piece.spec.block_size) {
      return Bad("elements " + Span(piece.begin, piece.count) + " must be encoded with " +
                 CodecName(piece.spec.id) + ", got " + CodecName(info->codec));
    }
    Status decoded = DecodeToFloat32(payload.data(), payload.size(), target, piece.count);
    if (!decoded.ok()) {
      return Bad("elements " + Span(piece.begin, piece.count) + ": " + decoded.message());
    }
  }
  return Status::Ok();
}

Result<net::Payload> PartCodec::Decode(const std::vector<net::Payload>& payloads, size_t begin,
                                       size_t count, bool check_raw_finite) const {
  std::vector<Piece> pieces = Pieces(begin, count);
  if (pieces.size() == 1 && pieces[0].spec.id == CodecId::kNone && payloads.size() == 1 &&
      payloads[0].size() == count * sizeof(float)) {
    if (check_raw_finite && !AllFinite(payloads[0].data(), count)) {
      return Bad("elements " + Span(begin, count) + " have non-finite values");
    }
    return payloads[0];
  }
  net::Payload out = net::Payload::Allocate(count * sizeof(float));
  Status ok = DecodeInto(payloads, begin, count, reinterpret_cast<float*>(out.mutable_data()));
  if (!ok.ok()) return ok;
  return out;
}

}  // namespace hivemind::averaging
