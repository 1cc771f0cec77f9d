"""F32 and BF16 GGUF files of the default model's weights, for llama.cpp as a bench peer.

The default model ships as a Q4_1 GGUF (asyncengine/model_files.py); the engine's
checkpoint is that file dequantized by transformers, which calls `gguf.dequantize`. Here
the same function dequantizes every tensor of the same file and the result is written
unchanged as an F32 GGUF (every metadata and tokenizer key copied), so llama.cpp computes
with exactly the engine's fp32 weights. The BF16 file rounds the body's matrices to bf16
(round to nearest even, as the engine's fp32 -> bf16 copy does when it runs in bf16); 1-D
tensors (norms) stay F32, as llama.cpp's own converter keeps them, and so does the token
embedding, which is the tied lm_head: the engine keeps its head in fp32 (lm_head_dtype's
default) with a bf16 body, and the peer computes the same head.

`verify` reads a written file back and checks it bit for bit against the dequantized
source; `verify_against_checkpoint` loads the F32 file the way the engine's checkpoint was
made (transformers' GGUF loader) and compares it with the checkpoint's safetensors.
`python bench/llamacpp.py --check` writes (if needed) and checks both files in the cache.
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

_SKIPPED_KEYS = (gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE)
_F32_IN_BF16 = ("token_embd.weight",)  # the tied head: fp32 in the engine's bf16 mode too
FILE_TYPES = {"float32": gguf.LlamaFileType.ALL_F32, "bfloat16": gguf.LlamaFileType.MOSTLY_BF16}


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bit patterns (uint16), round to nearest even, via torch (the engine's cast)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.bfloat16)
    return t.view(torch.int16).numpy().view(np.uint16)


def _target(name: str, weights: np.ndarray, dtype: str) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """The array to write for one dequantized fp32 tensor, and its GGML type."""
    if dtype == "float32" or weights.ndim == 1 or name in _F32_IN_BF16:
        return weights, gguf.GGMLQuantizationType.F32
    return _bf16_bits(weights), gguf.GGMLQuantizationType.BF16


def dequantized(reader: gguf.GGUFReader) -> dict[str, np.ndarray]:
    """Every tensor of `reader` dequantized to fp32 (GGUF layout: [rows, cols] in numpy)."""
    return {t.name: gguf.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False) for t in reader.tensors}


def write_dense(src: Path, dst: Path, dtype: str) -> Path:
    """Write `src` (any GGUF) as a dense `dtype` ("float32" or "bfloat16") GGUF at `dst`."""
    if dtype not in FILE_TYPES:
        raise ValueError(f"dtype must be one of {sorted(FILE_TYPES)}, not {dtype!r}")
    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in _SKIPPED_KEYS:
            continue  # written by GGUFWriter itself, or changed below
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    writer.add_file_type(FILE_TYPES[dtype])
    for name, weights in dequantized(reader).items():
        data, qtype = _target(name, weights, dtype)
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(dst)  # a half-written file never carries the final name
    return dst


def verify(src: Path, dst: Path, dtype: str) -> int:
    """Check `dst` holds exactly `src`'s dequantized tensors (bf16: their RNE rounding) and
    the same metadata; return the number of tensors checked, raise ValueError otherwise."""
    source, written = gguf.GGUFReader(src), gguf.GGUFReader(dst)
    expected = dequantized(source)
    got = {t.name: t for t in written.tensors}
    if set(got) != set(expected):
        raise ValueError(f"{dst}: tensor names differ from {src}")
    for name, weights in expected.items():
        want, qtype = _target(name, weights, dtype)
        t = got[name]
        if t.tensor_type != qtype or not np.array_equal(np.ascontiguousarray(t.data).view(want.dtype).reshape(want.shape), want):
            raise ValueError(f"{dst}: tensor {name} is not the {dtype} of {src}'s dequantized weights")
    for field in source.fields.values():
        if field.name.startswith("GGUF.") or field.name in _SKIPPED_KEYS:
            continue
        if field.name not in written.fields or written.fields[field.name].contents() != field.contents():
            raise ValueError(f"{dst}: metadata key {field.name} differs from {src}")
    return len(expected)


def verify_against_checkpoint(f32_gguf: Path, model_dir: Path) -> int:
    """Load `f32_gguf` with transformers' GGUF loader (the path that made the engine's
    checkpoint) and check every tensor equals `model_dir`'s safetensors bit for bit."""
    import torch
    from safetensors.torch import load_file
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    loaded = load_gguf_checkpoint(str(f32_gguf), return_tensors=True, model_to_load=skeleton)["tensors"]
    ours = load_file(str(model_dir / "model.safetensors"))
    names = [n for n in ours if n in loaded]
    if not names or any(n not in loaded for n in ours if n != "lm_head.weight"):
        raise ValueError(f"{f32_gguf}: tensors do not cover the checkpoint in {model_dir}")
    for n in names:
        if not torch.equal(torch.as_tensor(loaded[n]).to(torch.float32), ours[n]):
            raise ValueError(f"{f32_gguf}: {n} differs from the engine's checkpoint")
    return len(names)
