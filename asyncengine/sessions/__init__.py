"""Exact-token chat sessions: the episode is the tokens the engine saw, never re-tokenized.

store.py keeps each session's token history, loss mask, sampled logprobs and weight
versions, turn boundaries and drift reports (with idle expiry and a busy flag for 409s);
render.py builds a turn's prompt as the exact history + the template's new suffix;
engine.py (`SessionEngine`) runs turns over an AsyncEngine and pins a live session's
blocks in the KV pool so they are evicted last.
"""
from __future__ import annotations

from asyncengine.sessions.engine import PendingTurn, SessionEngine, SessionReply
from asyncengine.sessions.render import Renderer, TurnRenderer
from asyncengine.sessions.store import (
    Drift,
    Session,
    SessionBusyError,
    SessionError,
    SessionHistoryError,
    SessionLimitError,
    SessionNotFoundError,
    SessionStore,
    Turn,
)

__all__ = [
    "Drift", "PendingTurn", "Renderer", "Session", "SessionBusyError", "SessionEngine", "SessionError",
    "SessionHistoryError", "SessionLimitError", "SessionNotFoundError", "SessionReply", "SessionStore", "Turn", "TurnRenderer",
]
