"""One Llama-family decoder (Llama, SmolLM2, Qwen2, Qwen3) over the paged KV cache.

Weights are plain tensors in a fused layout (q|k|v and gate|up in one matrix each);
models/weights.py maps HF names onto them. The forward pass takes the flattened tokens
of a whole step ([T]) and explicit AttentionMetadata; there is no global context.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from asyncengine.models.args import ModelArgs
from asyncengine.models.layer_loop import LayerLoop
from kernels.attention import AttentionMetadata
from kernels.dispatch import KernelOps
from kernels.huge_pages import Arena
from kernels.rope import rope_cos_sin

# Rows per BLAS GEMM call in deterministic mode (EngineConfig.gemm_tile_rows). BLAS
# libraries choose kernels, blockings and thread splits by the row count M, and some of
# those round a row differently (measured: MKL below 12 rows; oneDNN bf16 on AMX past ~40
# rows); calls of one fixed shape run every row through the same code whatever the batch.
# The CPU backend's own GEMMs (ops.packed_linear: fp32, bf16 on AMX) are invariant without tiles.
DEFAULT_GEMM_TILE_ROWS = 64


def _gemm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, packed: torch.Tensor | None) -> torch.Tensor:
    if packed is not None:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, b, "none", [], "")
    return F.linear(x, w, b)


def linear(
    x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, tile_rows: int, packed: torch.Tensor | None = None
) -> torch.Tensor:
    """x: [T, in] @ w[out, in]^T (+ b) -> [T, out]. tile_rows > 0: computed in calls of
    exactly tile_rows rows (the last zero-padded), so a row's bits never depend on T;
    tile_rows = 0: one call of T rows (fast, batch-dependent). With `packed` (prepack(w))
    oneDNN runs on the weight laid out once in its blocked format."""
    t = x.shape[0]
    if tile_rows <= 0:
        return _gemm(x, w, b, packed)
    pad = -t % tile_rows
    if pad:
        x = F.pad(x, (0, 0, 0, pad))  # [T + pad, in]
    if x.shape[0] == tile_rows:
        out = _gemm(x, w, b, packed)
    else:
        out = torch.cat([_gemm(tile, w, b, packed) for tile in x.split(tile_rows)])
    return out[:t] if pad else out


def prepack(w: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's blocked copy of a CPU weight [out, in], or None where oneDNN is absent.

    MKL re-packs the weight at every call, which at decode sizes (tens of rows) costs as
    much as the multiply: measured on SmolLM2's shapes at 64 rows, 1.3-2x faster
    (the fp32 head 36 -> 18 ms). Tiled calls keep rows invariant with either library
    (tests/test_invariance_ops.py checks both)."""
    if w.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(w, None)
    except (AttributeError, RuntimeError):  # a torch without the op, or a dtype it lacks
        return None


def silu_mul(gate_up: torch.Tensor, exact: bool) -> torch.Tensor:
    """gate_up: [T, 2I] (gate | up) -> silu(gate) * up: [T, I].

    exact: F.silu uses a faster exp in its vectorized body than in its scalar tail, so a
    row that a thread split cuts at a column not a multiple of 32 rounds differently;
    x / (1 + exp(-x)) in fp32 uses the same exp everywhere (and rounds once to the dtype).
    """
    gate, up = gate_up.chunk(2, dim=-1)
    if not exact:
        return F.silu(gate) * up
    g = gate.float()  # [T, I] fp32 (for fp32 the strided view itself: never written)
    den = torch.neg(g).exp_().add_(1.0)  # 1 + exp(-g), in place on one new buffer
    return torch.div(g, den, out=den).to(gate.dtype).mul_(up)


@dataclass(slots=True)
class LayerWeights:
    attn_norm: torch.Tensor  # [H]
    qkv: torch.Tensor  # [(Hq + 2 Hkv) * D, H]
    qkv_bias: torch.Tensor | None  # [(Hq + 2 Hkv) * D]
    q_norm: torch.Tensor | None  # [D] (Qwen3)
    k_norm: torch.Tensor | None  # [D]
    o_proj: torch.Tensor  # [H, Hq * D]
    o_bias: torch.Tensor | None  # [H]
    mlp_norm: torch.Tensor  # [H]
    gate_up: torch.Tensor  # [2 I, H]
    gate_up_bias: torch.Tensor | None  # [2 I]
    down: torch.Tensor  # [H, I]
    down_bias: torch.Tensor | None  # [H]


class LlamaModel:
    def __init__(
        self,
        args: ModelArgs,
        inv_freq: torch.Tensor,
        rope_scaling: float,
        ops: KernelOps,
        dtype: torch.dtype,
        head_dtype: torch.dtype,
        deterministic: bool,
        device: str = "cpu",
        gemm_tile_rows: int = DEFAULT_GEMM_TILE_ROWS,
    ) -> None:
        self.args, self.ops, self.dtype, self.head_dtype = args, ops, dtype, head_dtype
        self.tile_rows = gemm_tile_rows if deterministic else 0
        self.deterministic = deterministic
        self.scale = args.head_dim**-0.5
        self.cos_sin = rope_cos_sin(inv_freq, rope_scaling, args.max_position_embeddings).to(device)

        def empty(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dt, device=device)

        a, d = args, args.head_dim
        qkv_rows = (a.num_heads + 2 * a.num_kv_heads) * d
        self.embed = empty(a.vocab_size, a.hidden_size)
        self.layers = [
            LayerWeights(
                attn_norm=empty(a.hidden_size),
                qkv=empty(qkv_rows, a.hidden_size),
                qkv_bias=empty(qkv_rows) if a.qkv_bias else None,
                q_norm=empty(d) if a.qk_norm else None,
                k_norm=empty(d) if a.qk_norm else None,
                o_proj=empty(a.hidden_size, a.num_heads * d),
                o_bias=empty(a.hidden_size) if a.o_bias else None,
                mlp_norm=empty(a.hidden_size),
                gate_up=empty(2 * a.intermediate_size, a.hidden_size),
                gate_up_bias=empty(2 * a.intermediate_size) if a.mlp_bias else None,
                down=empty(a.hidden_size, a.intermediate_size),
                down_bias=empty(a.hidden_size) if a.mlp_bias else None,
            )
            for _ in range(a.num_layers)
        ]
        self.final_norm = empty(a.hidden_size)
        # With tied embeddings and the same dtype the head is the embedding itself.
        shared = a.tie_word_embeddings and head_dtype == dtype
        self.lm_head = self.embed if shared else empty(a.vocab_size, a.hidden_size, dt=head_dtype)
        # id(weight) -> (weight._version when packed, x, bias -> x @ weight^T + bias on the
        # packed copy, the backend's own packing or None for oneDNN's); see repack().
        self._packed: dict[int, tuple[int, Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
                                      torch.Tensor | None]] = {}
        self._layer_loop: LayerLoop | None = None  # the compiled loop over _packed, where there is one

    def gemm_weights(self) -> list[torch.Tensor]:
        return [w for layer in self.layers for w in (layer.qkv, layer.o_proj, layer.gate_up, layer.down)] + [
            self.lm_head]

    def repack(self, place: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Lay the GEMM weights out once, after writing weights: for the backend's own
        batch-invariant linear where it has one for this dtype (on the CPU ops fp32, and
        bf16 where the CPU has AMX: no row tiles needed), else for oneDNN (in row tiles).
        A weight written in place since (its version counter moved) falls back to
        F.linear in row tiles, so a stale copy is never used.

        place(packing) -> where it is served from; by default a copy in one new arena of
        huge pages (kernels/huge_pages.py). Every decode step streams all the packings, and
        on 4 KB pages each page is a TLB miss. Measured on an AMD EPYC Zen 4, 64 sequences,
        two engines stepping alternately with equal tokens: 0.6-3.5% off a step (bf16 79.3
        -> 76.8 and 68.4 -> 67.7 ms, fp32 110.2 -> 106.9 and 119.5 -> 119.8 ms medians, the
        median of paired ratios 0.99 or below in every run), for ~0.4 s more at load.
        asyncengine/rl/staging.py places into buffers it keeps across updates."""
        self._packed = {}
        place = Arena().place if place is None else place
        owns: list[torch.Tensor | None] = []  # our packing of each weight, or None
        for w in self.gemm_weights():
            own = self.ops.pack_linear(w) if self.ops.pack_linear is not None else None
            owns.append(place(own) if own is not None and own.device.type == "cpu" else own)
        for i, (w, own) in enumerate(zip(self.gemm_weights(), owns)):
            run: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
            if own is not None and self.ops.packed_linear is not None:
                nxt = self._next_packing(owns, i)
                run = lambda x, b, p=own, n=w.shape[0], f=self.ops.packed_linear, nx=nxt: f(x, p, b, n, nx)  # noqa: E731
            elif (onednn := prepack(w)) is not None:
                own = None
                run = lambda x, b, w=w, p=onednn: linear(x, w, b, self.tile_rows, p)  # noqa: E731
            else:
                continue
            self._packed[id(w)] = (w._version, run, own)
        self._layer_loop = LayerLoop.build(self)

    @staticmethod
    def _next_packing(owns: list[torch.Tensor | None], i: int) -> torch.Tensor | None:
        """The packing multiplied by after gemm_weights()[i] (they are in call order), for the
        GEMM to hint into cache as it ends; none after qkv: attention's KV reads come between
        and would evict it. What it gains is measured in kernels/csrc/gemm_cpu.cpp (fp32) and
        gemm_bf16_avx512_cpu.cpp (bf16)."""
        return owns[i + 1] if i + 1 < len(owns) and i % 4 != 0 else None

    def packings(self) -> list[torch.Tensor]:
        """The backend's own packed weights that repack() made (oneDNN's are not listed)."""
        return [entry[2] for entry in self._packed.values() if entry[2] is not None]

    def _linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        entry = self._packed.get(id(w))
        if entry is None or entry[0] != w._version:
            return linear(x, w, b, self.tile_rows)
        return entry[1](x, b)

    def forward(
        self, input_ids: torch.Tensor, meta: AttentionMetadata, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        """input_ids: [T] -> final hidden states [T, H] (after the last norm)."""
        h = self.embed.index_select(0, input_ids)  # [T, H]
        residual: torch.Tensor | None = None
        eps = self.args.rms_norm_eps
        loop = self._layer_loop
        if loop is not None and loop.current(self.ops):  # the same loop, compiled (layer_loop.py)
            return loop(h, meta, kv_caches, self.cos_sin, self.scale, eps)
        for layer, kv in zip(self.layers, kv_caches):
            if residual is None:  # first layer: the embedding is the residual stream
                x, residual = self.ops.rms_norm(h, layer.attn_norm, eps)[0], h
            else:
                x, residual = self.ops.rms_norm(h, layer.attn_norm, eps, residual)
            h = self._attention(layer, x, meta, kv)
            x, residual = self.ops.rms_norm(h, layer.mlp_norm, eps, residual)
            h = self._mlp(layer, x)
        h, _ = self.ops.rms_norm(h, self.final_norm, eps, residual)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [R, H] -> logits [R, V], always fp32 (the head runs in head_dtype)."""
        return self._linear(hidden.to(self.head_dtype), self.lm_head, None).float()

    def _attention(
        self, layer: LayerWeights, x: torch.Tensor, meta: AttentionMetadata, kv: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        a, d, t = self.args, self.args.head_dim, x.shape[0]
        qkv = self._linear(x, layer.qkv, layer.qkv_bias)  # [T, (Hq + 2 Hkv) * D]
        q, k, v = qkv.split([a.num_heads * d, a.num_kv_heads * d, a.num_kv_heads * d], dim=-1)
        q = q.reshape(t, a.num_heads, d)
        k = k.reshape(t, a.num_kv_heads, d)
        v = v.reshape(t, a.num_kv_heads, d)
        if layer.q_norm is not None and layer.k_norm is not None:
            eps = a.rms_norm_eps
            q = self.ops.rms_norm(q.reshape(-1, d), layer.q_norm, eps)[0].view(t, a.num_heads, d)
            k = self.ops.rms_norm(k.reshape(-1, d), layer.k_norm, eps)[0].view(t, a.num_kv_heads, d)
        if self.ops.rope_store_kv is not None:
            qf = self.ops.rope_store_kv(q, k, v, meta.positions, self.cos_sin, kv[0], kv[1], meta.slot_mapping)
            o = self.ops.paged_attention(qf, kv[0], kv[1], meta, self.scale).to(self.dtype)  # [T, Hq, D]
        else:
            q, k = self.ops.apply_rope(q, k, meta.positions, self.cos_sin)
            self.ops.store_kv(k, v, kv[0], kv[1], meta.slot_mapping)
            o = self.ops.paged_attention(q, kv[0], kv[1], meta, self.scale)  # [T, Hq, D]
        return self._linear(o.reshape(t, a.num_heads * d), layer.o_proj, layer.o_bias)

    def _mlp(self, layer: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        gate_up = self._linear(x, layer.gate_up, layer.gate_up_bias)  # [T, 2 I]
        act = self.ops.silu_mul(gate_up) if self.ops.silu_mul is not None else silu_mul(gate_up, self.deterministic)
        return self._linear(act, layer.down, layer.down_bias)
