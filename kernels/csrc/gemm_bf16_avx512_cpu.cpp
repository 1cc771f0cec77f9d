// bf16 linear layer y = x @ W^T (+ b) on AVX-512, for CPUs with AVX512-BF16 but without
// AMX (AMD Zen 4/5, Intel parts without AMX or with it hidden), batch-invariant by
// construction. Every output element (r, c) is one fp32 chain over k in ascending order,
// from +0, then + bias, rounded once to bf16 (nearest even). Two chains, each a fixed
// function of (row, column, k):
//   "dot": VDPBF16PS steps over the k-pairs (0,1), (2,3), ...: each adds the pair's two
//          exact bf16 products to the sum as the instruction does (x's pair the first
//          operand, W's the second; subnormal inputs count as zero, subnormal sums flush).
//   "fma": one FMA per k, acc = fl(acc + x[r,k] * W[c,k]), the bf16 values widened to fp32
//          exactly (a product of two bf16 is exact in fp32, so each step rounds once, as
//          the test's chain written out in torch does; IEEE subnormals).
// avx512_bf16_chain() picks one per CPU (never per timing: every process on a machine
// computes the same bits); the op takes either by name. Blocking (rows per register tile,
// columns and rows per task, threads) only decides which elements are computed together,
// never the operations of one element, and a register tile runs the whole K at once. A
// row's bits therefore do not depend on how many rows share the call, where it sits, or
// the threads.
//
// The weight is the AMX kernel's packing (pack_linear_weight_bf16): 16-column panels of
// VNNI pairs, [ceil(N/32) * 2, Kp/2, 16, 2] with Kp = K rounded up to 32, zeros past K and
// N. One k-pair of a panel is one 64-byte vector: exactly VDPBF16PS's second operand, or,
// split by a shift and a mask, the fp32 weights of k = 2q and 2q + 1 for the FMAs; a pair
// of panels (one task's 32 columns) is one contiguous stream.
//
// Speed (why the shape): a register tile is up to 12 rows x 2 panels: 24 accumulators,
// 2 (dot) or 4 (fma) weight vectors and a broadcast of 32 zmm, so the 24 independent
// chains cover the latency and each k-pair needs 2 weight loads and 12 (dot) or 24 (fma)
// broadcasts, all loads, no shuffle port. x is repacked at each call (at decode by every
// thread for itself: pack_own_rows) into each tile's own k-major run (16 x 16 transposes
// in registers; fp32 already for fma; an odd K's last pair padded once), so a tile streams
// it in order. A task is 32 columns x a block of rows: its weights (K x 64 B) are read from
// memory once (prefetched into L2 during the task before) and stay in L1/L2 for every tile
// of the block; tasks split the columns first, so a decode step's few rows keep every
// thread busy.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "line_hints.h"
#include "task_runs.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define AE_HAVE_AVX512BF16 1
#else
#define AE_HAVE_AVX512BF16 0
#endif

namespace {

constexpr int64_t kTile = 16;       // columns per panel
constexpr int64_t kPanelAlign = 2;  // the packing pads N to 32 columns: panels come in pairs
constexpr int kMaxRows = 12;        // rows per register tile: 12 x 2 accumulators + 2 weights + 1
constexpr int64_t kBlockBytes = 1 << 20;  // x rows per task: at most ~1 MB of them (stays in L2)
constexpr int64_t kLineElems = 32;  // bf16 elements per 64-byte cache line

bool avx512_bf16_available() { return AE_HAVE_AVX512BF16 != 0; }

// The chain this CPU runs fastest, a fixed function of the CPU (never of a timing, so every
// process on a machine computes the same bits). On Intel VDPBF16PS issues at a quarter of
// FMA's rate, half its multiply-adds (measured on a Xeon without AMX exposed, bench/sol.py's
// probes: 80 vs 164 GFLOP/s per core), so the FMA chain over bf16 widened in registers is
// ~1.8x faster there. Elsewhere (AMD Zen 4/5) the dot chain stays, the one measured there.
std::string avx512_bf16_chain() {
#if defined(__GNUC__)
  if (__builtin_cpu_is("intel")) return "fma";
#endif
  return "dot";
}

// Rows [0, rows) split into `parts` consecutive ranges whose sizes differ by at most one:
// range i starts at start(i).
struct EvenSplit {
  int64_t rows, parts;
  int64_t start(int64_t i) const { return i * (rows / parts) + std::min(i, rows % parts); }
};

struct Tile {
  int64_t r0;  // first row
  int rows;    // 1..kMaxRows
};

#if AE_HAVE_AVX512BF16
// t[i] = row i of a 16 x 16 matrix of 32-bit lanes -> t[j] = its column j.
inline void transpose16(__m512i t[16]) {
  __m512i u[16];
  for (int i = 0; i < 16; i += 2) {  // per 128-bit lane: rows i, i+1 interleaved
    u[i] = _mm512_unpacklo_epi32(t[i], t[i + 1]);
    u[i + 1] = _mm512_unpackhi_epi32(t[i], t[i + 1]);
  }
  for (int g = 0; g < 16; g += 4) {  // t[g + e], lane L: rows g..g+3 of column 4L + e
    t[g] = _mm512_unpacklo_epi64(u[g], u[g + 2]);
    t[g + 1] = _mm512_unpackhi_epi64(u[g], u[g + 2]);
    t[g + 2] = _mm512_unpacklo_epi64(u[g + 1], u[g + 3]);
    t[g + 3] = _mm512_unpackhi_epi64(u[g + 1], u[g + 3]);
  }
  for (int e = 0; e < 4; ++e) {  // gather lane L of the four row groups: column 4L + e
    const __m512i v0 = _mm512_shuffle_i32x4(t[e], t[4 + e], 0x88), v1 = _mm512_shuffle_i32x4(t[e], t[4 + e], 0xDD);
    const __m512i w0 = _mm512_shuffle_i32x4(t[8 + e], t[12 + e], 0x88), w1 = _mm512_shuffle_i32x4(t[8 + e], t[12 + e], 0xDD);
    u[e] = _mm512_shuffle_i32x4(v0, w0, 0x88);
    u[8 + e] = _mm512_shuffle_i32x4(v0, w0, 0xDD);
    u[4 + e] = _mm512_shuffle_i32x4(v1, w1, 0x88);
    u[12 + e] = _mm512_shuffle_i32x4(v1, w1, 0xDD);
  }
  for (int j = 0; j < 16; ++j) t[j] = u[j];
}

// One register tile's rows r0..r0+R-1 of x [M, K] bf16, repacked k-major into its own
// contiguous run xt (so the tile streams it in order): kDot: xt[q * R + i] = row r0+i's
// pair (2q, 2q + 1) as one 32-bit lane; kFma: xt[kk * R + i] = x[r0 + i, kk] as fp32
// bits, kk < 2Q. Lanes past K are zero. 16 x 16 blocks of words, transposed in registers.
template <bool Fma>
void pack_tile(const uint16_t* x, int64_t k, int64_t r0, int rows, uint32_t* xt) {
  const int64_t words = (Fma ? 2 : 1) * ((k + 1) / 2);  // per row
  const __mmask16 keep = __mmask16((1u << rows) - 1u);
  for (int64_t w0 = 0; w0 < words; w0 += 16) {
    const int64_t e0 = (Fma ? 1 : 2) * w0, left = k - e0;  // first element, elements left in a row
    __m512i t[16];
    for (int i = 0; i < 16; ++i) {
      const uint16_t* row = x + (r0 + i) * k + e0;
      if (i >= rows) {
        t[i] = _mm512_setzero_si512();
      } else if constexpr (Fma) {  // 16 bf16 -> fp32 (exact: the bits shifted up)
        const __mmask16 m16 = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1u);
        t[i] = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m16, row)), 16);
      } else {  // 16 pairs
        const __mmask32 m32 = left >= 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << left) - 1u);
        t[i] = _mm512_maskz_loadu_epi16(m32, row);
      }
    }
    transpose16(t);
    for (int j = 0; j < 16 && w0 + j < words; ++j) _mm512_mask_storeu_epi32(xt + (w0 + j) * rows, keep, t[j]);
  }
}

struct Bf16Gemm {
  const uint32_t* xp;  // x from pack_tile, tile by tile: row r0's tile at xp + r0 * words
  const uint16_t* w;   // [P, Kp / 2, 16, 2]
  const float* bias;   // [N] or null
  uint16_t* y;         // [M, N]
  int64_t n, pairs, kp;  // pairs = Q = ceil(K / 2)

  // Rows r0..r0+R-1 x panels p0, p0+1 over every k-pair, + bias, into y as bf16; also
  // prefetches the `pf_lines` 64-byte lines at `pf` into L2, ceil(pf_lines / Q) per k-pair.
  template <int R, bool Fma>
  void tile(int64_t r0, int64_t p0, const uint16_t* pf, int64_t pf_lines) const {
    const SpreadHints hints(pf, pf_lines, pairs);
    __m512 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    const uint16_t* w0 = w + p0 * kp * kTile;  // panel p0 [Kp / 2, 16, 2]; p0 + 1 follows it
    const uint16_t* w1 = w0 + kp * kTile;
    const __m512i hi = _mm512_set1_epi32(int(0xFFFF0000u));
    const uint32_t* xq = xp + r0 * (Fma ? 2 : 1) * pairs;  // [Q, R] pairs or [2Q, R] fp32
    for (int64_t q = 0; q < pairs; ++q, xq += Fma ? 2 * R : R) {
      if (q < hints.steps) hints.issue(q);
      const __m512i a = _mm512_loadu_si512(w0 + q * 2 * kTile), b = _mm512_loadu_si512(w1 + q * 2 * kTile);
      if constexpr (Fma) {  // lane c of a pair vector: w[c, 2q] in the low half, w[c, 2q + 1] high
        const __m512 a0 = _mm512_castsi512_ps(_mm512_slli_epi32(a, 16)), b0 = _mm512_castsi512_ps(_mm512_slli_epi32(b, 16));
        const __m512 a1 = _mm512_castsi512_ps(_mm512_and_si512(a, hi)), b1 = _mm512_castsi512_ps(_mm512_and_si512(b, hi));
        for (int r = 0; r < R; ++r) {
          const __m512 x0 = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(xq[r])));
          acc[r][0] = _mm512_fmadd_ps(x0, a0, acc[r][0]);
          acc[r][1] = _mm512_fmadd_ps(x0, b0, acc[r][1]);
        }
        for (int r = 0; r < R; ++r) {
          const __m512 x1 = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(xq[R + r])));
          acc[r][0] = _mm512_fmadd_ps(x1, a1, acc[r][0]);
          acc[r][1] = _mm512_fmadd_ps(x1, b1, acc[r][1]);
        }
      } else {
        for (int r = 0; r < R; ++r) {
          const __m512bh xb = (__m512bh)_mm512_set1_epi32(static_cast<int>(xq[r]));
          acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xb, (__m512bh)a);
          acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xb, (__m512bh)b);
        }
      }
    }
    for (int j = 0; j < 2; ++j) {
      const int64_t c0 = (p0 + j) * kTile, valid = std::min<int64_t>(kTile, n - c0);
      if (valid <= 0) return;  // a padding panel past N
      const __mmask16 keep = valid >= kTile ? __mmask16(0xFFFF) : __mmask16((1u << valid) - 1u);
      const __m512 bv = bias ? _mm512_maskz_loadu_ps(keep, bias + c0) : _mm512_setzero_ps();
      for (int r = 0; r < R; ++r) {
        const __m256bh v = _mm512_cvtneps_pbh(_mm512_add_ps(acc[r][j], bv));  // round to nearest even
        _mm256_mask_storeu_epi16(y + (r0 + r) * n + c0, keep, (__m256i)v);
      }
    }
  }

  // Register tiles [t0, t1) of `tiles` ((first row, rows) each) against panels p0, p0 + 1;
  // the `next_lines` lines at `next` are prefetched into L2, a share per tile.
  template <bool Fma>
  void block(const std::vector<Tile>& tiles, int64_t t0, int64_t t1, int64_t p0, const uint16_t* next,
             int64_t next_lines) const {
    const int64_t share = (next_lines + (t1 - t0) - 1) / (t1 - t0);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r = tiles[t].r0, q0 = std::min(next_lines, (t - t0) * share);
      const uint16_t* nx = next + q0 * kLineElems;
      const int64_t nl = std::min(next_lines, q0 + share) - q0;
      switch (tiles[t].rows) {
        case 12: tile<12, Fma>(r, p0, nx, nl); break;
        case 11: tile<11, Fma>(r, p0, nx, nl); break;
        case 10: tile<10, Fma>(r, p0, nx, nl); break;
        case 9: tile<9, Fma>(r, p0, nx, nl); break;
        case 8: tile<8, Fma>(r, p0, nx, nl); break;
        case 7: tile<7, Fma>(r, p0, nx, nl); break;
        case 6: tile<6, Fma>(r, p0, nx, nl); break;
        case 5: tile<5, Fma>(r, p0, nx, nl); break;
        case 4: tile<4, Fma>(r, p0, nx, nl); break;
        case 3: tile<3, Fma>(r, p0, nx, nl); break;
        case 2: tile<2, Fma>(r, p0, nx, nl); break;
        default: tile<1, Fma>(r, p0, nx, nl); break;
      }
    }
  }
};

// Row blocks of a call: at most max_rows rows (one task's rows), as even as the count allows.
EvenSplit row_blocks(int64_t m, int64_t words) {
  const int64_t max_rows = std::max<int64_t>(kMaxRows, kBlockBytes / (4 * words));
  return {m, (m + max_rows - 1) / max_rows};
}

// Per thread, the slab it starts with in a call of m rows on `next` (the packing the model
// multiplies by next), as (its first element, its lines): the first task of the run
// TaskRuns deals it (task_runs.h). Hints: a wrong guess costs bandwidth, never a value.
std::vector<std::pair<const uint16_t*, int64_t>> first_slabs(const at::Tensor& next, int64_t m, bool fma) {
  const int64_t lines = next.size(1) * 2, slabs = next.size(0) / kPanelAlign;
  const int64_t count = slabs * row_blocks(m, (fma ? 2 : 1) * next.size(1)).parts;
  const auto* w = reinterpret_cast<const uint16_t*>(next.data_ptr<c10::BFloat16>());
  const int64_t threads = loop_threads();
  std::vector<std::pair<const uint16_t*, int64_t>> out;
  for (int64_t i = 0; i < threads; ++i)
    out.push_back({w + (TaskRuns::dealt_begin(count, threads, i) % slabs) * kPanelAlign * lines * kTile, lines});
  return out;
}

// The calling thread's buffer of at least `words` 32-bit words, kept across calls (a fresh
// allocation of a prefill chunk's size would be mapped and page-faulted anew each call).
inline uint32_t* thread_buffer(size_t words) {
  thread_local std::vector<uint32_t> buffer;
  if (buffer.size() < words) buffer.resize(words);
  return buffer.data();
}

// x [M, K] packed (pack_tile) tile by tile, tile i at row tiles[i].r0 * words, into a
// thread's buffer.
//
// With one row block (every decode step; up to 341-910 rows at SmolLM2's K) every thread's
// tasks read all of x, and each thread packs it itself (pack_own_rows) into its own buffer.
// It used to be packed once, split over the threads, before the tasks; then each thread
// read half of its x from the other core's cache, after one more barrier. Measured on an
// AMD EPYC (Zen 4) guest, 2 threads, weights in cache, both ways alternated in one process
// (medians of 15): 64 rows 0.93-0.95x the time at K = 576, 0.72x for the down projection
// (K = 1536); 1-16 rows 0.78-0.99x; 128-256 rows 0.76-1.00x. In the engine, 64-sequence
// bf16 decode, one engine switching between the two every step (120 pairs): median step
// 87.6 -> 85.8 ms, median paired ratio 0.977; 16 sequences 0.987.
// With several row blocks (prefill chunks) threads need mostly different rows, so x is
// still packed once, split over the threads (pack_shared): packing every block a thread
// touches measured 0.88-1.05x at 900-2048 rows, and 1.00-1.04x on 2048-token prefill steps.
template <bool Fma>
const uint32_t* pack_own_rows(const uint16_t* x, int64_t m, int64_t k, int64_t words, const std::vector<Tile>& tiles) {
  uint32_t* xp = thread_buffer(static_cast<size_t>(m * words));
  for (const Tile& t : tiles) pack_tile<Fma>(x, k, t.r0, t.rows, xp + t.r0 * words);
  return xp;
}

template <bool Fma>
const uint32_t* pack_shared(const uint16_t* x, int64_t m, int64_t k, int64_t words, const std::vector<Tile>& tiles) {
  uint32_t* xp = thread_buffer(static_cast<size_t>(m * words));  // the calling thread's, filled by all
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) pack_tile<Fma>(x, k, tiles[t].r0, tiles[t].rows, xp + tiles[t].r0 * words);
  });
  return xp;
}

template <bool Fma>
void run(const uint16_t* x, const at::Tensor& packed, const float* bias, uint16_t* y, int64_t m, int64_t n, int64_t k,
         const at::Tensor* next) {
  const int64_t pairs = (k + 1) / 2, words = (Fma ? 2 : 1) * pairs;  // 32-bit words per row of packed x
  // Rows in blocks of at most max_rows (one task's rows), each block in register tiles of
  // at most kMaxRows rows, both as even as the counts allow (no tile of a few rows whose
  // chains would wait on latency). first[b]: block b's first tile.
  const EvenSplit blocks = row_blocks(m, words);
  std::vector<Tile> tiles;
  std::vector<int64_t> first;
  for (int64_t b = 0; b < blocks.parts; ++b) {
    const int64_t r0 = blocks.start(b), rows = blocks.start(b + 1) - r0;
    const EvenSplit split{rows, (rows + kMaxRows - 1) / kMaxRows};
    first.push_back(static_cast<int64_t>(tiles.size()));
    for (int64_t t = 0; t < split.parts; ++t)
      tiles.push_back({r0 + split.start(t), static_cast<int>(split.start(t + 1) - split.start(t))});
  }
  first.push_back(static_cast<int64_t>(tiles.size()));
  const auto* w = reinterpret_cast<const uint16_t*>(packed.data_ptr<c10::BFloat16>());
  const int64_t slabs = packed.size(0) / kPanelAlign;  // 32-column tasks
  // Task t: slab t % slabs of row block t / slabs (a thread's consecutive tasks share the
  // rows, which stay in cache while the weights stream by once per block). Each task
  // prefetches the slab of the thread's next task into L2 over its tiles' k steps, so a
  // block's first tile (at decode, the only one or one of two) computes from L2 instead
  // of waiting on memory. Measured on an AMD EPYC (Zen 4) guest, 2 threads, a step's 30
  // layers streamed from memory, with and without it alternated in one process (medians
  // of 7): 16 rows 12.5 -> 9.9 ms, 8 rows 9.6 -> 8.6, 64 rows 35.8 -> 34.0, 1 and 512 rows
  // unchanged.
  // The thread's last task hints, with `next`, the slab it starts the model's next GEMM
  // with (as the fp32 kernel does its first group, kernels/csrc/gemm_cpu.cpp): one slab of
  // 9-48 per thread at SmolLM2's shapes, so the gain is small. Measured on the same guest,
  // 64-sequence bf16 decode at ~200-400 keys, two engines stepping alternately with equal
  // tokens, 12 rounds twice: median step 85.0 -> 84.0 and 86.1 -> 85.2 ms, median paired
  // ratio 0.994 and 0.991.
  const int64_t slab_lines = packed.size(1) * 2;  // 2 panels x Kp / 2 pairs x 64 bytes = Kp lines
  const auto afters = next ? first_slabs(*next, m, Fma) : std::vector<std::pair<const uint16_t*, int64_t>>{};
  const uint32_t* shared = blocks.parts > 1 ? pack_shared<Fma>(x, m, k, words, tiles) : nullptr;
  // A thread done with its run takes tasks from the end of the other's (task_runs.h); a
  // taken task hints nothing.
  parallel_runs(slabs * blocks.parts, [&](TaskRuns& runs, int64_t tid) {
    const Bf16Gemm g{shared ? shared : pack_own_rows<Fma>(x, m, k, words, tiles), w, bias, y, n, pairs,
                     packed.size(1) * 2};
    TaskRuns::Next t;
    while (runs.next(tid, t)) {
      const int64_t b = t.task / slabs;
      const uint16_t* next_w = g.w + ((t.task + 1) % slabs) * kPanelAlign * slab_lines * kTile;
      int64_t next_lines = t.task + 1 < t.end && !t.stolen ? slab_lines : 0;
      if (t.task + 1 == t.end && !t.stolen && tid < static_cast<int64_t>(afters.size()))
        std::tie(next_w, next_lines) = afters[tid];
      g.block<Fma>(tiles, first[b], first[b + 1], (t.task % slabs) * kPanelAlign, next_w, next_lines);
    }
  });
}
#endif

at::Tensor linear_bf16_avx512(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                              int64_t n, const std::optional<std::string>& chain, const std::optional<at::Tensor>& next) {
  TORCH_CHECK(avx512_bf16_available(), "this CPU or build has no AVX512-BF16");
  const std::string which = chain ? *chain : avx512_bf16_chain();
  TORCH_CHECK(which == "dot" || which == "fma", "chain must be \"dot\" or \"fma\", got \"", which, "\"");
  const bool fma = which == "fma";
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "x must be bf16 [M, K]");
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == at::kBFloat16 && packed.is_contiguous() &&
                  packed.size(2) == kTile && packed.size(3) == 2 && packed.size(1) * 2 == (x.size(1) + 31) / 32 * 32,
              "packed weight must be [P, Kp / 2, 16, 2] for x's K");
  TORCH_CHECK(n > 0 && packed.size(0) % kPanelAlign == 0 && (n + 31) / 32 * kPanelAlign == packed.size(0),
              "n does not match the packed weight");
  if (bias) TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->scalar_type() == at::kFloat &&
                        bias->is_contiguous(), "bias must be contiguous fp32 [N]");
  if (next) TORCH_CHECK(next->dim() == 4 && next->scalar_type() == at::kBFloat16 && next->is_contiguous() &&
                            next->size(2) == kTile && next->size(3) == 2 && next->size(0) % kPanelAlign == 0,
                        "next must be a packed bf16 weight [P, Kp / 2, 16, 2]");
  const at::Tensor xc = x.contiguous();
  const int64_t m = xc.size(0), k = xc.size(1);
  TORCH_CHECK(m * k < (int64_t(1) << 31), "x has too many elements for this kernel (M * K must be < 2^31)");
  at::Tensor y = at::empty({m, n}, x.options());
  if (m == 0) return y;
#if AE_HAVE_AVX512BF16
  const auto* xs = reinterpret_cast<const uint16_t*>(xc.data_ptr<c10::BFloat16>());
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  auto* ys = reinterpret_cast<uint16_t*>(y.data_ptr<c10::BFloat16>());
  const at::Tensor* nx = next ? &*next : nullptr;
  if (fma) run<true>(xs, packed, b, ys, m, n, k, nx);
  else run<false>(xs, packed, b, ys, m, n, k, nx);
#endif
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(asyncengine_cpu, m) {
  m.def("avx512_bf16_available() -> bool", &avx512_bf16_available);
  m.def("avx512_bf16_chain() -> str", &avx512_bf16_chain);
  m.def("packed_linear_bf16_avx512(Tensor x, Tensor packed, Tensor? bias, int n, str? chain=None, Tensor? next=None) "
        "-> Tensor",
        &linear_bf16_avx512);
}
