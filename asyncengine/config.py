"""One frozen engine configuration, validated on construction and passed down explicitly."""
from __future__ import annotations

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
    # Which implementation of the hot ops runs: auto = Triton on CUDA; on CPU the compiled
    # CPU attention op (kernels/attention_cpu.py) with torch for the rest, or plain torch
    # if that op cannot be built here.
    kernel_backend: KernelBackend = "auto"
    # Device for weights and KV cache.
    device: str = "cpu"
    # Intra-op threads for torch on CPU; None leaves torch's default.
    num_threads: int | None = None
    # Seed for requests that come without one (each gets a seed drawn from this).
    seed: int = 0
    # Bound of the waiting queue; past it add_request raises EngineOverloaded.
    max_waiting: int = 4096

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
