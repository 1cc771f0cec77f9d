"""A session turn's prompt: the exact previous tokens + the template's rendering of only
the new messages. An earlier assistant turn is never re-tokenized.

How the new suffix is found, for any chat template: render the new conversation with the
previous reply's content replaced by a sentinel. The text after the sentinel is what the
template puts after that reply (its end-of-turn marker, the new messages, the generation
prompt); tokenized, the part of it the sampled tokens already end with (an EOS such as
`<|im_end|>`) is dropped, the rest is appended. Comparing the template's own rendering of
the reply with the sampled tokens gives the drift report: "text" when the template
rewrites the reply (stripped reasoning or whitespace, a re-serialized tool call),
"tokens" when only the re-tokenization of the same text differs.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from asyncengine.sessions.store import Drift, Session, SessionHistoryError

# (messages, add_generation_prompt) -> the conversation as text.
Renderer = Callable[[list[dict[str, Any]], bool], str]
# Digits between invisible separators: survives trim, case changes and space stripping.
SENTINEL = "\u20638317402965\u2063"


@dataclass(slots=True)
class Extension:
    # The whole prompt of the turn: the session's exact tokens + the new suffix.
    prompt_ids: list[int]
    # The template's rendering of the turn's messages (kept to check the next turn).
    prompt_text: str
    drift: Drift | None = None


class TurnRenderer:
    """Builds a turn's prompt ids for a session from the chat messages."""

    def __init__(self, render: Renderer, tokenizer: Any) -> None:
        self.render = render
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=False))

    def first(self, messages: list[dict[str, Any]]) -> Extension:
        text = self.render(messages, True)
        return Extension(self.encode(text), text)

    def extend(self, session: Session, messages: Any) -> Extension:
        """The next turn's prompt; raises SessionHistoryError if `messages` do not extend
        the previous turn's messages with its assistant reply and at least one new message."""
        prev = session.messages
        n = len(prev)
        if (not isinstance(messages, list) or len(messages) < n + 2
                or [_norm(m) for m in messages[:n]] != [_norm(m) for m in prev]):
            raise SessionHistoryError(
                "a session turn's messages must be the previous turn's messages, then the assistant reply "
                "it returned, then at least one new message")
        reply = messages[n]
        if not isinstance(reply, dict) or reply.get("role") != "assistant":
            raise SessionHistoryError(f"messages[{n}] must be the assistant reply of the previous turn")
        marked = self.render([*prev, {"role": "assistant", "content": SENTINEL}, *messages[n + 1:]], True)
        if marked.count(SENTINEL) != 1:
            raise SessionHistoryError("the chat template does not render an assistant reply's content verbatim")
        head, tail = marked.split(SENTINEL)
        full = self.render(messages, True)
        tail_ids = self.encode(tail)
        sampled = session.reply_ids()
        k = _overlap(sampled, tail_ids)
        drift = self._drift(session, sampled, head, full, tail, tail_ids[:k])
        return Extension(session.token_ids + tail_ids[k:], full, drift)

    def _drift(
        self, session: Session, sampled: list[int], head: str, full: str, tail: str, closing: list[int]
    ) -> Drift | None:
        """The template's tokens for the previous reply vs the sampled ones (None if equal)."""
        before = head[len(session.prompt_text):] if head.startswith(session.prompt_text) else head
        if full.startswith(head) and full.endswith(tail) and len(full) >= len(head) + len(tail):
            template_ids = self.encode(before + full[len(head): len(full) - len(tail)]) + closing
        else:  # the reply changes how the rest renders: report the template's whole text after the history
            template_ids = self.encode(full[len(_common_prefix(full, session.prompt_text)):])
        if template_ids == sampled and head.startswith(session.prompt_text):
            return None
        sampled_text, template_text = self.decode(sampled), self.decode(template_ids)
        kind = "tokens" if sampled_text == template_text else "text"
        return Drift(session.turns[-1].index, kind, sampled, template_ids, sampled_text, template_text)


def _overlap(sampled: list[int], tail: list[int]) -> int:
    """Longest k such that the sampled tokens end with tail[:k]."""
    for k in range(min(len(sampled), len(tail)), 0, -1):
        if sampled[-k:] == tail[:k]:
            return k
    return 0


def _common_prefix(a: str, b: str) -> str:
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    return a[:i]


def _norm(m: Any) -> Any:
    """A message as compared across turns: keys with null values dropped."""
    return {k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m
