"""EngineCore: scheduling limits, chunking/caching equivalence, block accounting, stops, errors."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from asyncengine.config import ConfigError, EngineConfig
from asyncengine.engine_core import EngineCore, EngineOverloadedError
from asyncengine.outputs import CompletionResult, SchedulerOutput
from asyncengine.sampling_params import InvalidRequestError, SamplingParams


def engine(model_dir: Path, **kw: object) -> EngineCore:
    return EngineCore(EngineConfig(model=str(model_dir), **{"num_kv_blocks": 64, **kw}))


def run(core: EngineCore, reqs: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, CompletionResult]:
    results = {}
    for rid, (ids, sp) in reqs.items():
        core.add_request(rid, ids, sp)
        results[rid] = CompletionResult(request_id=rid, prompt_token_ids=ids)
    while core.has_unfinished():
        for out in core.step():
            results[out.request_id].add(out)
    return results


def workload(n: int = 12, seed: int = 0) -> dict[str, tuple[list[int], SamplingParams]]:
    rng = random.Random(seed)
    shared = [rng.randrange(3, 384) for _ in range(40)]
    reqs = {}
    for i in range(n):
        own = [rng.randrange(3, 384) for _ in range(rng.randrange(1, 60))]
        prompt = (shared + own) if i % 2 else own
        sp = SamplingParams(max_tokens=rng.randrange(1, 20), temperature=0.0 if i % 3 == 0 else 0.9,
                            top_p=0.9, seed=i, logprobs=3, ignore_eos=True)
        reqs[f"r{i}"] = (prompt, sp)
    return reqs


def assert_same(a: dict[str, CompletionResult], b: dict[str, CompletionResult]) -> None:
    for rid in a:
        assert a[rid].token_ids == b[rid].token_ids, rid
        assert a[rid].logprobs == b[rid].logprobs, rid  # exact, bitwise
        assert a[rid].top_logprobs == b[rid].top_logprobs, rid
        assert a[rid].finish_reason == b[rid].finish_reason, rid


def test_token_budget_and_max_num_seqs_respected(llama_dir: Path) -> None:
    core = engine(llama_dir, max_num_batched_tokens=24, max_num_seqs=3)
    seen: list[SchedulerOutput] = []
    schedule = core.scheduler.schedule

    def spy() -> SchedulerOutput:
        out = schedule()
        seen.append(out)
        return out

    core.scheduler.schedule = spy  # type: ignore[method-assign]
    run(core, workload(8))
    assert all(s.num_batched_tokens <= 24 and len(s.scheduled) <= 3 for s in seen)
    assert any(s.scheduled[0].num_new_tokens < s.scheduled[0].request.num_prompt_tokens for s in seen
               if s.scheduled and s.scheduled[0].start == 0), "expected a chunked prompt"


def test_chunked_prefill_and_prefix_cache_do_not_change_outputs(llama_dir: Path) -> None:
    base = run(engine(llama_dir, enable_prefix_caching=False, enable_chunked_prefill=False), workload())
    for kw in ({"max_num_batched_tokens": 16}, {"max_num_batched_tokens": 7}, {"enable_prefix_caching": True}):
        core = engine(llama_dir, **kw)
        assert_same(base, run(core, workload()))
    warm = engine(llama_dir)
    run(warm, workload())
    again = run(warm, workload())  # second pass hits the prefix cache
    assert warm.kv.num_hit_tokens > 0
    assert_same(base, again)


def test_blocks_all_free_after_finish_abort_and_preemption(llama_dir: Path) -> None:
    core = engine(llama_dir, num_kv_blocks=12, block_size=4, max_num_batched_tokens=32)
    reqs = workload(10, seed=3)
    for rid, (ids, sp) in reqs.items():
        core.add_request(rid, ids[:30], sp.with_options(max_tokens=12))
    steps = 0
    while core.has_unfinished():
        core.step()
        steps += 1
        if steps == 3:
            core.abort(["r1", "r4", "missing"])
    assert core.scheduler.num_preemptions > 0, "pool was meant to force preemption"
    assert core.pool.num_free_blocks == core.pool.num_blocks == 12
    assert all(b.ref_cnt == 0 for b in core.pool.blocks)
    assert core.requests == {}


def test_abort_returns_partial_output(llama_dir: Path) -> None:
    core = engine(llama_dir)
    core.add_request("a", [5, 6, 7], SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(4):
        core.step()
    [out] = core.abort(["a"])
    assert out.finished and out.finish_reason == "abort" and out.num_output_tokens == 4
    assert core.abort(["a"]) == []
    assert core.pool.num_free_blocks == core.pool.num_blocks


def test_stop_conditions(llama_dir: Path) -> None:
    core = engine(llama_dir)
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    ref = run(core, {"ref": ([10, 11, 12], greedy)})["ref"]
    third = ref.token_ids[2]
    first_stop = ref.token_ids.index(third) + 1
    res = run(core, {
        "tok": ([10, 11, 12], greedy.with_options(stop_token_ids=(third,))),
        "len": ([10, 11, 12], greedy.with_options(max_tokens=5)),
        "str": ([10, 11, 12], greedy.with_options(stop=(ref.text[4:7],))),
        "min": ([10, 11, 12], greedy.with_options(stop_token_ids=(ref.token_ids[0],), min_tokens=4)),
    })
    assert res["tok"].token_ids == ref.token_ids[:first_stop]
    assert (res["tok"].finish_reason, res["tok"].stop_reason) == ("stop", third)
    assert res["len"].token_ids == ref.token_ids[:5] and res["len"].finish_reason == "length"
    assert res["str"].finish_reason == "stop" and res["str"].stop_reason == ref.text[4:7]
    assert res["str"].text == ref.text[: ref.text.index(ref.text[4:7])]
    # The stop token is every output here (12, 12, ...): held back until the 4th token.
    assert ref.token_ids[:4] == [ref.token_ids[0]] * 4
    assert res["min"].token_ids == ref.token_ids[:4]
    assert (res["min"].finish_reason, res["min"].stop_reason) == ("stop", ref.token_ids[0])


def with_extra_eos(model_dir: Path, tmp_path: Path, eos: int) -> Path:
    """A copy of the checkpoint whose generation_config adds `eos` to the EOS ids (same
    weights, so the same greedy tokens)."""
    import json
    import shutil

    copy = Path(shutil.copytree(model_dir, tmp_path / "eos"))
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, eos]}))
    return copy


def test_eos_stops_unless_ignored_or_before_min_tokens(llama_dir: Path, tmp_path: Path) -> None:
    """Greedy from [5, 6, 7] gives 91 x 7, then 375 repeated. With 375 an EOS id the
    request stops at the first 375 (kept in token_ids; stop_reason None, unlike a stop
    token), at the next one under min_tokens, and never with ignore_eos."""
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    ref = run(engine(llama_dir), {"ref": ([5, 6, 7], greedy)})["ref"]
    assert ref.token_ids[:10] == [91] * 7 + [375] * 3, ref.token_ids
    core = engine(with_extra_eos(llama_dir, tmp_path, 375))
    assert core.model_info.eos_token_ids == (2, 375)
    eos = greedy.with_options(ignore_eos=False)
    res = run(core, {
        "eos": ([5, 6, 7], eos),
        "ignored": ([5, 6, 7], greedy),
        "min": ([5, 6, 7], eos.with_options(min_tokens=10)),
        "stop_token": ([5, 6, 7], greedy.with_options(stop_token_ids=(375,))),
    })
    assert (res["eos"].token_ids, res["eos"].finish_reason, res["eos"].stop_reason) == (ref.token_ids[:8], "stop", None)
    assert (res["ignored"].token_ids, res["ignored"].finish_reason) == (ref.token_ids, "length")
    assert (res["min"].token_ids, res["min"].finish_reason, res["min"].stop_reason) == (ref.token_ids[:10], "stop", None)
    assert (res["stop_token"].token_ids, res["stop_token"].stop_reason) == (ref.token_ids[:8], 375)


def test_context_length(tiny_dirs: dict[str, Path]) -> None:
    """A prompt of 20 in a 24-token context: 4 more tokens fit and end it ("length"), a
    5th is refused up front (the room, not max_tokens, is the limit); max_tokens 3 stops
    first."""
    core = engine(tiny_dirs["qwen2"], max_model_len=24)
    sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    res = run(core, {"a": ([1] * 20, sp), "b": ([1] * 20, sp.with_options(max_tokens=3))})
    assert len(res["a"].token_ids) == 4 and res["a"].finish_reason == "length"
    assert res["b"].token_ids == res["a"].token_ids[:3] and res["b"].finish_reason == "length"
    with pytest.raises(InvalidRequestError) as e:
        core.add_request("c", [1] * 20, sp.with_options(max_tokens=5))
    assert e.value.param == "max_tokens"
    assert core.model_info.eos_token_ids == (2,)


@pytest.mark.parametrize("kwargs,param", [
    ({"max_tokens": -1}, "max_tokens"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 2.0}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs_mode": "weird"}, "logprobs_mode"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"stop": ("",)}, "stop"),
])
def test_sampling_params_validation(kwargs: dict, param: str) -> None:
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param


def test_add_request_validation(llama_dir: Path) -> None:
    core = engine(llama_dir, max_model_len=64, max_waiting=2)
    sp = SamplingParams(max_tokens=4)
    bad = [
        ([], sp, "prompt"),
        ([1, 384], sp, "prompt"),
        ([1, -1], sp, "prompt"),
        ([1] * 70, sp, "prompt"),
        ([1] * 60, sp.with_options(max_tokens=10), "max_tokens"),
        ([1], sp.with_options(stop_token_ids=(999,)), "stop_token_ids"),
    ]
    for ids, params, param in bad:
        with pytest.raises(InvalidRequestError) as e:
            core.add_request("x", ids, params)
        assert e.value.param == param, (ids[:3], param)
    core.add_request("a", [1, 2], sp)
    with pytest.raises(InvalidRequestError):
        core.add_request("a", [1, 2], sp)  # duplicate id
    core.add_request("b", [1, 2], sp)
    with pytest.raises(EngineOverloadedError):
        core.add_request("c", [1, 2], sp)
    assert set(core.requests) == {"a", "b"}


def test_config_validation() -> None:
    for kw in ({"dtype": "float16"}, {"block_size": 12}, {"max_num_seqs": 0}, {"kernel_backend": "cuda"},
               {"gemm_tile_rows": 0}, {"gemm_tile_rows": 5000}):
        with pytest.raises(ConfigError):
            EngineConfig(**kw)  # type: ignore[arg-type]


def test_bfloat16_body_with_fp32_head_is_close_to_hf_fp32(llama_dir: Path) -> None:
    """bf16 weights and activations (8-bit mantissas) under an fp32 head: the logprobs of
    the sampled tokens within 0.1 nats of HF fp32 (mean 0.02). Measured here: max 0.028,
    mean 0.008; HF's own bf16 model is as far (max 0.020)."""
    import torch

    from tests.tiny_models import load_hf

    core = engine(llama_dir, dtype="bfloat16", lm_head_dtype="float32")
    assert str(core.model.lm_head.dtype) == "torch.float32"
    hf = load_hf(llama_dir)
    sp = SamplingParams(max_tokens=16, temperature=1.0, seed=3, ignore_eos=True)
    prompts = {"a": [5, 6, 7] * 5, "b": list(range(30, 80))}
    res = run(core, {rid: (p, sp) for rid, p in prompts.items()})
    for rid, prompt in prompts.items():
        out = res[rid].token_ids
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + out])).logits[0, len(prompt) - 1 : -1].float()
        want = torch.log_softmax(logits, -1).gather(1, torch.tensor(out)[:, None])[:, 0]
        delta = (torch.tensor(res[rid].logprobs) - want).abs()
        assert len(out) == 16 and delta.max() <= 0.1 and delta.mean() <= 0.02, (rid, delta)
