"""Sessions and their store: the exact token history of a multi-turn conversation.

A session's episode is the token ids the engine actually saw, in order: each turn's
new prompt tokens (rendered by the chat template) followed by the tokens the policy
sampled, with a loss mask (1 = sampled), the sampled tokens' logprobs and weight
versions, and per turn its boundaries, cached-token count and any drift found.

Synchronous and single-threaded (the event loop's): a busy flag per session is the
lock that turns a concurrent turn into SessionBusyError (HTTP 409) instead of a wait.
"""
from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
# Live sessions at most: a client opening ever more of them gets 429, not our memory.
MAX_SESSIONS = 65536


class SessionError(Exception):
    """A session request that cannot be served; `status` is its HTTP status."""

    status = 400
    code = "invalid_session"


class SessionNotFoundError(SessionError):
    status = 404
    code = "session_not_found"


class SessionBusyError(SessionError):
    status = 409
    code = "session_busy"


class SessionLimitError(SessionError):
    status = 429
    code = "too_many_sessions"


class SessionHistoryError(SessionError):
    """The messages do not extend the session's previous turn."""

    code = "session_history_mismatch"


@dataclass(slots=True)
class Drift:
    """An earlier assistant turn the chat template renders differently from what was
    sampled; the episode keeps the sampled tokens."""

    # Index of the turn whose reply drifted.
    turn: int
    # "text": the template rewrites the reply; "tokens": same text, other token ids.
    kind: str
    sampled_token_ids: list[int]
    template_token_ids: list[int]
    sampled_text: str
    template_text: str


@dataclass(slots=True)
class Turn:
    """One turn's place in the episode: [start, completion_start) is its new prompt
    suffix, [completion_start, end) what was sampled."""

    index: int
    start: int
    completion_start: int
    end: int
    # Prompt tokens (of the whole prompt) the prefix cache served.
    cached_tokens: int
    finish_reason: str | None
    # Drift of the previous turn's reply, found while rendering this turn.
    drift: Drift | None = None


@dataclass(slots=True)
class Session:
    session_id: str
    created: float
    last_used: float
    token_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    # Parallel to token_ids: set on sampled tokens, None on prompt tokens.
    logprobs: list[float | None] = field(default_factory=list)
    weight_versions: list[int | None] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    # The latest turn's messages and their template rendering (with the generation prompt).
    messages: list[dict[str, Any]] = field(default_factory=list)
    prompt_text: str = ""
    busy: bool = False
    deleted: bool = False

    def reply_ids(self) -> list[int]:
        """What the policy sampled in the latest turn."""
        if not self.turns:
            return []
        last = self.turns[-1]
        return self.token_ids[last.completion_start : last.end]

    def append_turn(
        self, prompt_ids: list[int], sampled: list[int], logprobs: list[float], versions: list[int],
        cached_tokens: int, finish_reason: str | None, drift: Drift | None,
    ) -> Turn:
        """Append a finished turn: prompt_ids is the whole prompt, which extends the history."""
        start = len(self.token_ids)
        assert prompt_ids[:start] == self.token_ids, "a turn's prompt must extend the session's tokens"
        suffix = prompt_ids[start:]
        self.token_ids += suffix + sampled
        self.loss_mask += [0] * len(suffix) + [1] * len(sampled)
        self.logprobs += [None] * len(suffix) + list(logprobs)
        self.weight_versions += [None] * len(suffix) + list(versions)
        turn = Turn(len(self.turns), start, start + len(suffix), len(self.token_ids), cached_tokens,
                    finish_reason, drift)
        self.turns.append(turn)
        return turn

    def episode(self) -> dict[str, Any]:
        """The trainable episode as JSON-ready data."""
        return {
            "id": self.session_id, "object": "session", "created": self.created, "num_turns": len(self.turns),
            "token_ids": list(self.token_ids), "loss_mask": list(self.loss_mask),
            "logprobs": list(self.logprobs), "weight_versions": list(self.weight_versions),
            "turns": [asdict(t) for t in self.turns],
            "drift": [asdict(t.drift) for t in self.turns if t.drift is not None],
        }


class SessionStore:
    """Sessions by id, with idle expiry (swept on every access)."""

    def __init__(
        self, ttl_s: float, clock: Callable[[], float] = time.monotonic, max_sessions: int = MAX_SESSIONS
    ) -> None:
        self.ttl_s = ttl_s
        self.clock = clock
        self.max_sessions = max_sessions
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def acquire(self, session_id: str, create: bool) -> Session:
        """Take the session for a turn (create it when `create` and it does not exist)."""
        check_id(session_id)
        session = self._sessions.get(session_id)
        if session is None:
            if not create:
                raise SessionNotFoundError(f"session {session_id!r} does not exist (expired or deleted)")
            if len(self._sessions) >= self.max_sessions:
                raise SessionLimitError(f"{self.max_sessions} sessions are live; end some (DELETE) or wait")
            now = self.clock()
            session = self._sessions[session_id] = Session(session_id, time.time(), now)
        if session.busy:
            raise SessionBusyError(f"session {session_id!r} has a turn in progress")
        session.busy = True
        return session

    def release(self, session: Session) -> bool:
        """End the turn; True when that dropped the session (a first turn that never finished)."""
        session.busy = False
        session.last_used = self.clock()
        if not session.turns and self._sessions.get(session.session_id) is session:
            del self._sessions[session.session_id]
            session.deleted = True
            return True
        return False

    def get(self, session_id: str) -> Session:
        check_id(session_id)
        session = self._sessions.get(session_id)
        if session is None:
            raise SessionNotFoundError(f"session {session_id!r} does not exist (expired or deleted)")
        return session

    def pop(self, session_id: str) -> Session:
        session = self.get(session_id)
        del self._sessions[session_id]
        session.deleted = True
        return session

    def expired(self) -> list[Session]:
        """Remove and return the sessions idle (no turn in progress) longer than the TTL."""
        cutoff = self.clock() - self.ttl_s
        gone = [s for s in self._sessions.values() if not s.busy and s.last_used < cutoff]
        for s in gone:
            del self._sessions[s.session_id]
            s.deleted = True
        return gone


def check_id(session_id: object) -> str:
    if not isinstance(session_id, str) or not _ID.fullmatch(session_id):
        raise SessionError("a session id is 1-128 characters of letters, digits and . _ : -")
    return session_id
