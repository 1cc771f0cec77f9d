"""The decoder layers of a forward step as one compiled call, where the backend has one.

LlamaModel.forward loops over its layers in Python, ~10 op calls a layer. On the CPU
backend kernels.attention_cpu.decoder_layers_cpu runs that loop in C++ over the same ops,
in the same order, with the same arguments, so the bits are the same
(tests/kernels/test_decoder_layers_cpu.py). It removes the Python between the ops.
Measured on an AMD EPYC Zen 4 (2 threads, SmolLM2-135M, one engine switching between the
two loops step by step, forwards asserted bitwise equal; medians of step time): 64
sequences decoding bf16 88.0 -> 83.8 ms (paired ratio 0.946, faster in 66 of 80 pairs),
fp32 154.9 -> 143.3 ms (0.938, 49/60); 8 sequences bf16 19.5 -> 17.6 ms (0.904, 53/60).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kernels.attention import AttentionMetadata
from kernels.attention_cpu import gemm_kernel
from kernels.dispatch import KernelOps, layer_loop

if TYPE_CHECKING:
    from asyncengine.models.llama import LlamaModel


@dataclass(frozen=True, slots=True)
class LayerLoop:
    """ops.decoder_layers' arguments for one model's weights, gathered at repack().

    It stands in for the Python loop only while nothing it captured moved: the ops it
    composes are still the backend's (a wrapper put in since means the Python loop; other
    fields may differ, as the pack_linear that rl/staging.py swaps in while it repacks),
    and every packed weight's version is the one it was packed at (a weight written in
    place falls back, as LlamaModel._linear does)."""

    run: Callable[..., torch.Tensor]
    weights: list[torch.Tensor]  # per layer [attn_norm, qkv, o, mlp_norm, gate_up, down], final norm, head?
    biases: list[torch.Tensor | None]  # per layer [qkv, o, gate_up, down]
    dims: list[int]  # heads, kv_heads, head_dim, the four GEMMs' output features
    gemm: str
    versions: list[tuple[torch.Tensor, int]]  # each source weight and its version when packed

    @classmethod
    def build(cls, model: LlamaModel) -> LayerLoop | None:
        """None where the model's layers need what the loop does not run (Qwen3's q/k norms)
        or a GEMM weight has no packing of the backend's own kernel."""
        run = layer_loop(model.ops)
        if run is None or any(layer.q_norm is not None for layer in model.layers):
            return None
        own = {key: (version, packing) for key, (version, _, packing) in model._packed.items()}
        weights: list[torch.Tensor] = []
        versions: list[tuple[torch.Tensor, int]] = []
        for layer in model.layers:
            packings = []
            for w in (layer.qkv, layer.o_proj, layer.gate_up, layer.down):
                version, packing = own.get(id(w), (None, None))
                if packing is None or packing.dtype != model.layers[0].qkv.dtype:
                    return None
                packings.append(packing)
                versions.append((w, version))
            weights += [layer.attn_norm, packings[0], packings[1], layer.mlp_norm, packings[2], packings[3]]
        weights.append(model.final_norm)
        head = own.get(id(model.lm_head), (None, None))[1]
        if head is not None:
            weights.append(head)
        biases = [b for layer in model.layers for b in (layer.qkv_bias, layer.o_bias, layer.gate_up_bias, layer.down_bias)]
        a, first = model.args, model.layers[0]
        dims = [a.num_heads, a.num_kv_heads, a.head_dim, first.qkv.shape[0], first.o_proj.shape[0],
                first.gate_up.shape[0], first.down.shape[0]]
        return cls(run, weights, biases, dims, gemm_kernel(first.qkv.dtype), versions)

    def current(self, ops: KernelOps) -> bool:
        return layer_loop(ops) is self.run and all(w._version == v for w, v in self.versions)

    def __call__(self, h: torch.Tensor, meta: AttentionMetadata, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 cos_sin: torch.Tensor, scale: float, eps: float) -> torch.Tensor:
        """h: [T, H] embeddings -> [T, H] after the final norm, as LlamaModel.forward's loop."""
        kv = [c for pair in kv_caches for c in pair]
        return self.run(h, self.weights, self.biases, self.dims, meta, cos_sin, kv, scale, eps, self.gemm)
