// Pending-interrupt polling for the whole-loop ops, so that Ctrl-C in Python
// stops a long quadratic_descent call instead of waiting for its end.
//
// The op library has no Python dependency (a LibTorch program links it
// without libpython), so the check itself is a callback that the Python
// module installs at import (csrc/python_module.cpp); without one, polling
// does nothing. The callback throws to interrupt (for Python: the
// KeyboardInterrupt that its SIGINT handler raised). Ops write only their
// own outputs, so an interrupted call leaves its inputs as they were.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <thread>

namespace torchiter {

// Throws when an interrupt is pending; called on the op's calling thread.
using InterruptCheck = void (*)();

// Installs the check (nullptr removes it).
void set_interrupt_check(InterruptCheck check);

// How many times this thread has run the installed check. The check may run
// any Python code (signal handlers), which may in turn run other kernels:
// per-thread CPU state kept across stop() calls (the AMX tile configuration)
// must be set up again when this count has changed.
uint64_t interrupt_checks_on_this_thread();

// One op call's poller. Made on the calling thread; any thread of the loop
// may call stop() between units of work (a tile, a run of iterations, a
// sweep). On the calling thread it runs the installed check at most every
// kInterval; when that throws, the other threads' next stop() returns true
// so they leave their work early, and the exception travels on (through
// at::parallel_for, which rethrows a worker's exception after the region).
class InterruptPoll {
 public:
  static constexpr std::chrono::milliseconds kInterval{100};

  InterruptPoll();
  InterruptPoll(const InterruptPoll&) = delete;
  InterruptPoll& operator=(const InterruptPoll&) = delete;

  // True when the loop should stop because another thread saw an interrupt;
  // throws on the calling thread when one is pending.
  bool stop();

 private:
  InterruptCheck check_;
  std::thread::id owner_;
  std::chrono::steady_clock::time_point next_;
  std::atomic<bool> aborted_{false};
};

} // namespace torchiter
