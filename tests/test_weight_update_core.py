"""EngineCore.update_weights: atomic swaps, versions per token, keep/recompute/abort, no stale cache."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from asyncengine.config import EngineConfig
from asyncengine.engine_core import EngineCore
from asyncengine.models.weights import WeightLoadError, read_safetensors
from asyncengine.outputs import CompletionResult
from asyncengine.sampling_params import SamplingParams
from tests.tiny_models import load_hf, make_model_dir

PROMPT = list(range(10, 60))  # 50 tokens: three full 16-token blocks to cache


@pytest.fixture(scope="module")
def new_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("v1") / "llama", "llama", seed=123)


def core_for(model_dir: Path, **kw: object) -> EngineCore:
    return EngineCore(EngineConfig(model=str(model_dir), num_kv_blocks=96, **kw))


def drain(core: EngineCore, results: dict[str, CompletionResult]) -> None:
    while core.has_unfinished():
        for out in core.step():
            results[out.request_id].add(out)


def submit(core: EngineCore, rid: str, prompt: list[int], sp: SamplingParams) -> dict[str, CompletionResult]:
    core.add_request(rid, prompt, sp)
    return {rid: CompletionResult(request_id=rid, prompt_token_ids=prompt)}


def hf_token_logprobs(model_dir: Path, prompt: list[int], out: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = load_hf(model_dir)(torch.tensor([prompt + out])).logits[0].float()
    return torch.log_softmax(logits[len(prompt) - 1 : -1], -1).gather(1, torch.tensor(out)[:, None])[:, 0]


def test_new_request_after_update_matches_new_weights_despite_cached_prompt(llama_dir: Path, new_dir: Path) -> None:
    core = core_for(llama_dir)
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    res = submit(core, "warm", PROMPT, sp)
    drain(core, res)  # the prompt's blocks are now in the prefix cache (v0 salt)
    core.update_weights(read_safetensors(new_dir))
    assert core.weight_version == 1
    res = submit(core, "after", PROMPT, sp)
    drain(core, res)
    after = res["after"]
    assert after.num_cached_tokens == 0, "KV from v0 must not be reused"
    assert after.weight_versions == [1] * 8
    torch.testing.assert_close(torch.tensor(after.logprobs), hf_token_logprobs(new_dir, PROMPT, after.token_ids),
                               atol=1e-5, rtol=0)


def hf_keep_raw_logprobs(old_dir: Path, new_dir: Path, prompt: list[int], out: list[int], n_old: int) -> torch.Tensor:
    """What keep mode must return: the first n_old tokens scored by the old weights; the
    rest by the new weights attending to the old weights' KV of prompt + out[:n_old - 1]
    (the positions computed before the update) and to their own KV after it. [len(out)]
    (With the tiny models' two seeds this differs from a fresh new-weights forward by up
    to ~3 nats, so a keep that recomputed, or mixed up positions, fails.)"""
    targets = torch.tensor(out)[:, None]
    with torch.no_grad():
        old = load_hf(old_dir)(torch.tensor([prompt + out[: n_old - 1]]), use_cache=True)
        new = load_hf(new_dir)(torch.tensor([out[n_old - 1 : -1]]), past_key_values=old.past_key_values)
    logits = torch.cat([old.logits[0, len(prompt) - 1 :], new.logits[0]]).float()  # [len(out), V]
    return torch.log_softmax(logits, -1).gather(1, targets)[:, 0]


def start_16(core: EngineCore) -> dict[str, CompletionResult]:
    results: dict[str, CompletionResult] = {}
    for i in range(16):
        sp = SamplingParams(max_tokens=12, temperature=0.0 if i % 2 else 0.9, seed=i, ignore_eos=True,
                            return_raw_logprob=True)
        results.update(submit(core, f"r{i}", PROMPT[: 20 + i], sp))
    for _ in range(5):
        for out in core.step():
            results[out.request_id].add(out)
    return results


def test_keep_tags_tokens_with_the_version_that_made_them(llama_dir: Path, new_dir: Path) -> None:
    core = core_for(llama_dir)
    results = start_16(core)
    before = {rid: len(r.token_ids) for rid, r in results.items()}
    assert all(n > 0 for n in before.values())
    core.update_weights(read_safetensors(new_dir), mode="keep")
    drain(core, results)
    for rid, r in results.items():
        assert len(r.token_ids) == 12 and r.finish_reason == "length"
        assert r.weight_versions == [0] * before[rid] + [1] * (12 - before[rid])
        assert r.raw_logprobs is not None
        want = hf_keep_raw_logprobs(llama_dir, new_dir, r.prompt_token_ids, r.token_ids, before[rid])
        torch.testing.assert_close(torch.tensor(r.raw_logprobs), want, atol=1e-5, rtol=0)
    assert core.pool.num_free_blocks == core.pool.num_blocks


def test_recompute_continues_like_a_fresh_run_of_the_new_weights(llama_dir: Path, new_dir: Path) -> None:
    core = core_for(llama_dir)
    results = start_16(core)
    core.update_weights(read_safetensors(new_dir), mode="recompute")
    drain(core, results)
    fresh = core_for(new_dir)
    for rid, r in results.items():
        n0 = r.weight_versions.count(0)
        assert 0 < n0 < 12 and r.weight_versions == [0] * n0 + [1] * (12 - n0)
        prefix = r.prompt_token_ids + r.token_ids[:n0]
        assert r.raw_logprobs is not None
        # Every token after the update is scored as a fresh new-weights forward over the prefix
        # (processed = raw for greedy rows and at T = 0.9 for the sampled ones, no truncation).
        want = hf_token_logprobs(new_dir, prefix, r.token_ids[n0:])
        torch.testing.assert_close(torch.tensor(r.raw_logprobs[n0:]), want, atol=1e-5, rtol=0)
        if int(rid[1:]) % 2:  # greedy: the same continuation as a fresh new-weights engine, token for token
            sp = SamplingParams(max_tokens=12 - n0, temperature=0.0, ignore_eos=True)
            ref = submit(fresh, rid, prefix, sp)
            drain(fresh, ref)
            assert ref[rid].token_ids == r.token_ids[n0:] and ref[rid].logprobs == r.logprobs[n0:]


def test_abort_returns_sixteen_partial_outputs(llama_dir: Path, new_dir: Path) -> None:
    core = core_for(llama_dir)
    results = start_16(core)
    outs = core.update_weights(read_safetensors(new_dir), mode="abort")
    assert sorted(o.request_id for o in outs) == sorted(results)
    assert all(o.finished and o.finish_reason == "abort" for o in outs)
    for o in outs:
        results[o.request_id].add(o)
    assert all(0 < len(r.token_ids) < 12 for r in results.values())
    assert not core.has_unfinished() and core.pool.num_free_blocks == core.pool.num_blocks


def test_bad_update_changes_nothing(llama_dir: Path, new_dir: Path) -> None:
    core = core_for(llama_dir)
    sp = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    ref = submit(core, "a", PROMPT, sp)
    drain(core, ref)
    sums = core.weight_checksums()
    good = read_safetensors(new_dir)
    missing = {k: v for k, v in good.items() if "layers.1.mlp.down_proj" not in k}
    wrong_shape = dict(good, **{"model.norm.weight": torch.ones(65)})
    wrong_type = dict(good, **{"model.norm.weight": torch.ones(64, dtype=torch.int64)})
    unknown = dict(good, **{"model.extra.weight": torch.ones(3)})
    for bad in (missing, wrong_shape, wrong_type, unknown):
        with pytest.raises(WeightLoadError):
            core.update_weights(bad)
    assert core.weight_version == 0 and core.weight_checksums() == sums
    again = submit(core, "b", PROMPT, sp)
    drain(core, again)
    assert again["b"].token_ids == ref["a"].token_ids and again["b"].logprobs == ref["a"].logprobs
    core.update_weights(good)
    assert core.weight_checksums() != sums and core.weight_version == 1
