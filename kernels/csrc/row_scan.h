// One read of a vocabulary row for what a step asks of it besides the normalizer's sum:
// its max, its first maximum's index exactly as torch.argmax (a NaN counts as the maximum:
// the first NaN's index), and whether every entry is finite. Used by row_reduce_cpu.cpp.
//
// Why one pass: the engine's non-finite check, the greedy argmax and the normalizer's max
// each read all of a [64, 49152] fp32 logits matrix (12.6 MB, past the caches) on their
// own, ~0.4 ms apiece of a decode step.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "vec16.h"

struct RowScan {
  float max;       // over the non-NaN entries (-inf for a row of -inf)
  int64_t argmax;  // torch.argmax's index: the first NaN, else the first maximum
  bool nan;        // a NaN anywhere
  bool finite;     // no NaN, no +-inf
};

#if defined(__AVX512F__)
// The first lane (j + lane) of the row where `hit` holds, from j = 0; v if none.
template <typename Hit>
inline int64_t first_where(const float* x, int64_t v, Hit hit) {
  for (int64_t j = 0; j < v; j += kLanes) {
    const int n = static_cast<int>(std::min<int64_t>(kLanes, v - j));
    const __mmask16 live = n == kLanes ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u);
    const __mmask16 h = hit(_mm512_maskz_loadu_ps(live, x + j)) & live;
    if (h) return j + __builtin_ctz(h);
  }
  return v;
}

// Four independent max chains (one compare-and-blend chain carrying indices ran ~10
// cycles a vector), with NaN and inf class masks or-ed alongside; then the first NaN or
// the first entry equal to the max, found by a second read that stops there (from L2:
// the row was just read). -inf (masked tokens) and +inf take the same path as any value.
inline RowScan scan_row(const float* x, int64_t v) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512 acc[4] = {ninf, ninf, ninf, ninf};
  __mmask16 nan = 0, inf = 0;
  int64_t j = 0;
  for (; j + 4 * kLanes <= v; j += 4 * kLanes)
    for (int u = 0; u < 4; ++u) {
      const __m512 a = _mm512_loadu_ps(x + j + u * kLanes);
      nan |= _mm512_fpclass_ps_mask(a, 0x81);  // QNaN | SNaN
      inf |= _mm512_fpclass_ps_mask(a, 0x18);  // +inf | -inf
      acc[u] = _mm512_max_ps(a, acc[u]);       // a NaN lane of a leaves acc
    }
  for (; j < v; j += kLanes) {
    const int n = static_cast<int>(std::min<int64_t>(kLanes, v - j));
    const __mmask16 live = n == kLanes ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1u);
    const __m512 a = _mm512_mask_loadu_ps(ninf, live, x + j);  // dead lanes -inf: never above
    nan |= _mm512_fpclass_ps_mask(a, 0x81);
    inf |= _mm512_fpclass_ps_mask(a, 0x18) & live;
    acc[0] = _mm512_max_ps(a, acc[0]);
  }
  const float m = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(acc[0], acc[1]), _mm512_max_ps(acc[2], acc[3])));
  if (nan) return {m, first_where(x, v, [](__m512 a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q); }), true, false};
  const __m512 mv = _mm512_set1_ps(m);
  const int64_t first = first_where(x, v, [mv](__m512 a) { return _mm512_cmp_ps_mask(a, mv, _CMP_EQ_OQ); });
  return {m, first, false, inf == 0};
}
#endif

inline RowScan scan_row_scalar(const float* x, int64_t v) {
  RowScan r{-std::numeric_limits<float>::infinity(), 0, false, true};
  int64_t first_nan = -1;
  for (int64_t j = 0; j < v; ++j) {
    if (std::isnan(x[j])) {
      if (first_nan < 0) first_nan = j;
      r.nan = true;
      r.finite = false;
      continue;
    }
    if (std::isinf(x[j])) r.finite = false;
    if (x[j] > r.max) r.max = x[j], r.argmax = j;
  }
  if (first_nan >= 0) r.argmax = first_nan;
  return r;
}

#if !defined(__AVX512F__)
inline RowScan scan_row(const float* x, int64_t v) { return scan_row_scalar(x, v); }
#endif
