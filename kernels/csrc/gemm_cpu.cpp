// fp32 linear layer y = x @ W^T (+ b) that is batch-invariant by construction: every
// output element is one FMA chain over k = 0..K-1 in ascending order, then the bias add.
// Blocking (rows per register tile, columns per tile, tasks per thread) only decides
// which elements are computed together, never the operations of one element, so a row's
// bits do not depend on how many rows share the call, where it sits, or the threads.
// (BLAS libraries pick kernels and K splits by the row count; this is why the engine's
// deterministic mode otherwise runs them in fixed-size row tiles.)
//
// The weight is packed once as [ceil(N/16), K, 16]: panel p holds columns 16p..16p+15,
// k-major, zero-padded past N, so the micro-kernel reads one 64-byte row per k and panel.
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

constexpr int kRows = 4;      // rows per register tile
constexpr int kPanels = 6;    // 16-column panels per register tile (4 x 6 accumulators)
constexpr int64_t kBlockRows = 64;  // rows per parallel task

at::Tensor pack_weight(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat, "weight must be fp32 [N, K]");
  const at::Tensor wc = w.contiguous();
  const int64_t n = wc.size(0), k = wc.size(1), panels = (n + kLanes - 1) / kLanes;
  at::Tensor packed = at::zeros({panels, k, kLanes}, wc.options());
  const float* src = wc.data_ptr<float>();
  float* dst = packed.data_ptr<float>();
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t l = 0; l < kLanes && p * kLanes + l < n; ++l)
        for (int64_t j = 0; j < k; ++j) dst[(p * k + j) * kLanes + l] = src[(p * kLanes + l) * k + j];
  });
  return packed;
}

struct Gemm {
  const float* x;     // [M, K]
  const float* w;     // [P, K, 16]
  const float* bias;  // [N] or null
  float* y;           // [M, N]
  int64_t m, n, k;

  // Rows r0..r0+R-1 against panels p0..p0+J-1.
  template <int R, int J>
  void tile(int64_t r0, int64_t p0) const {
    V16 acc[R][J];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < J; ++j) acc[r][j] = vzero();
    const float* wp = w + p0 * k * kLanes;
    for (int64_t kk = 0; kk < k; ++kk) {
      V16 wv[J];
      for (int j = 0; j < J; ++j) wv[j] = vload(wp + (j * k + kk) * kLanes);
      for (int r = 0; r < R; ++r) {
        const V16 xb = vsplat(x[(r0 + r) * k + kk]);
        for (int j = 0; j < J; ++j) acc[r][j] = vfma(xb, wv[j], acc[r][j]);
      }
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
  void tile_rows(int64_t r0, int64_t p0, int64_t panels) const {
    switch (panels) {
      case 6: return tile<R, 6>(r0, p0);
      case 5: return tile<R, 5>(r0, p0);
      case 4: return tile<R, 4>(r0, p0);
      case 3: return tile<R, 3>(r0, p0);
      case 2: return tile<R, 2>(r0, p0);
      default: return tile<R, 1>(r0, p0);
    }
  }

  // Rows [r0, r1) against panels [p0, p0 + panels).
  void block(int64_t r0, int64_t r1, int64_t p0, int64_t panels) const {
    int64_t r = r0;
    for (; r + kRows <= r1; r += kRows) tile_rows<kRows>(r, p0, panels);
    switch (r1 - r) {
      case 3: tile_rows<3>(r, p0, panels); break;
      case 2: tile_rows<2>(r, p0, panels); break;
      case 1: tile_rows<1>(r, p0, panels); break;
      default: break;
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
  at::parallel_for(0, col_blocks * row_blocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t cb = t % col_blocks, rb = t / col_blocks;
      const int64_t p0 = cb * kPanels, r0 = rb * kBlockRows;
      g.block(r0, std::min(m, r0 + kBlockRows), p0, std::min<int64_t>(kPanels, panels - p0));
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(asyncengine_cpu, m) {
  m.def("pack_linear_weight(Tensor w) -> Tensor", &pack_weight);
  m.def("packed_linear(Tensor x, Tensor packed, Tensor? bias, int n) -> Tensor", &linear);
}
