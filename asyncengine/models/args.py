"""Model hyper-parameters read from an HF config (Llama family: Llama, SmolLM2, Qwen2, Qwen3)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or options are not implemented."""


@dataclass(frozen=True, slots=True)
class ModelArgs:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    # Biases on q/k/v projections (Qwen2 always; Llama with attention_bias).
    qkv_bias: bool
    # Bias on the output projection (Llama with attention_bias).
    o_bias: bool
    mlp_bias: bool
    # Per-head RMSNorm of q and k before RoPE (Qwen3).
    qk_norm: bool
    tie_word_embeddings: bool

    @classmethod
    def from_hf_config(cls, cfg: Any) -> ModelArgs:
        mtype = getattr(cfg, "model_type", "")
        if mtype not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(f"model_type {mtype!r} is not supported (have {SUPPORTED_MODEL_TYPES})")
        if getattr(cfg, "use_sliding_window", False):
            raise UnsupportedModelError("sliding-window attention is not supported")
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act {cfg.hidden_act!r} is not supported")
        heads = cfg.num_attention_heads
        attention_bias = bool(getattr(cfg, "attention_bias", False))
        return cls(
            model_type=mtype,
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            rms_norm_eps=cfg.rms_norm_eps,
            max_position_embeddings=cfg.max_position_embeddings,
            qkv_bias=mtype == "qwen2" or attention_bias,
            o_bias=mtype != "qwen2" and attention_bias,
            mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
            qk_norm=mtype == "qwen3",
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        )


def rope_inv_freq(cfg: Any, head_dim: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim / 2], attention_scaling) exactly as HF computes them."""
    params = getattr(cfg, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(f"rope_type {rope_type!r} is not supported (have {SUPPORTED_ROPE_TYPES})")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        return inv_freq, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](cfg)
    return inv_freq.float(), float(scaling)
