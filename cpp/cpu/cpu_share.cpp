#include "gradkern/cpu_share.h"

#include <cstdint>
#include <cstdlib>

#if defined(__linux__)
#include <fcntl.h>
#include <unistd.h>
#endif

namespace gradkern {
namespace {

// The runnable time one verdict covers. Long enough to span a scheduler slice (0.75-3 ms)
// several times over, so one unlucky wait does not flip it; short enough that a training step
// (tens of ms and up) always yields a fresh one.
constexpr std::uint64_t kWindowNs = 4'000'000;

#if defined(__linux__)
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
    std::uint64_t run = 0, wait = 0;
    if (!read(run, wait)) return shared_;
    const std::uint64_t d_run = run - run_ns_, d_wait = wait - wait_ns_;
    if (d_run + d_wait >= kWindowNs) {
      shared_ = 3 * d_wait > d_run;
      run_ns_ = run;
      wait_ns_ = wait;
    }
    return shared_;
  }

 private:
  void open() {
    pid_ = ::getpid();
    fd_ = ::open("/proc/thread-self/schedstat", O_RDONLY | O_CLOEXEC);
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
  bool shared_ = false;
};

ThreadGauge& this_thread_gauge() {
  thread_local ThreadGauge gauge;
  return gauge;
}
#endif

}  // namespace

bool cpu_shared() {
#if defined(__linux__)
  return this_thread_gauge().shared();
#else
  return false;
#endif
}

bool cpu_share_measurable() {
#if defined(__linux__)
  return this_thread_gauge().usable();
#else
  return false;
#endif
}

}  // namespace gradkern
