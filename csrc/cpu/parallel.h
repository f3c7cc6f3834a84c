// Threads over independent items (Fisher blocks) with dynamic scheduling: every thread takes the
// next item from a shared counter, so a thread slowed by other work on the machine costs only
// the items it holds (no barrier waits for the slowest share, unlike a static split).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace ovit::cpu {

// fn(item, thread) for item in [0, n) on up to `threads` threads (the caller's thread is one of
// them); thread ids are 0..threads-1, for per-thread scratch. The first exception is rethrown.
template <typename F>
void parallel_for(int64_t n, int threads, F&& fn) {
  if (n <= 0) return;
  const int t = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, n)));
  if (t == 1) {
    for (int64_t i = 0; i < n; ++i) fn(i, 0);
    return;
  }
  std::atomic<int64_t> next{0};
  std::exception_ptr error;
  std::mutex lock;
  auto work = [&](int tid) {
    try {
      for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) fn(i, tid);
    } catch (...) {
      std::lock_guard<std::mutex> g(lock);
      if (!error) error = std::current_exception();
      next.store(n);
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(t - 1);
  for (int k = 1; k < t; ++k) pool.emplace_back(work, k);
  work(0);
  for (auto& th : pool) th.join();
  if (error) std::rethrow_exception(error);
}

}  // namespace ovit::cpu
