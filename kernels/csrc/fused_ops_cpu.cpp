// The CPU engine's small per-layer ops, each one pass over its rows instead of several
// torch kernels (at decode sizes these are dispatch- and memory-bound, not compute-bound):
//   rms_norm       y = w * (r * 1/sqrt(mean(r^2) + eps)), r = residual + x
//   silu_mul       silu(gate) * up, exact silu = g / (1 + exp(-g)) from a non-positive exp
//   rope_store_kv  rotate q and k (HF rotate_half), write k and v into the paged cache
// Every element or row is computed by one fixed sequence of operations that never looks
// at other rows, and 16-element tails go through the same vector code as the body, so
// results do not depend on the batch, the row's place in it or the thread split.
// Rounding follows the torch reference ops: each op rounds to the model dtype where the
// torch code computes in it (bf16), so only the order of the RMS sum differs from torch.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "vec16.h"

namespace {

// Round a float to the storage type (identity for float; nearest-even for bf16).
template <typename T>
inline float rnd(float x) {
  return static_cast<float>(static_cast<T>(x));
}

// n <= 16 elements of p as a V16, lanes past n zero.
template <typename T>
inline V16 load_n(const T* p, int64_t n) {
  float t[kLanes] = {};
  for (int64_t i = 0; i < n; ++i) t[i] = static_cast<float>(p[i]);
  return vload(t);
}

template <typename T>
inline void store_n(T* p, V16 a, int64_t n) {
  float t[kLanes];
  vstore(t, a);
  for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(t[i]);
}

// Rows per parallel task: enough elements that a task outweighs its scheduling.
inline int64_t grain(int64_t row_elems) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(row_elems, 1)); }

template <typename T>
void rms_norm_rows(const T* x, const T* res, const T* w, T* y, T* new_res, int64_t rows, int64_t h, float eps) {
  at::parallel_for(0, rows, grain(h), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * h;
      T* nr = new_res ? new_res + r * h : nullptr;
      // r = residual + x in the model dtype (the operand order of HF's residual add).
      if (res) {
        int64_t j = 0;
        for (; j + kLanes <= h; j += kLanes) store16(nr + j, vadd(load16(res + r * h + j), load16(xr + j)));
        for (; j < h; ++j) nr[j] = static_cast<T>(static_cast<float>(res[r * h + j]) + static_cast<float>(xr[j]));
        xr = nr;
      }
      V16 acc = vzero();
      int64_t j = 0;
      for (; j + kLanes <= h; j += kLanes) {
        const V16 v = load16(xr + j);
        acc = vfma(v, v, acc);
      }
      if (j < h) {  // the tail: zero lanes add +0 to each lane's sum
        const V16 v = load_n(xr + j, h - j);
        acc = vfma(v, v, acc);
      }
      const float inv = 1.0f / std::sqrt(hsum(acc) / static_cast<float>(h) + eps);
      const V16 inv16 = vsplat(inv);
      for (j = 0; j + kLanes <= h; j += kLanes)
        store16(y + r * h + j, vmul(load16(w + j), vround_to<T>(vmul(load16(xr + j), inv16))));
      for (; j < h; ++j)
        y[r * h + j] = static_cast<T>(static_cast<float>(w[j]) * rnd<T>(static_cast<float>(xr[j]) * inv));
    }
  });
}

std::tuple<at::Tensor, std::optional<at::Tensor>> rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps,
                                                            const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be contiguous [T, H]");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1) && weight.is_contiguous(), "weight must be [H]");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight and x dtypes differ");
  if (residual) TORCH_CHECK(residual->sizes() == x.sizes() && residual->is_contiguous() &&
                            residual->scalar_type() == x.scalar_type(), "residual must match x");
  at::Tensor y = at::empty_like(x);
  std::optional<at::Tensor> new_res;
  if (residual) new_res = at::empty_like(x);
  const int64_t rows = x.size(0), h = x.size(1);
  const float e = static_cast<float>(eps);
  if (x.scalar_type() == at::kFloat) {
    rms_norm_rows<float>(x.data_ptr<float>(), residual ? residual->data_ptr<float>() : nullptr,
                         weight.data_ptr<float>(), y.data_ptr<float>(), new_res ? new_res->data_ptr<float>() : nullptr,
                         rows, h, e);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "rms_norm supports float32 and bfloat16");
    using B = c10::BFloat16;
    rms_norm_rows<B>(x.data_ptr<B>(), residual ? residual->data_ptr<B>() : nullptr, weight.data_ptr<B>(),
                     y.data_ptr<B>(), new_res ? new_res->data_ptr<B>() : nullptr, rows, h, e);
  }
  return {y, new_res};
}

// silu(g) = g / (1 + e) for g >= 0, g * e / (1 + e) for g < 0, with e = exp(-|g|) <= 1:
// vexp only ever sees non-positive arguments, so nothing overflows.
inline V16 vsilu(V16 g) {
  const V16 neg_abs = vmul(vsplat(-1.0f), vmax(g, vmul(vsplat(-1.0f), g)));
  const V16 e = vexp(neg_abs);
  const V16 den = vadd(vsplat(1.0f), e);
  const V16 ge = vmul(g, e);  // the numerator for g < 0; one division serves both signs
#if defined(__AVX512F__)
  const __mmask16 m = _mm512_cmp_ps_mask(g.v, _mm512_setzero_ps(), _CMP_GE_OQ);
  const V16 num{_mm512_mask_blend_ps(m, ge.v, g.v)};
#else
  V16 num;
  for (int i = 0; i < kLanes; ++i) num.v[i] = g.v[i] >= 0.0f ? g.v[i] : ge.v[i];
#endif
  return vdiv(num, den);
}

template <typename T>
void silu_mul_rows(const T* gu, T* out, int64_t rows, int64_t inter) {
  at::parallel_for(0, rows, grain(inter), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* g = gu + r * 2 * inter;
      const T* u = g + inter;
      T* o = out + r * inter;
      for (int64_t j = 0; j < inter; j += kLanes) {
        const int64_t n = std::min<int64_t>(kLanes, inter - j);
        const V16 s = vsilu(n == kLanes ? load16(g + j) : load_n(g + j, n));
        if (n == kLanes) {  // silu rounded to T, times u, rounded to T (as torch computes it)
          store16(o + j, vmul(vround_to<T>(s), load16(u + j)));
          continue;
        }
        float sv[kLanes];
        vstore(sv, s);
        for (int64_t i = 0; i < n; ++i) o[j + i] = static_cast<T>(rnd<T>(sv[i]) * static_cast<float>(u[j + i]));
      }
    }
  });
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.is_contiguous() && gate_up.size(1) % 2 == 0,
              "gate_up must be contiguous [T, 2 I]");
  const int64_t rows = gate_up.size(0), inter = gate_up.size(1) / 2;
  at::Tensor out = at::empty({rows, inter}, gate_up.options());
  if (gate_up.scalar_type() == at::kFloat) {
    silu_mul_rows<float>(gate_up.data_ptr<float>(), out.data_ptr<float>(), rows, inter);
  } else {
    TORCH_CHECK(gate_up.scalar_type() == at::kBFloat16, "silu_mul supports float32 and bfloat16");
    using B = c10::BFloat16;
    silu_mul_rows<B>(gate_up.data_ptr<B>(), out.data_ptr<B>(), rows, inter);
  }
  return out;
}

// One head of one token: x1 * c + (-x2) * s | x2 * c + x1 * s, each product and sum
// rounded to T as the torch reference computes it (cos/sin first cast to T). Sixteen
// lanes at a time, then the same operations per element on the tail (-x is vmul by -1,
// exact, so a zero keeps the sign the scalar negation gives it).
template <typename T>
inline void rotate(const T* x, const float* cs, int64_t half, T* out) {
  const V16 neg = vsplat(-1.0f);
  int64_t i = 0;
  for (; i + kLanes <= half; i += kLanes) {
    const V16 c = vround_to<T>(load16(cs + i)), s = vround_to<T>(load16(cs + half + i));
    const V16 x1 = load16(x + i), x2 = load16(x + half + i);
    store16(out + i, vadd(vround_to<T>(vmul(x1, c)), vround_to<T>(vmul(vmul(neg, x2), s))));
    store16(out + half + i, vadd(vround_to<T>(vmul(x2, c)), vround_to<T>(vmul(x1, s))));
  }
  for (; i < half; ++i) {
    const float c = rnd<T>(cs[i]), s = rnd<T>(cs[half + i]);
    const float x1 = static_cast<float>(x[i]), x2 = static_cast<float>(x[half + i]);
    out[i] = static_cast<T>(rnd<T>(x1 * c) + rnd<T>(-x2 * s));
    out[half + i] = static_cast<T>(rnd<T>(x2 * c) + rnd<T>(x1 * s));
  }
}

struct StridedCache {
  int64_t s_block, s_slot, s_head, s_d, block_size;
  int64_t at(int64_t slot, int64_t head) const {  // element (slot, head, d = 0)
    return (slot / block_size) * s_block + (slot % block_size) * s_slot + head * s_head;
  }
};

// Write-intent prefetch of the cache lines one (slot, head) row of d elements lands on.
// The new token's rows are cold (last read a step ago, 30 layers of KV since), and on
// new_kv_cache's layout a key's d elements lie on d separate lines (keys are d-major):
// asking for them a token ahead overlaps their misses with the rotations. With the
// vector rotation: 120 -> 87 us a call in a 64-sequence bf16 decode step (AMD EPYC Zen 4,
// old and new op alternated step by step in one engine), ~1 ms of a ~90 ms step.
template <typename T>
inline void prefetch_row(const T* row, int64_t d, int64_t s_d) {
  const int64_t step = std::max<int64_t>(1, 64 / std::max<int64_t>(1, s_d * static_cast<int64_t>(sizeof(T))));
  for (int64_t j = 0; j < d; j += step) __builtin_prefetch(row + j * s_d, 1, 3);
  __builtin_prefetch(row + (d - 1) * s_d, 1, 3);
}

template <typename T>
void rope_store_rows(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const int64_t* pos,
                     const float* cos_sin, T* kc, T* vc, const StridedCache& KC, const StridedCache& VC,
                     const int64_t* slots, float* q_out) {
  const int64_t t_n = q.size(0), hq = q.size(1), hkv = k.size(1), d = q.size(2), half = d / 2;
  const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), ks0 = k.stride(0), ks1 = k.stride(1);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1);
  auto prefetch_token = [&](int64_t t) {
    for (int64_t h = 0; h < hkv; ++h) {
      prefetch_row(kc + KC.at(slots[t], h), d, KC.s_d);
      prefetch_row(vc + VC.at(slots[t], h), d, VC.s_d);
    }
  };
  at::parallel_for(0, t_n, grain((hq + 2 * hkv) * d), [&](int64_t t0, int64_t t1) {
    std::vector<T> tmp(d);
    if (t0 < t1) prefetch_token(t0);
    for (int64_t t = t0; t < t1; ++t) {
      if (t + 1 < t1) prefetch_token(t + 1);
      const float* cs = cos_sin + pos[t] * d;
      for (int64_t h = 0; h < hq; ++h) {
        rotate<T>(qp + t * qs0 + h * qs1, cs, half, tmp.data());
        float* qo = q_out + (t * hq + h) * d;
        for (int64_t j = 0; j < d; ++j) qo[j] = static_cast<float>(tmp[j]);
      }
      for (int64_t h = 0; h < hkv; ++h) {
        rotate<T>(kp + t * ks0 + h * ks1, cs, half, tmp.data());
        T* kr = kc + KC.at(slots[t], h);
        for (int64_t j = 0; j < d; ++j) kr[j * KC.s_d] = tmp[j];
        const T* vr = vp + t * vs0 + h * vs1;
        T* vo = vc + VC.at(slots[t], h);
        for (int64_t j = 0; j < d; ++j) vo[j * VC.s_d] = vr[j];
      }
    }
  });
}

at::Tensor rope_store_kv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                         const at::Tensor& cos_sin, const at::Tensor& k_cache, const at::Tensor& v_cache,
                         const at::Tensor& slot_mapping) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes(), "q [T, Hq, D], k and v [T, Hkv, D]");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(2) == k.size(2) && q.size(2) % 2 == 0, "q and k do not fit");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1, "head_dim must be contiguous");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && v.scalar_type() == k.scalar_type() &&
              k_cache.scalar_type() == k.scalar_type() && v_cache.scalar_type() == k.scalar_type(),
              "q, k, v and the caches must share one dtype");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() && k_cache.size(2) == k.size(1) &&
              k_cache.size(3) == k.size(2), "caches must be [NB, BS, Hkv, D]");
  TORCH_CHECK(cos_sin.scalar_type() == at::kFloat && cos_sin.is_contiguous() && cos_sin.size(1) == q.size(2),
              "cos_sin must be the contiguous fp32 [P, D] table");
  for (const auto* t : {&positions, &slot_mapping})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->size(0) == q.size(0),
                "positions and slot_mapping must be contiguous int64 [T]");
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t max_pos = cos_sin.size(0), max_slot = k_cache.size(0) * k_cache.size(1);
  for (int64_t t = 0; t < q.size(0); ++t)
    TORCH_CHECK(pos[t] >= 0 && pos[t] < max_pos && slots[t] >= 0 && slots[t] < max_slot, "position or slot out of range");
  auto view = [](const at::Tensor& c) {
    return StridedCache{c.stride(0), c.stride(1), c.stride(2), c.stride(3), c.size(1)};
  };
  at::Tensor q_out = at::empty(q.sizes(), q.options().dtype(at::kFloat));
  if (q.scalar_type() == at::kFloat) {
    rope_store_rows<float>(q, k, v, pos, cos_sin.data_ptr<float>(), k_cache.data_ptr<float>(),
                           v_cache.data_ptr<float>(), view(k_cache), view(v_cache), slots, q_out.data_ptr<float>());
  } else {
    TORCH_CHECK(q.scalar_type() == at::kBFloat16, "rope_store_kv supports float32 and bfloat16");
    using B = c10::BFloat16;
    rope_store_rows<B>(q, k, v, pos, cos_sin.data_ptr<float>(), k_cache.data_ptr<B>(), v_cache.data_ptr<B>(),
                       view(k_cache), view(v_cache), slots, q_out.data_ptr<float>());
  }
  return q_out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(asyncengine_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps, Tensor? residual) -> (Tensor, Tensor?)", &rms_norm);
  m.def("silu_mul(Tensor gate_up) -> Tensor", &silu_mul);
  m.def("rope_store_kv(Tensor q, Tensor k, Tensor v, Tensor positions, Tensor cos_sin, Tensor(a!) k_cache, "
        "Tensor(b!) v_cache, Tensor slot_mapping) -> Tensor",
        &rope_store_kv);
}
