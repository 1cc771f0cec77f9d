"""The weight-transfer fast path: vLLM's packed buckets, received tensors staged as views,
GEMM packings into kept buffers; each against the plain path (copy + load_weights + repack)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from asyncengine.config import EngineConfig
from asyncengine.engine_core import EngineCore
from asyncengine.models.weights import WeightLoadError, read_safetensors, weight_checksums
from asyncengine.outputs import CompletionResult
from asyncengine.rl.buffers import SpareBuffers
from asyncengine.rl.gloo import _view
from asyncengine.rl.packing import matches_op, pack_into, packed_numel
from asyncengine.rl.protocol import TransferError, UpdateInfo
from asyncengine.rl.staging import layout_rank, stage, stage_views, swap_in
from asyncengine.sampling_params import SamplingParams
from tests.tiny_models import make_model_dir

PROMPT = list(range(10, 30))


@pytest.fixture(scope="module")
def new_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("v1") / "llama", "llama", seed=321)


def info(sizes: list[int], cap: int, packed: bool = True) -> UpdateInfo:
    return UpdateInfo.parse({"names": [f"t{i}" for i in range(len(sizes))], "dtype_names": ["float32"] * len(sizes),
                             "shapes": [[n] for n in sizes], "packed": packed, "packed_buffer_size_bytes": cap})


def test_buckets_follow_vllms_rule() -> None:
    """A bucket closes once its size passes the cap, the passing tensor included; the rest
    (even if only empty tensors) is the last bucket."""
    assert info([10, 10, 0, 5], 50).buckets() == [(0, 80), (80, 100)]
    assert info([10, 10, 0, 5], 50).offsets() == [0, 40, 80, 80]
    assert info([20, 0, 0], 50).buckets() == [(0, 80), (80, 80)]
    assert info([5, 5, 5], 1 << 30).buckets() == [(0, 60)]
    assert info([100], 4).buckets() == [(0, 400)]  # one tensor past the cap is its own bucket
    for bad in ({"packed": "yes"}, {"packed_buffer_size_bytes": 0}, {"packed_num_buffers": -1}):
        body = {"names": ["a"], "dtype_names": ["float32"], "shapes": [[1]], **bad}
        with pytest.raises(TransferError):
            UpdateInfo.parse(body)


def test_pack_into_gives_the_ops_bytes() -> None:
    from kernels.attention_cpu import pack_linear_weight

    assert matches_op(pack_linear_weight)
    w = torch.randn(3 * 96 + 50, 7)
    out = torch.full((packed_numel(*w.shape),), float("nan"))
    assert torch.equal(pack_into(w, out), pack_linear_weight(w))


def received(state: dict[str, torch.Tensor], rank: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """The tensors as GlooGroup.receive leaves them: views of one flat buffer, in order
    (or in rank order)."""
    meta = UpdateInfo.parse({"names": list(state), "dtype_names": ["float32"] * len(state),
                             "shapes": [list(v.shape) for v in state.values()]})
    flat = torch.empty(sum(meta.sizes()), dtype=torch.uint8)
    out = {}
    for (name, v), at, size in zip(state.items(), meta.offsets(rank), meta.sizes()):
        out[name] = _view(flat[at : at + size], v.dtype, tuple(v.shape))
        out[name].copy_(v)
    return out


def greedy(core: EngineCore) -> tuple[list[int], list[float]]:
    core.add_request("r", PROMPT, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    res = CompletionResult("r", PROMPT)
    while core.has_unfinished():
        for out in core.step():
            res.add(out)
    return res.token_ids, res.logprobs


def test_views_serve_the_same_bits_as_a_load(llama_dir: Path, new_dir: Path) -> None:
    """Three fast updates in a row (new, old, new: the spare buffers alternate and are
    rewritten) serve exactly what an engine loaded from those weights serves; laid in the
    model's order, q, k and v are received as the fused tensor itself (in the file's
    alphabetical order they are copied together)."""
    cfg = {"num_kv_blocks": 32, "num_threads": 1}
    core = EngineCore(EngineConfig(model=str(llama_dir), **cfg))
    refs = {d: greedy(EngineCore(EngineConfig(model=str(d), **cfg))) for d in (llama_dir, new_dir)}
    spares = SpareBuffers()
    for d, rank in ((new_dir, layout_rank(core.model)), (llama_dir, None), (new_dir, layout_rank(core.model))):
        state = {k: v.float() for k, v in read_safetensors(d).items()}
        views = received(state, rank)
        shadow = stage_views(core.model, views, spares)
        assert shadow is not None
        q = views["model.layers.0.self_attn.q_proj.weight"]
        assert (shadow.layers[0].qkv.data_ptr() == q.data_ptr()) == (rank is not None)
        assert shadow.embed.data_ptr() == views["model.embed_tokens.weight"].data_ptr()
        assert weight_checksums(shadow) == weight_checksums(stage(core.model, state))
        # Every packing lies in one kept buffer (whole huge pages, not a buffer per weight).
        assert len({p.untyped_storage().data_ptr() for p in shadow.packings()}) == 1
        core.apply_weights(lambda: swap_in(core.model, shadow))
        spares.flip()
        assert greedy(core) == refs[d]
    assert spares.nbytes > 0


@pytest.mark.parametrize("head", ["float32", "bfloat16"])
def test_bf16_packings_reuse_kept_slabs(llama_dir: Path, new_dir: Path, head: str) -> None:
    """Where pack_into does not apply (bf16), the op's packings are copied into kept slabs,
    by stage_views (bf16 tensors, a bf16 head) or by stage (the file's fp32 tensors: another
    dtype, which keeps the fp32 head exact), as the weight-transfer endpoint calls them:
    the two spare sets alternate, and what is served matches a load."""
    cfg = {"num_kv_blocks": 32, "num_threads": 1, "dtype": "bfloat16", "lm_head_dtype": head}
    core = EngineCore(EngineConfig(model=str(llama_dir), **cfg))
    if not core.model.packings():
        pytest.skip("no bf16 GEMM of our own on this CPU (neither AMX nor AVX512-BF16): oneDNN packs instead")
    ref = greedy(EngineCore(EngineConfig(model=str(new_dir), **cfg)))
    spares, slabs = SpareBuffers(), []
    for d in (new_dir, llama_dir, new_dir):
        state = {k: v.to(getattr(torch, head)) for k, v in read_safetensors(d).items()}
        fast = stage_views(core.model, state, spares)
        assert (fast is not None) == (head == "bfloat16")
        shadow = fast if fast is not None else stage(core.model, state, spares)
        slabs.append({p.untyped_storage().data_ptr() for p in shadow.packings()})
        core.apply_weights(lambda: swap_in(core.model, shadow))
        spares.flip()
    assert slabs[0] == slabs[2] and not slabs[0] & slabs[1]
    assert greedy(core) == ref


def test_views_refuse_what_they_cannot_take(llama_dir: Path, new_dir: Path) -> None:
    core = EngineCore(EngineConfig(model=str(llama_dir), num_kv_blocks=16, num_threads=1))
    before = weight_checksums(core.model)
    state = {k: v.float() for k, v in read_safetensors(new_dir).items()}
    spares = SpareBuffers()
    assert stage_views(core.model, {"model.norm.weight": state["model.norm.weight"]}, spares) is None  # partial
    assert stage_views(core.model, {k: v.double() for k, v in state.items()}, spares) is None  # another dtype
    bad = received(state)
    bad["model.layers.0.self_attn.k_proj.weight"][1, 2] = float("nan")
    with pytest.raises(WeightLoadError, match="k_proj.weight: contains non-finite"):
        stage_views(core.model, bad, spares)
    wrong = dict(state, **{"model.norm.weight": torch.ones(3)})
    with pytest.raises(WeightLoadError, match="does not match"):
        stage_views(core.model, wrong, spares)
    assert weight_checksums(core.model) == before
