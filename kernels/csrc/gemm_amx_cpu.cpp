// bf16 linear layer y = x @ W^T (+ b) on AMX tiles, batch-invariant by construction:
// every output element is the fp32 sum of its TDPBF16PS contributions over k-blocks of
// 32 in ascending order (each one dot product of the row's and the column's 32 values,
// computed by the tile unit independently of the other rows), then + bias, rounded once
// to bf16. Rows are padded to tiles of 16 with zeros and never read each other, so a
// row's bits do not depend on how many rows share the call, where it sits, or the
// threads (oneDNN, which this replaces for bf16, picks kernels by the row count).
// As the tile unit and the bf16 conversion do, subnormal inputs count as zero and
// subnormal results flush to zero: the same for every row, so invariance holds.
//
// The weight is packed once into 16-column panels of VNNI pairs, [ceil(N/16), Kp/2, 16, 2]
// (Kp = K rounded up to 32, zeros past K and N): a panel's 32 k of one block is one 1 KB
// tile, and a panel's tiles follow each other in k.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#if defined(__AMX_BF16__) && defined(__AMX_TILE__) && defined(__AVX512BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define AE_HAVE_AMX 1
#else
#define AE_HAVE_AMX 0
#endif

namespace {

constexpr int64_t kTile = 16;      // rows of an A or C tile, columns of a panel
constexpr int64_t kKb = 32;        // k per tile (16 VNNI pairs)
constexpr int64_t kRowBlock = 32;  // rows per pass: 2 A tiles x 2 panels = 4 C tiles
constexpr int64_t kPanels = 2;     // 16-column panels per task
constexpr int64_t kCols = kPanels * kTile;  // columns per task
constexpr int64_t kChunkBytes = 1 << 20;    // x rows per chunk: this many bytes of them

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

#if AE_HAVE_AMX
// The kernel asks Linux once for the AMX tile state (a no-op when granted already).
bool request_amx() {
  static const bool granted = [] {
    constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  }();
  return granted;
}

struct alignas(64) TileConfig {  // palette 1: tmm0-3 C, tmm4-5 A, tmm6-7 B, each 16 rows x 64 B
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  TileConfig() {
    for (int t = 0; t < 8; ++t) colsb[t] = 64, rows[t] = kTile;
  }
};

struct AmxGemm {
  const c10::BFloat16* x;     // [full, Kp]: the caller's rows where they need no padding
  const c10::BFloat16* tail;  // [Mp - full, Kp]: the other rows, zero-padded
  int64_t full;               // rows read from x (a multiple of kRowBlock)
  const c10::BFloat16* w;  // [P, Kp / 2, 16, 2]
  const float* bias;       // [N] or null
  c10::BFloat16* y;        // [M, N]
  int64_t m, n, kp;

  const c10::BFloat16* panel(int64_t p) const { return w + p * kp * kTile; }
  const c10::BFloat16* row(int64_t r) const { return r < full ? x + r * kp : tail + (r - full) * kp; }

  // Rows [r0, r0 + 32) x panels [p0, p0 + 2) over all k: C tiles (row half i, panel j)
  // live in tmm(2i + j). No software prefetch: the panels are one sequential stream per
  // thread, which the hardware prefetchers follow; hinting the next task's panels into
  // L2 during its first pass (what this did before) made a 64-row step 30% slower
  // (bench/gemm.py --dtype bfloat16, Intel Xeon with AMX: 15.5-16 -> 12 ms).
  void pass(int64_t r0, int64_t p0, float* c) const {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    const int64_t blocks = kp / kKb, lda = kp * 2;
    for (int64_t b = 0; b < blocks; ++b) {
      _tile_loadd(4, row(r0) + b * kKb, lda);
      _tile_loadd(5, row(r0 + kTile) + b * kKb, lda);
      _tile_loadd(6, panel(p0) + b * kKb * kTile, 64);
      _tile_loadd(7, panel(p0 + 1) + b * kKb * kTile, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    constexpr int64_t ldc = kCols * sizeof(float);  // c is [32, kCols] fp32
    _tile_stored(0, c, ldc);
    _tile_stored(1, c + kTile, ldc);
    _tile_stored(2, c + kTile * kCols, ldc);
    _tile_stored(3, c + kTile * kCols + kTile, ldc);
  }

  // c [32, kCols] fp32 -> y rows r0.., columns p0 * 16.. (+ bias), rounded to bf16.
  void write(int64_t r0, int64_t p0, const float* c) const {
    const int64_t c0 = p0 * kTile, cols = std::min<int64_t>(kCols, n - c0);
    const __mmask32 keep = cols >= kCols ? ~__mmask32(0) : (__mmask32(1) << cols) - 1;
    __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
    if (bias) {
      b0 = _mm512_maskz_loadu_ps(static_cast<__mmask16>(keep), bias + c0);
      b1 = _mm512_maskz_loadu_ps(static_cast<__mmask16>(keep >> 16), bias + c0 + kTile);
    }
    for (int64_t r = 0; r < kRowBlock && r0 + r < m; ++r) {
      const __m512 lo = _mm512_add_ps(_mm512_loadu_ps(c + r * kCols), b0);
      const __m512 hi = _mm512_add_ps(_mm512_loadu_ps(c + r * kCols + kTile), b1);
      const __m512bh v = _mm512_cvtne2ps_pbh(hi, lo);  // round to nearest even
      _mm512_mask_storeu_epi16(y + (r0 + r) * n + c0, keep, (__m512i)v);
    }
  }
};
#endif

bool amx_available() {
#if AE_HAVE_AMX
  return request_amx();
#else
  return false;
#endif
}

at::Tensor pack_weight_bf16(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16, "weight must be bf16 [N, K]");
  const at::Tensor wc = w.contiguous();
  const int64_t n = wc.size(0), k = wc.size(1), panels = round_up(n, kCols) / kTile;
  const int64_t kp = round_up(k, kKb);
  at::Tensor packed = at::zeros({panels, kp / 2, kTile, 2}, wc.options());
  const c10::BFloat16* src = wc.data_ptr<c10::BFloat16>();
  c10::BFloat16* dst = packed.data_ptr<c10::BFloat16>();
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t c = 0; c < kTile && p * kTile + c < n; ++c)
        for (int64_t j = 0; j < k; ++j) dst[((p * kp / 2 + j / 2) * kTile + c) * 2 + j % 2] = src[(p * kTile + c) * k + j];
  });
  return packed;
}

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias, int64_t n) {
  TORCH_CHECK(amx_available(), "this CPU or build has no AMX-BF16");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "x must be bf16 [M, K]");
  TORCH_CHECK(packed.dim() == 4 && packed.scalar_type() == at::kBFloat16 && packed.is_contiguous() &&
              packed.size(2) == kTile && packed.size(3) == 2 && packed.size(1) * 2 == round_up(x.size(1), kKb),
              "packed weight must be [P, Kp / 2, 16, 2] for x's K");
  TORCH_CHECK(n > 0 && round_up(n, kCols) / kTile == packed.size(0), "n does not match the packed weight");
  if (bias) TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n && bias->scalar_type() == at::kFloat &&
                        bias->is_contiguous(), "bias must be contiguous fp32 [N]");
  const int64_t m = x.size(0), k = x.size(1), kp = packed.size(1) * 2, mp = round_up(std::max<int64_t>(m, 1), kRowBlock);
  at::Tensor y = at::empty({m, n}, x.options());
  if (m == 0) return y;
#if AE_HAVE_AMX
  // Tiles read whole 32-row blocks of Kp columns: where K is a multiple of 32, x's own
  // rows serve every full block; the rest (or all of x) is copied into a zero-padded
  // buffer. A row's values are the same wherever it is read from. (Zeroing and copying
  // all of x cost ~10% of a bf16 prefill forward.)
  const int64_t full = k == kp && x.is_contiguous() ? m / kRowBlock * kRowBlock : 0;
  at::Tensor tail = at::zeros({mp - full, kp}, x.options());
  if (m > full) tail.narrow(0, 0, m - full).narrow(1, 0, k).copy_(x.narrow(0, full, m - full));
  const AmxGemm g{x.data_ptr<c10::BFloat16>(), tail.data_ptr<c10::BFloat16>(), full, packed.data_ptr<c10::BFloat16>(),
                  bias ? bias->data_ptr<float>() : nullptr, y.data_ptr<c10::BFloat16>(), m, n, kp};
  const int64_t tasks = packed.size(0) / kPanels;
  const int64_t most = std::max<int64_t>(1, kChunkBytes / (kRowBlock * kp * 2)) * kRowBlock;
  const int64_t chunk = round_up((mp + most - 1) / ((mp + most - 1) / most), kRowBlock);  // balanced
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    const TileConfig cfg;
    _tile_loadconfig(&cfg);
    alignas(64) float c[kRowBlock * kCols];
    // Rows in chunks whose x stays in L2 while every task of the thread passes over it
    // (streaming all of x per task halved the rate at 2048 rows: 2.8 -> 1.5 TFLOP/s).
    for (int64_t rc = 0; rc < mp; rc += chunk)
      for (int64_t t = t0; t < t1; ++t)
        for (int64_t r0 = rc; r0 < std::min(mp, rc + chunk); r0 += kRowBlock) {
          g.pass(r0, t * kPanels, c);
          g.write(r0, t * kPanels, c);
        }
    _tile_release();
  });
#endif
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(asyncengine_cpu, m) {
  m.def("amx_available() -> bool", &amx_available);
  m.def("pack_linear_weight_bf16(Tensor w) -> Tensor", &pack_weight_bf16);
  m.def("packed_linear_bf16(Tensor x, Tensor packed, Tensor? bias, int n) -> Tensor", &linear_bf16);
}
