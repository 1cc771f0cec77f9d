// fp32 linear layer y = x @ W^T (+ b) that is batch-invariant by construction: every
// output element is the same fixed sequence of operations, whatever the batch: one FMA
// chain per block of 64 k (ascending, from +0), the blocks' chains added in k order from
// +0, then the bias add. Blocking (rows per register tile, columns per tile, tasks per
// thread) only decides which elements are computed together, never the operations of one
// element, so a row's bits do not depend on how many rows share the call, where it sits,
// or the threads. (BLAS libraries pick kernels and K splits by the row count; this is why
// the engine's deterministic mode otherwise runs them in fixed-size row tiles.)
//
// Why blocks of k: one chain over all of K (what this kernel did before) rounds ~3x worse
// than a BLAS sgemm at K = 576..1536, and through SmolLM2's 30 layers that made our
// logprobs 2-4x farther from the float64 forward than HF's fp32 ones (max |d logprob|
// 4.7e-5 vs 1.7e-5 on 16 rollouts; blocked: 1.0e-5, mean 4.3e-6 -> 1.4e-6), enough to
// break the zero-LR control's 1e-4 on one step in twenty. The sums cost no measurable time
// (bench/gemm.py, AMD EPYC, 2 threads, best of 2: 64 rows 379 -> 405 GFLOP/s, 512 rows
// 380 -> 382; this machine's noise is +-10%).
//
// The weight is packed once, in groups of up to 3 panels of 16 columns (48 columns, one
// register tile's): a group's storage is [K, J * 16] for its J panels, so a tile reads its
// weights as one sequential stream, every byte of each k's 192 B. (Groups were 6 panels,
// [K, 96], with two tiles each reading every other 192 B: the tile ran 10-20% slower
// once its weights came from memory. Measured on an AMD EPYC Zen 5, one thread, 60
// distinct packings of each of SmolLM2's shapes vs one reused, in huge pages, best of 5:
// 32 rows 193-221 -> 232-251 GFLOP/s from memory (hot 227-247 -> 243-257), 64 rows
// 221-231 -> 238-249, 8 rows 96-105 -> 118-136; 512 rows and 1-4 rows, bound by
// arithmetic or by the read rate, within the host's drift.) The packed tensor is
// [ceil(N/16), K, 16] in size, columns past N zero.
//
// Register tile: 8 rows x 3 panels (24 of the 32 zmm registers accumulate; per k: 3
// weight loads, 8 broadcasts of x, 24 FMAs), each chain held in its register over its
// block of k; the sums of the blocks stay in L1. A group's weights (K x 192 B: 110 KB
// at K = 576) stay in L2 while every row of the task passes over them, and the next group
// is prefetched into L2 while this one is computed (see linear()). Tiles of up to 4 rows
// (decode) read each group once, with a software prefetch into L1 64 k ahead.
// Measured on a shared 2-core machine (1 thread, best CPU time per layer over SmolLM2's
// shapes, old and new alternated in one process): 64 rows 67-77% ->
// 70-81% of the FMA peak, 512 rows 55-64% -> 65-73%, 4 rows +37%, against the 4 x 6 tile
// over 64-k blocks this replaced (same bits).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <optional>
#include <thread>
#include <utility>
#include <vector>

#include "line_hints.h"
#include "task_runs.h"
#include "vec16.h"

namespace {

constexpr int kGroup = 3;           // 16-column panels per packed group (the layout) and per register tile
constexpr int kRows = 8;            // rows per register tile
constexpr int kWideRows = 4;        // tiles of at most this many rows read each group once (decode)
constexpr int64_t kPrefetchK = 64;  // how far ahead (in k) a wide tile prefetches its weights into L1
constexpr int64_t kBlockK = 64;    // k per FMA chain; the chains' sums are added in k order

// Where panel group g's weights start: every group before it is full.
inline int64_t group_offset(int64_t g, int64_t k) { return g * kGroup * k * kLanes; }

at::Tensor pack_weight(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat, "weight must be fp32 [N, K]");
  const at::Tensor wc = w.contiguous();
  const int64_t n = wc.size(0), k = wc.size(1), panels = (n + kLanes - 1) / kLanes;
  const int64_t groups = (panels + kGroup - 1) / kGroup;
  at::Tensor packed = at::zeros({panels, k, kLanes}, wc.options());
  const float* src = wc.data_ptr<float>();
  float* dst = packed.data_ptr<float>();
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t width = std::min<int64_t>(kGroup, panels - g * kGroup) * kLanes;
      float* out = dst + group_offset(g, k);  // [K, width]
      for (int64_t c = 0; c < width && g * kGroup * kLanes + c < n; ++c)
        for (int64_t j = 0; j < k; ++j) out[j * width + c] = src[(g * kGroup * kLanes + c) * k + j];
    }
  });
  return packed;
}

struct Gemm {
  const float* x;     // [M, K]
  const float* w;     // [P, K, 16] in size: groups of 3 panels, each [K, 3 x 16]
  const float* bias;  // [N] or null
  float* y;           // [M, N]
  int64_t m, n, k, panels;

  // Rows r0..r0+R-1 against the J panels of the group starting at panel p0, the whole chain over k;
  // it also prefetches the `pf_lines` lines at `pf` into L2, spread evenly over its k steps
  // (EvenHints, line_hints.h).
  template <int R, int J>
  void tile(int64_t r0, int64_t p0, const float* pf, int64_t pf_lines) const {
    constexpr int64_t stride = J * kLanes;               // a tile spans its whole group
    const float* wp = w + group_offset(p0 / kGroup, k);  // [K, stride]
    const float* xr[R];
    for (int r = 0; r < R; ++r) xr[r] = x + (r0 + r) * k;
    // Per k block: acc = one FMA chain over the block from +0, held in registers; then
    // sum += acc in block order. sum lives in this array (L1), not registers: 24 chains
    // plus 24 sums would not fit the 32 zmm registers, and its 2 x 24 accesses per block
    // are ~3% of the block's 64 x 24 FMAs.
    alignas(64) float sum[R * J * kLanes];
    for (int i = 0; i < R * J; ++i) vstore(sum + i * kLanes, vzero());
    // The tile's output lines, fetched for writing while its k loop runs. They are rarely
    // cached (the weights streaming through evict them; the head's logits are 12.6 MB at
    // 64 rows), and a store to a missing line holds the store queue, which commits in
    // order, so the sums' stores behind it waited too and the FMAs stalled. Measured on an
    // AMD EPYC Zen 5, 2 threads, 64 rows x the 49152 x 576 head from memory, old and new
    // alternated: 226 / 221 / 229 -> 232 / 241 / 243 GFLOP/s a thread.
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < J; ++j) __builtin_prefetch(y + (r0 + r) * n + (p0 + j) * kLanes, 1, 3);
    auto step = [&](V16 (&acc)[R][J], int64_t kk) __attribute__((always_inline)) {
      V16 wv[J];
      for (int j = 0; j < J; ++j) wv[j] = vload(wp + kk * stride + j * kLanes);
      // Only wide tiles (up to kWideRows rows) prefetch into L1: they read the group
      // once, from farther out. The others read weights the hints put in
      // L2, whose lines L1's own prefetcher follows; their J prefetches a k step only took
      // load slots. Measured on an AMD EPYC (Zen 4) guest, fp32, with and without these
      // prefetches alternated in one engine, the same bits: steps of 16 prompts of 32-512
      // tokens, paired median 0.958 (20 of 30 faster); 64-sequence decode 0.982 and 0.997
      // (40 of 60, 54 of 100). Past the group's end this names other memory: prefetches
      // never fault.
      if constexpr (R <= kWideRows)
        for (int j = 0; j < J; ++j) __builtin_prefetch(wp + (kk + kPrefetchK) * stride + j * kLanes, 0, 3);
      for (int r = 0; r < R; ++r) {
        const V16 xb = vsplat(xr[r][kk]);
        for (int j = 0; j < J; ++j) acc[r][j] = vfma(xb, wv[j], acc[r][j]);
      }
    };
    EvenHints hints(pf, pf_lines, k);
    for (int64_t k0 = 0; k0 < k; k0 += kBlockK) {
      const int64_t k1 = std::min(k, k0 + kBlockK);
      V16 acc[R][J];
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < J; ++j) acc[r][j] = vzero();
      for (int64_t kk = k0; kk < k1; ++kk) {
        hints.step();
        step(acc, kk);
      }
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < J; ++j) {
          float* s = sum + (r * J + j) * kLanes;
          vstore(s, vadd(vload(s), acc[r][j]));
        }
    }
    for (int j = 0; j < J; ++j) {
      const int64_t c0 = (p0 + j) * kLanes, valid = std::min<int64_t>(kLanes, n - c0);
      float b[kLanes] = {};
      if (bias)
        for (int64_t l = 0; l < valid; ++l) b[l] = bias[c0 + l];
      for (int r = 0; r < R; ++r) {
        const V16 v = vload(sum + (r * J + j) * kLanes), o = bias ? vadd(v, vload(b)) : v;
        float* dst = y + (r0 + r) * n + c0;
        if (valid == kLanes) {  // a plain store: std::copy of 16 floats is a memmove call
          vstore(dst, o);
        } else {
          float out[kLanes];
          vstore(out, o);
          std::copy(out, out + valid, dst);
        }
      }
    }
  }

  template <int R>
  void tile_rows(int64_t r0, int64_t p0, int64_t np, const float* pf, int64_t pf_lines) const {
    static_assert(kGroup == 3, "the switch below lists 1..kGroup");
    switch (np) {
      case 3: return tile<R, 3>(r0, p0, pf, pf_lines);
      case 2: return tile<R, 2>(r0, p0, pf, pf_lines);
      default: return tile<R, 1>(r0, p0, pf, pf_lines);
    }
  }

  void tile_any(int64_t r0, int64_t rows, int64_t p0, int64_t np, const float* pf, int64_t pf_lines) const {
    static_assert(kRows == 8, "the switch below lists 1..kRows");
    switch (rows) {
      case 8: return tile_rows<8>(r0, p0, np, pf, pf_lines);
      case 7: return tile_rows<7>(r0, p0, np, pf, pf_lines);
      case 6: return tile_rows<6>(r0, p0, np, pf, pf_lines);
      case 5: return tile_rows<5>(r0, p0, np, pf, pf_lines);
      case 4: return tile_rows<4>(r0, p0, np, pf, pf_lines);
      case 3: return tile_rows<3>(r0, p0, np, pf, pf_lines);
      case 2: return tile_rows<2>(r0, p0, np, pf, pf_lines);
      default: return tile_rows<1>(r0, p0, np, pf, pf_lines);
    }
  }

  // Tiles of more than kWideRows rows hint the whole next group into L2 (see linear()).
  bool spread() const { return m > kWideRows; }

  // Rows [r0, r1) against group g; the `next_lines` 64-byte lines at `next` (weights the
  // thread reads after this task) are prefetched into L2, a share per tile: all of them
  // when spread(), else at most one line per k step of each tile.
  void task(int64_t r0, int64_t r1, int64_t g, const float* next, int64_t next_lines) const {
    const int64_t p0 = g * kGroup, np = std::min<int64_t>(kGroup, panels - p0);
    const int64_t tiles = (r1 - r0 + kRows - 1) / kRows;  // one tile per row block spans the group
    const int64_t share = (next_lines + tiles - 1) / tiles, take = spread() ? share : std::min(share, k);
    for (int64_t i = 0, r = r0; r < r1; r += kRows, ++i) {
      const int64_t q0 = std::min(next_lines, i * share), q1 = std::min(next_lines, q0 + take);
      tile_any(r, std::min<int64_t>(kRows, r1 - r), p0, np, next + q0 * kLanes, q1 - q0);
    }
  }
};

// How a call of m rows on `panels` panels splits into tasks: (group, block of rows),
// group-major, so a thread's consecutive tasks share a group's weights (read from memory
// once per thread). Groups are split across threads first; rows only where there are too
// few groups to go round (>= 4 tasks per thread).
struct Tasks {
  int64_t groups, block_rows, row_blocks;
  Tasks(int64_t m, int64_t panels) {
    groups = (panels + kGroup - 1) / kGroup;
    const int64_t row_tiles = (m + kRows - 1) / kRows;
    const int64_t want = std::max<int64_t>(1, (4 * loop_threads() + groups - 1) / groups);
    block_rows = (row_tiles + std::min(row_tiles, want) - 1) / std::min(row_tiles, want) * kRows;
    row_blocks = (m + block_rows - 1) / block_rows;
  }
  int64_t count() const { return groups * row_blocks; }
};

// Per thread, the lines of the group it starts with in a call of m rows on `next` (the
// packing the model multiplies by next): the first task of the run TaskRuns deals it
// (task_runs.h). Hints: a wrong guess costs bandwidth, never a value.
std::vector<std::pair<const float*, int64_t>> first_groups(const at::Tensor& next, int64_t m) {
  const int64_t k = next.size(1), panels = next.size(0);
  const Tasks tasks(m, panels);
  const int64_t threads = loop_threads();
  std::vector<std::pair<const float*, int64_t>> out;
  for (int64_t i = 0; i < threads; ++i) {
    const int64_t g = std::min(tasks.groups - 1, TaskRuns::dealt_begin(tasks.count(), threads, i) / tasks.row_blocks);
    out.push_back({next.data_ptr<float>() + group_offset(g, k), std::min<int64_t>(kGroup, panels - g * kGroup) * k});
  }
  return out;
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias, int64_t n,
                  const std::optional<at::Tensor>& next) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous fp32 [M, K]");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kFloat && packed.is_contiguous() &&
              packed.size(2) == kLanes && packed.size(1) == x.size(1), "packed weight must be [P, K, 16] for x's K");
  TORCH_CHECK(n > 0 && (n + kLanes - 1) / kLanes == packed.size(0), "n does not match the packed weight");
  if (bias) TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->scalar_type() == at::kFloat &&
                        bias->is_contiguous(), "bias must be contiguous fp32 [N]");
  if (next) TORCH_CHECK(next->dim() == 3 && next->scalar_type() == at::kFloat && next->is_contiguous() &&
                        next->size(2) == kLanes, "next must be a packed fp32 weight [P, K, 16]");
  const int64_t m = x.size(0), k = x.size(1), panels = packed.size(0);
  at::Tensor y = at::empty({m, n}, x.options());
  if (m == 0) return y;
  const Gemm g{x.data_ptr<float>(), packed.data_ptr<float>(), bias ? bias->data_ptr<float>() : nullptr,
               y.data_ptr<float>(), m, n, k, panels};
  const Tasks tasks(m, panels);
  const int64_t row_blocks = tasks.row_blocks, block_rows = tasks.block_rows;
  // The next group's weights are prefetched into L2 while this one is computed. Tiles of
  // more than kWideRows rows compute long enough per byte to hide the whole next group:
  // every task of this group in the thread prefetches its share of it, spread over the
  // tiles' k steps. Wide tiles (decode of <= 4 rows) are bound by memory themselves, and a
  // second stream only competes with theirs: the group's last task prefetches at most one
  // line per k step. Measured on an AMD EPYC (Zen 4) guest, 2 threads, a step's GEMMs
  // streamed from memory, old and new alternated in one process (medians of 7): 8 rows
  // 29.6 -> 22.2 ms, 16 rows 33.9 -> 29.4 ms; 1, 4 and 32-128 rows unchanged within 2%.
  //
  // A thread's last group has no next group in the call: with `next` (the packing of the
  // model's next GEMM) it hints the group it will start that call with instead, which
  // would otherwise be the one group it streams from memory (of 6 to 32 per thread at
  // SmolLM2's shapes). Measured on an AMD EPYC (Zen 4) guest, 64-sequence fp32 decode, two
  // engines stepping alternately with equal tokens, 10 and 12 rounds: median step 127.6 ->
  // 124.9 and 103.8 -> 103.6 ms, median of the paired ratios 0.992 and 0.978 (11 of 12
  // rounds faster).
  auto group_lines = [&](int64_t gi) { return std::min<int64_t>(kGroup, panels - gi * kGroup) * k; };
  const auto afters = next && g.spread() ? first_groups(*next, m) : std::vector<std::pair<const float*, int64_t>>{};
  // A thread done with its run takes tasks from the end of the other's (task_runs.h); a
  // taken task hints nothing.
  parallel_runs(tasks.count(), [&](TaskRuns& runs, int64_t tid) {
    const auto after = tid < static_cast<int64_t>(afters.size()) ? afters[tid] : std::pair<const float*, int64_t>{g.w, 0};
    TaskRuns::Next next_task;
    while (runs.next(tid, next_task)) {
      const int64_t t = next_task.task, t0 = next_task.begin, t1 = next_task.end;
      const int64_t gi = t / row_blocks, r0 = (t % row_blocks) * block_rows, r1 = std::min(m, r0 + block_rows);
      if (next_task.stolen) {
        g.task(r0, r1, gi, g.w, 0);
      } else if (g.spread()) {  // this thread's tasks of group gi share the next group (or the next call's first)
        const int64_t gn = gi + 1, first = std::max(t0, gi * row_blocks), count = std::min(t1, gn * row_blocks) - first;
        const bool inside = gn * row_blocks < t1;
        const float* base = inside ? g.w + group_offset(gn, k) : after.first;
        const int64_t lines = inside ? group_lines(gn) : after.second;
        const int64_t q0 = lines * (t - first) / count, q1 = lines * (t - first + 1) / count;
        g.task(r0, r1, gi, lines ? base + q0 * kLanes : g.w, q1 - q0);
      } else {
        const int64_t gn = (t + 1) / row_blocks;
        const bool fetch = t + 1 < t1 && gn != gi;  // the next task reads another group
        g.task(r0, r1, gi, fetch ? g.w + group_offset(gn, k) : g.w, fetch ? group_lines(gn) : 0);
      }
    }
  });
  return y;
}

// The contract written out for the tests: y[i, c] = sum over 64-k blocks in order (from +0)
// of the block's fma chain of x[i, k] * w[c, k] (k ascending, from +0), then + b[c]; one
// scalar at a time, no packing, no tiling.
at::Tensor linear_reference(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1) && x.scalar_type() == at::kFloat &&
              w.scalar_type() == at::kFloat, "x [M, K] and w [N, K] must be fp32");
  const at::Tensor xc = x.contiguous(), wc = w.contiguous();
  const int64_t m = xc.size(0), n = wc.size(0), k = xc.size(1);
  at::Tensor y = at::empty({m, n}, xc.options());
  const float *xp = xc.data_ptr<float>(), *wp = wc.data_ptr<float>();
  const at::Tensor bc = bias ? bias->contiguous() : at::Tensor();
  float* yp = y.data_ptr<float>();
  for (int64_t i = 0; i < m; ++i)
    for (int64_t c = 0; c < n; ++c) {
      float sum = 0.0f;
      for (int64_t j0 = 0; j0 < k; j0 += kBlockK) {
        float acc = 0.0f;
        for (int64_t j = j0; j < std::min(k, j0 + kBlockK); ++j) acc = std::fma(xp[i * k + j], wp[c * k + j], acc);
        sum += acc;
      }
      yp[i * n + c] = bias ? sum + bc.data_ptr<float>()[c] : sum;
    }
  return y;
}

}  // namespace

// For the tests of task_runs.h: [count, 2] int64, per task the times it ran and the thread
// that ran it last, with thread 0 starting `delay_us` late (so others must take from its run).
at::Tensor task_runs_trace(int64_t count, int64_t delay_us) {
  at::Tensor out = at::zeros({count, 2}, at::kLong);
  int64_t* o = out.data_ptr<int64_t>();
  parallel_runs(count, [&](TaskRuns& runs, int64_t tid) {
    if (tid == 0) std::this_thread::sleep_for(std::chrono::microseconds(delay_us));
    TaskRuns::Next t;
    while (runs.next(tid, t)) {
      __atomic_fetch_add(&o[2 * t.task], 1, __ATOMIC_RELAXED);
      o[2 * t.task + 1] = tid;
    }
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(asyncengine_cpu, m) {
  m.def("task_runs_trace(int count, int delay_us) -> Tensor", &task_runs_trace);
  m.def("pack_linear_weight(Tensor w) -> Tensor", &pack_weight);
  m.def("packed_linear(Tensor x, Tensor packed, Tensor? bias, int n, Tensor? next=None) -> Tensor", &linear);
  m.def("linear_fma_reference(Tensor x, Tensor w, Tensor? bias) -> Tensor", &linear_reference);
}
