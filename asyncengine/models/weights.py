"""HF weight names -> slices of the model's fused tensors; validated, all-or-nothing loads."""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from asyncengine.models.llama import LlamaModel


class WeightLoadError(ValueError):
    """A state dict does not fit the model (missing, unknown, wrong shape or dtype)."""


@dataclass(frozen=True, slots=True)
class Target:
    tensor: torch.Tensor
    # Rows of the fused tensor this HF tensor fills (None: the whole tensor).
    rows: slice | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        view = self.tensor if self.rows is None else self.tensor[self.rows]
        return tuple(view.shape)


def weight_map(model: LlamaModel) -> dict[str, list[Target]]:
    """Every HF tensor name the model takes, and where it goes."""
    a, d = model.args, model.args.head_dim
    q_rows, kv_rows = a.num_heads * d, a.num_kv_heads * d
    qkv = {"q_proj": slice(0, q_rows), "k_proj": slice(q_rows, q_rows + kv_rows),
           "v_proj": slice(q_rows + kv_rows, q_rows + 2 * kv_rows)}
    gu = {"gate_proj": slice(0, a.intermediate_size), "up_proj": slice(a.intermediate_size, 2 * a.intermediate_size)}
    out: dict[str, list[Target]] = {"model.embed_tokens.weight": [Target(model.embed)],
                                    "model.norm.weight": [Target(model.final_norm)]}
    if a.tie_word_embeddings:
        if model.lm_head is not model.embed:
            out["model.embed_tokens.weight"].append(Target(model.lm_head))
    else:
        out["lm_head.weight"] = [Target(model.lm_head)]
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = [Target(layer.attn_norm)]
        out[p + "post_attention_layernorm.weight"] = [Target(layer.mlp_norm)]
        for name, rows in qkv.items():
            out[p + f"self_attn.{name}.weight"] = [Target(layer.qkv, rows)]
            if layer.qkv_bias is not None:
                out[p + f"self_attn.{name}.bias"] = [Target(layer.qkv_bias, rows)]
        out[p + "self_attn.o_proj.weight"] = [Target(layer.o_proj)]
        if layer.o_bias is not None:
            out[p + "self_attn.o_proj.bias"] = [Target(layer.o_bias)]
        if layer.q_norm is not None and layer.k_norm is not None:
            out[p + "self_attn.q_norm.weight"] = [Target(layer.q_norm)]
            out[p + "self_attn.k_norm.weight"] = [Target(layer.k_norm)]
        for name, rows in gu.items():
            out[p + f"mlp.{name}.weight"] = [Target(layer.gate_up, rows)]
            if layer.gate_up_bias is not None:
                out[p + f"mlp.{name}.bias"] = [Target(layer.gate_up_bias, rows)]
        out[p + "mlp.down_proj.weight"] = [Target(layer.down)]
        if layer.down_bias is not None:
            out[p + "mlp.down_proj.bias"] = [Target(layer.down_bias)]
    return out


# Names a checkpoint may carry that the model does not need.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_weights(model: LlamaModel, state: Mapping[str, torch.Tensor], *, partial: bool = False,
                 place: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    """Copy HF-named tensors into the model, after checking every one of them.

    Nothing is written unless all checks pass, so a bad state dict leaves the model as it
    was. partial=True allows a subset of names (an update of some tensors). place: where
    the GEMM packings go (LlamaModel.repack).
    """
    targets = weight_map(model)
    tied_head = model.args.tie_word_embeddings
    names = [n for n in state if not n.endswith(_IGNORED_SUFFIXES) and not (tied_head and n == "lm_head.weight")]
    unknown = sorted(set(names) - targets.keys())
    if unknown:
        raise WeightLoadError(f"unknown weight names: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    missing = sorted(targets.keys() - set(names))
    if missing and not partial:
        raise WeightLoadError(f"missing weights: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for name in names:
        src = state[name]
        if not isinstance(src, torch.Tensor) or not src.is_floating_point():
            raise WeightLoadError(f"{name}: expected a floating-point tensor")
        want = targets[name][0].shape
        if tuple(src.shape) != want:
            raise WeightLoadError(f"{name}: shape {tuple(src.shape)} does not match the model's {want}")
        if not bool(torch.isfinite(src).all()):
            raise WeightLoadError(f"{name}: contains non-finite values")
    with torch.no_grad():
        for name in names:
            for t in targets[name]:
                view = t.tensor if t.rows is None else t.tensor[t.rows]
                view.copy_(state[name])
    model.repack(place)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file or of every .safetensors file in a directory."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise WeightLoadError(f"no .safetensors files in {path}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():
                state[name] = fh.get_tensor(name)
    return state


def export_state(model: LlamaModel) -> dict[str, torch.Tensor]:
    """Each HF-named tensor as the model holds it (its own dtype; views, not copies): what
    load_weights takes back to give another engine the same bits."""
    return {name: t.tensor if t.rows is None else t.tensor[t.rows]
            for name, (t, *_) in weight_map(model).items()}


def weight_checksums(model: LlamaModel) -> dict[str, str]:
    """sha256 of each HF-named tensor as the model holds it (its own dtype, row-major)."""
    out = {}
    for name, view in export_state(model).items():
        host = view.contiguous().cpu()  # host bytes
        out[name] = hashlib.sha256(host.view(torch.uint8).numpy().tobytes()).hexdigest()
    return out


def read_weight_source(source: str | Path | bytes) -> dict[str, Any]:
    """Tensors of safetensors bytes, file or directory (runs on a worker thread)."""
    if isinstance(source, bytes):
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            return load(source)
        except SafetensorError as exc:
            raise WeightLoadError(f"not a safetensors body: {exc}") from exc
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"no such weights file or directory: {path}")
    return read_safetensors(path)
