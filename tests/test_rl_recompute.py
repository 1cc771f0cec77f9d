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
