"""The guessing-game environment, driven by the official `openai` package against a real
`asyncengine serve` process on exact-token sessions."""
from __future__ import annotations

import asyncio

import openai
import pytest

from asyncengine.envs import GuessGame, play
from tests.test_openai_client import MODEL, base_url  # noqa: F401  (the server fixture)

BS = 16  # the server's default block size


def test_game_feedback_and_reward() -> None:
    game = GuessGame(secret=37, max_turns=3)
    assert game.feedback("I guess 50.") == ("check_guess(50) -> lower", False)
    assert game.feedback("no idea")[0].startswith("check_guess: no number")
    assert game.reward == pytest.approx(0.5 * (1 - 13 / 99))
    assert game.feedback("37") == ("check_guess(37) -> correct", True) and game.reward == 1.0
    assert GuessGame(secret=5).reward == 0.0
    over = GuessGame(secret=5, max_turns=1)
    assert over.feedback("6") == ("check_guess(6) -> lower", True)


async def test_episodes_through_openai_are_exact_and_cached(base_url: str) -> None:  # noqa: F811
    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
    games = [GuessGame(secret=63 + i, max_turns=3, rules="Guess a number from {low} to {high}.") for i in range(2)]
    results = await asyncio.gather(*(play(client, MODEL, g, f"agentic-{i}", max_tokens=4, seed=10 * i)
                                     for i, g in enumerate(games)))
    for game, res in zip(games, results):
        ep = res.episode
        assert 0.0 <= res.reward <= 1.0 and len(res.turns) == len(game.guesses) == ep["num_turns"]
        sampled = [t for t, m in zip(ep["token_ids"], ep["loss_mask"]) if m]
        assert sampled == [t for r in res.replies for t in r]
        assert [t["cached_tokens"] for t in ep["turns"]] == [s.cached_tokens for s in res.turns]
        for t in res.turns[1:]:  # the history is found in the cache but for its last partial block
            assert t.cached_tokens == (t.history_tokens - 1) // BS * BS
        with pytest.raises(openai.NotFoundError):
            await client.get(f"/sessions/{res.session_id}", cast_to=object)
    await client.close()
