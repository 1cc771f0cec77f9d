"""A request's grammar matcher, kept equal to exactly the tokens it has sampled."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class GrammarState:
    """Per-request matcher state: `token_ids` are the output tokens the matcher has accepted.

    The engine advances it on each sampled token (`accept`); before a mask is computed the
    sampler calls `sync(output_ids)`, which replays tokens the matcher has not seen and
    rolls back (reset + replay) past any divergence, so preemption, recompute or an
    output rewritten by the engine can never leave the grammar out of step with the request.
    """

    __slots__ = ("_matcher", "token_ids", "eos_token_ids", "dead_end")

    def __init__(self, matcher: Any, eos_token_ids: Sequence[int]) -> None:
        self._matcher = matcher  # an xgrammar GrammarMatcher
        self.token_ids: list[int] = []
        self.eos_token_ids = tuple(eos_token_ids)
        # A token the grammar rejects was appended: only possible after a step whose mask was
        # empty and fell back to the end tokens (bitmask.allowed_tokens). Nothing may follow.
        self.dead_end = False

    @property
    def is_done(self) -> bool:
        """Nothing may follow: the grammar accepted an end token, or hit a dead end."""
        return self.dead_end or bool(self._matcher.is_terminated())

    def accept(self, token_id: int) -> bool:
        """Advance by one appended token; False (and a dead end) if the grammar rejects it."""
        if self.dead_end or not self._matcher.accept_token(int(token_id)):
            self.dead_end = True
        self.token_ids.append(int(token_id))
        return not self.dead_end

    def sync(self, output_ids: Sequence[int]) -> None:
        """Make the accepted tokens equal output_ids (the engine only appends, so this is
        usually a no-op; the comparison of the last token keeps it O(1) then)."""
        n = len(self.token_ids)
        if n == len(output_ids) and (n == 0 or self.token_ids[-1] == output_ids[-1]):
            return
        if n > len(output_ids) or list(output_ids[:n]) != self.token_ids:
            self.reset()
        for t in output_ids[len(self.token_ids):]:
            self.accept(t)

    def reset(self) -> None:
        self._matcher.reset()
        self.token_ids = []
        self.dead_end = False

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into bitmask[row] ([B, ceil(V / 32)] int32, bit
        t % 32 of word t // 32 is token t). A finished grammar allows only the end tokens."""
        if self.is_done:
            bitmask[row].zero_()
            for t in self.eos_token_ids:
                bitmask[row, t // 32] |= _bit(t % 32)
            return
        self._matcher.fill_next_token_bitmask(bitmask, row)


def _bit(b: int) -> int:
    """Bit b of an int32 word as a Python int that fits it (bit 31 is the sign bit)."""
    return (1 << b) - (1 << 32 if b == 31 else 0)
