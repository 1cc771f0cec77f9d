"""One Llama-family decoder (Llama, SmolLM2, Qwen2, Qwen3) over the paged KV cache.

Weights are plain tensors in a fused layout (q|k|v and gate|up in one matrix each);
models/weights.py maps HF names onto them. The forward pass takes the flattened tokens
of a whole step ([T]) and explicit AttentionMetadata; there is no global context.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from asyncengine.models.args import ModelArgs
from kernels.attention import AttentionMetadata
from kernels.dispatch import KernelOps
from kernels.rope import rope_cos_sin

# CPU GEMMs pick a different small-M kernel (with different rounding) below this many
# rows; padding keeps a row's result independent of how many rows share the call.
MIN_GEMM_ROWS = 16


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, min_rows: int) -> torch.Tensor:
    """x: [T, in] @ w[out, in]^T (+ b) -> [T, out], padded to min_rows rows."""
    t = x.shape[0]
    if t < min_rows:
        x = F.pad(x, (0, 0, 0, min_rows - t))
        return F.linear(x, w, b)[:t]
    return F.linear(x, w, b)


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
    ) -> None:
        self.args, self.ops, self.dtype, self.head_dtype = args, ops, dtype, head_dtype
        self.min_rows = MIN_GEMM_ROWS if deterministic else 1
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

    def forward(
        self, input_ids: torch.Tensor, meta: AttentionMetadata, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        """input_ids: [T] -> final hidden states [T, H] (after the last norm)."""
        h = self.embed.index_select(0, input_ids)  # [T, H]
        residual: torch.Tensor | None = None
        eps = self.args.rms_norm_eps
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
        return linear(hidden.to(self.head_dtype), self.lm_head, None, self.min_rows).float()

    def _attention(
        self, layer: LayerWeights, x: torch.Tensor, meta: AttentionMetadata, kv: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        a, d, t = self.args, self.args.head_dim, x.shape[0]
        qkv = linear(x, layer.qkv, layer.qkv_bias, self.min_rows)  # [T, (Hq + 2 Hkv) * D]
        q, k, v = qkv.split([a.num_heads * d, a.num_kv_heads * d, a.num_kv_heads * d], dim=-1)
        q = q.reshape(t, a.num_heads, d)
        k = k.reshape(t, a.num_kv_heads, d)
        v = v.reshape(t, a.num_kv_heads, d)
        if layer.q_norm is not None and layer.k_norm is not None:
            eps = a.rms_norm_eps
            q = self.ops.rms_norm(q.reshape(-1, d), layer.q_norm, eps)[0].view(t, a.num_heads, d)
            k = self.ops.rms_norm(k.reshape(-1, d), layer.k_norm, eps)[0].view(t, a.num_kv_heads, d)
        q, k = self.ops.apply_rope(q, k, meta.positions, self.cos_sin)
        self.ops.store_kv(k, v, kv[0], kv[1], meta.slot_mapping)
        o = self.ops.paged_attention(q, kv[0], kv[1], meta, self.scale)  # [T, Hq, D]
        return linear(o.reshape(t, a.num_heads * d), layer.o_proj, layer.o_bias, self.min_rows)

    def _mlp(self, layer: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        gate_up = linear(x, layer.gate_up, layer.gate_up_bias, self.min_rows)  # [T, 2 I]
        return linear(silu_mul(gate_up, self.deterministic), layer.down, layer.down_bias, self.min_rows)
