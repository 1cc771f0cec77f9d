"""Exact-token sessions in process (SessionEngine over AsyncEngine) on a tiny random Llama."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from asyncengine.async_engine import AsyncEngine
from asyncengine.sampling_params import InvalidRequestError, SamplingParams
from asyncengine.sessions import (
    SessionBusyError,
    SessionEngine,
    SessionHistoryError,
    SessionNotFoundError,
)
from tests.test_server import make_engine as server_engine
from tests.tiny_models import CHATML, load_hf

BS = 16
SYSTEM = {"role": "system", "content": "You play a guessing game. The quick brown fox jumps over the lazy dog."}
# Like templates that rewrite earlier assistant turns (strip whitespace or reasoning):
# this one drops spaces and lower-cases them.
STRIPPING = CHATML.replace("{{ m['content'] }}",
                           "{% if m['role'] == 'assistant' %}{{ m['content'] | replace(' ', '') | lower }}"
                           "{% else %}{{ m['content'] }}{% endif %}")


def make_engine(model_dir: Path) -> AsyncEngine:
    return server_engine(model_dir, num_kv_blocks=96, max_model_len=512, block_size=BS)


@pytest.fixture(scope="module")
def engine(llama_dir: Path):
    eng = make_engine(llama_dir)
    yield eng
    eng.shutdown()


async def pool_state(engine: AsyncEngine) -> tuple[int, int, int, int]:
    """(free blocks, total, protected, pinned blocks) read on the engine thread."""
    def read(core: Any) -> tuple[int, int, int, int]:
        pool = core.pool
        return pool.num_free_blocks, pool.num_blocks, pool.num_protected_blocks, sum(b.pins > 0 for b in pool.blocks)

    return await engine.call(read)


def suffix_text(reply_ended_with_eos: bool, new: list[dict[str, str]]) -> str:
    """What the ChatML template puts after a sampled reply: its close, the new messages
    and the generation prompt (written out by hand: the test's own reference)."""
    close = "" if reply_ended_with_eos else "<|im_end|>"
    body = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in new)
    return close + "\n" + body + "<|im_start|>assistant\n"


async def test_six_turns_are_exact_cached_and_match_hf(engine: AsyncEngine, llama_dir: Path) -> None:
    sessions = SessionEngine(engine)
    tok = engine.tokenizer
    messages: list[dict[str, Any]] = [SYSTEM, {"role": "user", "content": "Guess a number."}]
    expected = list(tok.encode(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                               add_special_tokens=False))
    mask = [0] * len(expected)
    replies = []
    history_len = 0
    for turn in range(6):
        params = SamplingParams(max_tokens=5 + turn, seed=turn)
        reply = await sessions.chat("six", messages, params)
        assert reply.turn == turn and reply.prompt_tokens == len(expected)
        if turn > 0:  # every earlier token but the last partial block (the last token's KV is never computed)
            assert reply.cached_tokens == (history_len - 1) // BS * BS
        # Random tokens often end in half a UTF-8 character, which the returned text leaves
        # out: a real drift (reported), while the episode keeps the sampled ids (below).
        assert reply.drift is None or reply.drift.sampled_token_ids == replies[-1].token_ids
        expected += reply.token_ids
        history_len = len(expected)
        mask += [1] * len(reply.token_ids)
        replies.append(reply)
        new = [{"role": "tool", "content": f"feedback {turn}: higher"}]
        messages = [*messages, reply.message, *new]
        ended_eos = reply.token_ids[-1] in engine.model_info.eos_token_ids
        new_ids = list(tok.encode(suffix_text(ended_eos, new), add_special_tokens=False))
        expected += new_ids
        mask += [0] * len(new_ids)
    ep = await sessions.episode("six")
    n_ep = len(ep["token_ids"])
    assert ep["token_ids"] == expected[:n_ep] and ep["loss_mask"] == mask[:n_ep]
    assert ep["num_turns"] == 6 and [t["end"] - t["completion_start"] for t in ep["turns"]] == list(range(5, 11))
    sampled = [i for i, m in enumerate(ep["loss_mask"]) if m]
    assert [ep["token_ids"][i] for i in sampled] == [t for r in replies for t in r.token_ids]
    assert all(ep["logprobs"][i] is None for i in range(n_ep) if not ep["loss_mask"][i])
    assert all(v == 0 for i, v in enumerate(ep["weight_versions"]) if ep["loss_mask"][i])
    # The trainer's recompute of the whole episode in one forward pass (HF, fp32).
    hf = load_hf(llama_dir)
    with torch.no_grad():
        logits = hf(torch.tensor([ep["token_ids"]])).logits[0].float()
    ref = torch.log_softmax(logits, dim=-1)
    got = torch.tensor([ep["logprobs"][i] for i in sampled])
    want = torch.stack([ref[i - 1, ep["token_ids"][i]] for i in sampled])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    await sessions.delete("six")
    free, total, protected, pinned = await pool_state(engine)
    assert free == total and protected == 0 and pinned == 0


async def test_live_session_blocks_are_protected_until_delete(engine: AsyncEngine) -> None:
    sessions = SessionEngine(engine)
    msgs = [SYSTEM, {"role": "user", "content": "Hello world!"}]
    reply = await sessions.chat("pin", msgs, SamplingParams(max_tokens=4, seed=0))
    n = len((await sessions.episode("pin"))["token_ids"])
    free, total, protected, pinned = await pool_state(engine)
    assert free == total and protected == pinned == (n - 1) // BS
    await sessions.chat("pin", [*msgs, reply.message, {"role": "user", "content": "More."}], SamplingParams(max_tokens=3))
    await sessions.delete("pin")
    assert (await pool_state(engine))[2:] == (0, 0)
    with pytest.raises(SessionNotFoundError):
        await sessions.episode("pin")


async def test_template_that_rewrites_replies_reports_drift_and_keeps_sampled_tokens(llama_dir: Path) -> None:
    engine = make_engine(llama_dir)
    engine.tokenizer.chat_template = STRIPPING
    try:
        sessions = SessionEngine(engine)
        msgs = [SYSTEM, {"role": "user", "content": "Say something."}]
        reply = await sessions.chat("drift", msgs, SamplingParams(max_tokens=24, seed=3, ignore_eos=True))
        rewritten = reply.text.replace(" ", "").lower()
        assert rewritten != reply.text  # the precondition: the template has something to rewrite
        nxt = await sessions.chat("drift", [*msgs, reply.message, {"role": "user", "content": "ok"}],
                                  SamplingParams(max_tokens=2, seed=0))
        assert nxt.drift is not None and nxt.drift.kind == "text" and nxt.drift.turn == 0
        assert nxt.drift.sampled_token_ids == reply.token_ids
        # The reply ended by length: the template's close (<|im_end|>) belongs to the new suffix.
        assert nxt.drift.template_text == rewritten and nxt.drift.sampled_text == reply.text
        ep = await sessions.episode("drift")
        t0 = ep["turns"][0]
        assert ep["token_ids"][t0["completion_start"]:t0["end"]] == reply.token_ids
        assert ep["drift"] == [ep["turns"][1]["drift"]] and ep["turns"][1]["drift"]["kind"] == "text"
    finally:
        engine.shutdown()


async def test_errors_leave_the_session_as_it_was(engine: AsyncEngine) -> None:
    sessions = SessionEngine(engine)
    msgs = [SYSTEM, {"role": "user", "content": "Hi"}]
    with pytest.raises(SessionNotFoundError):  # history with a reply needs a live session
        await sessions.chat("gone", [*msgs, {"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}])
    reply = await sessions.chat("err", msgs, SamplingParams(max_tokens=3, seed=1))
    before = await sessions.episode("err")
    for bad in ([*msgs, {"role": "user", "content": "skipped the reply"}],
                [SYSTEM, {"role": "user", "content": "changed"}, reply.message, {"role": "user", "content": "z"}],
                [*msgs, reply.message]):
        with pytest.raises(SessionHistoryError):
            await sessions.chat("err", bad)
    nxt = [*msgs, reply.message, {"role": "user", "content": "go on"}]
    with pytest.raises(InvalidRequestError, match="maximum context length"):
        await sessions.chat("err", nxt, SamplingParams(max_tokens=500))
    assert await sessions.episode("err") == before
    first = asyncio.ensure_future(sessions.chat("err", nxt, SamplingParams(max_tokens=8)))
    await asyncio.sleep(0)
    with pytest.raises(SessionBusyError):
        await sessions.chat("err", nxt)
    assert (await first).turn == 1
    await sessions.delete("err")


async def test_idle_sessions_expire_and_release_their_blocks(engine: AsyncEngine) -> None:
    now = [0.0]
    sessions = SessionEngine(engine, ttl_s=10.0, clock=lambda: now[0])
    await sessions.chat("old", [SYSTEM, {"role": "user", "content": "a"}], SamplingParams(max_tokens=2))
    assert (await pool_state(engine))[2] > 0
    now[0] = 5.0
    await sessions.episode("old")  # still alive: idle 5 s of 10
    now[0] = 11.0
    with pytest.raises(SessionNotFoundError):
        await sessions.episode("old")
    free, total, protected, pinned = await pool_state(engine)
    assert free == total and protected == 0 and pinned == 0 and len(sessions.store) == 0
