// bf16 linear layer y = x @ W^T (+ b) with AVX512-BF16 (VDPBF16PS), for CPUs without AMX
// (AMD Zen 4/5), batch-invariant by construction: every output element is one chain of
// VDPBF16PS steps over the k-pairs (0,1), (2,3), ... in ascending order, each adding the
// pair's two exact bf16 products to the fp32 sum, then + bias, rounded once to bf16.
// Blocking (rows per register tile, panels per task, k-blocks) only decides which
// elements are computed together, never the operations of one element; partial sums wait
// in fp32 between k-blocks, so the chain is the same one. A row's bits therefore do not
// depend on how many rows share the call, where it sits, or the threads. As the
// instruction does, subnormal inputs count as zero and subnormal sums flush to zero: the
// same for every row.
//
// The weight is the AMX kernel's packing (pack_linear_weight_bf16): 16-column panels of
// VNNI pairs, [ceil(N/32) * 2, Kp/2, 16, 2] with Kp = K rounded up to 32, zeros past K and
// N. One k-pair of a panel is one 64-byte vector: exactly VDPBF16PS's second operand.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define AE_HAVE_AVX512BF16 1
#else
#define AE_HAVE_AVX512BF16 0
#endif

namespace {

constexpr int64_t kTile = 16;       // columns per panel
constexpr int64_t kPanelAlign = 2;  // the packing pads N to 32 columns: panels come in pairs
constexpr int kRows = 6;            // rows per register tile: 6 x 4 accumulators + 4 weights
constexpr int kPanels = 4;          // panels per task (64 columns)
constexpr int64_t kBlockRows = 48;  // rows per parallel task (8 register tiles)
constexpr int64_t kKc = 64;         // k-pairs per block: 4 panels x 64 x 64 B = 16 KB stays in L1
constexpr int64_t kPart = kPanels * kTile;  // partial sums per row

bool avx512_bf16_available() { return AE_HAVE_AVX512BF16 != 0; }

#if AE_HAVE_AVX512BF16
struct Bf16Gemm {
  const uint16_t* x;  // [M, K] bf16 bits
  const uint16_t* w;  // [P, Kp / 2, 16, 2]
  const float* bias;  // [N] or null
  uint16_t* y;        // [M, N]
  int64_t m, n, k, kp;

  // The bf16 pair (2q, 2q + 1) of row r as one 32-bit lane; past K the high half is zero.
  uint32_t pair(int64_t r, int64_t q) const {
    const uint16_t* p = x + r * k + 2 * q;
    if (2 * q + 1 < k) {
      uint32_t v;
      std::memcpy(&v, p, sizeof v);
      return v;
    }
    return p[0];
  }

  // Rows r0..r0+R-1 x panels p0..p0+J-1 over k-pairs [q0, q1): the sums continue from part
  // (unless first) and go back to part, or, after the last block, + bias into y as bf16.
  template <int R, int J>
  void tile(int64_t r0, int64_t p0, int64_t q0, int64_t q1, float* part, bool first, bool last) const {
    __m512 acc[R][J];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < J; ++j) acc[r][j] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(part + r * kPart + j * kTile);
    const uint16_t* wp = w + p0 * kp * kTile;  // panel p0; panel j starts kp * 16 further
    for (int64_t q = q0; q < q1; ++q) {
      __m512bh wv[J];
      for (int j = 0; j < J; ++j) wv[j] = (__m512bh)_mm512_loadu_si512(wp + (j * kp / 2 + q) * 2 * kTile);
      for (int r = 0; r < R; ++r) {
        const __m512bh xb = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair(r0 + r, q)));
        for (int j = 0; j < J; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], xb, wv[j]);
      }
    }
    if (!last) {
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < J; ++j) _mm512_storeu_ps(part + r * kPart + j * kTile, acc[r][j]);
      return;
    }
    for (int j = 0; j < J; ++j) {
      const int64_t c0 = (p0 + j) * kTile, valid = std::min<int64_t>(kTile, n - c0);
      if (valid <= 0) return;  // a padding panel past N
      const __mmask16 keep = valid >= kTile ? __mmask16(0xFFFF) : __mmask16((1u << valid) - 1u);
      const __m512 b = bias ? _mm512_maskz_loadu_ps(keep, bias + c0) : _mm512_setzero_ps();
      for (int r = 0; r < R; ++r) {
        const __m256bh v = _mm512_cvtneps_pbh(_mm512_add_ps(acc[r][j], b));  // round to nearest even
        _mm256_mask_storeu_epi16(y + (r0 + r) * n + c0, keep, (__m256i)v);
      }
    }
  }

  template <int R>
  void tile_rows(int64_t r0, int64_t p0, int64_t panels, int64_t q0, int64_t q1, float* part, bool first,
                 bool last) const {
    if (panels == 4) return tile<R, 4>(r0, p0, q0, q1, part, first, last);
    return tile<R, 2>(r0, p0, q0, q1, part, first, last);  // the packing's last pair of panels
  }

  // Rows [r0, r1) against panels [p0, p0 + panels), k-block by k-block.
  void block(int64_t r0, int64_t r1, int64_t p0, int64_t panels) const {
    alignas(64) float part[kBlockRows * kPart];
    const int64_t pairs = (k + 1) / 2;
    for (int64_t q0 = 0; q0 < pairs; q0 += kKc) {
      const int64_t q1 = std::min(pairs, q0 + kKc);
      const bool first = q0 == 0, last = q1 == pairs;
      for (int64_t r = r0; r < r1; r += kRows) {
        float* pr = part + (r - r0) * kPart;
        switch (std::min<int64_t>(kRows, r1 - r)) {
          case 6: tile_rows<6>(r, p0, panels, q0, q1, pr, first, last); break;
          case 5: tile_rows<5>(r, p0, panels, q0, q1, pr, first, last); break;
          case 4: tile_rows<4>(r, p0, panels, q0, q1, pr, first, last); break;
          case 3: tile_rows<3>(r, p0, panels, q0, q1, pr, first, last); break;
          case 2: tile_rows<2>(r, p0, panels, q0, q1, pr, first, last); break;
          default: tile_rows<1>(r, p0, panels, q0, q1, pr, first, last); break;
        }
      }
    }
  }
};
#endif

at::Tensor linear_bf16_avx512(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                              int64_t n) {
  TORCH_CHECK(avx512_bf16_available(), "this CPU or build has no AVX512-BF16");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "x must be bf16 [M, K]");
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == at::kBFloat16 && packed.is_contiguous() &&
                  packed.size(2) == kTile && packed.size(3) == 2 && packed.size(1) * 2 == (x.size(1) + 31) / 32 * 32,
              "packed weight must be [P, Kp / 2, 16, 2] for x's K");
  TORCH_CHECK(n > 0 && packed.size(0) % kPanelAlign == 0 && (n + 31) / 32 * kPanelAlign == packed.size(0),
              "n does not match the packed weight");
  if (bias) TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->scalar_type() == at::kFloat &&
                        bias->is_contiguous(), "bias must be contiguous fp32 [N]");
  const at::Tensor xc = x.contiguous();
  const int64_t m = xc.size(0);
  at::Tensor y = at::empty({m, n}, x.options());
  if (m == 0) return y;
#if AE_HAVE_AVX512BF16
  const Bf16Gemm g{reinterpret_cast<const uint16_t*>(xc.data_ptr<c10::BFloat16>()),
                   reinterpret_cast<const uint16_t*>(packed.data_ptr<c10::BFloat16>()),
                   bias ? bias->data_ptr<float>() : nullptr, reinterpret_cast<uint16_t*>(y.data_ptr<c10::BFloat16>()),
                   m, n, xc.size(1), packed.size(1) * 2};
  const int64_t panels = packed.size(0), col_blocks = (panels + kPanels - 1) / kPanels;
  const int64_t row_blocks = (m + kBlockRows - 1) / kBlockRows;
  // Task t: column block t % col_blocks of row block t / col_blocks (a thread's tasks share
  // rows, so x stays in cache while the weights stream by).
  at::parallel_for(0, col_blocks * row_blocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t p0 = (t % col_blocks) * kPanels, r0 = (t / col_blocks) * kBlockRows;
      g.block(r0, std::min(m, r0 + kBlockRows), p0, std::min<int64_t>(kPanels, panels - p0));
    }
  });
#endif
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(asyncengine_cpu, m) {
  m.def("avx512_bf16_available() -> bool", &avx512_bf16_available);
  m.def("packed_linear_bf16_avx512(Tensor x, Tensor packed, Tensor? bias, int n) -> Tensor", &linear_bf16_avx512);
}
