// The logprob contract's vocabulary reductions (asyncengine/row_reductions.py) compiled:
//   row_stats(x [R, V] fp32, with_sum) -> (m [R, 1], s [R, 1], argmax [R] int64, finite [R] bool)
//   m = max of the row (0 where that max is not finite: NaN anywhere, or +-inf),
//   argmax = torch.argmax's (the first NaN, else the first maximum), finite = no NaN or inf
//   (one read of the row, row_scan.h),
//   s = sum over the row of contract_exp(x - m), in a fixed tree: within each chunk of
//       512 entries halves are added (i + w with w = 256, 128, ..., 1), then the chunk sums
//       the same way over the chunk count rounded up to a power of two (missing ones 0).
// contract_exp is its own fixed sequence of single IEEE operations (no FMA, no library
// call), so the pure torch twin in row_reductions.py gives the same bits on any device,
// and this build gives the same bits with AVX-512 or without. One row is one thread's
// work, in one order: the bits never depend on the batch or the thread split.
//
// Why it exists: torch's exp is MKL's on x86, whose generic path on AMD took ~1 ms of a
// 64-row decode step's 2 ms logsumexp at vocab 49152; this is one read of the row for
// the scan and one (from L2) for the sum, with nothing written.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "row_scan.h"
#include "vec16.h"

namespace {

constexpr int kChunk = 512;  // = row_reductions._CHUNK
constexpr float kInf = std::numeric_limits<float>::infinity();

// Cephes expf, evaluated without FMAs; the twin is row_reductions.contract_exp. The
// constants are the fp32 values, written exactly (hex) in both places.
constexpr float kLog2e = 0x1.715476p+0f;
constexpr float kLn2Hi = 0x1.63p-1f;  // 0.693359375, 9 significant bits: n * kLn2Hi is exact
constexpr float kLn2Lo = -0x1.bd0106p-13f;
constexpr float kPoly[6] = {0x1.a0d2cep-13f, 0x1.6e879cp-10f, 0x1.11121p-7f, 0x1.555382p-5f, 0x1.555554p-3f, 0x1p-1f};

#if defined(__AVX512F__)
inline V16 vmin(V16 a, V16 b) { return {_mm512_min_ps(a.v, b.v)}; }  // b when either is NaN
// 2^n for integral n in [-126, 127], from the exponent bits.
inline V16 vpow2(V16 n) {
  const __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(n.v), _mm512_set1_epi32(127));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(e, 23))};
}
// t < -87: 0; t > 88: +inf; else y (NaN t keeps y, which is NaN).
inline V16 exp_ends(V16 y, V16 t) {
  const __mmask16 lo = _mm512_cmp_ps_mask(t.v, _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
  const __mmask16 hi = _mm512_cmp_ps_mask(t.v, _mm512_set1_ps(88.0f), _CMP_GT_OQ);
  return {_mm512_mask_blend_ps(hi, _mm512_mask_blend_ps(lo, y.v, _mm512_setzero_ps()), _mm512_set1_ps(kInf))};
}
#else
inline V16 vmin(V16 a, V16 b) {
  V16 r;
  for (int i = 0; i < kLanes; ++i) r.v[i] = a.v[i] < b.v[i] ? a.v[i] : b.v[i];
  return r;
}
inline V16 vpow2(V16 n) {
  V16 r;
  for (int i = 0; i < kLanes; ++i) {
    const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n.v[i]) + 127) << 23;
    std::memcpy(&r.v[i], &bits, sizeof(float));
  }
  return r;
}
inline V16 exp_ends(V16 y, V16 t) {
  for (int i = 0; i < kLanes; ++i) y.v[i] = t.v[i] < -87.0f ? 0.0f : (t.v[i] > 88.0f ? kInf : y.v[i]);
  return y;
}
#endif

inline V16 contract_exp(V16 t) {
  const V16 x = vmin(vsplat(88.0f), vmax(vsplat(-87.0f), t));  // operand order keeps NaN
  const V16 n = vround(vmul(x, vsplat(kLog2e)));                // nearest, ties to even
  V16 r = vsub(x, vmul(n, vsplat(kLn2Hi)));
  r = vsub(r, vmul(n, vsplat(kLn2Lo)));
  V16 p = vsplat(kPoly[0]);
  for (int i = 1; i < 6; ++i) p = vadd(vmul(p, r), vsplat(kPoly[i]));
  p = vadd(vadd(vmul(p, vmul(r, r)), r), vsplat(1.0f));
  return exp_ends(vmul(p, vpow2(n)), t);
}

// Up to 16 entries of p, the lanes past n = fill.
inline V16 load_tail(const float* p, int64_t n, float fill) {
  float t[kLanes];
  for (int i = 0; i < kLanes; ++i) t[i] = i < n ? p[i] : fill;
  return vload(t);
}

// Sums w floats (a power of two) in place by halves: a[i] += a[i + w/2], ...; returns a[0].
inline float halving_sum(float* a, int64_t w) {
  for (; w > kLanes; w /= 2)
    for (int64_t i = 0; i < w / 2; i += kLanes) vstore(a + i, vadd(vload(a + i), vload(a + i + w / 2)));
  for (; w > 1; w /= 2)
    for (int64_t i = 0; i < w / 2; ++i) a[i] = a[i] + a[i + w / 2];
  return a[0];
}

// next: the row the thread scans after this one (or null), hinted into L2 a line per 16
// entries summed here, so its scan reads cache while this sum computes (hints only).
float row_exp_sum(const float* x, int64_t v, float m, float* chunk_sums, const float* next) {
  alignas(64) float e[kChunk];
  const V16 mv = vsplat(m);
  const int64_t chunks = (v + kChunk - 1) / kChunk;
  int64_t padded = 1;
  while (padded < chunks) padded *= 2;
  for (int64_t c = 0; c < chunks; ++c) {
    const float* xc = x + c * kChunk;
    const int64_t n = std::min<int64_t>(kChunk, v - c * kChunk);
    for (int64_t j = 0; j < kChunk; j += kLanes) {
      V16 y = vzero();  // entries past the row add +0
      if (next != nullptr && j < n) __builtin_prefetch(next + c * kChunk + j, 0, 2);
      if (j + kLanes <= n) y = contract_exp(vsub(vload(xc + j), mv));
      else if (j < n) y = vkeep_first(contract_exp(vsub(load_tail(xc + j, n - j, 0.0f), mv)), int(n - j), 0.0f);
      vstore(e + j, y);
    }
    chunk_sums[c] = halving_sum(e, kChunk);
  }
  for (int64_t c = chunks; c < padded; ++c) chunk_sums[c] = 0.0f;
  return halving_sum(chunk_sums, padded);
}

// with_sum false skips the sum (s is left 0): the finite check and a filtered row's
// argmax need only the scan.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> row_stats(const at::Tensor& x_in, bool with_sum) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(),
              "row_stats takes a CPU float32 [R, V] tensor");
  const at::Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0), v = x.size(1);
  TORCH_CHECK(v < (int64_t{1} << 31) - kLanes, "row_stats: rows of at most 2^31 - 17 entries (int32 lane indices)");
  at::Tensor m = at::empty({rows, 1}, x.options()), s = at::zeros({rows, 1}, x.options());
  at::Tensor idx = at::empty({rows}, x.options().dtype(at::kLong)), finite = at::empty({rows}, x.options().dtype(at::kBool));
  if (v == 0) {  // torch's amax and argmax have no identity: the twins raise the same way
    TORCH_CHECK(rows == 0, "row_stats of an empty row");
    return {m, s, idx, finite};
  }
  const float* xp = x.data_ptr<float>();
  float *mp = m.data_ptr<float>(), *sp = s.data_ptr<float>();
  int64_t* ip = idx.data_ptr<int64_t>();
  bool* fp = finite.data_ptr<bool>();
  const int64_t grain = std::max<int64_t>(1, 16384 / v);
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    // halving_sum works on whole vectors past 16 sums: round the buffer up to one.
    std::vector<float> sums(std::max<int64_t>(kLanes, 2 * ((v + kChunk - 1) / kChunk)));
    for (int64_t r = r0; r < r1; ++r) {
      const RowScan scan = scan_row(xp + r * v, v);
      // The normalizer's shift: 0 where the max is not finite (NaN anywhere, or +-inf).
      mp[r] = !scan.nan && std::isfinite(scan.max) ? scan.max : 0.0f;
      ip[r] = scan.argmax;
      fp[r] = scan.finite;
      const float* next = r + 1 < r1 ? xp + (r + 1) * v : nullptr;
      if (with_sum) sp[r] = row_exp_sum(xp + r * v, v, mp[r], sums.data(), next);  // the row is in L2 now
    }
  });
  return {m, s, idx, finite};
}

// contract_exp elementwise: what row_stats sums, for the contract's other uses (top-p's
// mass) and for tests that compare it with the twin entry by entry.
at::Tensor contract_exp_op(const at::Tensor& t_in) {
  TORCH_CHECK(t_in.scalar_type() == at::kFloat && t_in.device().is_cpu(), "contract_exp takes a CPU float32 tensor");
  const at::Tensor t = t_in.contiguous();
  at::Tensor y = at::empty_like(t);
  const float* tp = t.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, (t.numel() + kLanes - 1) / kLanes, 1024, [&](int64_t v0, int64_t v1) {
    for (int64_t i = v0 * kLanes; i < std::min(v1 * kLanes, t.numel()); i += kLanes) {
      const int64_t n = std::min<int64_t>(kLanes, t.numel() - i);
      float out[kLanes];
      vstore(out, contract_exp(n == kLanes ? vload(tp + i) : load_tail(tp + i, n, 0.0f)));
      std::memcpy(yp + i, out, n * sizeof(float));
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(asyncengine_cpu, m) {
  m.def("row_stats(Tensor x, bool with_sum) -> (Tensor, Tensor, Tensor, Tensor)", &row_stats);
  m.def("contract_exp(Tensor t) -> Tensor", &contract_exp_op);
}
