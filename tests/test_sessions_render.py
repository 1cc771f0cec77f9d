"""TurnRenderer: the new suffix after the exact history, the EOS bridge, drift kinds; the store."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from asyncengine.sessions.render import TurnRenderer
from asyncengine.sessions.store import Session, Turn

USER = {"role": "user", "content": "Hello world!"}
NEXT = {"role": "tool", "content": "42"}
AFTER = "<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def renderer(llama_dir: Path) -> TurnRenderer:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(llama_dir))
    return TurnRenderer(lambda m, gen: str(tok.apply_chat_template(m, tokenize=False, add_generation_prompt=gen)),
                        tok)


def session_with_reply(r: TurnRenderer, reply_ids: list[int]) -> Session:
    first = r.first([USER])
    s = Session("s", 0.0, 0.0, messages=[USER], prompt_text=first.prompt_text)
    s.token_ids = first.prompt_ids + reply_ids
    s.turns.append(Turn(0, 0, len(first.prompt_ids), len(s.token_ids), 0, "stop"))
    return s


def extend(r: TurnRenderer, s: Session, content: str) -> Any:
    return r.extend(s, [USER, {"role": "assistant", "content": content}, NEXT])


def test_reply_ending_in_eos_gets_the_rest_of_the_close(renderer: TurnRenderer) -> None:
    reply = renderer.encode("The quick brown fox") + renderer.encode("<|im_end|>")
    s = session_with_reply(renderer, reply)
    ext = extend(renderer, s, "The quick brown fox")
    assert ext.prompt_ids == s.token_ids + renderer.encode("\n" + AFTER) and ext.drift is None


def test_reply_cut_by_length_gets_the_whole_close(renderer: TurnRenderer) -> None:
    s = session_with_reply(renderer, renderer.encode("The quick"))
    ext = extend(renderer, s, "The quick")
    assert ext.prompt_ids == s.token_ids + renderer.encode("<|im_end|>\n" + AFTER) and ext.drift is None
    assert ext.prompt_text.endswith(AFTER)


def test_rewritten_reply_is_text_drift_and_resplit_tokens_are_token_drift(renderer: TurnRenderer) -> None:
    s = session_with_reply(renderer, renderer.encode("The quick"))
    ext = extend(renderer, s, "The  quick ")  # e.g. a client's re-serialization of the reply
    assert ext.drift is not None and ext.drift.kind == "text" and ext.drift.turn == 0
    assert ext.prompt_ids[: len(s.token_ids)] == s.token_ids  # the sampled tokens win
    chars = [i for ch in "The" for i in renderer.encode(ch)]
    assert chars != renderer.encode("The")  # the precondition: a non-canonical split
    s = session_with_reply(renderer, chars)
    ext = extend(renderer, s, "The")
    assert ext.drift is not None and ext.drift.kind == "tokens"
    assert ext.drift.sampled_token_ids == chars and ext.drift.template_token_ids == renderer.encode("The")


def test_store_ids_limit_and_busy_flag() -> None:
    from asyncengine.sessions import SessionBusyError, SessionError, SessionLimitError, SessionStore

    store = SessionStore(ttl_s=5.0, clock=lambda: 0.0, max_sessions=1)
    s = store.acquire("a", create=True)
    with pytest.raises(SessionBusyError):
        store.acquire("a", create=True)
    with pytest.raises(SessionLimitError):
        store.acquire("b", create=True)
    with pytest.raises(SessionError):
        store.acquire("bad id", create=True)
    assert store.release(s) is True and len(store) == 0  # a first turn that never finished leaves nothing
