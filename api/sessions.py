"""Exact-token sessions over HTTP (asyncengine/sessions/ does the work).

- `session_id` in a /v1/chat/completions body, or the `X-Session-ID` header: the turn's
  prompt is the session's exact tokens + the template's rendering of the new messages;
  the response carries `session: {id, turn, drift}`.
- `GET /v1/sessions/{id}`: the episode (token ids, loss mask, logprobs and weight
  versions of sampled tokens, turns with boundaries, cached tokens and drift).
- `DELETE /v1/sessions/{id}`: end it. Unknown id: 404; a turn in progress: 409.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from api.prompts import parse_chat, render_chat
from api.protocol import APIError, bad
from api.server import json_response
from asyncengine.sampling_params import SamplingParams
from asyncengine.sessions import PendingTurn, SessionBusyError, SessionEngine, SessionError

if TYPE_CHECKING:
    from api.generation import GenerationHandler
    from asyncengine.async_engine import RequestStream

SESSION_HEADER = "X-Session-ID"
_ERROR_TYPES = {404: "not_found_error", 409: "conflict_error", 429: "rate_limit_error"}


def api_error(exc: SessionError) -> APIError:
    return APIError(exc.status, str(exc), _ERROR_TYPES.get(exc.status, "invalid_request_error"), "session_id", exc.code)


class _TurnHooks:
    """What GenerationHandler.respond asks of a session turn: open the request, head fields."""

    def __init__(self, sessions: SessionEngine, turn: PendingTurn) -> None:
        self.sessions = sessions
        self.turn = turn

    async def add_request(self, prompt: list[int], params: SamplingParams, request_id: str) -> RequestStream:
        return await self.sessions.open(self.turn, params, request_id)  # type: ignore[return-value]

    def head(self) -> dict[str, Any]:
        return self.turn.head()


class SessionAPI:
    """The chat turn of a session and the episode routes."""

    def __init__(self, gen: GenerationHandler) -> None:
        self.gen = gen
        self.sessions = SessionEngine(gen.engine)

    @staticmethod
    def session_id(request: web.Request, body: Any) -> str | None:
        """The turn's session: the body field (taken out of the body) or the header."""
        sid = body.pop("session_id", None) if isinstance(body, dict) else None
        if sid is None:
            sid = request.headers.get(SESSION_HEADER)
        if sid is not None and not isinstance(sid, str):
            raise bad("'session_id' must be a string", "session_id", "invalid_type")
        return sid

    async def chat_turn(self, request: web.Request, body: dict[str, Any], sid: str) -> web.StreamResponse:
        """Steps: 1. validate the body as any chat request; 2. hold the session and build
        the prompt (history + new suffix); 3. serve it, recording the sampled tokens;
        4. append the finished turn to the episode; 5. release the session."""
        engine = self.gen.engine
        req = parse_chat(body, engine.tokenizer, engine.model_info.vocab_size, self.gen.strict_fields,
                         self.gen.tool_parser)
        if req.n != 1:
            raise bad("a session turn has one choice (n = 1)", "n")
        tok = engine.tokenizer
        try:
            tools, kwargs = req.tools.tools, body.get("chat_template_kwargs") or {}
            turn = await self.sessions.begin(
                sid, body["messages"], lambda m, gen: render_chat(m, tok, gen, tools, kwargs))
        except SessionError as exc:
            raise api_error(exc) from exc
        try:
            req.prompts = [turn.prompt_ids]
            resp = await self.gen.respond(request, req, "chatcmpl-", "chat.completion", _TurnHooks(self.sessions, turn))
            self.sessions.commit(turn)
            return resp
        finally:
            await self.sessions.release(turn)

    async def get(self, request: web.Request) -> web.Response:
        try:
            return json_response(await self.sessions.episode(request.match_info["session_id"]))
        except SessionError as exc:
            raise api_error(exc) from exc

    async def delete(self, request: web.Request) -> web.Response:
        sid = request.match_info["session_id"]
        try:
            if self.sessions.store.get(sid).busy:
                raise SessionBusyError(f"session {sid!r} has a turn in progress")
            return json_response(await self.sessions.delete(sid))
        except SessionError as exc:
            raise api_error(exc) from exc


def add_session_routes(app: web.Application, gen: GenerationHandler) -> SessionAPI | None:
    """Sessions on chat completions (through `gen`) and the /v1/sessions/{id} routes
    (none for a model without a tokenizer: there is no chat to hold)."""
    if gen.engine.tokenizer is None:
        return None
    api = SessionAPI(gen)
    gen.sessions = api
    app.router.add_get("/v1/sessions/{session_id}", api.get)
    app.router.add_delete("/v1/sessions/{session_id}", api.delete)
    return api
