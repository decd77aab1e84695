#include "common/logging.h"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

namespace hivemind {
namespace {

LogLevel LevelFromEnvironment() {
  const char* value = std::getenv("HIVEMIND_LOG_LEVEL");
  if (value == nullptr) return LogLevel::kWarning;
  if (std::strcmp(value, "DEBUG") == 0) return LogLevel::kDebug;
  if (std::strcmp(value, "INFO") == 0) return LogLevel::kInfo;
  if (std::strcmp(value, "ERROR") == 0) return LogLevel::kError;
  if (std::strcmp(value, "OFF") == 0) return LogLevel::kOff;
  return LogLevel::kWarning;
}

std::atomic<LogLevel>& Threshold() {
  static std::atomic<LogLevel> threshold{LevelFromEnvironment()};
  return threshold;
}

const char* LevelName(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug:
      return "DEBUG";
    case LogLevel::kInfo:
      return "INFO";
    case LogLevel::kWarning:
      return "WARNING";
    case LogLevel::kError:
      return "ERROR";
    case LogLevel::kOff:
      return "OFF";
  }
  return "?";
}

}  // namespace

LogLevel CurrentLogLevel() { return Threshold().load(std::memory_order_relaxed); }

void SetLogLevel(LogLevel level) { Threshold().store(level); }

void WriteLogLine(LogLevel level, const char* file, int line, const std::string& text) {
  static std::mutex mutex;
  const char* base = std::strrchr(file, '/');
  auto now = std::chrono::duration_cast<std::chrono::milliseconds>(
                 std::chrono::system_clock::now().time_since_epoch())
                 .count();
  std::lock_guard<std::mutex> lock(mutex);
  std::fprintf(stderr, "[hivemind %s %lld.%03lld %s:%d] %s\n", LevelName(level),
               static_cast<long long>(now / 1000), static_cast<long long>(now % 1000),
               base ? base + 1 : file, line, text.c_str());
}

}  // namespace hivemind
