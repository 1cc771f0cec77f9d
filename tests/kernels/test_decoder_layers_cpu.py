"""The compiled decoder-layer loop (kernels/csrc/decoder_layers_cpu.cpp, through
asyncengine/models/layer_loop.py) against the model's Python loop over the same ops:
bitwise equal on every forward of an engine run (prefill chunks, decode, mixed steps),
and never used where it would compute something else."""
from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
import torch

from asyncengine.llm import LLM
from asyncengine.models.layer_loop import LayerLoop
from asyncengine.models.llama import LlamaModel
from asyncengine.sampling_params import SamplingParams
from kernels import attention_cpu

pytestmark = pytest.mark.skipif(not attention_cpu.available(), reason="the compiled CPU ops do not build here")


def _engine(model_dir: Path, dtype: str) -> LLM:
    return LLM(model=str(model_dir), dtype=dtype, kernel_backend="cpu", max_num_batched_tokens=48,
               num_kv_blocks=64, max_num_seqs=6)


def _bf16_packed() -> bool:
    return attention_cpu.bf16_gemm_kernel() is not None


def _check_every_forward(llm: LLM) -> int:
    """Runs a few requests with every forward computed by both loops; returns how many
    forwards were compared (each asserted bitwise equal, the KV caches too)."""
    model: LlamaModel = llm.engine.runner.model
    loop = model._layer_loop
    assert loop is not None
    forward, compared = model.forward, [0]

    def both(ids: torch.Tensor, meta: object, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        model._layer_loop = None
        want = forward(ids, meta, kv)
        want_kv = [c.clone() for pair in kv for c in pair]
        model._layer_loop = loop
        got = forward(ids, meta, kv)  # writes the same K and V into the same slots
        assert torch.equal(got.view(torch.int16) if got.dtype == torch.bfloat16 else got.view(torch.int32),
                           want.view(torch.int16) if want.dtype == torch.bfloat16 else want.view(torch.int32))
        assert all(torch.equal(a, b) for a, b in zip([c for pair in kv for c in pair], want_kv))
        compared[0] += 1
        return got

    model.forward = both
    rng = random.Random(0)
    sp = SamplingParams(max_tokens=12, temperature=0.8, seed=1, ignore_eos=True)
    llm.generate([[rng.randrange(3, 200) for _ in range(n)] for n in (5, 40, 17, 90, 1, 33)], sp)
    return compared[0]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_compiled_loop_is_bitwise_the_python_loop(tiny_dirs: dict[str, Path], arch: str, dtype: str) -> None:
    """llama: tied head, no biases; qwen2: qkv biases, untied head. Chunked prefill (a
    90-token prompt over 48-token steps), decode and mixed steps."""
    if dtype == "bfloat16" and not _bf16_packed():
        pytest.skip("no batch-invariant bf16 GEMM on this CPU: bf16 runs the Python loop (checked below)")
    assert _check_every_forward(_engine(tiny_dirs[arch], dtype)) >= 12


def _every_sequence(query_start_loc: list[int], seq_lens: list[int], threads: int, min_rows: int) -> list[int]:
    return list(range(len(seq_lens) + 1))  # more groups than threads: a thread runs several


def _halves(query_start_loc: list[int], seq_lens: list[int], threads: int, min_rows: int) -> list[int]:
    return [0, len(seq_lens) // 2, len(seq_lens)] if len(seq_lens) > 1 else [0, len(seq_lens)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("cut", [_halves, _every_sequence])
def test_groups_of_sequences_on_their_own_threads_keep_the_bits(
        tiny_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch, cut: object, dtype: str) -> None:
    """The tiny batches here are below any split kernels/layer_groups.py would choose, so
    the cuts are forced: each group runs every op on one thread, side by side (qwen2: its
    biases too). Every forward against the Python loop, bitwise, KV caches too."""
    if dtype == "bfloat16" and not _bf16_packed():
        pytest.skip("no batch-invariant bf16 GEMM on this CPU: bf16 runs the Python loop")
    cuts: list[list[int]] = []

    def recorded(*args: int | list[int]) -> list[int]:
        groups = cut(*args)
        cuts.append(groups)
        return groups

    monkeypatch.setattr(attention_cpu, "layer_groups", recorded)
    assert _check_every_forward(_engine(tiny_dirs["qwen2"], dtype)) >= 12
    assert sum(len(g) > 2 for g in cuts) >= 10  # the forwards ran split


def test_the_op_refuses_groups_that_do_not_cut_its_batch(tiny_dirs: dict[str, Path],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    llm = _engine(tiny_dirs["llama"], "float32")
    model: LlamaModel = llm.engine.runner.model
    forward, calls = model.forward, []

    def recorded(ids: torch.Tensor, meta: object, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        calls.append((ids, meta, kv))
        return forward(ids, meta, kv)

    model.forward = recorded
    llm.generate([[5, 6, 7], [8, 9], [3, 4, 5, 6]], SamplingParams(max_tokens=3, temperature=0.0))
    ids, meta, kv = calls[-1]  # a decode step of the three sequences (it writes the same K, V again)
    assert meta.seq_lens.numel() == 3

    def run(groups: list[int]) -> torch.Tensor:
        monkeypatch.setattr(attention_cpu, "layer_groups", lambda *args: list(groups))
        return forward(ids, meta, kv)

    assert torch.equal(run([0, 1, 3]), run([0, 3]))
    for bad in ([0], [1, 3], [0, 1, 1, 3], [0, 2, 1, 3], [0, 2], [0, 4]):
        with pytest.raises(RuntimeError, match="groups must"):
            run(bad)


def test_qwen3s_qk_norms_and_oneDNN_weights_keep_the_python_loop(tiny_dirs: dict[str, Path]) -> None:
    assert _engine(tiny_dirs["qwen3"], "float32").engine.runner.model._layer_loop is None
    if not _bf16_packed():
        assert _engine(tiny_dirs["llama"], "bfloat16").engine.runner.model._layer_loop is None


def test_replaced_ops_or_weights_written_in_place_fall_back(tiny_dirs: dict[str, Path]) -> None:
    llm = _engine(tiny_dirs["llama"], "float32")
    model: LlamaModel = llm.engine.runner.model
    loop = model._layer_loop
    assert loop is not None and loop.current(model.ops)
    # rl/staging.py repacks a shadow with its own pack_linear put in: not an op the loop runs
    assert loop.current(dataclasses.replace(model.ops, pack_linear=lambda w: None))
    calls = [0]
    rms = model.ops.rms_norm

    def counted(*args: object, **kwargs: object) -> object:
        calls[0] += 1
        return rms(*args, **kwargs)

    wrapped = dataclasses.replace(model.ops, rms_norm=counted)
    assert not loop.current(wrapped)
    model.ops = wrapped  # a wrapper put in after repack(): the Python loop runs it
    assert LayerLoop.build(model) is None
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, temperature=0.0))
    assert calls[0] > 0
    model.ops = dataclasses.replace(wrapped, rms_norm=rms)  # the backend's ops again
    assert loop.current(model.ops)
    model.layers[1].down.mul_(1.0)  # same values, new version: the packing may be stale
    assert not loop.current(model.ops)
    model.repack()
    assert model._layer_loop is not None and model._layer_loop.current(model.ops)
