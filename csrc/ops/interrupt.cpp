#include "interrupt.h"

namespace torchiter {
namespace {

std::atomic<InterruptCheck> g_check{nullptr};
thread_local uint64_t t_checks = 0;

} // namespace

uint64_t interrupt_checks_on_this_thread() {
  return t_checks;
}

void set_interrupt_check(InterruptCheck check) {
  g_check.store(check, std::memory_order_release);
}

InterruptPoll::InterruptPoll()
    : check_(g_check.load(std::memory_order_acquire)),
      owner_(std::this_thread::get_id()),
      next_(std::chrono::steady_clock::now() + kInterval) {}

bool InterruptPoll::stop() {
  if (aborted_.load(std::memory_order_relaxed)) {
    return true;
  }
  if (check_ == nullptr || std::this_thread::get_id() != owner_) {
    return false;
  }
  const auto now = std::chrono::steady_clock::now();
  if (now < next_) {
    return false;
  }
  next_ = now + kInterval;
  ++t_checks;
  try {
    check_();
  } catch (...) {
    aborted_.store(true, std::memory_order_relaxed);
    throw;
  }
  return false;
}

} // namespace torchiter
