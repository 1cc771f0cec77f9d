"""Tests for asyncengine.model_files: local model resolution and default-model preparation."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from asyncengine.model_files import (
    DEFAULT_MODEL_NAME,
    default_cache_dir,
    prepare_default_model,
    resolve_model,
)


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    """A tiny random-weight Llama checkpoint saved with save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    out = tmp_path / "tiny"
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def test_resolve_nonexistent_path_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not reachable"):
        resolve_model(str(tmp_path / "does-not-exist"), cache_dir=tmp_path / "cache")


def test_resolve_hub_style_id_never_downloads(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        resolve_model("some-org/some-model", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_resolve_dir_without_config_raises(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="config.json"):
        resolve_model(str(empty))


def test_resolve_file_raises(tmp_path: Path) -> None:
    f = tmp_path / "config.json"
    f.write_text("{}")
    with pytest.raises(ValueError, match="not a directory"):
        resolve_model(str(f))


def test_resolve_valid_local_dir(tiny_checkpoint: Path) -> None:
    assert resolve_model(str(tiny_checkpoint)) == tiny_checkpoint.resolve()
    assert json.loads((tiny_checkpoint / "config.json").read_text())["model_type"] == "llama"


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_cache_dir() == Path.home() / ".cache" / "asyncengine"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "asyncengine"


def test_complete_marker_short_circuits(tmp_path: Path) -> None:
    """A complete directory is returned as is: no download, no conversion."""
    model_dir = tmp_path / "models" / DEFAULT_MODEL_NAME
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text("{}")
    (model_dir / ".complete").write_text("done\n")
    assert prepare_default_model(tmp_path, quiet=True) == model_dir
    assert resolve_model(DEFAULT_MODEL_NAME.upper(), cache_dir=tmp_path) == model_dir
    assert resolve_model(None, cache_dir=tmp_path) == model_dir
    assert not (tmp_path / "wheels").exists()


@pytest.mark.real_model
def test_prepare_default_model_real() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_dir = prepare_default_model()
    assert model_dir.name == DEFAULT_MODEL_NAME
    for name in ("config.json", "model.safetensors", "generation_config.json",
                 "tokenizer.json", "tokenizer_config.json", ".complete"):
        assert (model_dir / name).is_file(), name

    config = AutoConfig.from_pretrained(model_dir)
    assert config.model_type == "llama"
    assert config.architectures == ["LlamaForCausalLM"]
    assert config.tie_word_embeddings is True
    assert not hasattr(config, "quantization_config") or config.quantization_config is None

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.generation_config.eos_token_id == 2

    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok.chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                   add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>user\nhi<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2

    marker = model_dir / ".complete"
    mtime = marker.stat().st_mtime_ns
    inode = os.stat(model_dir).st_ino
    assert prepare_default_model(quiet=True) == model_dir
    assert marker.stat().st_mtime_ns == mtime
    assert os.stat(model_dir).st_ino == inode
