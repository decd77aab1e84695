// Codec benchmark: encode and decode throughput of every tensor codec on float32 N(0,1) data
// (16 MiB by default), with memcpy of the same buffer measured in the same run as the reference,
// so a reader sees each codec's cost relative to the machine's memory bandwidth. Also prints the
// compression ratio and the round-trip MSE.
//
//   benchmark_codecs [--mib=16] [--reps=7] [--quick]
//
// Throughput is float32 bytes per second on both sides (input bytes for encode, output bytes for
// decode), median over the repetitions after one warm-up. Single-threaded: the averaging layer
// runs codecs on its worker pool, one part per task. Exits 1 if a codec fails, 2 on bad flags.

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "averaging/codec.h"

namespace {

namespace avg = hivemind::averaging;
using Clock = std::chrono::steady_clock;

struct Config {
  size_t mib = 16;
  int reps = 7;
};

bool ParseFlags(int argc, char** argv, Config* config) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--quick") {
      config->mib = 4;
      config->reps = 3;
    } else if (arg.rfind("--mib=", 0) == 0) {
      config->mib = std::strtoul(arg.c_str() + 6, nullptr, 10);
    } else if (arg.rfind("--reps=", 0) == 0) {
      config->reps = std::atoi(arg.c_str() + 7);
    } else {
      return false;
    }
  }
  return config->mib > 0 && config->reps > 0;
}

// Median seconds of `reps` runs of fn, after one untimed warm-up run.
template <class Fn>
double MedianSeconds(int reps, Fn&& fn) {
  fn();
  std::vector<double> seconds;
  for (int i = 0; i < reps; ++i) {
    const auto start = Clock::now();
    fn();
    seconds.push_back(std::chrono::duration<double>(Clock::now() - start).count());
  }
  std::sort(seconds.begin(), seconds.end());
  return seconds[seconds.size() / 2];
}

// Keeps the compiler from discarding work whose result is otherwise unused.
volatile uint8_t g_sink;

}  // namespace

int main(int argc, char** argv) {
  Config config;
  if (!ParseFlags(argc, argv, &config)) {
    std::fprintf(stderr, "usage: benchmark_codecs [--mib=16] [--reps=7] [--quick]\n");
    return 2;
  }
  const size_t n = config.mib * (size_t{1} << 20) / sizeof(float);
  const double bytes = static_cast<double>(n * sizeof(float));
  std::vector<float> input(n);
  std::mt19937 rng(42);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (float& v : input) v = normal(rng);
  std::vector<float> output(n);

  const double memcpy_s = MedianSeconds(config.reps, [&] {
    std::memcpy(output.data(), input.data(), n * sizeof(float));
    g_sink = static_cast<uint8_t>(output[n / 2]);
  });
  const double memcpy_gbps = bytes / memcpy_s / 1e9;

  std::printf(
      "codec benchmark: %zu MiB of float32 N(0,1) (%zu elements), median of %d runs, "
      "1 thread\n",
      config.mib, n, config.reps);
  std::printf("%-16s %10s %10s %10s %10s %8s %11s\n", "codec", "encode", "enc/memcpy", "decode",
              "dec/memcpy", "ratio", "MSE");
  std::printf("%-16s %7.2f GB/s %9s %7.2f GB/s %9s %8s %11s\n", "memcpy", memcpy_gbps, "1.00",
              memcpy_gbps, "1.00", "1.00", "0");

  const avg::CodecSpec specs[] = {avg::CodecSpec::None(),          avg::CodecSpec::Float16(),
                                  avg::CodecSpec::ScaledFloat16(), avg::CodecSpec::Uniform8(),
                                  avg::CodecSpec::Quantile8(),     avg::CodecSpec::Blockwise8()};
  const avg::TensorView view{input.data(), n, avg::DType::kFloat32};
  int failures = 0;
  for (const avg::CodecSpec& spec : specs) {
    const char* name = avg::CodecName(spec.id);
    hivemind::Result<size_t> size = avg::EncodedSize(spec, n, avg::DType::kFloat32);
    if (!size.ok()) {
      std::fprintf(stderr, "%s: %s\n", name, size.status().ToString().c_str());
      return 1;
    }
    std::vector<uint8_t> encoded(*size);
    hivemind::Status status;
    const double encode_s = MedianSeconds(config.reps, [&] {
      hivemind::Result<size_t> written = avg::EncodeTo(spec, view, encoded.data(), encoded.size());
      if (!written.ok()) status = written.status();
      g_sink = encoded[encoded.size() / 2];
    });
    const double decode_s = MedianSeconds(config.reps, [&] {
      hivemind::Status decoded =
          avg::DecodeToFloat32(encoded.data(), encoded.size(), output.data(), n);
      if (!decoded.ok()) status = decoded;
      g_sink = static_cast<uint8_t>(output[n / 2]);
    });
    if (!status.ok()) {
      std::fprintf(stderr, "%s: %s\n", name, status.ToString().c_str());
      ++failures;
      continue;
    }
    double mse = 0;
    for (size_t i = 0; i < n; ++i) {
      const double d = static_cast<double>(input[i]) - output[i];
      mse += d * d;
    }
    mse /= static_cast<double>(n);
    const double encode_gbps = bytes / encode_s / 1e9;
    const double decode_gbps = bytes / decode_s / 1e9;
    std::printf("%-16s %7.2f GB/s %9.2f %7.2f GB/s %9.2f %8.2f %11.3e\n", name, encode_gbps,
                encode_gbps / memcpy_gbps, decode_gbps, decode_gbps / memcpy_gbps,
                bytes / static_cast<double>(encoded.size()), mse);
  }
  return failures == 0 ? 0 : 1;
}
