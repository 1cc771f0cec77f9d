"""/inference/v1/generate on the default model (SmolLM2-135M-Instruct): logprobs equal HF fp32."""
from __future__ import annotations

import pytest
import torch
from aiohttp.test_utils import TestClient, TestServer

from api.server import create_app
from asyncengine.async_engine import AsyncEngine
from asyncengine.config import EngineConfig
from asyncengine.model_files import resolve_model
from tests.test_server import post
from tests.test_tools import HISTORY, TOOLS
from tests.tiny_models import load_hf

pytestmark = pytest.mark.real_model


async def test_generate_logprobs_equal_hf_fp32_default_model() -> None:
    engine = AsyncEngine.from_config(EngineConfig(num_threads=2, kv_cache_memory_gb=0.25, max_model_len=1024))
    try:
        tok = engine.tokenizer
        text = tok.apply_chat_template([{"role": "user", "content": "Name three prime numbers."}], tokenize=False,
                                       add_generation_prompt=True)
        prompt = list(tok.encode(text, add_special_tokens=False))
        async with TestClient(TestServer(create_app(engine, ["smol"]))) as client:
            status, res = await post(client, "/inference/v1/generate", {
                "token_ids": prompt, "sampling_params": {"max_tokens": 24, "temperature": 0.8, "seed": 11,
                                                         "logprobs": 0, "ignore_eos": True}})
        assert status == 200, res
        async with TestClient(TestServer(create_app(engine, ["smol"]))) as client:
            # SmolLM2's template fails on content null and has no tools: the hermes-style fallback.
            status, chat = await post(client, "/v1/chat/completions", {
                "messages": HISTORY, "tools": TOOLS, "max_tokens": 4, "return_token_ids": True})
        assert status == 200, chat
        rendered = tok.decode(chat["prompt_token_ids"])
        assert "<tools>" in rendered and "<tool_response>\n18C\n</tool_response>" in rendered
        choice = res["choices"][0]
        ids = choice["token_ids"]
        got = torch.tensor([e["logprob"] for e in choice["logprobs"]["content"]])
        assert [int(e["token"].removeprefix("token_id:")) for e in choice["logprobs"]["content"]] == ids
        model_dir = resolve_model(None)
    finally:
        engine.shutdown()
    seq = prompt + ids
    with torch.no_grad():
        logits = load_hf(model_dir)(torch.tensor([seq])).logits[0].float()
    want = (logits / 0.8).log_softmax(-1)[torch.arange(len(prompt) - 1, len(seq) - 1), torch.tensor(ids)]
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
