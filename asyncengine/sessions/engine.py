"""SessionEngine: exact-token chat sessions over an AsyncEngine (in process; the HTTP API
in api/sessions.py runs its turns through the same begin / open / commit / release).

    sessions = SessionEngine(engine)
    reply = await sessions.chat("ep-1", [{"role": "user", "content": "2+2?"}], SamplingParams(max_tokens=32))
    msgs = [..., reply.message, {"role": "tool", "content": "4"}]
    reply = await sessions.chat("ep-1", msgs, params)
    episode = await sessions.episode("ep-1")   # token_ids, loss_mask, logprobs, turns, ...
    await sessions.delete("ep-1")
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from asyncengine.outputs import CompletionResult, RequestOutput
from asyncengine.sampling_params import SamplingParams
from asyncengine.sessions.render import Extension, Renderer, TurnRenderer
from asyncengine.sessions.store import Drift, Session, SessionError, SessionStore, check_id

if TYPE_CHECKING:
    from asyncengine.async_engine import AsyncEngine, RequestStream


@dataclass(slots=True)
class PendingTurn:
    """A turn between begin() and release(): its session is held (busy)."""

    session: Session
    # The turn's index in the session (its number of turns when it began).
    index: int
    messages: list[dict[str, Any]]
    ext: Extension
    # Accumulated outputs of the turn's request (filled by the stream open() returns).
    result: CompletionResult = field(default_factory=lambda: CompletionResult("", []))

    @property
    def prompt_ids(self) -> list[int]:
        return self.ext.prompt_ids

    def head(self) -> dict[str, Any]:
        """What a response says about its session (drift in brief; details in the episode)."""
        drift = self.ext.drift
        brief = None if drift is None else {"turn": drift.turn, "kind": drift.kind}
        return {"session": {"id": self.session.session_id, "turn": self.index, "drift": brief}}


@dataclass(slots=True)
class SessionReply:
    session_id: str
    turn: int
    text: str
    token_ids: list[int]
    logprobs: list[float]
    weight_versions: list[int]
    finish_reason: str | None
    prompt_tokens: int
    cached_tokens: int
    drift: Drift | None

    @property
    def message(self) -> dict[str, Any]:
        """The reply as the next turn's history entry."""
        return {"role": "assistant", "content": self.text}


class RecordingStream:
    """A RequestStream whose deltas are also added to the turn's result as they pass."""

    def __init__(self, stream: RequestStream, result: CompletionResult) -> None:
        self.stream = stream
        self.result = result

    @property
    def request_id(self) -> str:
        return self.stream.request_id

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        async for out in self.stream:
            self.result.add(out)
            yield out

    def abort(self) -> None:
        self.stream.abort()


class SessionEngine:
    """Sessions over one AsyncEngine; see the module docstring."""

    def __init__(
        self, engine: AsyncEngine, render: Renderer | None = None, ttl_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if engine.tokenizer is None:
            raise SessionError("sessions need a tokenizer with a chat template")
        self.engine = engine
        self.store = SessionStore(engine.config.session_ttl_s if ttl_s is None else ttl_s, clock)
        self.renderer = TurnRenderer(render or self._apply_template, engine.tokenizer)

    def _apply_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        tok = self.engine.tokenizer
        return str(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt))

    # -- one turn: begin -> open -> (iterate) -> commit -> release ----------------------
    async def begin(
        self, session_id: str, messages: list[dict[str, Any]], render: Renderer | None = None
    ) -> PendingTurn:
        """Hold the session and build the turn's prompt (with `render` instead of the
        engine's chat template if given). A session starts with a conversation that has
        no assistant message yet; otherwise an unknown id is SessionNotFoundError."""
        await self.sweep()
        fresh = isinstance(messages, list) and not any(
            isinstance(m, dict) and m.get("role") == "assistant" for m in messages)
        session = self.store.acquire(session_id, create=fresh)
        renderer = self.renderer if render is None else TurnRenderer(render, self.engine.tokenizer)
        try:
            ext = renderer.extend(session, messages) if session.turns else renderer.first(messages)
        except BaseException:
            await self.release_session(session)
            raise
        return PendingTurn(session, len(session.turns), list(messages), ext)

    async def open(self, turn: PendingTurn, params: SamplingParams, request_id: str) -> RecordingStream:
        """Add the turn's request, its session pin registered first: both are queued in
        order (gather starts its tasks in order), so the pin is in place before the
        request can finish and free its blocks."""
        sid = turn.session.session_id
        pin = self.engine.call(lambda core: core.kv.pin_request(request_id, sid))
        pinned, stream = await asyncio.gather(
            pin, self.engine.add_request(turn.prompt_ids, params, request_id), return_exceptions=True)
        if isinstance(stream, BaseException):
            raise stream
        if isinstance(pinned, BaseException):
            stream.abort()
            raise pinned
        turn.result = CompletionResult(request_id, turn.prompt_ids)
        return RecordingStream(stream, turn.result)

    def commit(self, turn: PendingTurn) -> bool:
        """Append the turn to the episode if its request finished (a client that left
        mid-turn leaves the session as it was, so the turn can be retried)."""
        res, session = turn.result, turn.session
        if res.finish_reason is None or session.deleted:
            return False
        session.append_turn(turn.prompt_ids, res.token_ids, res.logprobs, res.weight_versions,
                            res.num_cached_tokens, res.finish_reason, turn.ext.drift)
        session.messages, session.prompt_text = turn.messages, turn.ext.prompt_text
        return True

    async def release(self, turn: PendingTurn) -> None:
        await self.release_session(turn.session)

    async def release_session(self, session: Session) -> None:
        if self.store.release(session):
            await self._unpin([session.session_id])

    # -- the in-process API -------------------------------------------------------------
    async def chat(
        self, session_id: str, messages: list[dict[str, Any]], params: SamplingParams | None = None
    ) -> SessionReply:
        """One turn: the reply, with the session's episode extended by it."""
        turn = await self.begin(session_id, messages)
        try:
            rid = f"session-{session_id}-{turn.index}-{uuid.uuid4().hex[:8]}"
            async for _ in await self.open(turn, params or SamplingParams(), rid):
                pass
            self.commit(turn)
        finally:
            await self.release(turn)
        res = turn.result
        return SessionReply(session_id, turn.index, res.text, res.token_ids, res.logprobs, res.weight_versions,
                            res.finish_reason, len(turn.prompt_ids), res.num_cached_tokens, turn.ext.drift)

    async def episode(self, session_id: str) -> dict[str, Any]:
        await self.sweep()
        return self.store.get(session_id).episode()

    async def delete(self, session_id: str) -> dict[str, Any]:
        """End the session: its blocks lose their protection (they stay cached until evicted)."""
        await self.sweep()
        session = self.store.pop(check_id(session_id))
        await self._unpin([session.session_id])
        return {"id": session_id, "object": "session.deleted", "deleted": True}

    async def sweep(self) -> None:
        """Expire idle sessions (called on every session operation)."""
        gone = self.store.expired()
        if gone:
            await self._unpin([s.session_id for s in gone])

    async def _unpin(self, ids: list[str]) -> None:
        def unpin(core: Any) -> None:
            for sid in ids:
                core.kv.unpin(sid)

        await self.engine.call(unpin)
