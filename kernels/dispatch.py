"""Choose the implementation of the hot ops: Triton on CUDA (every per-layer op, the
linear layers through the fixed-tile kernels/matmul.py); on CPU the torch ops with the
compiled CPU ops (kernels/attention_cpu.py), or plain torch.

`get_ops(backend, device)` returns one KernelOps; the model holds it and calls through it,
so the choice is made once, from the engine config, never from the environment.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from kernels import activation, attention, attention_cpu, kv_store, matmul, rmsnorm, rope, sampling
from kernels.attention import head_major_cache, paged_attention_torch
from kernels.kv_store import store_kv_torch
from kernels.rmsnorm import rms_norm_torch
from kernels.rope import apply_rope_torch
from kernels.sampling import LogprobsOut, log_softmax_topn_torch, support_mask_torch


def contiguous_kv_cache(*shape: int, dtype: torch.dtype, device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)


def head_major_kv_cache(*shape: int, dtype: torch.dtype, device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return head_major_cache(*shape, dtype=dtype, device=device), head_major_cache(*shape, dtype=dtype, device=device)


@dataclass(frozen=True, slots=True)
class KernelOps:
    name: str
    rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
    apply_rope: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    store_kv: Callable[..., None]
    paged_attention: Callable[..., torch.Tensor]
    # Sampling support (kernels/sampling.py): log_softmax + chosen + top-N, support mask.
    log_softmax_topn: Callable[..., LogprobsOut] = log_softmax_topn_torch
    support_mask: Callable[..., torch.Tensor] = support_mask_torch
    # (num_blocks, block_size, Hkv, D, dtype, device) -> zeroed (k_cache, v_cache), both
    # seen as [NB, BS, Hkv, D]; each backend stores them in the layout it reads fastest.
    new_kv_cache: Callable[..., tuple[torch.Tensor, torch.Tensor]] = contiguous_kv_cache
    # Fused ops (OPTIONAL_FUSED) where a backend has them; else the model composes the ops above.
    # gate_up [T, 2I] -> silu(gate) * up [T, I], exact silu (row-invariant).
    silu_mul: Callable[[torch.Tensor], torch.Tensor] | None = None
    # (q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping) -> rotated q, fp32
    # [T, Hq, D]; stores the rotated k and v (apply_rope + store_kv in one pass).
    rope_store_kv: Callable[..., torch.Tensor] | None = None
    # Batch-invariant linear layer: pack_linear(w [N, K]) -> packed (None: this dtype is not
    # handled), packed_linear(x [T, K], packed, bias, N, next_packed=None) -> [T, N]
    # (next_packed: the packing multiplied by next, a cache hint).
    pack_linear: Callable[[torch.Tensor], torch.Tensor | None] | None = None
    packed_linear: Callable[..., torch.Tensor] | None = None
    # Every decoder layer as one call (attention_cpu.decoder_layers_cpu) composing the ops
    # named in LAYER_LOOP_OPS; used only while those are this backend's (layer_loop()).
    decoder_layers: Callable[..., torch.Tensor] | None = None


# KernelOps fields a backend may leave None.
OPTIONAL_FUSED = ("silu_mul", "rope_store_kv", "pack_linear", "packed_linear", "decoder_layers")
# The ops decoder_layers runs in C++: the loop may stand in for them only while they are CPU_OPS's.
LAYER_LOOP_OPS = ("rms_norm", "rope_store_kv", "paged_attention", "silu_mul", "packed_linear")

TORCH_OPS = KernelOps(
    name="torch",
    rms_norm=rms_norm_torch,
    apply_rope=apply_rope_torch,
    store_kv=store_kv_torch,
    paged_attention=paged_attention_torch,
    log_softmax_topn=log_softmax_topn_torch,
    support_mask=support_mask_torch,
    new_kv_cache=head_major_kv_cache,
)
# The torch ops with the compiled CPU ops (attention with no gather and no padding, and
# the fused per-layer ops): the CPU engine's fast path, batch-invariant by construction
# like the torch one.
CPU_OPS = replace(TORCH_OPS, name="cpu", paged_attention=attention_cpu.paged_attention_cpu,
                  store_kv=attention_cpu.store_kv_cpu, new_kv_cache=attention_cpu.new_kv_cache,
                  rms_norm=attention_cpu.rms_norm_cpu, silu_mul=attention_cpu.silu_mul_cpu,
                  rope_store_kv=attention_cpu.rope_store_kv_cpu, pack_linear=attention_cpu.pack_linear_weight,
                  packed_linear=attention_cpu.packed_linear_cpu, decoder_layers=attention_cpu.decoder_layers_cpu)


def layer_loop(ops: KernelOps) -> Callable[..., torch.Tensor] | None:
    """ops.decoder_layers where it computes what the model's Python loop over `ops` would:
    none when an op it composes was replaced (a test's or a bench's wrapper keeps working)."""
    if ops.decoder_layers is None or any(getattr(ops, f) is not getattr(CPU_OPS, f) for f in LAYER_LOOP_OPS):
        return None
    return ops.decoder_layers


def triton_available() -> bool:
    return rmsnorm.triton is not None


def get_ops(backend: str, device: str | torch.device) -> KernelOps:
    """backend: "auto" (Triton on CUDA when Triton imports; on CPU the compiled CPU
    attention when it builds, else torch), "cpu", "torch" or "triton" (forced; on a CPU
    device "triton" means the Triton interpreter)."""
    if backend not in ("auto", "cpu", "torch", "triton"):
        raise ValueError(f"unknown kernel backend {backend!r}")
    on_cuda = torch.device(device).type == "cuda"
    if backend == "cpu" or (backend == "auto" and not on_cuda):
        if on_cuda:
            raise ValueError('kernel_backend="cpu" needs a CPU device')
        if backend == "cpu":
            attention_cpu.load()  # forced: a build failure is an error, not a fallback
            return CPU_OPS
        return CPU_OPS if attention_cpu.available() else TORCH_OPS
    if backend == "torch" or (backend == "auto" and not triton_available()):
        return TORCH_OPS
    return _triton_ops(on_cuda)


def _triton_ops(on_cuda: bool) -> KernelOps:
    if not triton_available():
        raise RuntimeError('kernel_backend="triton" needs the `triton` package, which cannot be imported')
    if not on_cuda and not _interpreted():
        # Without a GPU driver Triton cannot launch compiled kernels; the interpreter is
        # chosen when the kernels are decorated, i.e. when triton is first imported.
        raise RuntimeError(
            'kernel_backend="triton" on a CPU device runs only under the Triton interpreter: '
            "set TRITON_INTERPRET=1 before triton (or kernels.*) is first imported"
        )
    return KernelOps(
        name="triton",
        rms_norm=rmsnorm.rms_norm_triton,
        apply_rope=rope.apply_rope_triton,
        store_kv=kv_store.store_kv_triton,
        paged_attention=attention.paged_attention_triton,
        log_softmax_topn=sampling.log_softmax_topn_triton,
        support_mask=sampling.support_mask_triton,
        silu_mul=activation.silu_mul_triton,
        pack_linear=matmul.pack_linear_triton,
        packed_linear=matmul.packed_linear_triton,
    )


def _interpreted() -> bool:
    """Whether the kernels were built as interpreter functions (CPU-runnable)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(rmsnorm._rms_norm_kernel, InterpretedFunction)
