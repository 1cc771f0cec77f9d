"""Agentic RL environments that drive the server through the official `openai` package
(imported by the caller, not here) on exact-token sessions."""
from __future__ import annotations

from asyncengine.envs.guess import EpisodeResult, GuessGame, TurnStats, play

__all__ = ["EpisodeResult", "GuessGame", "TurnStats", "play"]
