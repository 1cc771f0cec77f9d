// Paged attention for the CPU engine: one query row at a time, reading keys and values
// straight from the block table (no gather, no padding), every row computed by the same
// fixed sequence of operations. Row r of sequence s sees keys 0..pos_r and nothing else:
//   scores  s_j = (four FMA chains over d mod 4, ascending, summed (c0+c1)+(c2+c3)) * scale
//   softmax m = max_j s_j;  p_j = exp(s_j - m);  den = sum of 16 lane sums (fixed tree)
//   output  o_d = (sum_j p_j v_jd, j ascending, one FMA chain per d) / den
// so a row's bits depend only on its query, its keys and this binary: never on which
// other rows, sequences, chunks or threads share the call (batch invariance by design).
// Keys past a row's position are never multiplied, so stale slots (even NaN) are inert.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "vec16.h"

namespace {

// A view of one KV cache, [num_blocks, block_size, Hkv, D] with any strides.
template <typename T>
struct PagedCache {
  const T* base;
  int64_t s_block, s_slot, s_head, s_d;
  int64_t block_size;
  const T* at(const int64_t* table, int64_t j, int64_t head) const {
    return base + table[j / block_size] * s_block + (j % block_size) * s_slot + head * s_head;
  }
  // Keys stored d-major, 16 to a chunk within one block: a chunk is D rows of 16 in place.
  bool d_major() const { return s_slot == 1 && block_size % kLanes == 0; }
  // Hint into L2 the D elements of keys c0..min(c0 + 15, last) of one head: D rows of 16
  // when stored d-major (a chunk never straddles blocks there), else a row per key.
  void prefetch_chunk(const int64_t* table, int64_t c0, int64_t last, int64_t head, int64_t D) const {
    constexpr int64_t kLine = 64 / sizeof(T);
    if (c0 > last) return;
    if (d_major()) {
      const T* p = at(table, c0, head);
      for (int64_t d = 0; d < D; ++d) __builtin_prefetch(p + d * s_d, 0, 2);
    } else if (s_d == 1) {
      for (int64_t j = c0; j <= std::min(last, c0 + kLanes - 1); ++j)
        for (int64_t e = 0; e < D; e += kLine) __builtin_prefetch(at(table, j, head) + e, 0, 2);
    }
  }
};

// One unit of work: query tokens [t0, t1) of sequence seq, the G heads of one KV head.
struct Item {
  int64_t seq, kv_head, t0, t1;
};

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

  int64_t row_token(const Item& it, int64_t r) const { return P.qsl[it.seq] + it.t0 + r / P.group; }
  int64_t row_head(const Item& it, int64_t r) const { return it.kv_head * P.group + r % P.group; }

  void run(const Item& it) {
    const int64_t q_len = P.qsl[it.seq + 1] - P.qsl[it.seq];
    const int64_t first_pos = P.lens[it.seq] - q_len + it.t0;  // position of the item's token 0
    const int64_t rows = (it.t1 - it.t0) * P.group;
    const int64_t last = first_pos + (it.t1 - it.t0) - 1;      // the furthest key any row sees
    const int64_t width = (last / kLanes + 1) * kLanes;
    const int64_t* table = P.tables + it.seq * P.table_width;
    scores.resize(rows * width);
    den.resize(rows);
    score_rows(it, rows, first_pos, last, table, width);
    for (int64_t r = 0; r < rows; ++r) softmax_row(&scores[r * width], first_pos + r / P.group, den[r]);
    // The G rows of one token share its keys: up to 4 at a time share each value load.
    for (int64_t r = 0; r < rows;) {
      const int64_t n = std::min<int64_t>(kValueRows, P.group - r % P.group);
      const int64_t pos = first_pos + r / P.group;
      switch (n) {
        case 4: weigh_values<4>(it, r, width, pos, table); break;
        case 3: weigh_values<3>(it, r, width, pos, table); break;
        case 2: weigh_values<2>(it, r, width, pos, table); break;
        default: weigh_values<1>(it, r, width, pos, table); break;
      }
      r += n;
    }
  }

  // Scores, 16 keys at a time from the chunk's keys as [D, 16]: the cache's own layout
  // when it stores keys d-major, else a transposed copy.
  void score_rows(const Item& it, int64_t rows, int64_t first_pos, int64_t last, const int64_t* table,
                  int64_t width) {
    const int64_t D = P.head_dim;
    const bool direct = K.d_major();
    for (int64_t c0 = 0; c0 <= last; c0 += kLanes) {
      const int64_t n = std::min<int64_t>(kLanes, last + 1 - c0);
      // Into L2 while this chunk's scores compute: its values (the values pass reads them
      // next) and the keys two chunks on. Streaming one 4 KB block at a time, each block
      // restarts the hardware prefetcher and memory sits idle (decode, 64 sequences x 445
      // keys, 30 layers: 76-94 -> 74-86 ms).
      V.prefetch_chunk(table, c0, last, it.kv_head, D);
      K.prefetch_chunk(table, c0 + 2 * kLanes, last, it.kv_head, D);
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
      // Rows are in token order, so the rows whose keys reach this chunk are a suffix.
      // Up to four at a time share each key load (a decode's G rows in one pass); a
      // row's own operations are the same however many share the pass.
      int64_t r = 0;
      while (r < rows && first_pos + r / P.group < c0) ++r;
      for (; r + 3 < rows; r += 4) score_chunk<4>(it, r, kd, ld, first_pos, c0, width);
      switch (rows - r) {
        case 3: score_chunk<3>(it, r, kd, ld, first_pos, c0, width); break;
        case 2: score_chunk<2>(it, r, kd, ld, first_pos, c0, width); break;
        case 1: score_chunk<1>(it, r, kd, ld, first_pos, c0, width); break;
        default: break;
      }
    }
  }

  // Scores of rows r..r+R-1 against one chunk: per row and key lane, four FMA chains over
  // d mod 4 (ascending), summed as (c0 + c1) + (c2 + c3), times scale.
  template <int R>
  void score_chunk(const Item& it, int64_t r, const T* kd, int64_t ld, int64_t first_pos, int64_t c0,
                   int64_t width) {
    const int64_t D = P.head_dim;
    const float* q[R];
    V16 a[R][4];
    for (int i = 0; i < R; ++i) {
      q[i] = P.q + (row_token(it, r + i) * P.num_heads + row_head(it, r + i)) * D;
      for (int c = 0; c < 4; ++c) a[i][c] = vzero();
    }
    for (int64_t d = 0; d < D; d += 4)
      for (int c = 0; c < 4; ++c) {
        const V16 k = load16(kd + (d + c) * ld);
        for (int i = 0; i < R; ++i) a[i][c] = vfma(vsplat(q[i][d + c]), k, a[i][c]);
      }
    for (int i = 0; i < R; ++i) {
      const int64_t p = first_pos + (r + i) / P.group;
      V16 s = vmul(vadd(vadd(a[i][0], a[i][1]), vadd(a[i][2], a[i][3])), vsplat(P.scale));
      // Lanes past the row's position may hold stale (even NaN) keys: dropped by a select.
      vstore(&scores[(r + i) * width + c0], vkeep_first(s, static_cast<int>(p + 1 - c0), 0.0f));
    }
  }

  // In place: s[0..pos] -> exp(s - max); den = the sum (16 lane sums, then a fixed tree).
  static void softmax_row(float* s, int64_t pos, float& den) {
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

  // Rows r..r+R-1 (one token: the same pos): o = (sum_{j <= pos} p_j v_j) / den, one FMA
  // chain per row and 16 values of d, j ascending.
  static constexpr int kMaxNV = NV > 0 ? NV : 16;
  static constexpr int kValueRows = NV > 0 && NV <= 4 ? 4 : 1;  // accumulators fit registers
  template <int R>
  void weigh_values(const Item& it, int64_t r, int64_t width, int64_t pos, const int64_t* table) {
    const int nv = NV > 0 ? NV : static_cast<int>(P.head_dim / kLanes);
    V16 acc[R][kMaxNV];
    for (int i = 0; i < R; ++i)
      for (int k = 0; k < nv; ++k) acc[i][k] = vzero();
    const float* p = &scores[r * width];
    for (int64_t j = 0; j <= pos; ++j) {
      const T* v = V.at(table, j, it.kv_head);
      for (int k = 0; k < nv; ++k) {
        const V16 vk = load16(v + k * kLanes);
        for (int i = 0; i < R; ++i) acc[i][k] = vfma(vsplat(p[i * width + j]), vk, acc[i][k]);
      }
    }
    for (int i = 0; i < R; ++i) {
      float* o = P.out + (row_token(it, r + i) * P.num_heads + row_head(it, r + i)) * P.head_dim;
      const V16 dv = vsplat(den[r + i]);
      for (int k = 0; k < nv; ++k) vstore(o + k * kLanes, vdiv(acc[i][k], dv));
    }
  }
};

template <typename T, int NV>
void run_items(const Problem& P, const PagedCache<T>& K, const PagedCache<T>& V, const std::vector<Item>& items) {
  std::atomic<int64_t> next{0};
  const int64_t n = static_cast<int64_t>(items.size());
  // Dynamic scheduling over the items (largest first): which thread runs an item never
  // changes what the item computes.
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t begin, int64_t end) {
    Worker<T, NV> w{P, K, V, {}, {}, {}};
    for (int64_t t = begin; t < end; ++t)
      for (int64_t i = next++; i < n; i = next++) w.run(items[i]);
  });
}

template <typename T>
void run_all(const Problem& P, const at::Tensor& k_cache, const at::Tensor& v_cache, const std::vector<Item>& items) {
  auto view = [](const at::Tensor& c) {
    return PagedCache<T>{c.data_ptr<T>(), c.stride(0), c.stride(1), c.stride(2), c.stride(3), c.size(1)};
  };
  const PagedCache<T> K = view(k_cache), V = view(v_cache);
  switch (P.head_dim / kLanes) {  // the same per-lane ops either way: only speed differs
    case 4: return run_items<T, 4>(P, K, V, items);
    case 8: return run_items<T, 8>(P, K, V, items);
    default: return run_items<T, 0>(P, K, V, items);
  }
}

// Query tiles of a bounded number of rows, so that a long chunk spreads over threads
// and each key chunk, once transposed, serves many rows.
std::vector<Item> make_items(const int64_t* qsl, int64_t num_seqs, int64_t num_kv_heads, int64_t group,
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

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& query_start_loc, const at::Tensor& seq_lens,
                           const at::Tensor& block_tables, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous(), "q must be contiguous fp32 [T, Hq, D]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(), "k_cache and v_cache must be [NB, BS, Hkv, D]");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "k_cache and v_cache dtypes differ");
  TORCH_CHECK(v_cache.stride(3) == 1, "v_cache head_dim must be contiguous");
  const int64_t num_heads = q.size(1), head_dim = q.size(2), num_kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == head_dim && head_dim % kLanes == 0, "head_dim must match and be a multiple of 16");
  TORCH_CHECK(num_heads % num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads");
  for (const auto* t : {&query_start_loc, &seq_lens, &block_tables})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(), "metadata must be contiguous int64");
  const int64_t num_seqs = seq_lens.size(0);
  TORCH_CHECK(query_start_loc.size(0) == num_seqs + 1 && block_tables.size(0) == num_seqs, "metadata sizes differ");
  at::Tensor out = at::empty_like(q);
  const int64_t* qsl = query_start_loc.data_ptr<int64_t>();
  Problem P{q.data_ptr<float>(), out.data_ptr<float>(), qsl, seq_lens.data_ptr<int64_t>(),
            block_tables.data_ptr<int64_t>(), block_tables.size(1), num_heads, num_heads / num_kv_heads,
            head_dim, static_cast<float>(scale)};
  const auto items = make_items(qsl, num_seqs, num_kv_heads, P.group, P.lens);
  if (k_cache.scalar_type() == at::kFloat) {
    run_all<float>(P, k_cache, v_cache, items);
  } else {
    TORCH_CHECK(k_cache.scalar_type() == at::kBFloat16, "cache must be float32 or bfloat16");
    run_all<c10::BFloat16>(P, k_cache, v_cache, items);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(asyncengine_cpu, m) {
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor query_start_loc, "
        "Tensor seq_lens, Tensor block_tables, float scale) -> Tensor",
        &paged_attention);
}
