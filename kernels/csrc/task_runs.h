// A parallel loop over tasks [0, count) whose threads end together: each thread owns one
// contiguous run, the one at::parallel_for would give it (so its prefetch of the task it
// runs next stays right), and takes its own tasks from the front; a thread whose run is
// done takes the last untaken task of another run, until none is left. For the GEMMs
// (gemm_cpu.cpp, gemm_bf16_avx512_cpu.cpp), whose tasks write disjoint outputs with the
// same operations on any thread: which thread runs a task never changes a value.
//
// Why: at a decode step the two threads' equal runs of a GEMM take unequal times (memory
// stalls, the host), and at::parallel_for's end waits for the slower one. A perf
// profile of a 64-sequence bf16 decode on an AMD EPYC (Zen 4) guest had each thread ~3% of
// its time in libgomp's barrier while the other was still in a GEMM tile; with the runs,
// ~1%. Both ways alternated step by step in one engine on that guest (the same bits):
// 64-sequence decode paired ratio 0.989-0.990 bf16, 0.992 fp32; 8 sequences 1.001. A taken
// task has no weights prefetched for it, so the end of a call still costs some.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

class TaskRuns {
 public:
  TaskRuns(int64_t count, int64_t threads) : threads_(used_threads(count, threads)), runs_(new Run[threads_]) {
    const int64_t chunk = (count + threads_ - 1) / threads_;
    for (int64_t i = 0; i < threads_; ++i) {
      const int64_t b = std::min(count, dealt_begin(count, threads, i)), e = std::min(count, b + chunk);
      runs_[i].begin = b;
      runs_[i].end = e;
      runs_[i].span.store(pack(b, e), std::memory_order_relaxed);
    }
  }
  int64_t threads() const { return threads_; }

  // How many threads a loop of `count` tasks on `threads` uses, and where thread i's dealt
  // run begins (a thread past the used ones: the last run's). The GEMMs' hints of the
  // next call's first weights read these, so they name the tasks the runs will deal.
  static int64_t used_threads(int64_t count, int64_t threads) { return std::max<int64_t>(1, std::min(count, threads)); }
  static int64_t dealt_begin(int64_t count, int64_t threads, int64_t i) {
    const int64_t used = used_threads(count, threads);
    return std::min(i, used - 1) * ((count + used - 1) / used);
  }

  // The task thread `tid` runs next, with the bounds of the run it belongs to; false when
  // every task is taken.
  struct Next {
    int64_t task, begin, end;
    bool stolen;
  };
  bool next(int64_t tid, Next& out) {
    if (take(tid, true, out)) return true;
    for (int64_t i = 1; i < threads_; ++i)
      if (take((tid + i) % threads_, false, out)) return true;
    return false;
  }

 private:
  struct alignas(64) Run {
    std::atomic<uint64_t> span;  // (front << 32) | back of the untaken tasks
    int64_t begin, end;          // the run as dealt
  };
  static uint64_t pack(int64_t front, int64_t back) { return static_cast<uint64_t>(front) << 32 | static_cast<uint64_t>(back); }

  bool take(int64_t i, bool own, Next& out) {
    Run& r = runs_[i];
    uint64_t s = r.span.load(std::memory_order_relaxed);
    for (;;) {
      const int64_t front = static_cast<int64_t>(s >> 32), back = static_cast<int64_t>(s & 0xffffffffu);
      if (front >= back) return false;
      const uint64_t want = own ? pack(front + 1, back) : pack(front, back - 1);
      if (r.span.compare_exchange_weak(s, want, std::memory_order_relaxed)) {
        out = {own ? front : back - 1, r.begin, r.end, !own};
        return true;
      }
    }
  }

  int64_t threads_;
  std::unique_ptr<Run[]> runs_;
};

// The threads a loop started here runs on: one inside another parallel region, where
// at::parallel_for runs inline (decoder_layers_cpu.cpp runs groups of sequences a thread
// each, every op of a group on its thread).
inline int64_t loop_threads() { return at::in_parallel_region() ? 1 : at::get_num_threads(); }

// body(runs, tid) on each thread of one parallel region, tid in [0, runs.threads()): it sets
// up what the thread needs, then runs `while (runs.next(tid, t)) ...`; the region ends when
// every task of [0, count) has run.
template <typename F>
void parallel_runs(int64_t count, F&& body) {
  if (count <= 0) return;
  TaskRuns runs(count, loop_threads());
  at::parallel_for(0, runs.threads(), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t tid = i0; tid < i1; ++tid) body(runs, tid);
  });
}
