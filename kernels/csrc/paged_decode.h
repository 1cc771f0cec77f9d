// Decode items of the CPU paged attention (paged_attention_cpu.cpp) on new_kv_cache's
// layout: one query token, the G heads that share one KV head, and per (block, head) the
// keys ([D, BS]) and then the values ([BS, D]) in one run of memory. Each row runs the
// same operations in the same order as the general path there, so the bits are the same;
// only the layout of the work differs:
// - q rows, keys and accumulators sit at compile-time offsets (D = 16 NV): the loops hold
//   no division, no spilled pointer and no accumulator in memory;
// - the cache is hinted into L2 at the rate it is read, kDecodeLead halves (16 keys' keys
//   or values) ahead of the read in the order the thread reads them: this item's keys,
//   its values, then the next item's keys and values; half of 16 keys' worth per 16 keys
//   of scores and again per 16 keys of values, at fixed offsets from one pointer, each
//   hint where it is written (hint_line, line_hints.h: __builtin_prefetch let GCC gather
//   them into bursts).
// Measured on an AMD EPYC Zen 4 (2 threads, bf16, 64 sequences, a pool far larger than the
// caches, per layer) against the general path: 0.71-0.85x the time at 64-512 keys, and
// within ~7% of a bare read of the same scattered runs. A lead of 4 halves against the
// next item in memory order (its keys and values block by block, one item ahead), on an
// AMD EPYC Zen 5, 64 x 272 keys, one thread: fp32 1.38-1.42 -> 1.19-1.23 ms a call, bf16
// 0.72 -> 0.69-0.70 (leads of 8 and 16 no better); end to end (bench/throughput.py decode,
// alternated with the old order) +1.3-2.6% tokens/s, within the host's drift.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "line_hints.h"
#include "paged_attention.h"
#include "vec16.h"

// In place: s[0..pos] -> exp(s - max); den = the sum (16 lane sums, then a fixed tree).
inline void softmax_row(float* s, int64_t pos, float& den) {
  const float ninf = -std::numeric_limits<float>::infinity();
  V16 m = vsplat(ninf);
  for (int64_t c0 = 0; c0 <= pos; c0 += kLanes)
    m = vmax(m, vkeep_first(vload(s + c0), static_cast<int>(pos + 1 - c0), ninf));
  V16 mx = vsplat(hmax(m)), sum = vzero();
  for (int64_t c0 = 0; c0 <= pos; c0 += kLanes) {
    V16 e = vkeep_first(vexp(vsub(vload(s + c0), mx)), static_cast<int>(pos + 1 - c0), 0.0f);
    vstore(s + c0, e);
    sum = vadd(sum, e);
  }
  den = hsum(sum);
}

// Whether the caches are in new_kv_cache's joint layout (the one this file reads).
template <typename T>
bool joint_layout(const PagedCache<T>& K, const PagedCache<T>& V, int64_t D) {
  const int64_t bs = K.block_size;
  return K.d_major() && K.s_d == bs && V.s_slot == D && V.s_d == 1 && K.s_block == V.s_block &&
         K.s_head == V.s_head && V.base == K.base + bs * D;
}

// The halves of a thread's reads in its order (see above), from kDecodeLead halves past this
// item's first: this item's keys chunk by chunk (the scores pass), its values (the values
// pass), then the next item's keys and values. A (block, head) run is its keys (BS x D
// elements, d-major), then its values (BS x D); the half of keys c..c+15 is the 16 x D
// elements from c's offset in the keys' part (those keys exactly when BS = 16; for larger
// blocks the halves of one block together cover its keys, in memory order), of values the
// 16 keys' rows. Past the end (or with no next item) take() gives `idle`, lines already
// cached: a hint there costs only its issue.
constexpr int64_t kDecodeLead = 4;
template <typename T>
struct HalfSlices {
  struct Run {
    const int64_t* table;
    int64_t head_off, chunks;
  };
  const T* base;
  int64_t s_block, bs, d, next;
  Run runs[2];
  const char* idle;
  HalfSlices(const PagedCache<T>& K, const int64_t* tab, int64_t head, int64_t keys, const int64_t* next_tab,
             int64_t next_head, int64_t next_keys, int64_t D, const void* idle_at)
      : base(K.base), s_block(K.s_block), bs(K.block_size), d(D), next(kDecodeLead),
        runs{{tab, head * K.s_head, (keys + kLanes - 1) / kLanes},
             {next_tab, next_head * K.s_head, next_tab == nullptr ? 0 : (next_keys + kLanes - 1) / kLanes}},
        idle(static_cast<const char*>(idle_at)) {}
  const char* take() {
    int64_t k = next++;
    for (const Run& r : runs) {
      if (k < 2 * r.chunks) {
        const int64_t which = k / r.chunks, key = (k % r.chunks) * kLanes;  // which: 0 keys, 1 values
        const T* run = base + r.table[key / bs] * s_block + r.head_off;
        return reinterpret_cast<const char*>(run + (which * bs + key % bs) * d);
      }
      k -= 2 * r.chunks;
    }
    return idle;
  }
};

// Scores of the R rows at q ([R, D]) against keys c0..c0+15 (kd: [D, 16], row stride ld):
// four FMA chains over d mod 4, summed (c0 + c1) + (c2 + c3), times scale; lanes from
// `keep` on are 0. HP lines hinted per step of 4 d from `hint`.
template <int R, int NV, int HP, typename T>
inline void score_joint(const float* q, const T* kd, int64_t ld, float scale, int keep, float* s, int64_t width,
                        const char* hint) {
  constexpr int D = NV * kLanes;
  V16 a[R][4];
  for (int i = 0; i < R; ++i)
    for (int c = 0; c < 4; ++c) a[i][c] = vzero();
#pragma GCC unroll 32
  for (int d = 0; d < D; d += 4) {
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
      const V16 k = load16(kd + (d + c) * ld);
#pragma GCC unroll 4
      for (int i = 0; i < R; ++i) a[i][c] = vfma(vsplat(q[i * D + d + c]), k, a[i][c]);
    }
#pragma GCC unroll 8
    for (int l = 0; l < HP; ++l) hint_line(hint + (d / 4 * HP + l) * 64);
  }
  for (int i = 0; i < R; ++i) {
    const V16 sc = vmul(vadd(vadd(a[i][0], a[i][1]), vadd(a[i][2], a[i][3])), vsplat(scale));
    vstore(s + i * width, vkeep_first(sc, keep, 0.0f));
  }
}

// o_i = (sum_{j <= pos} p_ij v_j) / den_i for the R rows whose weights start at p (row
// stride width), o rows [R, D]: one FMA chain per row and 16 values of d, j ascending.
// HP lines hinted per key from the half `next` gives for each 16 keys.
template <int R, int NV, int HP, typename T>
inline void values_joint(const float* p, int64_t width, const float* den, const PagedCache<T>& V,
                         const int64_t* table, int64_t head, int64_t pos, float* o, HalfSlices<T>& next) {
  constexpr int D = NV * kLanes;
  V16 acc[R][NV];
  for (int i = 0; i < R; ++i)
    for (int k = 0; k < NV; ++k) acc[i][k] = vzero();
  for (int64_t j0 = 0; j0 <= pos; j0 += kLanes) {  // 16 keys never straddle a block
    const T* vb = V.at(table, j0, head);
    const char* hint = next.take();
    const int64_t n = std::min<int64_t>(kLanes, pos + 1 - j0);
    for (int64_t s = 0; s < n; ++s) {
      const T* v = vb + s * D;
#pragma GCC unroll 8
      for (int k = 0; k < NV; ++k) {
        const V16 vk = load16(v + k * kLanes);
#pragma GCC unroll 4
        for (int i = 0; i < R; ++i) acc[i][k] = vfma(vsplat(p[i * width + j0 + s]), vk, acc[i][k]);
      }
#pragma GCC unroll 8
      for (int l = 0; l < HP; ++l) hint_line(hint + (s * HP + l) * 64);
    }
    for (int64_t l = n * HP; l < kLanes * HP; ++l) hint_line(hint + l * 64);
  }
  for (int i = 0; i < R; ++i) {
    const V16 dv = vsplat(den[i]);
    for (int k = 0; k < NV; ++k) vstore(o + i * D + k * kLanes, vdiv(acc[i][k], dv));
  }
}

// One decode item: the G rows at q ([G, D] fp32) at position pos, into o ([G, D]); rows in
// passes of up to 4 for scores and as many as keep the accumulators in registers for values.
// `next` is the cache of the item this thread runs next, hinted meanwhile.
template <int NV, typename T>
void decode_item(const float* q, float* o, int64_t G, int64_t pos, float scale, const int64_t* table, int64_t head,
                 const PagedCache<T>& K, const PagedCache<T>& V, HalfSlices<T> next, std::vector<float>& scores,
                 std::vector<float>& den) {
  constexpr int D = NV * kLanes, HS = sizeof(T), HV = NV * sizeof(T) / 4;  // half of 16 keys' lines per step
  constexpr int64_t VR = NV <= 4 ? 4 : 2;
  const int64_t width = (pos / kLanes + 1) * kLanes;
  scores.resize(G * width);
  den.resize(G);
  for (int64_t c0 = 0; c0 <= pos; c0 += kLanes) {
    const char* hint = next.take();
    const T* kd = K.at(table, c0, head);
    const int keep = static_cast<int>(std::min<int64_t>(pos + 1 - c0, kLanes));
    for (int64_t r = 0; r < G; r += 4) {
      const float* qr = q + r * D;
      float* s = &scores[r * width + c0];
      switch (std::min<int64_t>(4, G - r)) {
        case 4: score_joint<4, NV, HS>(qr, kd, K.s_d, scale, keep, s, width, hint); break;
        case 3: score_joint<3, NV, HS>(qr, kd, K.s_d, scale, keep, s, width, hint); break;
        case 2: score_joint<2, NV, HS>(qr, kd, K.s_d, scale, keep, s, width, hint); break;
        default: score_joint<1, NV, HS>(qr, kd, K.s_d, scale, keep, s, width, hint); break;
      }
    }
  }
  for (int64_t r = 0; r < G; ++r) softmax_row(&scores[r * width], pos, den[r]);
  for (int64_t r = 0; r < G; r += VR) {
    const float* p = &scores[r * width];
    switch (std::min<int64_t>(VR, G - r)) {
      case 4: values_joint<4, NV, HV>(p, width, &den[r], V, table, head, pos, o + r * D, next); break;
      case 3: values_joint<3, NV, HV>(p, width, &den[r], V, table, head, pos, o + r * D, next); break;
      case 2: values_joint<2, NV, HV>(p, width, &den[r], V, table, head, pos, o + r * D, next); break;
      default: values_joint<1, NV, HV>(p, width, &den[r], V, table, head, pos, o + r * D, next); break;
    }
  }
}
