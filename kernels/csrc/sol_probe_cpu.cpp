// Speed-of-light probes of the machine itself (bench/sol.py), run on every intra-op thread:
//   fma_peak_fp32:  a register-only loop of independent fp32 FMA chains (AVX-512, else
//                   AVX2 + FMA, else scalar std::fma): no loads, no stores, so nothing but
//                   the FMA units bounds it.
//   dot_peak_bf16:  the same with VDPBF16PS (AVX512-BF16: 32 multiply-adds per instruction).
//   amx_peak_bf16:  TDPBF16PS on tiles that stay in the tile registers (AMX-BF16).
//   stream_read:    one pass reading a buffer far larger than the caches, each thread its
//                   own contiguous share, summed so the loads cannot be dropped.
// Each returns (rate over wall time, rate over the threads' CPU time) in FLOP/s or bytes/s,
// or zeros where this CPU or build lacks the instructions.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <ctime>
#include <tuple>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

// Rates of body(thread) -> work (FLOPs or bytes) run on every thread at once: the total
// work over the wall time, and the sum of each thread's work over its own CPU time. The
// second is the machine's rate while the threads hold cores: on a machine shared with
// other processes the first also counts the time others held them.
using Rates = std::tuple<double, double>;

double thread_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

template <typename F>
Rates timed_parallel(F body) {
  const int64_t threads = at::get_num_threads();
  std::vector<double> work(threads), cpu(threads);
  const auto t0 = std::chrono::steady_clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const double c0 = thread_cpu_seconds();
      work[i] = body(i);
      cpu[i] = thread_cpu_seconds() - c0;
    }
  });
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  double total = 0.0, per_cpu = 0.0;
  for (int64_t i = 0; i < threads; ++i) total += work[i], per_cpu += work[i] / std::max(cpu[i], 1e-9);
  return {total / wall, per_cpu};
}

volatile float g_sink;  // results land here, so the loops are not optimized away

// 24 independent chains: more than FMA latency x FMA ports on any current core.
constexpr int kChains = 24;

Rates fma_peak_fp32(int64_t iters) {
  TORCH_CHECK(iters > 0, "iters must be positive");
  return timed_parallel([&](int64_t) {
#if defined(__AVX512F__)
    constexpr int lanes = 16, chains = kChains;
    __m512 acc[chains];
    for (int c = 0; c < chains; ++c) acc[c] = _mm512_set1_ps(1.0f + c * 1e-3f);
    const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
    for (int64_t i = 0; i < iters; ++i)
#pragma GCC unroll 32  // every chain in its own register, no stack round trips
      for (int c = 0; c < chains; ++c) acc[c] = _mm512_fmadd_ps(acc[c], a, b);
    for (int c = 1; c < chains; ++c) acc[0] = _mm512_add_ps(acc[0], acc[c]);
    g_sink = _mm512_reduce_add_ps(acc[0]);
#elif defined(__AVX2__) && defined(__FMA__)
    constexpr int lanes = 8, chains = 12;  // 16 ymm registers
    __m256 acc[chains];
    for (int c = 0; c < chains; ++c) acc[c] = _mm256_set1_ps(1.0f + c * 1e-3f);
    const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
    for (int64_t i = 0; i < iters; ++i)
#pragma GCC unroll 32
      for (int c = 0; c < chains; ++c) acc[c] = _mm256_fmadd_ps(acc[c], a, b);
    for (int c = 1; c < chains; ++c) acc[0] = _mm256_add_ps(acc[0], acc[c]);  // every chain is used
    float out[8];
    _mm256_storeu_ps(out, acc[0]);
    g_sink = out[0];
#else
    constexpr int lanes = 1, chains = kChains;
    float acc[chains];
    for (int c = 0; c < chains; ++c) acc[c] = 1.0f + c * 1e-3f;
    for (int64_t i = 0; i < iters; ++i)
#pragma GCC unroll 32
      for (int c = 0; c < chains; ++c) acc[c] = std::fma(acc[c], 0.999999f, 1e-7f);
    for (int c = 1; c < chains; ++c) acc[0] += acc[c];
    g_sink = acc[0];
#endif
    return 2.0 * chains * lanes * iters;
  });
}

Rates dot_peak_bf16(int64_t iters) {
  TORCH_CHECK(iters > 0, "iters must be positive");
#if defined(__AVX512BF16__)
  return timed_parallel([&](int64_t) {
    __m512 acc[kChains];
    for (int c = 0; c < kChains; ++c) acc[c] = _mm512_set1_ps(c * 1e-3f);
    const __m512bh a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3f), _mm512_set1_ps(2e-3f));
    for (int64_t i = 0; i < iters; ++i)
#pragma GCC unroll 32
      for (int c = 0; c < kChains; ++c) acc[c] = _mm512_dpbf16_ps(acc[c], a, a);
    for (int c = 1; c < kChains; ++c) acc[0] = _mm512_add_ps(acc[0], acc[c]);
    g_sink = _mm512_reduce_add_ps(acc[0]);
    return 2.0 * 32 * kChains * iters;  // 32 multiply-adds per instruction
  });
#else
  return {0.0, 0.0};
#endif
}

Rates amx_peak_bf16(int64_t iters) {
  TORCH_CHECK(iters > 0, "iters must be positive");
#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
  constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;  // ask Linux for the tile state
  if (syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) != 0) return {0.0, 0.0};
  return timed_parallel([&](int64_t) {
    struct alignas(64) {
      uint8_t palette = 1, start_row = 0, reserved[14] = {};
      uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
      uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
    } cfg;
    alignas(64) uint16_t src[16 * 32] = {};  // bf16 zeros: the tile unit's speed does not depend on values
    alignas(64) float out[16 * 16];
    _tile_loadconfig(&cfg);
    _tile_zero(0);  // tile numbers are immediates: no loop
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    _tile_loadd(4, src, 64);
    _tile_loadd(5, src, 64);
    _tile_loadd(6, src, 64);
    _tile_loadd(7, src, 64);
    for (int64_t i = 0; i < iters; ++i) {  // 4 independent accumulator tiles
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, out, 64);
    g_sink = out[0];
    _tile_release();
    return 2.0 * 16 * 16 * 32 * 4 * iters;  // 16 x 16 outputs x 32 multiply-adds per tile op
  });
#else
  return {0.0, 0.0};
#endif
}

Rates stream_read(const at::Tensor& buf) {
  TORCH_CHECK(buf.scalar_type() == at::kFloat && buf.is_contiguous() && buf.numel() > 0,
              "buf must be a non-empty contiguous fp32 tensor");
  const float* p = buf.data_ptr<float>();
  const int64_t n = buf.numel(), threads = at::get_num_threads();
  return timed_parallel([&](int64_t t) {
    const int64_t lo = n * t / threads, hi = n * (t + 1) / threads;
    float sum = 0.0f;
    int64_t i = lo;
#if defined(__AVX512F__)
    __m512 acc[8];
    for (auto& a : acc) a = _mm512_setzero_ps();
    for (; i + 128 <= hi; i += 128)  // 8 cache lines per iteration, 8 independent sums
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) acc[j] = _mm512_add_ps(acc[j], _mm512_loadu_ps(p + i + 16 * j));
    for (int j = 1; j < 8; ++j) acc[0] = _mm512_add_ps(acc[0], acc[j]);
    sum = _mm512_reduce_add_ps(acc[0]);
#endif
    for (; i < hi; ++i) sum += p[i];
    g_sink = sum;
    return static_cast<double>(hi - lo) * sizeof(float);
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(asyncengine_cpu, m) {
  m.def("fma_peak_fp32(int iters) -> (float, float)", &fma_peak_fp32);
  m.def("dot_peak_bf16(int iters) -> (float, float)", &dot_peak_bf16);
  m.def("amx_peak_bf16(int iters) -> (float, float)", &amx_peak_bf16);
  m.def("stream_read(Tensor buf) -> (float, float)", &stream_read);
}
