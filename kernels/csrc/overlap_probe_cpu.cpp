// Whether one core can hide scattered cache reads under its own arithmetic (bench/overlap.py):
// the question behind the decode step's gap to its speed of light, which counts the KV
// reads of attention as free under the GEMMs' FMAs. On every intra-op thread, each with its
// own runs of run_bytes at random places in `pool` (far larger than the caches, fresh
// places for every mode so nothing is cached), it times per run:
//   read:        the runs read one after another, each hinted into L2 kLead runs ahead a
//                line per 64 bytes read (the decode attention's pattern: paged_decode.h);
//   compute:     a register-only block of compute_iters x 24 independent FMAs (a GEMM tile
//                with its operands in registers);
//   serial:      a compute block, then a run read as in `read`;
//   interleaved: a compute block that hints the next run's lines spread over it, then the
//                run read from L2 (what overlapping attention's reads with a GEMM would do);
//   hinted:      the interleaved compute blocks alone, no reads: their time over `compute`
//                is what the hints cost the arithmetic.
// Returns [read, compute, serial, interleaved, hinted] in ns per run, the mean over the
// threads (zeros without AVX-512).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <chrono>
#include <cstdint>
#include <random>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

#if defined(__AVX512F__)
constexpr int kLead = 2;  // runs hinted ahead in `read`
volatile float g_sink;

inline void hint(const char* p) { asm volatile("prefetcht1 (%0)" : : "r"(p)); }

// iters x 24 FMAs in registers; `lines` lines from `next` hinted evenly over the block.
__m512 compute_block(int64_t iters, const char* next, int64_t lines) {
  __m512 a[24];
  for (int c = 0; c < 24; ++c) a[c] = _mm512_set1_ps(1.0f + c * 1e-3f);
  const __m512 m = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
  int64_t issued = 0;
  for (int64_t i = 0; i < iters; ++i) {
#pragma GCC unroll 24
    for (int c = 0; c < 24; ++c) a[c] = _mm512_fmadd_ps(a[c], m, b);
    for (const int64_t want = (i + 1) * lines / iters; issued < want; ++issued) hint(next + issued * 64);
  }
  for (int c = 1; c < 24; ++c) a[0] = _mm512_add_ps(a[0], a[c]);
  return a[0];
}

// One run summed in 8 independent chains; `ahead` (or null) hinted a line per line read.
__m512 read_run(const char* p, int64_t bytes, const char* ahead) {
  __m512 s[8];
  for (auto& v : s) v = _mm512_setzero_ps();
  for (int64_t i = 0; i < bytes; i += 512) {
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      if (ahead != nullptr) hint(ahead + i + 64 * j);
      s[j] = _mm512_add_ps(s[j], _mm512_loadu_ps(reinterpret_cast<const float*>(p + i + 64 * j)));
    }
  }
  for (int j = 1; j < 8; ++j) s[0] = _mm512_add_ps(s[0], s[j]);
  return s[0];
}

// ns per run of the five modes on one thread.
std::vector<double> probe_thread(const char* pool, int64_t slots, int64_t runs, int64_t iters, int64_t bytes,
                                 uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<const char*> at(runs);
  const auto fresh = [&] {
    for (auto& p : at) p = pool + static_cast<int64_t>(rng() % static_cast<uint64_t>(slots)) * bytes;
  };
  const auto ahead = [&](int64_t i, int64_t k) { return i + k < runs ? at[i + k] : nullptr; };
  const int64_t lines = bytes / 64;
  __m512 sink = _mm512_setzero_ps();
  std::vector<double> ns;
  for (int mode = 0; mode < 5; ++mode) {
    fresh();
    const auto t0 = std::chrono::steady_clock::now();
    for (int64_t i = 0; i < runs; ++i) {
      const char* next = ahead(i, 1) != nullptr ? ahead(i, 1) : at[i];
      if (mode == 1 || mode == 2) sink = _mm512_add_ps(sink, compute_block(iters, nullptr, 0));
      if (mode == 3 || mode == 4) sink = _mm512_add_ps(sink, compute_block(iters, next, lines));
      if (mode == 0 || mode == 2) sink = _mm512_add_ps(sink, read_run(at[i], bytes, ahead(i, kLead)));
      if (mode == 3) sink = _mm512_add_ps(sink, read_run(at[i], bytes, nullptr));
    }
    ns.push_back(std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count() / runs);
  }
  g_sink = _mm512_reduce_add_ps(sink);
  return ns;
}
#endif

std::vector<double> overlap_probe(const at::Tensor& pool, int64_t runs, int64_t compute_iters, int64_t run_bytes,
                                  int64_t seed) {
  TORCH_CHECK(pool.device().is_cpu() && pool.is_contiguous() && pool.scalar_type() == at::kByte,
              "pool must be a contiguous CPU uint8 tensor");
  TORCH_CHECK(runs > 0 && compute_iters > 0, "runs and compute_iters must be positive");
  TORCH_CHECK(run_bytes >= 512 && run_bytes % 512 == 0 && pool.numel() >= run_bytes,
              "run_bytes must be a positive multiple of 512, at most the pool");
#if defined(__AVX512F__)
  const int64_t threads = at::get_num_threads(), slots = pool.numel() / run_bytes;
  const char* base = static_cast<const char*>(pool.data_ptr());
  std::vector<std::vector<double>> per(threads);
  at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t)
      per[t] = probe_thread(base, slots, runs, compute_iters, run_bytes, static_cast<uint64_t>(seed * 1000 + t));
  });
  std::vector<double> mean(5, 0.0);
  for (const auto& p : per)
    for (int m = 0; m < 5; ++m) mean[m] += p[m] / static_cast<double>(threads);
  return mean;
#else
  return std::vector<double>(5, 0.0);
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(asyncengine_cpu, m) {
  m.def("overlap_probe(Tensor pool, int runs, int compute_iters, int run_bytes, int seed) -> float[]", &overlap_probe);
}
