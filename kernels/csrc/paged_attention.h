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
      for (int64_t d = 0; d < D; ++d) lines.add(p + d * s_d);
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
    const T* row = at(table, j, head);
    for (int64_t e = 0; e < D; e += kLine) lines.add(row + e);
  }
};

// Cache lines to hint into L2, issued a few at a time between FMAs: a burst of a hundred
// prefetches fills the core's miss buffers and stalls the arithmetic behind it, so fetch
// and compute would take turns instead of overlapping.
struct LineQueue {
  static constexpr int kMax = 512;
  const char* line[kMax];
  int n = 0, next = 0, pace = 0;
  void clear() { n = next = 0; }
  void add(const void* p) {  // skipped when it repeats the last line, or when full
    const auto* c = static_cast<const char*>(p);
    if (n < kMax && (n == 0 || (reinterpret_cast<uintptr_t>(c) >> 6) != (reinterpret_cast<uintptr_t>(line[n - 1]) >> 6)))
      line[n++] = c;
  }
  void pace_over(int64_t steps) { pace = static_cast<int>((n + steps - 1) / std::max<int64_t>(steps, 1)); }
  void step() {  // the next `pace` lines
    for (const int upto = std::min(n, next + pace); next < upto; ++next) __builtin_prefetch(line[next], 0, 2);
  }
  void all() { pace = n; step(); }
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
