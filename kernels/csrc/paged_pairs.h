// Prefill items of the CPU paged attention (paged_attention_cpu.cpp), two at a time where
// one load can serve both: a row's scores against two 16-key chunks, and the values pass
// of two consecutive tokens' rows. Each row runs exactly the operations of the one-at-a-
// time code there (the same chains, in the same order), so the bits are the same; only
// which rows and keys share a load differs, and so the register tiles:
// - scores: a d step loads the two chunks' keys and R broadcasts of q for 2R FMAs (one
//   chunk: 1 and R for R), R <= 3 rows: 2 x 4 chains x R = 24 accumulators at most;
// - values: each value load serves 2G rows (one token: G), G <= 3, head_dim 64.
// Measured on an AMD EPYC Zen 5 (2 threads, `python bench/kernels.py --prefill-attention`,
// one at a time before / after, three runs each): 4 prompts x 512 tokens bf16 4.01-4.09 ->
// 3.52-3.66 ms, fp32 4.56-4.65 -> 4.32-4.49; 8 x 256 bf16 2.08-2.16 -> 1.90-1.97, fp32
// 2.33-2.40 -> 2.30-2.35; 16 x 128 within 5%. 64 prompts of 32-512 tokens through the
// bf16 engine (`bench/step_phases.py --workload prefill`, four runs each): 559-584 ->
// 554-575 ms a step, ~1%: attention is ~14% of such a step.
#pragma once

#include <algorithm>
#include <cstdint>

#include "paged_attention.h"
#include "vec16.h"

// Scores of the R rows at q[i] ([D] each) against keys c0..c0+15 (kd0: [D, 16], row stride
// ld, all at or before every row's position) and c0+16..c0+31 (kd1, lanes from keep1[i]
// on are 0), into s[i][0..31]: per row and key, four FMA chains over d mod 4, summed
// (c0 + c1) + (c2 + c3), times scale.
template <int R, typename T>
inline void score_two_chunks(const float* const* q, const T* kd0, const T* kd1, int64_t D, int64_t ld, float scale,
                             const int* keep1, float* const* s) {
  V16 a[R][4], b[R][4];
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < 4; ++c) a[i][c] = b[i][c] = vzero();
  for (int64_t d = 0; d < D; d += 4) {
    for (int c = 0; c < 4; ++c) {
      const V16 k0 = load16(kd0 + (d + c) * ld), k1 = load16(kd1 + (d + c) * ld);
      for (int i = 0; i < R; ++i) {
        const V16 qb = vsplat(q[i][d + c]);
        a[i][c] = vfma(qb, k0, a[i][c]);
        b[i][c] = vfma(qb, k1, b[i][c]);
      }
    }
  }
  for (int i = 0; i < R; ++i) {
    vstore(s[i], vmul(vadd(vadd(a[i][0], a[i][1]), vadd(a[i][2], a[i][3])), vsplat(scale)));
    const V16 s1 = vmul(vadd(vadd(b[i][0], b[i][1]), vadd(b[i][2], b[i][3])), vsplat(scale));
    vstore(s[i] + kLanes, vkeep_first(s1, keep1[i], 0.0f));
  }
}

// o[i] = (sum_j p_ij v_j) / den_i for the R = 2G rows whose weights start at p (row stride
// width): the first G rows one token at position pos (keys 0..pos), the rest the next
// token (keys 0..pos + 1). Every key up to pos for all rows, then key pos + 1 for the
// second token's alone: each row's chain is j ascending, one FMA chain per 16 values of d.
template <int R, int NV, typename T>
inline void values_two_tokens(const float* p, int64_t width, const float* den, const PagedCache<T>& V,
                              const int64_t* table, int64_t head, int64_t pos, float* const* o) {
  constexpr int G = R / 2;
  V16 acc[R][NV];
  for (int i = 0; i < R; ++i)
    for (int k = 0; k < NV; ++k) acc[i][k] = vzero();
  const int64_t bs = V.block_size;
  for (int64_t j0 = 0; j0 <= pos; j0 += bs) {  // a block at a time: one table lookup each
    const T* vb = V.at(table, j0, head);
    const int64_t n = std::min(bs, pos + 1 - j0);
    for (int64_t s = 0; s < n; ++s) {
      const T* v = vb + s * V.s_slot;
      for (int k = 0; k < NV; ++k) {
        const V16 vk = load16(v + k * kLanes);
        for (int i = 0; i < R; ++i) acc[i][k] = vfma(vsplat(p[i * width + j0 + s]), vk, acc[i][k]);
      }
    }
  }
  const T* v = V.at(table, pos + 1, head);  // the second token's own key
  for (int k = 0; k < NV; ++k) {
    const V16 vk = load16(v + k * kLanes);
    for (int i = G; i < R; ++i) acc[i][k] = vfma(vsplat(p[i * width + pos + 1]), vk, acc[i][k]);
  }
  for (int i = 0; i < R; ++i) {
    const V16 dv = vsplat(den[i]);
    for (int k = 0; k < NV; ++k) vstore(o[i] + k * kLanes, vdiv(acc[i][k], dv));
  }
}
