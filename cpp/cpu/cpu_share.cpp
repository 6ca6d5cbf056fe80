#include "gradkern/cpu_share.h"

#include <chrono>
#include <cstdint>
#include <cstdlib>

#if defined(__linux__)
#include <fcntl.h>
#include <unistd.h>
#endif

#include "gradkern/constants.h"

namespace gradkern {
namespace {

#if defined(__linux__)
// The runnable time one verdict covers (kShareWindowNs, gradkern/constants.h). Long enough to
// span a scheduler slice (0.75-3 ms) several times over, so one unlucky wait does not flip it;
// short enough that a training step (tens of ms and up) always yields a fresh one.
constexpr std::uint64_t kWindowNs = kShareWindowNs;

// One per thread: the file names the thread that opened it, and each thread has its own window.
// A fork's child inherits the descriptor, which still names the parent's thread, so a gauge
// reopens it in a process other than its own.
class ThreadGauge {
 public:
  ThreadGauge() { open(); }
  ~ThreadGauge() { close(); }
  ThreadGauge(const ThreadGauge&) = delete;
  ThreadGauge& operator=(const ThreadGauge&) = delete;

  bool usable() const { return fd_ >= 0 && ::getpid() == pid_; }

  bool shared() {
    if (::getpid() != pid_) {
      close();
      open();
      shared_ = false;
    }
    // A thread is runnable for no longer than the wall time that passes, so until kWindowNs of
    // it has passed since the window opened, the window cannot be complete: no read needed.
    const auto now = std::chrono::steady_clock::now();
    if (now - window_opened_ < std::chrono::nanoseconds(kWindowNs)) return shared_;
    std::uint64_t run = 0, wait = 0;
    if (!read(run, wait)) return shared_;
    const std::uint64_t d_run = run - run_ns_, d_wait = wait - wait_ns_;
    if (d_run + d_wait >= kWindowNs) {
      shared_ = kSharedRunPerWait * d_wait > d_run;
      run_ns_ = run;
      wait_ns_ = wait;
      window_opened_ = now;
    }
    return shared_;
  }

 private:
  void open() {
    pid_ = ::getpid();
    fd_ = ::open("/proc/thread-self/schedstat", O_RDONLY | O_CLOEXEC);
    window_opened_ = std::chrono::steady_clock::now();
    if (!read(run_ns_, wait_ns_)) close();
  }
  void close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

  // The file holds "<ns on a cpu> <ns waiting on a run queue> <timeslices>\n".
  bool read(std::uint64_t& run, std::uint64_t& wait) const {
    if (fd_ < 0) return false;
    char buf[96];
    const ssize_t n = ::pread(fd_, buf, sizeof buf - 1, 0);
    if (n <= 0) return false;
    buf[n] = '\0';
    char* end = nullptr;
    run = std::strtoull(buf, &end, 10);
    if (end == buf) return false;
    char* end2 = nullptr;
    wait = std::strtoull(end, &end2, 10);
    return end2 != end;
  }

  int fd_ = -1;
  pid_t pid_ = 0;
  std::uint64_t run_ns_ = 0, wait_ns_ = 0;  // at the start of the current window
  std::chrono::steady_clock::time_point window_opened_;
  bool shared_ = false;
};

ThreadGauge& this_thread_gauge() {
  thread_local ThreadGauge gauge;
  return gauge;
}

}  // namespace

bool cpu_shared() { return this_thread_gauge().shared(); }
bool cpu_share_measurable() { return this_thread_gauge().usable(); }

#else  // no per-thread scheduler statistics: passes run as on a quiet machine

}  // namespace

bool cpu_shared() { return false; }
bool cpu_share_measurable() { return false; }

#endif

}  // namespace gradkern
