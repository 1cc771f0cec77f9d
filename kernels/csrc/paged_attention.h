// Pieces of the CPU paged attention (paged_attention_cpu.cpp): the KV cache as it reads
// it, the queue of cache-line hints it issues ahead of its reads (hints only: they never
// change what is computed), and its work items.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "vec16.h"

// A view of one KV cache, [num_blocks, block_size, Hkv, D] with any strides.
template <typename T>
struct PagedCache {
  const T* base;
  int64_t s_block, s_slot, s_head, s_d;
  int64_t block_size;
  static constexpr int64_t kLine = 64 / static_cast<int64_t>(sizeof(T));  // elements per cache line
  const T* at(const int64_t* table, int64_t j, int64_t head) const {
    return base + table[j / block_size] * s_block + (j % block_size) * s_slot + head * s_head;
  }
  // Keys stored d-major, 16 to a chunk within one block: a chunk is D rows of 16 in place.
  bool d_major() const { return s_slot == 1 && block_size % kLanes == 0; }
  // Collect the cache lines of keys c0..min(c0 + 15, last) of one head: D rows of 16
  // when stored d-major (a chunk never straddles blocks there), else a row per key.
  template <typename L>
  void chunk_lines(const int64_t* table, int64_t c0, int64_t last, int64_t head, int64_t D, L& lines) const {
    if (c0 > last) return;
    if (d_major()) {
      const T* p = at(table, c0, head);
      // Rows of 16 back to back (the engine's block of 16): one span, not D merged ones.
      if (s_d == kLanes) return lines.add_span(p, D * kLanes * static_cast<int64_t>(sizeof(T)));
      for (int64_t d = 0; d < D; ++d) lines.add_span(p + d * s_d, kLanes * static_cast<int64_t>(sizeof(T)));
    } else {
      for (int64_t j = c0; j <= std::min(last, c0 + kLanes - 1); ++j) row_lines(table, j, head, D, lines);
    }
  }
  // Hint one key's D contiguous elements (s_d == 1) into L2.
  void prefetch_row(const T* row, int64_t D) const {
    for (int64_t e = 0; e < D; e += kLine) __builtin_prefetch(row + e, 0, 2);
  }
  // Collect the cache lines of one key's D elements (contiguous when s_d == 1).
  template <typename L>
  void row_lines(const int64_t* table, int64_t j, int64_t head, int64_t D, L& lines) const {
    if (s_d != 1) return;
    lines.add_span(at(table, j, head), D * static_cast<int64_t>(sizeof(T)));
  }
};

// Cache lines to hint into L2, issued a few at a time between FMAs: a burst of a hundred
// prefetches fills the core's miss buffers and stalls the arithmetic behind it, so fetch
// and compute would take turns instead of overlapping. Held as spans of whole lines (a
// chunk of keys, a key's values): adding one is a store, not a store per line.
struct LineQueue {
  static constexpr int kMax = 64;  // spans; past it further adds are dropped (hints only)
  uintptr_t first[kMax];           // line numbers (address / 64)
  int count[kMax];
  int n = 0, cur = 0, off = 0, lines = 0, pace = 0;
  void clear() { n = cur = off = lines = 0; }
  // Every line of [p, p + bytes): the first skipped when it repeats the last line added,
  // and the span merged into the last one when it continues it.
  void add_span(const void* p, int64_t bytes) {
    uintptr_t l = reinterpret_cast<uintptr_t>(p) >> 6;
    const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + bytes + 63) >> 6;
    const uintptr_t last_end = n > 0 ? first[n - 1] + count[n - 1] : 0;
    if (n > 0 && l + 1 == last_end) ++l;
    if (l >= end) return;
    if (n > 0 && l == last_end) {
      count[n - 1] += static_cast<int>(end - l);
    } else if (n < kMax) {
      first[n] = l;
      count[n++] = static_cast<int>(end - l);
    } else {
      return;
    }
    lines += static_cast<int>(end - l);
  }
  void pace_over(int64_t steps) { pace = static_cast<int>((lines + steps - 1) / std::max<int64_t>(steps, 1)); }
  void step() {  // the next `pace` lines
    for (int k = 0; k < pace && cur < n; ++k) {
      __builtin_prefetch(reinterpret_cast<const char*>((first[cur] + off) << 6), 0, 2);
      if (++off == count[cur]) off = 0, ++cur;
    }
  }
  void all() { pace = lines; step(); }
};

// One unit of work: query tokens [t0, t1) of sequence seq, the G heads of one KV head.
struct Item {
  int64_t seq, kv_head, t0, t1;
};

// Query tiles of a bounded number of rows, so that a long chunk spreads over threads
// and each key chunk, once transposed, serves many rows.
inline std::vector<Item> make_items(const int64_t* qsl, int64_t num_seqs, int64_t num_kv_heads, int64_t group,
                             const int64_t* lens) {
  const int64_t tile = std::max<int64_t>(1, 48 / group);
  std::vector<std::pair<int64_t, Item>> costed;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t q_len = qsl[s + 1] - qsl[s];
    for (int64_t t0 = 0; t0 < q_len; t0 += tile) {
      const int64_t t1 = std::min(q_len, t0 + tile);
      const int64_t cost = (t1 - t0) * (lens[s] - q_len + t1);
      for (int64_t h = 0; h < num_kv_heads; ++h) costed.push_back({cost, Item{s, h, t0, t1}});
    }
  }
  std::stable_sort(costed.begin(), costed.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  std::vector<Item> items;
  items.reserve(costed.size());
  for (auto& c : costed) items.push_back(c.second);
  return items;
}
