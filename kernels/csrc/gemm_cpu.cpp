// fp32 linear layer y = x @ W^T (+ b) that is batch-invariant by construction: every
// output element is one FMA chain over k = 0..K-1 in ascending order, then the bias add.
// Blocking (rows per register tile, columns per tile, tasks per thread) only decides
// which elements are computed together, never the operations of one element, so a row's
// bits do not depend on how many rows share the call, where it sits, or the threads.
// (BLAS libraries pick kernels and K splits by the row count; this is why the engine's
// deterministic mode otherwise runs them in fixed-size row tiles.)
//
// The weight is packed once, in groups of up to 6 panels of 16 columns (96 columns): a
// group's storage is [K, J * 16] for its J panels, so the micro-kernel reads the J x 16
// weights of one k as consecutive bytes (one stream per task for the prefetchers). The
// packed tensor is [ceil(N/16), K, 16] in size, columns past N zero.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "vec16.h"

namespace {

constexpr int kRows = 4;            // rows per register tile
constexpr int kPanels = 6;          // 16-column panels per register tile (4 x 6 accumulators)
constexpr int64_t kBlockRows = 64;  // rows per parallel task
// k per block: a block's weights (6 panels x 64 k x 64 B = 24 KB) stay in L1 while every
// row tile of the task reads them; partial sums wait in `part` between blocks (stored and
// reloaded as fp32, so the chain over k is the same one).
constexpr int64_t kKc = 64;
constexpr int64_t kPartStride = kPanels * kLanes;

// Where panel group g's weights start: every group before it is full.
inline int64_t group_offset(int64_t g, int64_t k) { return g * kPanels * k * kLanes; }

// A contiguous range of weights, prefetched into L2 a share at a time.
struct Lines {
  const float* start;
  int64_t count;  // 64-byte lines
  void prefetch(int64_t q0, int64_t q1) const {
    for (int64_t q = q0; q < q1; ++q) __builtin_prefetch(start + q * kLanes, 0, 2);
  }
};

at::Tensor pack_weight(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat, "weight must be fp32 [N, K]");
  const at::Tensor wc = w.contiguous();
  const int64_t n = wc.size(0), k = wc.size(1), panels = (n + kLanes - 1) / kLanes;
  const int64_t groups = (panels + kPanels - 1) / kPanels;
  at::Tensor packed = at::zeros({panels, k, kLanes}, wc.options());
  const float* src = wc.data_ptr<float>();
  float* dst = packed.data_ptr<float>();
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t width = std::min<int64_t>(kPanels, panels - g * kPanels) * kLanes;
      float* out = dst + group_offset(g, k);  // [K, width]
      for (int64_t c = 0; c < width && g * kPanels * kLanes + c < n; ++c)
        for (int64_t j = 0; j < k; ++j) out[j * width + c] = src[(g * kPanels * kLanes + c) * k + j];
    }
  });
  return packed;
}

struct Gemm {
  const float* x;     // [M, K]
  const float* w;     // [P, K, 16] in size: groups of 6 panels, each [K, 6 x 16]
  const float* bias;  // [N] or null
  float* y;           // [M, N]
  int64_t m, n, k;

  // Rows r0..r0+R-1 against panels p0..p0+J-1 over k in [k0, k1): the sums continue from
  // part (unless first) and go back to part, or, after the last block, + bias into y.
  template <int R, int J>
  void tile(int64_t r0, int64_t p0, int64_t k0, int64_t k1, float* part, bool first, bool last) const {
    V16 acc[R][J];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < J; ++j) acc[r][j] = first ? vzero() : vload(part + r * kPartStride + j * kLanes);
    const float* wp = w + group_offset(p0 / kPanels, k);  // [K, J * 16]
    for (int64_t kk = k0; kk < k1; ++kk) {
      V16 wv[J];
      for (int j = 0; j < J; ++j) wv[j] = vload(wp + (kk * J + j) * kLanes);
      for (int r = 0; r < R; ++r) {
        const V16 xb = vsplat(x[(r0 + r) * k + kk]);
        for (int j = 0; j < J; ++j) acc[r][j] = vfma(xb, wv[j], acc[r][j]);
      }
    }
    if (!last) {
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < J; ++j) vstore(part + r * kPartStride + j * kLanes, acc[r][j]);
      return;
    }
    for (int j = 0; j < J; ++j) {
      const int64_t c0 = (p0 + j) * kLanes, valid = std::min<int64_t>(kLanes, n - c0);
      float b[kLanes] = {};
      if (bias)
        for (int64_t l = 0; l < valid; ++l) b[l] = bias[c0 + l];
      for (int r = 0; r < R; ++r) {
        float out[kLanes];
        vstore(out, bias ? vadd(acc[r][j], vload(b)) : acc[r][j]);
        std::copy(out, out + valid, y + (r0 + r) * n + c0);
      }
    }
  }

  template <int R>
  void tile_rows(int64_t r0, int64_t p0, int64_t panels, int64_t k0, int64_t k1, float* part, bool first,
                 bool last) const {
    switch (panels) {
      case 6: return tile<R, 6>(r0, p0, k0, k1, part, first, last);
      case 5: return tile<R, 5>(r0, p0, k0, k1, part, first, last);
      case 4: return tile<R, 4>(r0, p0, k0, k1, part, first, last);
      case 3: return tile<R, 3>(r0, p0, k0, k1, part, first, last);
      case 2: return tile<R, 2>(r0, p0, k0, k1, part, first, last);
      default: return tile<R, 1>(r0, p0, k0, k1, part, first, last);
    }
  }

  // Rows [r0, r1) against panels [p0, p0 + panels); `next` is what the thread reads after
  // this task (fetched during its last k-block).
  void block(int64_t r0, int64_t r1, int64_t p0, int64_t panels, const Lines& next) const {
    alignas(64) float part[kBlockRows * kPartStride];
    const int64_t tiles = (r1 - r0 + kRows - 1) / kRows;
    for (int64_t k0 = 0; k0 < k; k0 += kKc) {
      const int64_t k1 = std::min(k, k0 + kKc);
      const bool first = k0 == 0, last = k1 == k;
      const Lines ahead = last ? next : Lines{w + group_offset(p0 / kPanels, k) + k1 * panels * kLanes,
                                              (std::min(k, k1 + kKc) - k1) * panels};
      const int64_t lines = ahead.count;
      for (int64_t i = 0; i < tiles; ++i) {
        ahead.prefetch(lines * i / tiles, lines * (i + 1) / tiles);
        const int64_t r = r0 + i * kRows;
        float* pr = part + (r - r0) * kPartStride;
        switch (std::min<int64_t>(kRows, r1 - r)) {
          case 4: tile_rows<4>(r, p0, panels, k0, k1, pr, first, last); break;
          case 3: tile_rows<3>(r, p0, panels, k0, k1, pr, first, last); break;
          case 2: tile_rows<2>(r, p0, panels, k0, k1, pr, first, last); break;
          default: tile_rows<1>(r, p0, panels, k0, k1, pr, first, last); break;
        }
      }
    }
  }
};

at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous fp32 [M, K]");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kFloat && packed.is_contiguous() &&
              packed.size(2) == kLanes && packed.size(1) == x.size(1), "packed weight must be [P, K, 16] for x's K");
  TORCH_CHECK(n > 0 && (n + kLanes - 1) / kLanes == packed.size(0), "n does not match the packed weight");
  if (bias) TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->scalar_type() == at::kFloat &&
                        bias->is_contiguous(), "bias must be contiguous fp32 [N]");
  const int64_t m = x.size(0), panels = packed.size(0);
  at::Tensor y = at::empty({m, n}, x.options());
  if (m == 0) return y;
  const Gemm g{x.data_ptr<float>(), packed.data_ptr<float>(), bias ? bias->data_ptr<float>() : nullptr,
               y.data_ptr<float>(), m, n, x.size(1)};
  const int64_t col_blocks = (panels + kPanels - 1) / kPanels, row_blocks = (m + kBlockRows - 1) / kBlockRows;
  const int64_t tasks = col_blocks * row_blocks;
  // Task t: column block t % col_blocks of row block t / col_blocks (consecutive tasks of a
  // thread share its rows, so x stays in cache while the weights stream by).
  auto panels_of = [&](int64_t t) { return std::min<int64_t>(kPanels, panels - (t % col_blocks) * kPanels); };
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t p0 = (t % col_blocks) * kPanels, r0 = (t / col_blocks) * kBlockRows;
      const Lines next = t + 1 < t1 ? Lines{g.w + group_offset((t + 1) % col_blocks, g.k),
                                            std::min(g.k, kKc) * panels_of(t + 1)}
                                    : Lines{g.w, 0};
      g.block(r0, std::min(m, r0 + kBlockRows), p0, panels_of(t), next);
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(asyncengine_cpu, m) {
  m.def("pack_linear_weight(Tensor w) -> Tensor", &pack_weight);
  m.def("packed_linear(Tensor x, Tensor packed, Tensor? bias, int n) -> Tensor", &linear);
}
