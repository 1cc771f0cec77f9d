"""What the engine reads from a checkpoint directory besides the weights: the tokenizer
and the EOS ids (config, generation_config and tokenizer together)."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def load_tokenizer(model_dir: Path) -> Any | None:
    """The checkpoint's HF tokenizer, or None when it ships none."""
    if not any((model_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def eos_token_ids(model_dir: Path, hf_config: Any, tokenizer: Any | None) -> tuple[int, ...]:
    """Every EOS id the config, the generation config and the tokenizer name, sorted."""
    ids: set[int] = set()
    for source in (hf_config, _generation_config(model_dir)):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return tuple(sorted(ids))


def _generation_config(model_dir: Path) -> Any | None:
    if not (model_dir / "generation_config.json").exists():
        return None
    from transformers import GenerationConfig

    return GenerationConfig.from_pretrained(str(model_dir))
