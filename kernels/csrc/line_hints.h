// Cache-line hints spread over a loop, for the GEMMs (gemm_cpu.cpp, gemm_bf16_avx512_cpu.cpp):
// the weights a thread reads next are hinted into L2 a few lines per step of the loop that
// computes the current ones, so a second memory stream runs under the arithmetic instead
// of before it. Hints only: they never change a value.
#pragma once

#include <cstdint>

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
