"""The per-step allowed-token masks of a batch, from each request's grammar state."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from asyncengine.structured.state import GrammarState

# _BYTE_BITS[b, j] = bit j of byte b: unpacks a little-endian bitmask a byte at a time.
_BYTE_BITS = ((torch.arange(256, dtype=torch.int32)[:, None] >> torch.arange(8, dtype=torch.int32)) & 1).bool()


def words_for(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def _last_word_bits(vocab_size: int) -> int:
    """The bits of the last bitmask word that stand for tokens (< vocab_size), as an int32."""
    n = vocab_size - (words_for(vocab_size) - 1) * 32  # 1..32
    return -1 if n == 32 else (1 << n) - 1


def unpack(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, W] int32 bitmask (bit t % 32 of word t // 32 = token t) -> [B, V] bool."""
    as_bytes = bitmask.contiguous().view(torch.uint8)  # [B, 4W]; little-endian: byte k of word w = bits 8k..8k+7
    return _BYTE_BITS[as_bytes.long()].view(bitmask.shape[0], -1)[:, :vocab_size]


def allowed_tokens(
    states: Sequence[GrammarState | None], output_ids: Sequence[Sequence[int]], vocab_size: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor | None:
    """[R, V] bool: the tokens each row's grammar allows next (rows without one: all True).
    None when no row has a grammar. Each state is synced to its row's output ids first.

    A row whose grammar allows no token at all (a tokenizer that cannot spell what the
    grammar needs next) gets its end tokens, so the request ends instead of sampling from
    an empty support."""
    rows = [i for i, s in enumerate(states) if s is not None]
    if not rows:
        return None
    bitmask = torch.full((len(rows), words_for(vocab_size)), -1, dtype=torch.int32)  # [G, W]
    for j, i in enumerate(rows):
        state = states[i]
        assert state is not None
        state.sync(output_ids[i])
        state.fill(bitmask, j)
    empty = (bitmask[:, :-1] == 0).all(dim=-1) & (bitmask[:, -1] & _last_word_bits(vocab_size) == 0)  # [G]
    grammar_rows = unpack(bitmask, vocab_size)  # [G, V]
    for j in torch.nonzero(empty).flatten().tolist():
        grammar_rows[j, list(states[rows[j]].eos_token_ids)] = True  # type: ignore[union-attr]
    allowed = torch.ones(len(states), vocab_size, dtype=torch.bool)
    allowed[rows] = grammar_rows
    return allowed.to(device)  # the matchers write host memory; the logits may live on the GPU


def replay_masks(state: GrammarState, output_ids: Sequence[int], vocab_size: int) -> torch.Tensor:
    """[N, V] bool: the allowed set before each of the N output tokens, as the sampler saw it
    (a trainer's `allowed` for logprobs.sequence_logprobs). `state` must be fresh."""
    masks = []
    for i in range(len(output_ids)):
        step = allowed_tokens([state], [output_ids[:i]], vocab_size)
        assert step is not None
        masks.append(step[0])
    return torch.stack(masks) if masks else torch.zeros(0, vocab_size, dtype=torch.bool)
