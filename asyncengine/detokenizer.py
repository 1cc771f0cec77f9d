"""Incremental detokenization and stop-string matching for one request.

Text is emitted only once it is final: a multi-byte character split across tokens
(decoded as U+FFFD) is held back until it completes, and so are the last characters
that could still turn out to be the start of a stop string.
"""
from __future__ import annotations

from typing import Any

# Tokens of context decoded before the new ones, so that leading-space handling of
# tokenizers (e.g. SentencePiece) matches a full decode.
_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: list[int],
        stop: tuple[str, ...],
        include_stop: bool,
        skip_special_tokens: bool,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special_tokens
        self.stop = stop
        self.include_stop = include_stop
        # Hold back this many chars while a stop string could still be forming.
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.tokens: list[int] = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)
        self.text = ""  # all final output text decoded so far
        self.emitted = 0  # chars of self.text already returned

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def add(self, token_id: int) -> str | None:
        """Add one output token. Returns the matched stop string if one now appears."""
        self.tokens.append(token_id)
        prefix = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.tokens)
        return self._check_stop()

    def _check_stop(self) -> str | None:
        if not self.stop:
            return None
        # Only the newly added text (plus overlap) can complete a stop string.
        start = max(0, self.emitted - self.hold)
        best: tuple[int, str] | None = None
        for s in self.stop:
            pos = self.text.find(s, start)
            if pos >= 0 and (best is None or pos < best[0]):
                best = (pos, s)
        if best is None:
            return None
        pos, s = best
        self.text = self.text[: pos + len(s)] if self.include_stop else self.text[:pos]
        return s

    def take(self, finished: bool) -> str:
        """New final text since the last call (all of it once the request finished)."""
        limit = len(self.text) if finished else max(self.emitted, len(self.text) - self.hold)
        out = self.text[self.emitted : limit]
        self.emitted = limit
        return out
