// Paged attention for the CPU engine: one query row at a time, reading keys and values
// straight from the block table (no gather, no padding), every row computed by the same
// fixed sequence of operations. Row r of sequence s sees keys 0..pos_r and nothing else:
//   scores  s_j = (four FMA chains over d mod 4, ascending, summed (c0+c1)+(c2+c3)) * scale
//   softmax m = max_j s_j;  p_j = exp(s_j - m);  den = sum of 16 lane sums (fixed tree)
//   output  o_d = (sum_j p_j v_jd, j ascending, one FMA chain per d) / den
// so a row's bits depend only on its query, its keys and this binary: never on which
// other rows, sequences, chunks or threads share the call (batch invariance by design).
// Keys past a row's position are never multiplied, so stale slots (even NaN) are inert.
// Single-token items on new_kv_cache's layout (every decode) run paged_decode.h: the same
// operations per row, laid out for that layout alone. Prefill items share loads between
// two key chunks and two tokens where they fit (paged_pairs.h), again the same per row.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <vector>

#include "paged_attention.h"
#include "paged_worker.h"
#include "vec16.h"

namespace {

template <typename T, int NV>
void run_items(const Problem& P, const PagedCache<T>& K, const PagedCache<T>& V, const std::vector<Item>& items) {
  std::atomic<int64_t> next{0};
  const int64_t n = static_cast<int64_t>(items.size());
  // Dynamic scheduling over the items (largest first): which thread runs an item never
  // changes what the item computes.
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t begin, int64_t end) {
    Worker<T, NV> w{P, K, V};
    w.joint = joint_layout(K, V, P.head_dim);
    for (int64_t t = begin; t < end; ++t) {
      // Claim the next item before running this one, so its first keys are fetched ahead.
      for (int64_t i = next++; i < n;) {
        const int64_t following = next++;
        w.run(items[i], following < n ? &items[following] : nullptr);
        i = following;
      }
    }
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
