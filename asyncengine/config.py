"""One frozen engine configuration, validated on construction and passed down explicitly."""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Literal

DTYPES = ("float32", "bfloat16")
KernelBackend = Literal["auto", "cpu", "torch", "triton"]


class ConfigError(ValueError):
    """An engine option has a value the engine cannot run with."""


@dataclass(frozen=True, slots=True)
class EngineConfig:
    # Path to an HF checkpoint directory (config.json + safetensors + tokenizer);
    # None means the default model (SmolLM2-135M-Instruct, prepared locally).
    model: str | None = None
    # Compute dtype of the transformer body; logits are always materialized in fp32.
    dtype: str = "float32"
    # Dtype of the final projection; "float32" keeps the head exact with a bf16 body.
    # None means "same as dtype".
    lm_head_dtype: str | None = "float32"
    # Tokens per KV block (the unit of paging and of prefix-cache hashing).
    block_size: int = 16
    # Number of KV blocks in the pool; None derives it from kv_cache_memory_gb.
    num_kv_blocks: int | None = None
    # Memory budget for the KV pool when num_kv_blocks is None; None sizes the pool from
    # the memory available at start-up (asyncengine/kv_budget.py).
    kv_cache_memory_gb: float | None = None
    # Most requests scheduled in one step.
    max_num_seqs: int = 64
    # Most tokens (prompt chunks + decodes) computed in one step.
    max_num_batched_tokens: int = 2048
    # Longest prompt + output; None means the model's max_position_embeddings.
    max_model_len: int | None = None
    # Split long prompts across steps under the token budget.
    enable_chunked_prefill: bool = True
    # Reuse KV of full blocks whose token-prefix hash matches.
    enable_prefix_caching: bool = True
    # Bitwise batch/chunk/cache invariance (the contract); False allows faster paths.
    deterministic: bool = True
    # Rows per BLAS GEMM call in deterministic mode (models/llama.py): linear layers that a
    # BLAS library runs (bf16; the torch backend) take calls of exactly this many rows, the
    # last zero-padded, so a row's bits do not depend on the batch. Larger tiles run big
    # batches faster and small ones slower. (The CPU backend's own GEMMs, fp32 and bf16
    # on AMX, need none.)
    gemm_tile_rows: int = 64
    # Async scheduling: a step's output side (detokenizing requests without stop strings,
    # building and delivering RequestOutputs) runs while the next step's forward runs on a
    # forward thread. Every stop decision is still taken before the next step is scheduled,
    # so outputs are bitwise those of sync scheduling (tests/test_async_scheduling.py).
    async_scheduling: bool = False
    # Which implementation of the hot ops runs: auto = Triton on CUDA; on CPU the compiled
    # CPU attention op (kernels/attention_cpu.py) with torch for the rest, or plain torch
    # if that op cannot be built here.
    kernel_backend: KernelBackend = "auto"
    # Device for weights, KV cache and every hot op: "cpu", or "cuda" / "cuda:N" (the
    # Triton kernels; with kernel_backend "auto" the backend follows the device).
    device: str = "cpu"
    # Intra-op threads for torch on CPU; None leaves torch's default.
    num_threads: int | None = None
    # CPU: fix glibc's malloc thresholds for this process so a step's freed tensors stay
    # in the heap for the next step instead of being unmapped and faulted in again
    # (kernels/host_heap.py: 0.86 of an fp32 step of prompts). Process-wide once applied.
    retain_host_heap: bool = True
    # Seed for requests that come without one (each gets a seed drawn from this).
    seed: int = 0
    # Bound of the waiting queue; past it add_request raises EngineOverloaded.
    max_waiting: int = 4096
    # Exact-token sessions (asyncengine/sessions/): a session idle this long expires.
    session_ttl_s: float = 600.0
    # Largest share of the KV pool that live sessions' free cached blocks may hold while
    # they are evicted last (after every other free block).
    session_kv_fraction: float = 0.5
    # Seconds a request may wait in the queue before it is first scheduled; past it the
    # request fails with a queue timeout (HTTP 503). None: no limit.
    max_queue_seconds: float | None = None
    # UNSAFE, a demonstration of a classic RL bug only (`asyncengine rl-check`): keep the
    # prefix cache (and its hash salt) across weight updates, so new requests reuse KV
    # computed by older weights. Breaks the weight-update contract; never for training.
    unsafe_keep_prefix_cache_across_updates: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.lm_head_dtype is not None and self.lm_head_dtype not in DTYPES:
            raise ConfigError(f"lm_head_dtype must be one of {DTYPES} or None, got {self.lm_head_dtype!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ConfigError("num_kv_blocks must be at least 2")
        if self.kv_cache_memory_gb is not None and self.kv_cache_memory_gb <= 0:
            raise ConfigError("kv_cache_memory_gb must be positive")
        if self.max_num_seqs < 1:
            raise ConfigError("max_num_seqs must be at least 1")
        if not 1 <= self.gemm_tile_rows <= 4096:
            raise ConfigError(f"gemm_tile_rows must be in [1, 4096], got {self.gemm_tile_rows}")
        if self.max_num_batched_tokens < 1:
            raise ConfigError("max_num_batched_tokens must be at least 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError("max_model_len must be at least 2")
        if self.kernel_backend not in ("auto", "cpu", "torch", "triton"):
            raise ConfigError(f"kernel_backend must be auto, cpu, torch or triton, got {self.kernel_backend!r}")
        if self.max_waiting < 1:
            raise ConfigError("max_waiting must be at least 1")
        if self.session_ttl_s <= 0 or not 0.0 <= self.session_kv_fraction <= 1.0:
            raise ConfigError("session_ttl_s must be positive and session_kv_fraction in [0, 1]")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f'device must be "cpu", "cuda" or "cuda:N", got {self.device!r}')
        if self.kernel_backend == "cpu" and self.device != "cpu":
            raise ConfigError('kernel_backend="cpu" runs on device="cpu" only')
        if self.max_queue_seconds is not None and not self.max_queue_seconds > 0:
            raise ConfigError(f"max_queue_seconds must be positive, got {self.max_queue_seconds}")

    @property
    def head_dtype(self) -> str:
        return self.lm_head_dtype or self.dtype

    def with_options(self, **changes: object) -> EngineConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the engine derives from the checkpoint (returned, never written back)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_model_len: int
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
