"""Tiny random-weight checkpoints (Llama, Qwen2, Qwen3) with a small trained BPE tokenizer.

Saved as ordinary HF checkpoint directories so the engine loads them through the same
path as a real model, and HF transformers can serve as the fp32 trainer reference.
"""
from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 384
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Reinforcement learning trains a policy.",
    "Logprobs, tokens and weights: the engine returns what the trainer recomputes.",
    "Hello world! How are you today? Ünïcödé text: café, naïve, 東京, 😀 emoji.",
    "def step(self): return self.scheduler.schedule() 0123456789 + - * / = < >",
] * 20


def make_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    fast.chat_template = CHATML
    fast.save_pretrained(str(path))


def hf_config(arch: str, **overrides: object):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    common.update(overrides)
    if arch == "llama":
        return LlamaConfig(tie_word_embeddings=True, **common)
    if arch == "qwen2":
        return Qwen2Config(tie_word_embeddings=False, rope_theta=1e6, **common)
    if arch == "qwen3":
        return Qwen3Config(tie_word_embeddings=True, head_dim=32, **common)
    raise ValueError(arch)


def make_model_dir(path: Path, arch: str, seed: int = 0, **overrides: object) -> Path:
    """Random weights saved with a tokenizer.

    The scales give realistic next-token distributions (logit std ~1.6, top prob 0.1-0.3)
    rather than HF's near-uniform default init. They also set the fp32 noise floor: at
    these scales HF's own sdpa and eager attention differ by <= 5e-6 in log-probs, so the
    1e-5 parity tolerance tests our math, not rounding. (With 2.5x larger weights HF
    disagrees with itself by 2.5e-5.)
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = hf_config(arch, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2 if ("embed" in name or "lm_head" in name) else 0.08)
    model.save_pretrained(str(path))
    make_tokenizer(path)
    return path


def load_hf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
