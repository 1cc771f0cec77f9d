// 16-float vectors for the CPU ops: AVX-512 where compiled for it, else plain lanes.
// Every op is one correctly rounded IEEE operation per lane (explicit FMAs only; the
// build passes -ffp-contract=off), so both builds give the same bits.
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

constexpr int kLanes = 16;  // keys per score vector, floats per value vector

#if defined(__AVX512F__)
struct V16 {
  __m512 v;
};
inline V16 vzero() { return {_mm512_setzero_ps()}; }
inline V16 vsplat(float x) { return {_mm512_set1_ps(x)}; }
inline V16 vload(const float* p) { return {_mm512_loadu_ps(p)}; }
inline void vstore(float* p, V16 a) { _mm512_storeu_ps(p, a.v); }
inline V16 vfma(V16 a, V16 b, V16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline V16 vadd(V16 a, V16 b) { return {_mm512_add_ps(a.v, b.v)}; }
inline V16 vsub(V16 a, V16 b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline V16 vmul(V16 a, V16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline V16 vdiv(V16 a, V16 b) { return {_mm512_div_ps(a.v, b.v)}; }
inline V16 vmax(V16 a, V16 b) { return {_mm512_max_ps(a.v, b.v)}; }
inline V16 vround(V16 a) { return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
inline V16 vscalef(V16 a, V16 n) { return {_mm512_scalef_ps(a.v, n.v)}; }
// Lanes >= n become `fill` (a select, never arithmetic: NaN in a dropped lane is gone).
inline V16 vkeep_first(V16 a, int n, float fill) {
  __mmask16 m = n >= kLanes ? __mmask16(0xFFFF) : __mmask16((1u << std::max(n, 0)) - 1u);
  return {_mm512_mask_blend_ps(m, _mm512_set1_ps(fill), a.v)};
}
#else
struct V16 {
  float v[kLanes];
};
#define AE_LANEWISE(expr)                          \
  V16 r;                                           \
  for (int i = 0; i < kLanes; ++i) r.v[i] = expr; \
  return r
inline V16 vzero() { AE_LANEWISE(0.0f); }
inline V16 vsplat(float x) { AE_LANEWISE(x); }
inline V16 vload(const float* p) { AE_LANEWISE(p[i]); }
inline void vstore(float* p, V16 a) { for (int i = 0; i < kLanes; ++i) p[i] = a.v[i]; }
inline V16 vfma(V16 a, V16 b, V16 c) { AE_LANEWISE(std::fma(a.v[i], b.v[i], c.v[i])); }
inline V16 vadd(V16 a, V16 b) { AE_LANEWISE(a.v[i] + b.v[i]); }
inline V16 vsub(V16 a, V16 b) { AE_LANEWISE(a.v[i] - b.v[i]); }
inline V16 vmul(V16 a, V16 b) { AE_LANEWISE(a.v[i] * b.v[i]); }
inline V16 vdiv(V16 a, V16 b) { AE_LANEWISE(a.v[i] / b.v[i]); }
inline V16 vmax(V16 a, V16 b) { AE_LANEWISE(a.v[i] > b.v[i] ? a.v[i] : b.v[i]); }
inline V16 vround(V16 a) { AE_LANEWISE(std::nearbyint(a.v[i])); }
inline V16 vscalef(V16 a, V16 n) { AE_LANEWISE(std::ldexp(a.v[i], static_cast<int>(n.v[i]))); }
inline V16 vkeep_first(V16 a, int n, float fill) { AE_LANEWISE(i < n ? a.v[i] : fill); }
#undef AE_LANEWISE
#endif

// Fixed-order horizontal reductions (a tree over lane pairs).
inline float hsum(V16 a) {
  float t[kLanes];
  vstore(t, a);
  for (int w = kLanes / 2; w > 0; w /= 2)
    for (int i = 0; i < w; ++i) t[i] = t[i] + t[i + w];
  return t[0];
}
inline float hmax(V16 a) {
  float t[kLanes];
  vstore(t, a);
  float m = t[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, t[i]);
  return m;
}

// exp for x <= 0: x = n ln2 + r, |r| <= ln2 / 2, degree-7 Taylor polynomial (relative
// error ~5e-9, below fp32 rounding), times 2^n. Inputs below -87 are clamped (their
// weight, < 2^-125, is below fp32 resolution of any denominator that includes p = 1).
inline V16 vexp(V16 x) {
  x = vmax(vsplat(-87.0f), x);  // operand order: a NaN x stays NaN
  V16 n = vround(vmul(x, vsplat(1.44269504088896341f)));
  V16 r = vfma(n, vsplat(-0.693145751953125f), x);  // ln2 split hi + lo: exact n * hi
  r = vfma(n, vsplat(-1.428606765330187e-06f), r);
  V16 p = vsplat(1.0f / 5040.0f);
  p = vfma(p, r, vsplat(1.0f / 720.0f));
  p = vfma(p, r, vsplat(1.0f / 120.0f));
  p = vfma(p, r, vsplat(1.0f / 24.0f));
  p = vfma(p, r, vsplat(1.0f / 6.0f));
  p = vfma(p, r, vsplat(0.5f));
  p = vfma(p, r, vsplat(1.0f));
  p = vfma(p, r, vsplat(1.0f));
  return vscalef(p, n);
}

// 16 consecutive elements as fp32 (bf16 -> fp32 is exact: the bits shifted up by 16).
inline V16 load16(const float* p) { return vload(p); }
inline V16 load16(const c10::BFloat16* p) {
#if defined(__AVX512F__)
  __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
#else
  float t[kLanes];
  for (int i = 0; i < kLanes; ++i) t[i] = static_cast<float>(p[i]);
  return vload(t);
#endif
}

// fp32 -> bf16 bits exactly as c10::BFloat16(float) rounds: nearest even on the bit
// pattern (subnormals kept), NaN -> 0x7FC0. Lanes hold the 16 result bits in their low half.
#if defined(__AVX512F__)
inline __m512i bf16_bits_exact(V16 a) {
  const __m512i u = _mm512_castps_si512(a.v);
  const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)),
                                        _mm512_set1_epi32(0x7FFF));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q);
  return _mm512_mask_blend_epi32(nan, r, _mm512_set1_epi32(0x7FC0));
}
#endif

// The same 16 results packed as bf16. Where the CPU has VCVTNEPS2BF16 it rounds every
// lane: it is nearest even like c10 on normals, zeros and infinities, but it reads a
// subnormal input as zero and keeps a NaN's sign and payload, so a vector holding
// either (one fpclass test; rare in a model's activations) takes the bit-pattern path.
// One conversion for the ~9 integer ops of that path. AMD EPYC Zen 5, one thread, the
// shapes of a 32-row decode group of SmolLM2, per call: SiLU-and-multiply [32, 3072]
// 24.8 -> 19.6 us, RMSNorm + residual [32, 576] 7.8 -> 6.7, RoPE + KV store into cached
// lines 15.4 -> 11.4 (the same bits: tests/kernels/test_cpu_fused_ops.py).
#if defined(__AVX512F__)
inline __m256i bf16_packed(V16 a) {
#if defined(__AVX512BF16__)
  constexpr int kNanOrSubnormal = 0x01 | 0x80 | 0x20;  // QNaN, SNaN, denormal
  if (__builtin_expect(_mm512_fpclass_ps_mask(a.v, kNanOrSubnormal) == 0, 1))
    return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(a.v));
#endif
  return _mm512_cvtepi32_epi16(bf16_bits_exact(a));
}
#endif

// a rounded to T and back to fp32 (identity for float): the vector form of rnd<T>.
template <typename T>
inline V16 vround_to(V16 a) {
  return a;
}
template <>
inline V16 vround_to<c10::BFloat16>(V16 a) {
#if defined(__AVX512F__)
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16_packed(a)), 16))};
#else
  float t[kLanes];
  vstore(t, a);
  for (int i = 0; i < kLanes; ++i) t[i] = static_cast<float>(c10::BFloat16(t[i]));
  return vload(t);
#endif
}

// 16 consecutive elements stored as T, each rounded as static_cast<T> does.
inline void store16(float* p, V16 a) { vstore(p, a); }
inline void store16(c10::BFloat16* p, V16 a) {
#if defined(__AVX512F__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bf16_packed(a));
#else
  float t[kLanes];
  vstore(t, a);
  for (int i = 0; i < kLanes; ++i) p[i] = c10::BFloat16(t[i]);
#endif
}
