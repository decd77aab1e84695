#pragma once

#include <sstream>
#include <string>

namespace hivemind {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3, kOff = 4 };

// The threshold comes from HIVEMIND_LOG_LEVEL (DEBUG, INFO, WARNING, ERROR, OFF); WARNING by
// default.
LogLevel CurrentLogLevel();
void SetLogLevel(LogLevel level);
void WriteLogLine(LogLevel level, const char* file, int line, const std::string& text);

}  // namespace hivemind

// HM_LOG(kInfo) << "joined " << peer;  The stream is only evaluated when the level is enabled.
#define HM_LOG(level)                                                \
  if (::hivemind::LogLevel::level < ::hivemind::CurrentLogLevel()) { \
  } else                                                             \
    ::hivemind::detail_log::LogLine(::hivemind::LogLevel::level, __FILE__, __LINE__).stream()

namespace hivemind::detail_log {

class LogLine {
 public:
  LogLine(LogLevel level, const char* file, int line) : level_(level), file_(file), line_(line) {}
  ~LogLine() { WriteLogLine(level_, file_, line_, stream_.str()); }
  std::ostringstream& stream() { return stream_; }

 private:
  LogLevel level_;
  const char* file_;
  int line_;
  std::ostringstream stream_;
};

}  // namespace hivemind::detail_log
