// Cache-line hints spread over a loop, for the GEMMs (gemm_cpu.cpp, gemm_bf16_avx512_cpu.cpp):
// the weights a thread reads next are hinted into L2 a few lines per step of the loop that
// computes the current ones, so a second memory stream runs under the arithmetic instead
// of before it. Hints only: they never change a value.
#pragma once

#include <cstdint>

// Hint the line at p into L2 (PREFETCHT1), issued where it is written. __builtin_prefetch is
// free to move: GCC gathers an unrolled loop's prefetches into bursts ahead of the
// arithmetic (32 in two runs in the decode attention's 16-key score step), and a burst
// fills the core's miss buffers, so the loads behind it wait on memory instead of the
// fetch running under the FMAs. A volatile asm keeps its place among the others, and
// with no memory clobber the loads and FMAs around it still schedule freely. Measured
// on an AMD EPYC Zen 5 (bench/kernels.py --decode-bandwidth and 64 x 272 keys, bf16, a
// pool far past the caches): the decode attention's call 0.90 -> 0.64 ms on one thread,
// 0.53 -> 0.42 ms on two.
// The address goes in a register, not as a memory operand: a char-typed "m" operand may
// alias any local array, so GCC kept the values pass's accumulators in memory and stored
// all of them after every key (paged_decode.h's values_joint; 64 x 272 keys whose tables
// share blocks that stay in L2, one thread: fp32 0.454 -> 0.405 ms, bf16 0.386 -> 0.274;
// from a pool far past the caches the call is bound by its read rate and did not change).
// SpreadHints below keeps __builtin_prefetch: in the GEMMs' tile loops the asm took
// the compiler's scheduling with it (bf16 decode GEMMs 16 -> 36 ms a step, fp32 +8%).
inline void hint_line(const void* p) {
#if defined(__x86_64__)
  asm volatile("prefetcht1 (%0)" : : "r"(p));
#else
  __builtin_prefetch(p, 0, 2);
#endif
}

// `lines` consecutive 64-byte lines from `p`, evenly over a loop of `over` (> 0) steps:
// after step s, floor((s + 1) * lines / over) of them have been issued (Bresenham), so a share
// of fewer lines than steps comes one line every over / lines steps instead of one a step
// from step 0 (which ran the fetch at the core's full miss rate for the first part of the
// loop). Measured on an AMD EPYC Zen 5, fp32 (gemm_cpu.cpp), 2 threads, alternated with
// SpreadHints: 64 rows x the 49152 x 576 head from memory 242 / 243 / 237 -> 246 / 251 / 249
// GFLOP/s a thread; bench/gemm.py's whole steps of 32 rows 404 / 409 / 416 / 425 -> 448 / 419
// / 441 / 446 GFLOP/s, of 512 rows 456 / 456 / 455 / 454 -> 462 / 453 / 466 / 460.
struct EvenHints {
  const char* base;
  int64_t lines, over, acc = 0, next = 0;
  EvenHints(const void* p, int64_t lines, int64_t over) : base(static_cast<const char*>(p)), lines(lines), over(over) {}
  void step() {
    for (acc += lines; acc >= over; acc -= over) __builtin_prefetch(base + next++ * 64, 0, 2);
  }
};

// `lines` consecutive 64-byte lines from `p`, over a loop of `over` (> 0) steps: ceil(lines /
// over) per step from step 0, so steps [0, steps) issue them (the last may pass the end by
// fewer than `per` lines; a hint never faults).
struct SpreadHints {
  const char* base;
  int64_t per, steps;
  SpreadHints(const void* p, int64_t lines, int64_t over)
      : base(static_cast<const char*>(p)), per((lines + over - 1) / over), steps(per ? (lines + per - 1) / per : 0) {}
  void issue(int64_t step) const {  // the lines of one step < steps
    for (int64_t i = 0; i < per; ++i) __builtin_prefetch(base + (step * per + i) * 64, 0, 2);
  }
};
