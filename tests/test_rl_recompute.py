"""The mixed-version recompute equals the engine token by token in keep mode."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from asyncengine.async_engine import AsyncEngine
from asyncengine.config import EngineConfig
from asyncengine.logprobs import sequence_logprobs
from asyncengine.outputs import CompletionResult
from asyncengine.rl.recompute import mixed_version_logprobs, position_versions
from asyncengine.sampling_params import SamplingParams
from tests.tiny_models import make_model_dir


def test_position_versions() -> None:
    # prompt of 3 prefilled under v0; out[0], out[1] sampled under v0, out[2..3] under v1:
    # out[1]'s KV was computed in the step that sampled out[2], under v1.
    assert position_versions(3, [0, 0, 1, 1]) == [0, 0, 0, 0, 1, 1]
    assert position_versions(2, []) == []


def hf(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


async def run(eng: AsyncEngine, prompt: list[int], sp: SamplingParams) -> CompletionResult:
    res = CompletionResult("r", prompt)
    async for out in eng.generate(prompt, sp):
        res.add(out)
    return res


async def test_keep_mode_sequences_recompute_exactly(llama_dir: Path, tmp_path: Path) -> None:
    new_dir = make_model_dir(tmp_path / "v1", "llama", seed=99)
    eng = AsyncEngine.from_config(EngineConfig(model=str(llama_dir), num_kv_blocks=256, max_model_len=256,
                                               num_threads=1))
    try:
        prompts = [list(range(10, 22 + 3 * i)) for i in range(4)]
        params = [SamplingParams(max_tokens=24, temperature=0.8 if i % 2 else 0.0, top_p=0.9, seed=i,
                                 ignore_eos=True) for i in range(4)]
        tasks = [asyncio.create_task(run(eng, p, sp)) for p, sp in zip(prompts, params)]
        while eng.stats()["num_running"] < 4 or eng.num_steps < 6:
            await asyncio.sleep(0.001)
        await eng.pause("keep")
        await eng.update_weights(new_dir, "keep")
        await eng.resume()
        results = await asyncio.gather(*tasks)
    finally:
        eng.shutdown()
    models = {0: hf(llama_dir), 1: hf(new_dir)}
    for prompt, sp, res in zip(prompts, params, results):
        m = res.weight_versions.index(1)  # the first token sampled with the new weights
        assert 0 < m < len(res.token_ids), res.weight_versions
        engine = torch.tensor(res.logprobs)
        exact = mixed_version_logprobs(models, prompt, res.token_ids, res.weight_versions, sp)["processed"]
        assert (exact - engine).abs().max().item() <= 1e-5
        # A trainer that scores the whole sequence with the version it started under is exact
        # up to the switch and wrong on every token after it.
        with torch.no_grad():
            logits = models[0](torch.tensor([prompt + res.token_ids])).logits[0, len(prompt) - 1 : -1]
        one = sequence_logprobs(logits, prompt, res.token_ids, sp)["processed"]
        delta = (one - engine).abs()
        assert delta[:m].max().item() <= 1e-5
        assert delta[m:].min().item() > 1e-4, delta[m:]


def test_missing_version_model_is_a_key_error(llama_dir: Path) -> None:
    with pytest.raises(KeyError, match=r"\[1\]"):
        mixed_version_logprobs({0: hf(llama_dir)}, [5, 6], [7, 8], [0, 1], SamplingParams(max_tokens=2))


def test_preempted_keep_mode_sequences_recompute_exactly(llama_dir: Path, tmp_path: Path) -> None:
    """A KV pool too small for the batch preempts requests over and over, a keep-mode update
    lands mid-run: requests re-prefilled after it attend to KV of the new weights at early
    positions. With the engine's kv_epochs the recompute equals the engine token by token;
    assuming no preemption (weight_versions alone) it does not, on the preempted requests."""
    from asyncengine.engine_core import EngineCore
    from asyncengine.models.weights import read_safetensors

    new_dir = make_model_dir(tmp_path / "v1", "llama", seed=99)
    core = EngineCore(EngineConfig(model=str(llama_dir), num_kv_blocks=12, block_size=4, max_model_len=64,
                                   num_threads=1))
    prompts = [list(range(10, 19 + 2 * i)) for i in range(4)]
    params = [SamplingParams(max_tokens=20, temperature=0.8 if i % 2 else 0.0, top_p=0.9, seed=i,
                             ignore_eos=True) for i in range(4)]
    results = {f"r{i}": CompletionResult(f"r{i}", p) for i, p in enumerate(prompts)}
    for i, (p, sp) in enumerate(zip(prompts, params)):
        core.add_request(f"r{i}", p, sp)
    steps = 0
    while core.has_unfinished():
        if steps == 12:
            core.update_weights(read_safetensors(new_dir), "keep")
        for out in core.step():
            results[out.request_id].add(out)
        steps += 1
    assert core.scheduler.num_preemptions > 0
    models = {0: hf(llama_dir), 1: hf(new_dir)}
    recomputed_after_update = 0
    for prompt, sp, res in zip(prompts, params, results.values()):
        epochs = res.kv_epochs
        assert epochs is not None and epochs[0][0] == 0 and epochs[-1][1] == len(prompt) + len(res.token_ids) - 1
        engine = torch.tensor(res.logprobs)
        exact = mixed_version_logprobs(models, prompt, res.token_ids, res.weight_versions, sp, epochs)["processed"]
        assert (exact - engine).abs().max().item() <= 1e-5, (epochs, res.weight_versions)
        # A recompute from position 0 under the new weights after some tokens were sampled
        # under the old ones: there, assuming no preemption is wrong.
        if any(a == 0 and v == 1 for a, _, v in epochs[1:]) and 0 in res.weight_versions:
            recomputed_after_update += 1
            naive = mixed_version_logprobs(models, prompt, res.token_ids, res.weight_versions, sp)["processed"]
            assert (naive - engine).abs().max().item() > 1e-4
    assert recomputed_after_update > 0


def test_kv_epochs_of_an_unpreempted_request_follow_weight_versions() -> None:
    from asyncengine.rl.recompute import default_epochs

    # prompt of 3 under v0, out[0..1] under v0, out[2..3] under v1: positions 0..4 by v0, 5 by v1.
    assert default_epochs(3, [0, 0, 1, 1]) == [(0, 4, 0), (4, 6, 1)]
