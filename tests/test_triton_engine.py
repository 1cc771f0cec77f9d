"""The whole engine on the Triton backend: every per-layer op (linear layers through the
fixed-tile kernels/matmul.py, paged attention, KV store, RMSNorm, RoPE, SiLU * up) is a
Triton kernel, under the same contracts as the CPU engine.

Each test runs on two devices:
- "cpu": kernel_backend="triton" under the Triton interpreter, the same engine code as a
  GPU runs (fp32; the tiny Llama: hidden 64, 2 layers, GQA 2:1), a few seconds each;
- "cuda" (marked `cuda`, skipped without a GPU; scripts/gpu_check.sh runs them): the
  compiled kernels, kernel_backend="auto" (which must pick Triton on a CUDA device),
  plus bf16 (body bf16, head fp32).

Checked: greedy tokens equal HF `generate` and logprobs equal HF's fp32 log-softmax
(1e-5 on CPU against HF on CPU, 1e-4 on a GPU against HF on the same GPU); bitwise
invariance of tokens, logprobs and top-N for a request alone vs among others, under two
chunked-prefill budgets, and on a prefix-cache hit vs a cold engine; on a GPU also
batch size 1 vs 16 and preemption with recompute.
"""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from asyncengine.config import ConfigError, EngineConfig
from asyncengine.engine_core import EngineCore
from asyncengine.sampling_params import SamplingParams
from tests.cuda_support import CUDA, interpreted_or_skip
from tests.invariance_harness import Req, diff, random_prompt, run
from tests.tiny_models import VOCAB, load_hf

DEVICES = [pytest.param("cpu", id="interpreter"), pytest.param("cuda", marks=CUDA)]
TOL = {"cpu": 1e-5, "cuda": 1e-4}
NEW = 4  # tokens per request: each step costs ~0.1-0.3 s under the interpreter


def _engine(model_dir: Path, device: str, **options: object) -> EngineCore:
    if device == "cpu":
        interpreted_or_skip()
    backend = "triton" if device == "cpu" else "auto"
    engine = EngineCore(EngineConfig(model=str(model_dir), device=device, kernel_backend=backend,
                                     num_kv_blocks=64, **options))  # type: ignore[arg-type]
    assert engine.model.ops.name == "triton"
    assert engine.runner.kv_caches[0][0].device.type == device
    return engine


def _sampled(seed: int, n: int = NEW) -> SamplingParams:
    return SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=seed, max_tokens=n, logprobs=3,
                          ignore_eos=True)


def _greedy(n: int = NEW) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, logprobs=3, ignore_eos=True)


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_and_logprobs_equal_hf_fp32(tiny_dirs: dict[str, Path], device: str) -> None:
    engine = _engine(tiny_dirs["llama"], device, max_num_batched_tokens=16)
    prompts = [tuple(range(30, 53)), (5, 6, 7)]  # 23 tokens: chunked 16 + 7, with a decode beside
    got = run(engine, [Req(f"r{i}", p, _greedy(6)) for i, p in enumerate(prompts)])
    hf = load_hf(tiny_dirs["llama"]).to(device)
    for i, prompt in enumerate(prompts):
        out = got[f"r{i}"]
        ref = hf.generate(torch.tensor([prompt], device=device), max_new_tokens=6, do_sample=False,
                          eos_token_id=None)
        assert list(out.token_ids) == ref[0, len(prompt):].tolist()
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + out.token_ids], device=device)).logits[0].float()
        # Greedy: processed logprobs are computed at T = 1, untruncated: HF's log-softmax.
        want = torch.log_softmax(logits[len(prompt) - 1 : -1], -1).gather(1, torch.tensor(out.token_ids, device=device)[:, None])
        torch.testing.assert_close(torch.tensor(out.logprobs), want[:, 0].cpu(), atol=TOL[device], rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_needle_alone_vs_in_a_batch(tiny_dirs: dict[str, Path], device: str) -> None:
    rng = random.Random(f"triton-needle-{device}")
    needle = Req("needle", random_prompt(rng, 21, VOCAB), _sampled(7))
    others = [Req(f"o{i}", random_prompt(rng, rng.randint(1, 40), VOCAB), _sampled(i) if i % 2 else _greedy())
              for i in range(5)]
    want = run(_engine(tiny_dirs["llama"], device), [needle])["needle"]
    got = run(_engine(tiny_dirs["llama"], device), others[:2] + [needle] + others[2:])["needle"]
    assert len(want.token_ids) == NEW and len(want.top_logprobs) == NEW
    assert got == want


@pytest.mark.parametrize("device", DEVICES)
def test_chunked_prefill_budgets(tiny_dirs: dict[str, Path], device: str) -> None:
    """Budget 8 cuts the 29-token prompt mid-block and mid-query-tile, 64 not at all."""
    rng = random.Random(f"triton-chunks-{device}")
    reqs = [Req("a", random_prompt(rng, 29, VOCAB), _sampled(1)), Req("b", random_prompt(rng, 19, VOCAB), _greedy())]
    want = run(_engine(tiny_dirs["llama"], device, max_num_batched_tokens=64), reqs)
    got = run(_engine(tiny_dirs["llama"], device, max_num_batched_tokens=8), reqs)
    assert diff(got, want) == []


@pytest.mark.parametrize("device", DEVICES)
def test_prefix_cache_hit_vs_cold(tiny_dirs: dict[str, Path], device: str) -> None:
    rng = random.Random(f"triton-prefix-{device}")
    req = Req("p", random_prompt(rng, 37, VOCAB), _sampled(3))
    want = run(_engine(tiny_dirs["llama"], device, enable_prefix_caching=False), [req])
    warm = _engine(tiny_dirs["llama"], device)
    first = run(warm, [req])
    hits = warm.stats()["prefix_hit_tokens"]
    second = run(warm, [req])
    assert warm.stats()["prefix_hit_tokens"] - hits == 32  # two full blocks of 16 reused
    assert first == want and second == want


@pytest.mark.parametrize("_", [pytest.param(None, marks=CUDA)])
def test_cuda_preemption_and_batch_size(tiny_dirs: dict[str, Path], _: None) -> None:
    """The other perturbations, where steps are cheap: 16 requests one at a time vs all
    at once, and a pool so small that requests are preempted and recomputed."""
    rng = random.Random("triton-preempt")
    reqs = [Req(f"r{i}", random_prompt(rng, rng.randint(20, 60), VOCAB), _sampled(i, 16)) for i in range(16)]
    want = run(_engine(tiny_dirs["qwen3"], "cuda", max_num_seqs=1), reqs)
    assert diff(run(_engine(tiny_dirs["qwen3"], "cuda", max_num_seqs=16), reqs), want) == []
    small = EngineCore(EngineConfig(model=str(tiny_dirs["qwen3"]), device="cuda", num_kv_blocks=8))
    assert diff(run(small, reqs), want) == []
    assert small.stats()["num_preemptions"] > 0


@pytest.mark.parametrize("_", [pytest.param(None, marks=CUDA)])
def test_cuda_bf16_near_hf_fp32_and_invariant(tiny_dirs: dict[str, Path], _: None) -> None:
    """bf16 body, fp32 head: logprobs within 0.05 nats of HF fp32 on the same GPU (the
    body's bf16 rounding, 2^-8 relative per op, through 2 layers), and still bitwise
    invariant for a request alone vs in a batch."""
    rng = random.Random("triton-bf16")
    needle = Req("needle", random_prompt(rng, 30, VOCAB), _greedy(6))
    others = [Req(f"o{i}", random_prompt(rng, rng.randint(1, 40), VOCAB), _sampled(i)) for i in range(7)]
    alone = run(_engine(tiny_dirs["llama"], "cuda", dtype="bfloat16"), [needle])["needle"]
    mixed = run(_engine(tiny_dirs["llama"], "cuda", dtype="bfloat16"), others[:3] + [needle] + others[3:])
    assert mixed["needle"] == alone
    hf = load_hf(tiny_dirs["llama"]).cuda()
    ids = torch.tensor([needle.prompt + alone.token_ids], device="cuda")
    with torch.no_grad():
        logits = hf(ids).logits[0].float()[len(needle.prompt) - 1 : -1]
    want = torch.log_softmax(logits, -1).gather(1, ids[0, len(needle.prompt):, None])[:, 0].cpu()
    assert (torch.tensor(alone.logprobs) - want).abs().max() <= 0.05


def test_interpreter_refuses_bf16(tiny_dirs: dict[str, Path]) -> None:
    interpreted_or_skip()
    for dtypes in ({"dtype": "bfloat16"}, {"lm_head_dtype": "bfloat16"}):
        with pytest.raises(ConfigError, match="runs fp32 only"):
            EngineCore(EngineConfig(model=str(tiny_dirs["llama"]), kernel_backend="triton", **dtypes))  # type: ignore[arg-type]


def test_cuda_device_errors_are_clear(tiny_dirs: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="device must be"):
        EngineConfig(device="gpu")
    with pytest.raises(ConfigError, match='kernel_backend="cpu"'):
        EngineConfig(device="cuda", kernel_backend="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="sees no CUDA device"):
            EngineCore(EngineConfig(model=str(tiny_dirs["llama"]), device="cuda"))
