// How the parts and results of an all-reduce round travel: ranges of the averaged vector
// compressed with a codec (docs/compression.md), everything else raw float32. Every member of a
// round must use the same ranges: their digest goes into OPEN, and a reducer refuses a sender
// whose digest differs.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "averaging/codec.h"
#include "common/status.h"
#include "net/message.h"

namespace hivemind::averaging {

// Elements [begin, begin + size) of the averaged vector travel encoded with `spec`.
struct CodecRange {
  size_t begin = 0;
  size_t size = 0;
  CodecSpec spec;
};

class PartCodec {
 public:
  // Lossless: every element travels as raw float32.
  PartCodec() = default;
  // `ranges` must be sorted, disjoint and inside [0, total_elements); kInvalidArgument names the
  // first one that is not, or a bad spec. Ranges of CodecId::kNone travel raw.
  static Result<PartCodec> Make(std::vector<CodecRange> ranges, size_t total_elements);

  bool lossless() const { return ranges_.empty(); }
  // Whether elements [begin, begin + count) travel as one payload of raw float32.
  bool Raw(size_t begin, size_t count) const;
  // Identifies the ranges (empty when lossless).
  const std::string& digest() const { return digest_; }

  // The payloads of elements [begin, begin + count), whose float32 values `values` holds: one per
  // piece of the span cut at range boundaries. Raw pieces point into `values` (no copy).
  Result<std::vector<net::Payload>> Encode(const net::Payload& values, size_t begin) const;

  // Checks the payloads of elements [begin, begin + count) (their number, sizes, encodings, and
  // that every value is finite) and writes the values to `out`. kInvalidArgument on any problem.
  Status DecodeInto(const std::vector<net::Payload>& payloads, size_t begin, size_t count,
                    float* out) const;
  // Same, into a new payload; a span that travels as one raw piece is passed through uncopied,
  // and its values are checked only when `check_raw_finite` (a reducer leaves that to the check of
  // its weighted mean, which fails when any input is not finite: one pass over the part fewer).
  Result<net::Payload> Decode(const std::vector<net::Payload>& payloads, size_t begin, size_t count,
                              bool check_raw_finite = true) const;

 private:
  struct Piece {
    size_t begin = 0;
    size_t count = 0;
    CodecSpec spec;
  };
  std::vector<Piece> Pieces(size_t begin, size_t count) const;

  std::vector<CodecRange> ranges_;
  std::string digest_;
};

}  // namespace hivemind::averaging
