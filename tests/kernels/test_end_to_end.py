"""A tiny model generating with kernel_backend="triton" (the interpreter on CPU) gives the
same tokens as the torch backend and logprobs within fp32 tolerance."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from asyncengine.llm import LLM
from asyncengine.sampling_params import SamplingParams


@pytest.mark.usefixtures("need_triton")
def test_triton_backend_generates_like_torch(tiny_dirs: dict[str, Path]) -> None:
    # qwen3: GQA 2:1, q/k norms; chunks of 16 tokens mix prefill and decode in one step.
    prompts = [list(range(5, 29)), [7, 8, 9], list(range(40, 51))]
    params = [
        SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, return_raw_logprob=True),
        SamplingParams(max_tokens=6, temperature=0.9, top_k=20, top_p=0.9, seed=3, ignore_eos=True,
                       return_raw_logprob=True),
        SamplingParams(max_tokens=6, temperature=1.0, seed=4, ignore_eos=True, return_raw_logprob=True),
    ]
    results = {}
    for backend in ("torch", "triton"):
        llm = LLM(model=str(tiny_dirs["qwen3"]), kernel_backend=backend, num_kv_blocks=32,
                  max_num_batched_tokens=16)
        assert llm.engine.model.ops.name == backend
        results[backend] = llm.generate(prompts, params, use_tqdm=False)
    for ref, got in zip(results["torch"], results["triton"]):
        assert got.token_ids == ref.token_ids
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(ref.logprobs), atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(got.raw_logprobs), torch.tensor(ref.raw_logprobs), atol=1e-5, rtol=0)
