"""A 6-turn session on the default model (SmolLM2-135M-Instruct) vs an HF fp32 recompute."""
from __future__ import annotations

from typing import Any

import pytest
import torch

from asyncengine.async_engine import AsyncEngine
from asyncengine.config import EngineConfig
from asyncengine.sampling_params import SamplingParams
from asyncengine.sessions import SessionEngine
from tests.tiny_models import load_hf


@pytest.mark.real_model
async def test_default_model_six_turn_episode_matches_hf_fp32() -> None:
    from asyncengine.model_files import resolve_model

    engine = AsyncEngine.from_config(EngineConfig(num_kv_blocks=256, max_model_len=2048))
    try:
        sessions = SessionEngine(engine)
        msgs: list[dict[str, Any]] = [{"role": "system", "content": "You are a terse assistant."},
                                      {"role": "user", "content": "Guess my number between 1 and 100."}]
        history = 0
        for turn in range(6):
            reply = await sessions.chat("real", msgs, SamplingParams(max_tokens=24, seed=turn))
            if turn:
                assert reply.cached_tokens == (history - 1) // 16 * 16
            history = reply.prompt_tokens + len(reply.token_ids)
            msgs += [reply.message, {"role": "tool", "content": f"check_guess -> {'higher' if turn % 2 else 'lower'}"}]
        ep = await sessions.episode("real")
        await sessions.delete("real")
    finally:
        engine.shutdown()
    assert len(ep["token_ids"]) == history and ep["num_turns"] == 6
    hf = load_hf(resolve_model(None))
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ep["token_ids"]])).logits[0].float(), dim=-1)
    sampled = [i for i, m in enumerate(ep["loss_mask"]) if m]
    got = torch.tensor([ep["logprobs"][i] for i in sampled])
    want = torch.stack([ref[i - 1, ep["token_ids"][i]] for i in sampled])
    # T = 1 and no truncation: the processed logprob is the model's own log-softmax.
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
