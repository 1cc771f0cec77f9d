"""Shadow staging: new weights are written into a copy of the model's tensors, packed
there, and swapped in by reference at a step boundary, so the engine pauses for a few
attribute writes rather than for a 538 MB copy and a repack."""
from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import fields

import torch

from asyncengine.models.llama import LayerWeights, LlamaModel
from asyncengine.models.weights import load_weights, weight_map

# The attributes of LlamaModel that hold weights (and their packed layouts).
_WEIGHT_ATTRS = ("embed", "layers", "final_norm", "lm_head", "_packed")


def shadow_of(model: LlamaModel, keep_values: bool = True) -> LlamaModel:
    """A model sharing everything with `model` but its weights, which are copies (or, with
    keep_values=False, uninitialized tensors of the same shapes, for a full overwrite)."""
    def dup(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else (t.clone() if keep_values else torch.empty_like(t))

    shadow = copy.copy(model)  # shallow: args, ops, rope tables are shared (never written)
    shadow.embed = dup(model.embed)
    shadow.layers = [LayerWeights(**{f.name: dup(getattr(layer, f.name)) for f in fields(LayerWeights)})
                     for layer in model.layers]
    shadow.final_norm = dup(model.final_norm)
    # A tied head in the body's dtype is the embedding tensor itself: keep it that way.
    shadow.lm_head = shadow.embed if model.lm_head is model.embed else dup(model.lm_head)
    shadow._packed = {}
    return shadow


def stage(model: LlamaModel, state: Mapping[str, torch.Tensor]) -> LlamaModel:
    """A shadow of `model` holding `state` (a subset of HF names is fine), packed.

    Runs off the engine thread: it reads the live weights (never written in place by
    the engine) and writes only the copies. Raises WeightLoadError (nothing staged).
    """
    full = weight_map(model).keys() <= state.keys()  # every tensor is overwritten: copy none
    shadow = shadow_of(model, keep_values=not full)
    load_weights(shadow, state, partial=not full)  # validates every tensor first, then repacks
    return shadow


def swap_in(model: LlamaModel, shadow: LlamaModel) -> None:
    """Point `model` at the shadow's weights (at a step boundary: O(1), nothing copied)."""
    for attr in _WEIGHT_ATTRS:
        setattr(model, attr, getattr(shadow, attr))


def expected_shapes(model: LlamaModel) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name the model takes and its shape (a tied model also accepts lm_head)."""
    shapes = {name: targets[0].shape for name, targets in weight_map(model).items()}
    if model.args.tie_word_embeddings:
        shapes["lm_head.weight"] = shapes["model.embed_tokens.weight"]
    return shapes
