// The work of the CPU paged attention (paged_attention_cpu.cpp, whose header states the
// operations every row runs): the problem's pointers, and the worker that runs one item
// (a tile of query tokens x the G heads of one KV head) at a time: scores chunk by chunk
// (two chunks at a time where rows reach both, paged_pairs.h), the softmax, then the
// values pass token by token (two tokens at a time where they fit), with the next keys
// and values hinted into L2 as it goes; decode items on new_kv_cache's layout go to
// paged_decode.h. Which path or pairing runs never changes a row's operations.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "paged_attention.h"
#include "paged_decode.h"
#include "paged_pairs.h"
#include "vec16.h"

// Internal linkage, as when this lived in the .cpp (its one includer): at global scope the
// same code ran bf16 prefill attention ~8% slower (bench/kernels.py --prefill-attention,
// 4 x 512 tokens: 3.91-3.97 vs 3.55-3.79 ms), by how GCC compiled it.
namespace {

struct Problem {
  const float* q;        // [T, Hq, D] fp32, contiguous
  float* out;            // [T, Hq, D] fp32, contiguous
  const int64_t* qsl;    // [S + 1]
  const int64_t* lens;   // [S]
  const int64_t* tables; // [S, W]
  int64_t table_width, num_heads, group, head_dim;
  float scale;
};

// NV = head_dim / 16 when known at compile time (accumulators in registers), 0 = any.
template <typename T, int NV>
struct Worker {
  const Problem& P;
  const PagedCache<T>& K;
  const PagedCache<T>& V;
  std::vector<T> kt;            // [D, 16] keys of one chunk, transposed (slow layouts only)
  std::vector<float> scores;    // [rows, width]
  std::vector<float> den;       // [rows]
  LineQueue ahead;              // cache lines to fetch while computing
  bool joint = false;           // the caches are in new_kv_cache's layout: decode items go to paged_decode.h
  static constexpr int64_t kKeysAhead = 2 * kLanes;
  // How far ahead the values pass fetches: kKeysAhead rounded up to whole blocks.
  int64_t values_ahead() const { return (kKeysAhead + V.block_size - 1) / V.block_size * V.block_size; }

  int64_t row_token(const Item& it, int64_t r) const { return P.qsl[it.seq] + it.t0 + r / P.group; }
  int64_t row_head(const Item& it, int64_t r) const { return it.kv_head * P.group + r % P.group; }

  int64_t first_pos(const Item& it) const {  // position of the item's token 0
    return P.lens[it.seq] - (P.qsl[it.seq + 1] - P.qsl[it.seq]) + it.t0;
  }
  int64_t last_key(const Item& it) const { return first_pos(it) + (it.t1 - it.t0) - 1; }
  const int64_t* table_of(const Item& it) const { return P.tables + it.seq * P.table_width; }

  // Memory is kept busy all along: the scores pass fetches keys kKeysAhead on (and the
  // first values), the values pass fetches values kKeysAhead on and the first keys of
  // `next` (the item this thread runs next, or null).
  void run(const Item& it, const Item* next) {
    if (NV > 0 && joint && it.t1 - it.t0 == 1) return run_decode(it, next);
    const int64_t first_pos = this->first_pos(it);
    const int64_t rows = (it.t1 - it.t0) * P.group;
    const int64_t last = last_key(it);  // the furthest key any row sees
    const int64_t width = (last / kLanes + 1) * kLanes;
    const int64_t* table = table_of(it);
    scores.resize(rows * width);
    den.resize(rows);
    score_rows(it, rows, first_pos, last, table, width);
    for (int64_t r = 0; r < rows; ++r) softmax_row(&scores[r * width], first_pos + r / P.group, den[r]);
    ahead.clear();
    if (next != nullptr)
      for (int64_t c0 = 0; c0 < kKeysAhead; c0 += kLanes)
        K.chunk_lines(table_of(*next), c0, last_key(*next), next->kv_head, P.head_dim, ahead);
    ahead.pace_over(first_pos + 1);  // over the first values pass
    // The G rows of one token share its keys: up to 4 at a time share each value load;
    // after the first token, two tokens' rows at a time where they fit (weigh_pair).
    const bool pairs = NV > 0 && NV <= 4 && P.group <= 3;
    for (int64_t r = 0; r < rows;) {
      const int64_t n = std::min<int64_t>(kValueRows, P.group - r % P.group);
      const int64_t pos = first_pos + r / P.group;
      if (pairs && r > 0 && r % P.group == 0 && r + 2 * P.group <= rows) {
        weigh_pair(it, r, width, pos, table);
        r += 2 * P.group;
        continue;
      }
      if (r == 0) {
        weigh_values_n<true>(n, it, r, width, pos, table);
      } else {
        weigh_values_n<false>(n, it, r, width, pos, table);
      }
      r += n;
    }
    ahead.all();
  }

  void run_decode(const Item& it, const Item* next) {
    const int64_t row0 = (row_token(it, 0) * P.num_heads + row_head(it, 0)) * P.head_dim;  // its G rows follow
    const int64_t* table = table_of(it);
    HalfSlices<T> ahead_runs(K, table, it.kv_head, last_key(it) + 1, next != nullptr ? table_of(*next) : nullptr,
                             next != nullptr ? next->kv_head : 0, next != nullptr ? last_key(*next) + 1 : 0,
                             P.head_dim, K.at(table, 0, it.kv_head));
    decode_item<NV>(P.q + row0, P.out + row0, P.group, first_pos(it), P.scale, table, it.kv_head, K, V, ahead_runs,
                    scores, den);
  }

  // Scores, 16 keys at a time from the chunk's keys as [D, 16]: the cache's own layout
  // when it stores keys d-major, else a transposed copy.
  void score_rows(const Item& it, int64_t rows, int64_t first_pos, int64_t last, const int64_t* table,
                  int64_t width) {
    const int64_t D = P.head_dim;
    const bool direct = K.d_major();
    for (int64_t c0 = 0; c0 <= last; c0 += kLanes) {
      if (direct && c0 + kLanes <= last && rows - first_row(first_pos, rows, c0 + kLanes) > 4) {
        score_pair(it, rows, first_pos, last, table, width, c0);
        c0 += kLanes;
        continue;
      }
      const int64_t n = std::min<int64_t>(kLanes, last + 1 - c0);
      // Into L2, spread over this chunk's FMAs: the keys kKeysAhead on. The cache is read
      // one scattered 4 KB block at a time, and each block restarts the hardware
      // prefetcher, so without hints memory sits idle between blocks.
      ahead.clear();
      K.chunk_lines(table, c0 + kKeysAhead, last, it.kv_head, D, ahead);
      if (c0 < values_ahead())  // and the values the values pass starts with
        for (int64_t j = c0; j <= std::min(last, c0 + kLanes - 1); ++j) V.row_lines(table, j, it.kv_head, D, ahead);
      ahead.pace_over(D / 4);
      const T* kd;
      int64_t ld;
      if (direct) {
        kd = K.at(table, c0, it.kv_head);
        ld = K.s_d;
      } else {
        kt.assign(D * kLanes, T(0));
        for (int64_t j = 0; j < n; ++j) {
          const T* k = K.at(table, c0 + j, it.kv_head);
          for (int64_t d = 0; d < D; ++d) kt[d * kLanes + j] = k[d * K.s_d];
        }
        kd = kt.data();
        ld = kLanes;
      }
      const int64_t r = first_row(first_pos, rows, c0);
      // One pass (a decode's rows) spreads the fetches over its FMAs; behind several
      // passes (prefill) one burst hides.
      if (rows - r <= 4) {
        score_passes<true>(it, r, rows, kd, ld, first_pos, c0, width);
      } else {
        ahead.all();
        score_passes<false>(it, r, rows, kd, ld, first_pos, c0, width);
      }
      ahead.all();
    }
  }

  // Rows are in token order, so the rows whose keys reach key c are a suffix: its first.
  int64_t first_row(int64_t first_pos, int64_t rows, int64_t c) const {
    int64_t r = 0;
    while (r < rows && first_pos + r / P.group < c) ++r;
    return r;
  }

  // Chunks c0 and c0 + 16 of a prefill item on the cache's own layout: rows that reach
  // only the first take it alone, the rest take both in passes of up to 3 (score_chunk2).
  // The keys 2 chunks on are hinted in one burst, as for several passes of one chunk.
  void score_pair(const Item& it, int64_t rows, int64_t first_pos, int64_t last, const int64_t* table,
                  int64_t width, int64_t c0) {
    const int64_t D = P.head_dim, c1 = c0 + kLanes;
    ahead.clear();
    K.chunk_lines(table, c0 + kKeysAhead, last, it.kv_head, D, ahead);
    K.chunk_lines(table, c1 + kKeysAhead, last, it.kv_head, D, ahead);
    for (int64_t j = c0; j <= std::min(last, c1 + kLanes - 1) && j < values_ahead(); ++j)
      V.row_lines(table, j, it.kv_head, D, ahead);
    ahead.all();
    const T* kd0 = K.at(table, c0, it.kv_head);
    const T* kd1 = K.at(table, c1, it.kv_head);
    const int64_t r1 = first_row(first_pos, rows, c1);
    score_passes<false>(it, first_row(first_pos, rows, c0), r1, kd0, K.s_d, first_pos, c0, width);
    int64_t r = r1;
    for (; r + 2 < rows; r += 3) score_chunk2<3>(it, r, kd0, kd1, first_pos, c0, width);
    switch (rows - r) {
      case 2: return score_chunk2<2>(it, r, kd0, kd1, first_pos, c0, width);
      case 1: return score_chunk2<1>(it, r, kd0, kd1, first_pos, c0, width);
      default: return;
    }
  }

  // Rows r..r+R-1, which reach chunk c0 + 16, against chunks c0 and c0 + 16 (paged_pairs.h).
  template <int R>
  void score_chunk2(const Item& it, int64_t r, const T* kd0, const T* kd1, int64_t first_pos, int64_t c0,
                    int64_t width) {
    const float* q[R];
    float* s[R];
    int keep1[R];
    for (int i = 0; i < R; ++i) {
      q[i] = P.q + (row_token(it, r + i) * P.num_heads + row_head(it, r + i)) * P.head_dim;
      s[i] = &scores[(r + i) * width + c0];
      keep1[i] = static_cast<int>(first_pos + (r + i) / P.group + 1 - c0 - kLanes);
    }
    score_two_chunks<R>(q, kd0, kd1, P.head_dim, K.s_d, P.scale, keep1, s);
  }

  // Rows r..rows-1 against one chunk, up to four at a time sharing each key load; a row's
  // own operations are the same however many share the pass.
  template <bool Paced>
  void score_passes(const Item& it, int64_t r, int64_t rows, const T* kd, int64_t ld, int64_t first_pos,
                    int64_t c0, int64_t width) {
    for (; r + 3 < rows; r += 4) score_chunk<4, Paced>(it, r, kd, ld, first_pos, c0, width);
    switch (rows - r) {
      case 3: return score_chunk<3, Paced>(it, r, kd, ld, first_pos, c0, width);
      case 2: return score_chunk<2, Paced>(it, r, kd, ld, first_pos, c0, width);
      case 1: return score_chunk<1, Paced>(it, r, kd, ld, first_pos, c0, width);
      default: return;
    }
  }

  // Scores of rows r..r+R-1 against one chunk: per row and key lane, four FMA chains over
  // d mod 4 (ascending), summed as (c0 + c1) + (c2 + c3), times scale.
  template <int R, bool Paced>
  void score_chunk(const Item& it, int64_t r, const T* kd, int64_t ld, int64_t first_pos, int64_t c0,
                   int64_t width) {
    const int64_t D = P.head_dim;
    const float* q[R];
    V16 a[R][4];
    for (int i = 0; i < R; ++i) {
      q[i] = P.q + (row_token(it, r + i) * P.num_heads + row_head(it, r + i)) * D;
      for (int c = 0; c < 4; ++c) a[i][c] = vzero();
    }
    for (int64_t d = 0; d < D; d += 4) {
      for (int c = 0; c < 4; ++c) {
        const V16 k = load16(kd + (d + c) * ld);
        for (int i = 0; i < R; ++i) a[i][c] = vfma(vsplat(q[i][d + c]), k, a[i][c]);
      }
      if (Paced) ahead.step();
    }
    for (int i = 0; i < R; ++i) {
      const int64_t p = first_pos + (r + i) / P.group;
      V16 s = vmul(vadd(vadd(a[i][0], a[i][1]), vadd(a[i][2], a[i][3])), vsplat(P.scale));
      // Lanes past the row's position may hold stale (even NaN) keys: dropped by a select.
      vstore(&scores[(r + i) * width + c0], vkeep_first(s, static_cast<int>(p + 1 - c0), 0.0f));
    }
  }

  // Rows r..r+R-1 (one token: the same pos): o = (sum_{j <= pos} p_j v_j) / den, one FMA
  // chain per row and 16 values of d, j ascending.
  static constexpr int kMaxNV = NV > 0 ? NV : 16;
  static constexpr int kValueRows = NV > 0 && NV <= 4 ? 4 : 1;  // accumulators fit registers
  template <bool Lead>
  void weigh_values_n(int64_t n, const Item& it, int64_t r, int64_t width, int64_t pos, const int64_t* table) {
    switch (n) {
      case 4: return weigh_values<4, Lead>(it, r, width, pos, table);
      case 3: return weigh_values<3, Lead>(it, r, width, pos, table);
      case 2: return weigh_values<2, Lead>(it, r, width, pos, table);
      default: return weigh_values<1, Lead>(it, r, width, pos, table);
    }
  }

  // The rows of two consecutive tokens from row r (the first at position pos): every key
  // up to pos for all of them, then key pos + 1 for the second token's rows alone, so each
  // row's chain is the one weigh_values runs (j ascending) and each value load serves 2G rows.
  void weigh_pair(const Item& it, int64_t r, int64_t width, int64_t pos, const int64_t* table) {
    if constexpr (NV > 0 && NV <= 4) {  // 2G x NV accumulators in registers (G <= 3)
      switch (P.group) {
        case 3: return weigh_values2<6>(it, r, width, pos, table);
        case 2: return weigh_values2<4>(it, r, width, pos, table);
        default: return weigh_values2<2>(it, r, width, pos, table);
      }
    }
  }

  template <int R>
  void weigh_values2(const Item& it, int64_t r, int64_t width, int64_t pos, const int64_t* table) {
    float* o[R];
    for (int i = 0; i < R; ++i) o[i] = P.out + (row_token(it, r + i) * P.num_heads + row_head(it, r + i)) * P.head_dim;
    values_two_tokens<R, NV>(&scores[r * width], width, &den[r], V, table, it.kv_head, pos, o);
  }

  // Lead: the item's first values pass (its earliest token), which also fetches ahead.
  template <int R, bool Lead>
  void weigh_values(const Item& it, int64_t r, int64_t width, int64_t pos, const int64_t* table) {
    const int nv = NV > 0 ? NV : static_cast<int>(P.head_dim / kLanes);
    V16 acc[R][kMaxNV];
    for (int i = 0; i < R; ++i)
      for (int k = 0; k < nv; ++k) acc[i][k] = vzero();
    const float* p = &scores[r * width];
    const int64_t bs = V.block_size, dist = values_ahead();
    for (int64_t j0 = 0; j0 <= pos; j0 += bs) {  // a block at a time: one table lookup each
      const T* vb = V.at(table, j0, it.kv_head);
      const T* fb = Lead && j0 + dist <= pos ? V.at(table, j0 + dist, it.kv_head) : nullptr;
      const int64_t n = std::min(bs, pos + 1 - j0);
      for (int64_t s = 0; s < n; ++s) {
        // Into L2, a key at a time: the values `dist` keys on and a share of `ahead` (the
        // lead pass only: later passes of a prefill item re-read cached values).
        if (Lead) {
          if (fb != nullptr && j0 + dist + s <= pos) V.prefetch_row(fb + s * V.s_slot, P.head_dim);
          ahead.step();
        }
        const T* v = vb + s * V.s_slot;
        for (int k = 0; k < nv; ++k) {
          const V16 vk = load16(v + k * kLanes);
          for (int i = 0; i < R; ++i) acc[i][k] = vfma(vsplat(p[i * width + j0 + s]), vk, acc[i][k]);
        }
      }
    }
    for (int i = 0; i < R; ++i) {
      float* o = P.out + (row_token(it, r + i) * P.num_heads + row_head(it, r + i)) * P.head_dim;
      const V16 dv = vsplat(den[r + i]);
      for (int k = 0; k < nv; ++k) vstore(o + k * kLanes, vdiv(acc[i][k], dv));
    }
  }
};

}  // namespace
