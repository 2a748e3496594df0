// ParallelFor: the native CPU kernels' threads. XLA's own pool wakes a sleeping thread per task,
// which costs about as much as one decode matmul (tens of microseconds); these workers spin for
// a while after each job, so the calls of one decode step find them awake, then sleep. A spinning
// thread offers its core to any other runnable thread every few microseconds (sched_yield): a
// server's event loop or a client on the same cores then runs there, instead of preempting a
// thread that computes while the other spins waiting for it.

#ifndef JAXINFER_KERNELS_CPU_PARALLEL_H_
#define JAXINFER_KERNELS_CPU_PARALLEL_H_

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include <immintrin.h>

namespace jaxinfer {

// A buffer of at least n T's for the calling thread, not zeroed, kept between calls: the kernels'
// quantized activations. A fresh std::vector each call zeroed them first (about 1-2% of a prefill or
// 32-stream step) and, past malloc's mmap threshold, faulted its pages in anew. `Slot` tells apart
// the buffers one call needs at once; a thread runs one kernel call at a time.
template <typename T, int Slot>
T* Scratch(size_t n) {
  thread_local std::unique_ptr<T[]> buffer;
  thread_local size_t size = 0;
  if (size < n) {
    buffer.reset(new T[n]);
    size = n;
  }
  return buffer.get();
}

// The next column block's weights brought into L2 a few lines at a time, while the passes after the
// first over this block's rows compute from the cache. At 8-32 decode rows a block's first pass
// streams its weights from memory faster than a core's share of the bandwidth, and the passes after
// it use none: that is when the next block can come in. Spread over the passes' steps (Step), since
// issuing a block's lines at once stalls the core on its own prefetches (paged_attention.cc's Spread
// found the same). ParallelTiles deals a thread runs of consecutive blocks, so the next is its own.
struct NextBlock {
  const char* at = nullptr;
  const char* end = nullptr;
  int64_t per_step = 0;

  NextBlock() = default;
  // `bytes` from `begin` over `steps` calls of Step; none if steps <= 0.
  NextBlock(const void* begin, int64_t bytes, int64_t steps) {
    if (steps <= 0) return;
    at = static_cast<const char*>(begin);
    end = at + bytes;
    per_step = (bytes / 64 + steps - 1) / steps;
  }
  bool active() const { return at < end; }
  // Always inlined: GCC deleted calls to an out-of-line function that only prefetches (paged_attention.cc).
  __attribute__((always_inline)) void Step() {
    for (int64_t i = 0; i < per_step && at < end; ++i, at += 64) __builtin_prefetch(at, 0, 2);
  }
};

// The matmuls' tile rule: a tile of r rows spans up to TileVectors(r) vectors of columns (r times
// that many accumulators, and as many integer sums, in registers).
constexpr int TileVectors(int64_t r) { return r >= 3 ? 2 : 4; }

// The tiles that cover `width` columns (vectors of `lanes`) in a pass of r rows: full tiles, then
// one-vector tiles for the rest.
constexpr int64_t TilesPerPass(int64_t r, int64_t width, int64_t lanes) {
  return width / (TileVectors(r) * lanes) + width % (TileVectors(r) * lanes) / lanes;
}

// The tiles of a block's passes after the first (rows in passes of 4, then the remainder): the
// steps over which NextBlock spreads the next block's prefetches; none for one pass.
constexpr int64_t LaterPassTiles(int64_t rows, int64_t width, int64_t lanes) {
  if (rows <= 4) return 0;
  return (rows / 4 - 1) * TilesPerPass(4, width, lanes) + (rows % 4 ? TilesPerPass(rows % 4, width, lanes) : 0);
}

class Workers {
 public:
  // Calls fn(i) for i in [0, n) on the calling thread and the workers; returns when all are done.
  void ParallelFor(int64_t n, const std::function<void(int64_t)>& fn) {
    if (n <= 1 || threads_.empty()) {
      for (int64_t i = 0; i < n; ++i) fn(i);
      return;
    }
    auto job = std::make_shared<Job>();
    job->fn = fn;  // a copy: a worker may start after this call returns
    job->n = n;
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_ = job;
      generation_.fetch_add(1, std::memory_order_release);
    }
    if (sleepers_.load() > 0) cv_.notify_all();
    job->Work();
    for (int spins = 1; job->done.load(std::memory_order_acquire) < n; ++spins) Pause(spins);
  }

  // fn(m0, m1) over [0, m) in runs of `rows`: on this thread alone below two runs, else on all.
  template <typename Fn>
  void ParallelRows(int64_t m, int64_t rows, const Fn& fn) {
    if (m < 2 * rows) return fn(int64_t{0}, m);
    ParallelFor((m + rows - 1) / rows, [&](int64_t c) { fn(c * rows, std::min(m, (c + 1) * rows)); });
  }

  // fn(b0, b1, m0, m1) computes rows [m0, m1) of the column blocks [b0, b1) of an M-row matmul. Few
  // rows (decode): a few runs of blocks per thread, each over every row. Many (a prefill chunk):
  // items of one block and kRows rows, so that a layer with few blocks (9 for N = 576) still
  // divides evenly between the threads.
  template <typename Fn>
  void ParallelTiles(int64_t m, int64_t num_blocks, const Fn& fn) {
    constexpr int64_t kRows = 64;
    if (m >= 2 * kRows) {
      const int64_t row_chunks = (m + kRows - 1) / kRows;
      ParallelFor(row_chunks * num_blocks, [&](int64_t i) {
        const int64_t b = i / row_chunks, r = i % row_chunks;
        fn(b, b + 1, r * kRows, std::min(m, (r + 1) * kRows));
      });
      return;
    }
    // Runs of at least 2 blocks when there are several row passes, so that a block's later passes
    // can bring in the next (NextBlock); 2 balances as well as 1 between 2 threads.
    const int64_t per_chunk = std::max<int64_t>(m > 4 ? 2 : 1, num_blocks / (4 * size()));
    const int64_t num_chunks = (num_blocks + per_chunk - 1) / per_chunk;
    ParallelFor(num_chunks, [&](int64_t c) { fn(c * per_chunk, std::min(num_blocks, (c + 1) * per_chunk), 0, m); });
  }

  // ParallelTiles over several matmuls of one x (fused projections: q, k and v): their blocks are
  // numbered one after another and dealt out as one matmul's, so small ones share the threads with
  // the rest. fn(i, b0, b1, m0, m1): rows [m0, m1) of matmul i's blocks [b0, b1).
  template <typename Fn>
  void ParallelTilesOf(int64_t m, const std::vector<int64_t>& num_blocks, const Fn& fn) {
    std::vector<int64_t> first(num_blocks.size() + 1, 0);
    for (size_t i = 0; i < num_blocks.size(); ++i) first[i + 1] = first[i] + num_blocks[i];
    ParallelTiles(m, first.back(), [&](int64_t b0, int64_t b1, int64_t m0, int64_t m1) {
      for (size_t i = 0; i < num_blocks.size(); ++i) {
        const int64_t lo = std::max(b0, first[i]), hi = std::min(b1, first[i + 1]);
        if (lo < hi) fn(static_cast<int64_t>(i), lo - first[i], hi - first[i], m0, m1);
      }
    });
  }

  static Workers& Get() {
    static Workers* workers = new Workers();  // never destroyed: its threads are detached
    return *workers;
  }

  int64_t size() const { return static_cast<int64_t>(threads_.size()) + 1; }

 private:
  struct Job {
    std::function<void(int64_t)> fn;
    int64_t n = 0;
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    void Work() {
      for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) {
        fn(i);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };

  Workers() {
    int cpus = 1;
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) cpus = CPU_COUNT(&set);
    if (const char* env = std::getenv("JAXINFER_NATIVE_THREADS")) cpus = std::max(1, std::atoi(env));
    for (int i = 1; i < cpus; ++i) {
      threads_.emplace_back([this] { Loop(); });
      threads_.back().detach();
    }
  }

  void Loop() {
    uint64_t seen = generation_.load();
    for (;;) {
      const auto start = std::chrono::steady_clock::now();
      int spins = 0;
      while (generation_.load(std::memory_order_acquire) == seen) {
        Pause(++spins);
        if (spins % 1024 == 0 && std::chrono::steady_clock::now() - start > kSpin) {
          std::unique_lock<std::mutex> lock(mu_);
          sleepers_.fetch_add(1);
          cv_.wait(lock, [&] { return generation_.load() != seen; });
          sleepers_.fetch_sub(1);
          break;
        }
      }
      std::shared_ptr<Job> job;
      {
        std::lock_guard<std::mutex> lock(mu_);
        job = job_;
        seen = generation_.load();
      }
      if (job) job->Work();
    }
  }

  // A waiting thread's pause; every 64th also offers the core to another runnable thread (a
  // system call of about a microsecond when there is none). Measured with a server at 32 streams
  // on 2 cores: 1.05x the output tokens/s (docs/KERNELS.md); in a process alone, no change.
  static void Pause(int spins) {
    _mm_pause();
    if (spins % 64 == 0) sched_yield();
  }

  static constexpr std::chrono::microseconds kSpin{2000};
  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> sleepers_{0};
  std::shared_ptr<Job> job_;
};

}  // namespace jaxinfer

#endif  // JAXINFER_KERNELS_CPU_PARALLEL_H_
