// The decoder layers of one forward step as one op: the loop that models/llama.py runs
// in Python (RMSNorm, qkv GEMM, RoPE + KV store, paged attention, o GEMM, RMSNorm,
// gate_up GEMM, SiLU-and-multiply, down GEMM; then the final RMSNorm), calling the same
// compiled ops in the same order with the same arguments, so the bits are the same by
// construction (tests/kernels/test_decoder_layers_cpu.py checks them against the Python
// loop). What it removes is the Python between the ops: ~10 op calls a layer, each
// through a wrapper and the dispatcher, plus the split / reshape / cast glue, ~4 ms of a
// 64-sequence decode step on SmolLM2's 30 layers (AMD EPYC Zen 4; the measurement is in
// asyncengine/models/layer_loop.py).
//
// A large batch can be cut into groups of whole sequences that run side by side, each
// through every op of every layer on one thread (kernels/layer_groups.py says when): one
// thread's attention (memory reads) then overlaps the other's GEMMs (FMAs), and the threads
// do not meet at the end of each op. Measured on the same machine, both ways alternated in
// one engine: 64 sequences decoding 0.963 (bf16) and 0.967 (fp32) of a step, 128 sequences
// 0.899 (bf16); steps of prompts alone 0.997 (bf16) and 0.971 (fp32), within those pairs'
// noise (a prompt's rows are many, its GEMMs long, so the threads met rarely anyway).
//
// The ops are called through the dispatcher (handles looked up once), so this file needs
// nothing from the others' translation units.
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace {

using Opt = std::optional<at::Tensor>;
using RmsSig = std::tuple<at::Tensor, Opt>(const at::Tensor&, const at::Tensor&, double, const Opt&);
using RopeSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&);
using AttnSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, double);
using SiluSig = at::Tensor(const at::Tensor&);
using Fp32Sig = at::Tensor(const at::Tensor&, const at::Tensor&, const Opt&, int64_t, const Opt&);
using Avx512Sig = at::Tensor(const at::Tensor&, const at::Tensor&, const Opt&, int64_t,
                             const std::optional<std::string>&, const Opt&);
using AmxSig = at::Tensor(const at::Tensor&, const at::Tensor&, const Opt&, int64_t);

template <typename Sig>
c10::TypedOperatorHandle<Sig> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

struct Ops {
  c10::TypedOperatorHandle<RmsSig> rms = handle<RmsSig>("asyncengine_cpu::rms_norm");
  c10::TypedOperatorHandle<RopeSig> rope = handle<RopeSig>("asyncengine_cpu::rope_store_kv");
  c10::TypedOperatorHandle<AttnSig> attn = handle<AttnSig>("asyncengine_cpu::paged_attention");
  c10::TypedOperatorHandle<SiluSig> silu = handle<SiluSig>("asyncengine_cpu::silu_mul");
  c10::TypedOperatorHandle<Fp32Sig> fp32 = handle<Fp32Sig>("asyncengine_cpu::packed_linear");
  c10::TypedOperatorHandle<Avx512Sig> avx512 = handle<Avx512Sig>("asyncengine_cpu::packed_linear_bf16_avx512");
  c10::TypedOperatorHandle<AmxSig> amx = handle<AmxSig>("asyncengine_cpu::packed_linear_bf16");

  static const Ops& get() {
    static const Ops ops;  // after the library's fragments registered (first call)
    return ops;
  }
};

enum class Gemm { kFp32, kAvx512, kAmx };

Gemm gemm_of(const std::string& name) {
  if (name == "fp32") return Gemm::kFp32;
  if (name == "avx512") return Gemm::kAvx512;
  TORCH_CHECK(name == "amx", "gemm must be fp32, avx512 or amx, not ", name);
  return Gemm::kAmx;
}

// kernels.attention_cpu.packed_linear_cpu: the bias in fp32 for the bf16 kernels, the
// next packing (a cache hint) only where it is this kernel's layout.
at::Tensor linear(Gemm g, const at::Tensor& x, const at::Tensor& packed, const Opt& bias, int64_t n,
                  const Opt& next) {
  const Ops& ops = Ops::get();
  const Opt nx = next && next->scalar_type() == packed.scalar_type() ? next : std::nullopt;
  if (g == Gemm::kFp32) return ops.fp32.call(x.contiguous(), packed, bias, n, nx);
  const Opt b = bias ? Opt(bias->to(at::kFloat)) : std::nullopt;
  if (g == Gemm::kAmx) return ops.amx.call(x, packed, b, n);
  return ops.avx512.call(x, packed, b, n, std::nullopt, nx);
}

// One forward's arguments that every group of sequences shares.
struct Model {
  at::TensorList weights;
  const c10::List<Opt>& biases;
  at::IntArrayRef dims;
  const at::Tensor& cos_sin;
  at::TensorList kv;
  double scale, eps;
  Gemm g;
};

// The rows of some sequences: h [T, H] and what attention reads of them.
struct Rows {
  at::Tensor h, positions, slot_mapping, query_start_loc, seq_lens, block_tables;
};

// Every layer over `r`, then the final norm: [T, H].
at::Tensor run_layers(const Model& m, const Rows& r) {
  const Ops& ops = Ops::get();
  const int64_t layers = static_cast<int64_t>(m.kv.size()) / 2;
  const int64_t hq = m.dims[0], hkv = m.dims[1], d = m.dims[2], t = r.h.size(0);
  at::Tensor h = r.h;
  Opt residual;
  for (int64_t l = 0; l < layers; ++l) {
    const at::Tensor* w = m.weights.data() + 6 * l;
    const Opt b[4] = {m.biases.get(4 * l), m.biases.get(4 * l + 1), m.biases.get(4 * l + 2), m.biases.get(4 * l + 3)};
    at::Tensor x;
    if (!residual) {  // first layer: the embedding is the residual stream
      x = std::get<0>(ops.rms.call(h.contiguous(), w[0], m.eps, std::nullopt));
      residual = h;
    } else {
      std::tie(x, residual) = ops.rms.call(h.contiguous(), w[0], m.eps, residual);
    }
    const at::Tensor qkv = linear(m.g, x, w[1], b[0], m.dims[3], std::nullopt);  // [T, (Hq + 2 Hkv) D]
    const at::Tensor q = qkv.narrow(1, 0, hq * d).reshape({t, hq, d});
    const at::Tensor k = qkv.narrow(1, hq * d, hkv * d).reshape({t, hkv, d});
    const at::Tensor v = qkv.narrow(1, (hq + hkv) * d, hkv * d).reshape({t, hkv, d});
    const at::Tensor qf = ops.rope.call(q, k, v, r.positions, m.cos_sin, m.kv[2 * l], m.kv[2 * l + 1], r.slot_mapping);
    const at::Tensor o = ops.attn.call(qf, m.kv[2 * l], m.kv[2 * l + 1], r.query_start_loc, r.seq_lens,
                                       r.block_tables, m.scale)
                             .to(r.h.scalar_type());  // [T, Hq, D]
    h = linear(m.g, o.reshape({t, hq * d}), w[2], b[1], m.dims[4], w[4]);
    std::tie(x, residual) = ops.rms.call(h.contiguous(), w[3], m.eps, residual);
    const at::Tensor gate_up = linear(m.g, x, w[4], b[2], m.dims[5], w[5]);  // [T, 2 I]
    const Opt next = l + 1 < layers ? Opt(m.weights[6 * (l + 1) + 1])
                     : static_cast<int64_t>(m.weights.size()) == 6 * layers + 2 ? Opt(m.weights.back()) : std::nullopt;
    h = linear(m.g, ops.silu.call(gate_up.contiguous()), w[5], b[3], m.dims[6], next);
  }
  return std::get<0>(ops.rms.call(h.contiguous(), m.weights[6 * layers], m.eps, residual));
}

// Sequences [s0, s1) of `all`: their rows, query starts from 0.
Rows rows_of(const Rows& all, const int64_t* qsl, int64_t s0, int64_t s1) {
  const int64_t t0 = qsl[s0], tn = qsl[s1] - t0;
  return {all.h.narrow(0, t0, tn), all.positions.narrow(0, t0, tn), all.slot_mapping.narrow(0, t0, tn),
          all.query_start_loc.narrow(0, s0, s1 - s0 + 1).sub(t0), all.seq_lens.narrow(0, s0, s1 - s0),
          all.block_tables.narrow(0, s0, s1 - s0)};
}

// weights: per layer [attn_norm, qkv, o, mlp_norm, gate_up, down] (the four GEMM weights
// packed), then the final norm, then the head's packing or nothing (the last down's hint).
// biases: per layer [qkv, o, gate_up, down]. dims: [heads, kv_heads, head_dim, then the
// four GEMMs' output features]. kv: per layer [k_cache, v_cache]. h: [T, H] embeddings.
// groups: sequence indices [0, ..., S] cutting the batch into groups that run each on one
// thread, every op of every layer, side by side (kernels/layer_groups.py says when and
// why); [0, S] runs the batch as one, every op on every thread. A row's bits
// are the same either way: each op computes a row from that row (or, in attention, from
// its own sequence) alone.
at::Tensor decoder_layers(const at::Tensor& h_in, at::TensorList weights, const c10::List<Opt>& biases,
                          at::IntArrayRef dims, const at::Tensor& positions, const at::Tensor& cos_sin,
                          at::TensorList kv, const at::Tensor& slot_mapping, const at::Tensor& query_start_loc,
                          const at::Tensor& seq_lens, const at::Tensor& block_tables, double scale, double eps,
                          const std::string& gemm, at::IntArrayRef groups) {
  const int64_t layers = static_cast<int64_t>(kv.size()) / 2;
  TORCH_CHECK(dims.size() == 7, "dims: heads, kv_heads, head_dim and four output features");
  TORCH_CHECK(static_cast<int64_t>(weights.size()) >= 6 * layers + 1 && static_cast<int64_t>(weights.size()) <= 6 * layers + 2 &&
              static_cast<int64_t>(biases.size()) == 4 * layers && kv.size() % 2 == 0,
              "weights, biases and kv do not describe the same layers");
  const int64_t seqs = seq_lens.size(0), parts = static_cast<int64_t>(groups.size()) - 1;
  TORCH_CHECK(parts >= 1 && groups.front() == 0 && groups.back() == seqs, "groups must run from 0 to the sequences");
  for (int64_t i = 0; i < parts; ++i) TORCH_CHECK(groups[i] < groups[i + 1], "groups must be non-empty and increasing");
  const Model m{weights, biases, dims, cos_sin, kv, scale, eps, gemm_of(gemm)};
  const Rows all{h_in, positions, slot_mapping, query_start_loc, seq_lens, block_tables};
  if (parts == 1) return run_layers(m, all);
  const at::Tensor qsl = query_start_loc.to(at::kLong).contiguous();
  TORCH_CHECK(qsl.numel() == seqs + 1 && qsl.data_ptr<int64_t>()[seqs] == h_in.size(0), "query_start_loc does not cover h");
  at::Tensor out = at::empty_like(h_in);
  // Inside the region every op runs on its caller's thread alone (at::parallel_for does
  // not nest); the caller's thread-local state (inference mode, dispatch) goes with it.
  const at::ThreadLocalState state;
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    const at::ThreadLocalStateGuard guard(state);
    for (int64_t p = p0; p < p1; ++p) {
      const Rows r = rows_of(all, qsl.data_ptr<int64_t>(), groups[p], groups[p + 1]);
      out.narrow(0, qsl.data_ptr<int64_t>()[groups[p]], r.h.size(0)).copy_(run_layers(m, r));
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(asyncengine_cpu, m) {
  m.def("decoder_layers(Tensor h, Tensor[] weights, Tensor?[] biases, int[] dims, Tensor positions, "
        "Tensor cos_sin, Tensor(a!)[] kv, Tensor slot_mapping, Tensor query_start_loc, Tensor seq_lens, "
        "Tensor block_tables, float scale, float eps, str gemm, int[] groups) -> Tensor",
        &decoder_layers);
}
