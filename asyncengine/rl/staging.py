"""Shadow staging: new weights are put into a shadow of the model, packed there, and
swapped in by reference at a step boundary, so the engine pauses for a few attribute
writes rather than for a 538 MB copy and a repack.

Two ways: `stage_views` (a full update in the model's dtype, what a trainer sends every
step) makes the received tensors themselves the shadow's weights, without a copy: q, k, v
(and gate, up) received back to back are already the fused tensor; the GEMM packings go
into kept buffers (asyncengine/rl/buffers.py). Anything else (a subset of the tensors,
another dtype) takes `stage`: a copy of the weights, written, repacked.
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import fields

import torch

from asyncengine.models.llama import LayerWeights, LlamaModel
from asyncengine.models.weights import WeightLoadError, load_weights, weight_map
from asyncengine.rl.buffers import SpareBuffers
from asyncengine.rl.packing import matches_op, pack_into, packed_numel
from kernels.huge_pages import Arena

# The attributes of LlamaModel that hold weights (and their packed layouts).
_WEIGHT_ATTRS = ("embed", "layers", "final_norm", "lm_head", "_packed", "_layer_loop")
_PAGE = 4096


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
    shadow._layer_loop = None  # it captured the live weights: repack() builds the shadow's own
    return shadow


def stage(model: LlamaModel, state: Mapping[str, torch.Tensor], spares: SpareBuffers | None = None) -> LlamaModel:
    """A shadow of `model` holding `state` (a subset of HF names is fine), packed (into
    kept slabs of `spares` when given: then flip them at the swap, as for stage_views).

    Runs off the engine thread: it reads the live weights (never written in place by
    the engine) and writes only the copies. Raises WeightLoadError (nothing staged).
    """
    full = weight_map(model).keys() <= state.keys()  # every tensor is overwritten: copy none
    shadow = shadow_of(model, keep_values=not full)
    # Validates every tensor first, then repacks.
    load_weights(shadow, state, partial=not full, place=None if spares is None else _kept_slabs(spares))
    return shadow


def stage_views(model: LlamaModel, state: Mapping[str, torch.Tensor], spares: SpareBuffers) -> LlamaModel | None:
    """A shadow of `model` whose weights are the tensors of `state` (views, not copies),
    packed into `spares`; None where this does not apply (a partial update, another dtype
    or device, an unknown name: then `stage`). Raises WeightLoadError on a wrong shape or
    a non-finite value. The tensors of `state` must not be written while it serves."""
    targets = weight_map(model)
    extra = state.keys() - targets.keys() - {"lm_head.weight"}
    if extra or not targets.keys() <= state.keys():
        return None
    parts: dict[int, tuple[torch.Tensor, list[tuple[slice | None, torch.Tensor, str]]]] = {}
    for name, ts in targets.items():
        for t in ts:
            parts.setdefault(id(t.tensor), (t.tensor, []))[1].append((t.rows, state[name], name))
    if any(src.dtype != live.dtype or src.device != live.device for live, ps in parts.values() for _, src, _ in ps):
        return None
    new = {key: _assemble(live, ps) for key, (live, ps) in parts.items()}
    for key, t in new.items():
        _check_finite(t, parts[key][1])

    def sub(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else new[id(t)]

    shadow = copy.copy(model)
    shadow.embed, shadow.final_norm = sub(model.embed), sub(model.final_norm)
    shadow.layers = [LayerWeights(**{f.name: sub(getattr(layer, f.name)) for f in fields(LayerWeights)})
                     for layer in model.layers]
    shadow.lm_head = shadow.embed if model.lm_head is model.embed else sub(model.lm_head)
    _repack_into(shadow, spares)
    return shadow


def _assemble(live: torch.Tensor, parts: list[tuple[slice | None, torch.Tensor, str]]) -> torch.Tensor:
    """The new value of one of the model's tensors from the HF tensors that fill it: the
    received tensor itself, or for a fused one (qkv, gate_up) the span its parts cover
    when they were received back to back in row order, else a copy."""
    for rows, src, name in parts:
        want = tuple(live.shape if rows is None else live[rows].shape)
        if tuple(src.shape) != want:
            raise WeightLoadError(f"{name}: shape {tuple(src.shape)} does not match the model's {want}")
    if len(parts) == 1 and parts[0][0] is None:
        return parts[0][1]
    ordered = sorted(parts, key=lambda p: p[0].start if p[0] is not None else 0)
    first = ordered[0][1]
    row_bytes = live.stride(0) * live.element_size() if live.dim() > 1 else live.element_size()
    adjacent = all(src.is_contiguous() and src.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
                   and rows is not None and src.data_ptr() == first.data_ptr() + rows.start * row_bytes
                   for rows, src, _ in ordered)
    if adjacent and ordered[0][0] is not None and ordered[0][0].start == 0 and live.is_contiguous():
        return first.as_strided(live.shape, live.stride(), first.storage_offset())
    return torch.cat([src for _, src, _ in ordered])


def _check_finite(t: torch.Tensor, parts: list[tuple[slice | None, torch.Tensor, str]]) -> None:
    """A sum is finite only if every element is (inf and nan stay in a sum): one read of
    the tensor; the elementwise test (much slower) only where the sum is not finite."""
    if not t.numel() or bool(torch.isfinite(t.sum())):
        return
    for _, src, name in parts:
        if not bool(torch.isfinite(src).all()):
            raise WeightLoadError(f"{name}: contains non-finite values")


def _repack_into(shadow: LlamaModel, spares: SpareBuffers) -> None:
    """shadow.repack() into kept buffers: the fp32 packings written straight into one
    buffer where pack_into gives the op's bytes (asyncengine/rl/packing.py), else the op's
    packings copied into kept slabs."""
    op = shadow.ops.pack_linear
    weights = shadow.gemm_weights()
    if op is None or not all(w.dtype == torch.float32 and w.device.type == "cpu" for w in weights) \
            or not matches_op(op):
        shadow.repack(_kept_slabs(spares))
        return
    # One kept buffer holds every packing, each from a page boundary: like the model's own
    # arena (LlamaModel.repack), whole 2 MB pages rather than one small buffer per weight.
    offsets, total = {}, 0
    for w in weights:
        offsets[id(w)] = total
        total += -(-packed_numel(*w.shape) * 4 // _PAGE) * _PAGE
    buf = spares.get("packings", total)

    def pack(w: torch.Tensor) -> torch.Tensor:
        start = offsets[id(w)]
        return pack_into(w, buf[start : start + packed_numel(*w.shape) * 4].view(torch.float32))

    ops = shadow.ops
    shadow.ops = dataclasses.replace(ops, pack_linear=pack)
    try:
        shadow.repack(place=lambda packed: packed)  # already in the kept buffer
    finally:
        shadow.ops = ops


def _kept_slabs(spares: SpareBuffers) -> Callable[[torch.Tensor], torch.Tensor]:
    """Places packings in slabs of the spare set, kept across updates: memory written
    before, on huge pages, instead of ~0.1-0.3 s of fresh pages faulted per update."""
    return Arena(new_slab=lambda i, nbytes: spares.get(("packing slab", i), nbytes)).place


def swap_in(model: LlamaModel, shadow: LlamaModel) -> None:
    """Point `model` at the shadow's weights (at a step boundary: O(1), nothing copied)."""
    for attr in _WEIGHT_ATTRS:
        setattr(model, attr, getattr(shadow, attr))


def layout_rank(model: LlamaModel) -> dict[str, int]:
    """A rank per HF name that puts the parts of each fused tensor (q, k, v; gate, up)
    next to each other in row order: received in this order, they are the fused tensor."""
    groups: dict[int, list[tuple[int, str]]] = {}
    for name, targets in weight_map(model).items():
        t = targets[0]
        groups.setdefault(id(t.tensor), []).append((0 if t.rows is None else t.rows.start, name))
    ordered = [name for parts in groups.values() for _, name in sorted(parts)]
    return {name: i for i, name in enumerate(ordered)}


def expected_shapes(model: LlamaModel) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name the model takes and its shape (a tied model also accepts lm_head)."""
    shapes = {name: targets[0].shape for name, targets in weight_map(model).items()}
    if model.args.tie_word_embeddings:
        shapes["lm_head.weight"] = shapes["model.embed_tokens.weight"]
    return shapes
