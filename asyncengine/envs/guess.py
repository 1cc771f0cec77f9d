"""A multi-turn guessing game with tool feedback and a reward, played through the
official `openai` package against an asyncengine server, on an exact-token session.

Each turn the policy answers with a number; the environment's `check_guess` tool
replies "higher", "lower" or "correct" (a `role: "tool"` message, or a user message for
servers that do not take tool messages). The episode (token ids, loss mask, logprobs of
the sampled tokens) comes from `GET /v1/sessions/{id}`, ready for a trainer.

    client = openai.AsyncOpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    result = await play(client, "model", GuessGame(secret=37), session_id="ep-0")
    print(result.reward, len(result.episode["token_ids"]))
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

RULES = (
    "You are playing a number guessing game against an environment. The environment has picked a secret "
    "whole number between {low} and {high}, inclusive. On every turn you answer with exactly one number, "
    "your guess, and nothing else. After each guess the environment calls its check_guess tool and shows "
    "you the result: 'higher' means the secret is larger than your guess, 'lower' means it is smaller, and "
    "'correct' ends the game. Use the feedback of all earlier turns: never guess outside the range the "
    "feedback leaves, and halve that range every turn, which finds any secret in at most seven guesses. "
    "You score one point if you find the secret; otherwise you score less the further your closest guess was."
)
_NUMBER = re.compile(r"-?\d+")


@dataclass(slots=True)
class GuessGame:
    secret: int
    low: int = 1
    high: int = 100
    max_turns: int = 8
    rules: str = RULES
    guesses: list[int | None] = field(default_factory=list)

    def start(self) -> list[dict[str, Any]]:
        """The opening messages: the shared system prompt and the first question."""
        return [
            {"role": "system", "content": self.rules.format(low=self.low, high=self.high)},
            {"role": "user", "content": f"I picked a number between {self.low} and {self.high}. Your guess?"},
        ]

    def feedback(self, reply: str) -> tuple[str, bool]:
        """The tool's answer to a reply, and whether the game is over."""
        m = _NUMBER.search(reply)
        guess = int(m.group()) if m else None
        self.guesses.append(guess)
        if guess is None:
            text = f"check_guess: no number found; answer with a number between {self.low} and {self.high}"
        elif guess == self.secret:
            return f"check_guess({guess}) -> correct", True
        else:
            text = f"check_guess({guess}) -> {'higher' if self.secret > guess else 'lower'}"
        return text, len(self.guesses) >= self.max_turns

    @property
    def reward(self) -> float:
        """1 for a found secret; else up to 0.5, less the further the closest guess was."""
        valid = [g for g in self.guesses if g is not None]
        if self.secret in valid:
            return 1.0
        if not valid:
            return 0.0
        miss = min(abs(g - self.secret) for g in valid)
        return 0.5 * max(0.0, 1.0 - miss / (self.high - self.low))


@dataclass(slots=True)
class TurnStats:
    ttft_s: float
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    # Tokens of the session's history before this turn (what a prefix cache could reuse).
    history_tokens: int


@dataclass(slots=True)
class EpisodeResult:
    session_id: str
    reward: float
    turns: list[TurnStats]
    # GET /v1/sessions/{id} at the end (token_ids, loss_mask, logprobs, turns, drift).
    episode: dict[str, Any]
    replies: list[list[int]] = field(default_factory=list)


async def play(
    client: Any, model: str, game: GuessGame, session_id: str, max_tokens: int = 16, seed: int = 0,
    temperature: float = 1.0, feedback_role: str = "tool", delete: bool = True,
) -> EpisodeResult:
    """Play one game on one session; every turn streams (for its time to first token)."""
    messages = game.start()
    stats: list[TurnStats] = []
    replies: list[list[int]] = []
    history = 0
    for turn in range(game.max_turns):
        text, ids, turn_stats = await _turn(client, model, messages, session_id, max_tokens, seed + turn,
                                            temperature, history)
        stats.append(turn_stats)
        replies.append(ids)
        history = turn_stats.prompt_tokens + turn_stats.completion_tokens
        result, done = game.feedback(text)
        if done:
            break
        messages = [*messages, {"role": "assistant", "content": text}, {"role": feedback_role, "content": result}]
    episode = await client.get(f"/sessions/{session_id}", cast_to=object)
    if delete:
        await client.delete(f"/sessions/{session_id}", cast_to=object)
    return EpisodeResult(session_id, game.reward, stats, episode, replies)


async def _turn(
    client: Any, model: str, messages: list[dict[str, Any]], session_id: str, max_tokens: int, seed: int,
    temperature: float, history: int,
) -> tuple[str, list[int], TurnStats]:
    t0 = time.perf_counter()
    ttft = None
    text, ids, usage = "", [], None
    stream = await client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=temperature, seed=seed, stream=True,
        stream_options={"include_usage": True}, extra_body={"session_id": session_id, "return_token_ids": True},
    )
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            new = (choice.model_extra or {}).get("token_ids") or []
            if new and ttft is None:
                ttft = time.perf_counter() - t0
            ids += new
            text += choice.delta.content or ""
    assert usage is not None, "the server sent no usage chunk"
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return text, ids, TurnStats(ttft if ttft is not None else time.perf_counter() - t0, usage.prompt_tokens,
                                cached or 0, usage.completion_tokens, history)
