"""/v1/completions and /v1/chat/completions: requests in, engine streams out (SSE or JSON)."""
from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any, TypeVar

import orjson
from aiohttp import web

from api.limits import LIMITS_KEY, Limits, check_limits
from api.metrics import Metrics
from api.prompts import parse_chat, parse_completion
from api.protocol import IGNORED_FIELDS_HEADER, APIError, GenerationRequest, ignored_names
from api.responses import ChoiceBuilder, TokenStrings, merge_pieces, role_piece, usage
from asyncengine.async_engine import AsyncEngine, EngineDeadError, RequestStream
from asyncengine.engine_core import EngineOverloadedError
from asyncengine.outputs import RequestOutput
from asyncengine.reliability.errors import QueueTimeoutError, RequestFailedError
from asyncengine.sampling_params import InvalidRequestError

T = TypeVar("T")
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def engine_error(exc: Exception) -> APIError:
    """The HTTP answer to an exception raised by the engine while admitting a request."""
    if isinstance(exc, InvalidRequestError):
        code = "context_length_exceeded" if "context length" in str(exc) else None
        return APIError(400, str(exc), param=exc.param, code=code)
    if isinstance(exc, EngineOverloadedError):
        return APIError(503, f"The server is overloaded: {exc}", "server_error", code="overloaded",
                        headers={"Retry-After": "1"})
    if isinstance(exc, EngineDeadError):
        return APIError(500, str(exc), "server_error", code="engine_dead")
    if isinstance(exc, QueueTimeoutError):
        return APIError(503, f"The server is overloaded: {exc}", "server_error", code=exc.code,
                        headers={"Retry-After": "1"})
    if isinstance(exc, RequestFailedError):  # this request failed inside the engine; others go on
        return APIError(500, f"The request failed in the engine: {exc}", "server_error", code=exc.code)
    raise exc


def ignored_header(req: GenerationRequest) -> dict[str, str]:
    """The header naming the request fields that were ignored (none: no header)."""
    return {IGNORED_FIELDS_HEADER: ignored_names(req.ignored_fields)} if req.ignored_fields else {}


@contextlib.contextmanager
def _tokenizer_errors() -> Iterator[None]:
    """Parsing raises APIError for bad input; anything else is the tokenizer failing on
    this prompt: a 500 for this request only."""
    try:
        yield
    except APIError:
        raise
    except Exception as exc:
        raise APIError(500, f"tokenizing the prompt failed: {exc!r}", "server_error", code="tokenizer_error") from exc


def sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class GenerationHandler:
    def __init__(
        self, engine: AsyncEngine, metrics: Metrics, served_names: list[str], strict_fields: bool = False,
        tool_parser: str | None = None,
    ) -> None:
        from api.tools import default_parser_name, get_parser

        self.engine = engine
        self.metrics = metrics
        self.served_names = served_names
        # Unknown request fields: 400 when strict, else ignored and named in a header.
        self.strict_fields = strict_fields
        self.tool_parser = tool_parser or default_parser_name(engine.tokenizer)
        get_parser(self.tool_parser)  # an unknown name fails at startup, not per request
        self.tokens = TokenStrings(engine.tokenizer)
        self.id_tokens = TokenStrings(engine.tokenizer, as_ids=True)
        # Exact-token chat sessions (api/sessions.py sets it when it registers its routes).
        self.sessions: Any = None
        # Longest prompt + output a request may need: the context, bounded by the KV pool.
        self.limit = min(engine.model_info.max_model_len, engine.kv_capacity_tokens)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        with _tokenizer_errors():
            req = parse_completion(body, self.engine.tokenizer, self.engine.model_info.vocab_size,
                                   self.strict_fields)
        return await self.respond(request, req, "cmpl-", "text_completion")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        if self.sessions is not None and (sid := self.sessions.session_id(request, body)) is not None:
            return await self.sessions.chat_turn(request, body, sid)
        info = self.engine.model_info
        with _tokenizer_errors():
            req = parse_chat(body, self.engine.tokenizer, info.vocab_size, self.strict_fields, self.tool_parser)
        return await self.respond(request, req, "chatcmpl-", "chat.completion")

    async def respond(
        self, request: web.Request, req: GenerationRequest, prefix: str, obj: str, turn: Any = None
    ) -> web.StreamResponse:
        """Run a parsed request and answer it (SSE or JSON); shared by every generating endpoint.
        `turn` (api/sessions.py) opens the request itself and adds to the response head."""
        if req.model is not None and req.model not in self.served_names:
            raise APIError(404, f"The model `{req.model}` does not exist.", param="model", code="model_not_found")
        check_limits(req, request.app.get(LIMITS_KEY) or Limits(), self.limit)
        t0 = time.perf_counter()
        rid = prefix + (req.request_id or uuid.uuid4().hex)
        streams = await self._open(req, rid, turn)
        tokens = self.id_tokens if req.tokens_as_ids else self.tokens
        builders = [ChoiceBuilder(req, i, i // req.n, tokens) for i in range(len(streams))]
        head: dict[str, Any] = {"id": rid, "object": obj, "created": int(time.time()),
                                "model": req.model or self.served_names[0]}
        if req.kind == "generate":  # vLLM's /inference/v1/generate answers with request_id only
            head = {"request_id": rid}
        if turn is not None:
            head.update(turn.head())
        try:
            if req.stream:
                return await self._stream(request, req, streams, builders, head, t0)
            return await self._full(req, streams, builders, head, t0)
        finally:
            for s in streams:
                s.abort()
            self.metrics.e2e.observe(time.perf_counter() - t0)

    async def _open(self, req: GenerationRequest, rid: str, turn: Any = None) -> list[RequestStream]:
        """Admit every choice in one engine step boundary; on any error abort the others."""
        try:
            params = [req.params(i // req.n, i % req.n, self.limit) for i in range(len(req.prompts) * req.n)]
        except InvalidRequestError as exc:
            raise engine_error(exc) from exc
        add = self.engine.add_request if turn is None else turn.add_request
        results = await asyncio.gather(
            *(add(req.prompts[i // req.n], p, f"{rid}-{i}") for i, p in enumerate(params)),
            return_exceptions=True,
        )
        streams = [r for r in results if not isinstance(r, BaseException)]
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            for s in streams:
                s.abort()
            raise engine_error(errors[0]) if isinstance(errors[0], Exception) else errors[0]
        self.metrics.prompt_tokens.inc(sum(len(p) for p in req.prompts))
        return streams

    async def _full(
        self, req: GenerationRequest, streams: list[RequestStream], builders: list[ChoiceBuilder],
        head: dict[str, Any], t0: float,
    ) -> web.Response:
        pieces: list[list[dict[str, Any]]] = [[] for _ in streams]
        try:
            async for i, out in self._merged(streams, t0):
                pieces[i].append(builders[i].piece(out))
        except (EngineDeadError, RequestFailedError) as exc:
            raise engine_error(exc) from exc
        choices = [merge_pieces(p) for p in pieces]
        body: dict[str, Any] = {**head, "choices": choices, "usage": usage(req, builders)}
        if req.kind == "chat" and req.return_token_ids:
            body["prompt_token_ids"] = req.prompts[0]
        if req.kind == "generate" or req.kind == "chat" and req.prompt_logprobs is not None:  # vLLM: top level
            body["prompt_logprobs"] = choices[0].get("prompt_logprobs")
            for c in choices:
                c.pop("prompt_logprobs", None)
        return web.Response(body=orjson.dumps(body), content_type="application/json", headers=ignored_header(req))

    async def _stream(
        self, request: web.Request, req: GenerationRequest, streams: list[RequestStream],
        builders: list[ChoiceBuilder], head: dict[str, Any], t0: float,
    ) -> web.StreamResponse:
        """Steps: 1. send headers; 2. (chat) a role chunk per choice; 3. one chunk per delta;
        4. the usage chunk if asked; 5. [DONE]. A failed write (client gone) ends it; the
        caller aborts the requests. Headers wait for the first delta, so an error before it
        (a queue timeout: 503) is an HTTP status, not an event."""
        deltas = self._merged(streams, t0)
        try:
            first_delta = await deltas.__anext__()
        except (EngineDeadError, RequestFailedError) as exc:
            raise engine_error(exc) from exc
        resp = web.StreamResponse(headers={**_SSE_HEADERS, **ignored_header(req)})
        await resp.prepare(request)
        chunk_head = {**head, "object": head["object"] + ".chunk"} if req.kind == "chat" else head
        if req.kind == "chat":
            first = {**chunk_head, "choices": [role_piece(b.index) for b in builders]}
            if req.return_token_ids:
                first["prompt_token_ids"] = req.prompts[0]
            await resp.write(sse(first))
        try:
            async for i, out in _prepend(first_delta, deltas):
                chunk = {**chunk_head, "choices": [builders[i].piece(out)]}
                if req.continuous_usage:
                    chunk["usage"] = usage(req, builders)
                await resp.write(sse(chunk))
            if req.include_usage:
                await resp.write(sse({**chunk_head, "choices": [], "usage": usage(req, builders)}))
        except (EngineDeadError, RequestFailedError) as exc:
            await resp.write(sse(engine_error(exc).body()))
        except ConnectionResetError:
            return resp  # the client left; respond() aborts its requests
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def _merged(self, streams: list[RequestStream], t0: float) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Deltas of all choices as they come, tagged with the choice index."""
        first = True
        async for i, out in _merge(streams):
            if first and out.token_ids:
                first = False
                self.metrics.ttft.observe(time.perf_counter() - t0)
            self.metrics.generation_tokens.inc(len(out.token_ids))
            yield i, out


async def _prepend(first: T, rest: AsyncIterator[T]) -> AsyncIterator[T]:
    yield first
    async for item in rest:
        yield item


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Steps: 1. one stream: iterate it directly (the common case, no tasks); 2. several:
    a task per stream feeds one queue; 3. on exit cancel the tasks (which aborts their requests)."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                queue.put_nowait((i, out))
        except Exception as exc:  # forwarded to the consumer, which re-raises it
            queue.put_nowait((i, exc))
        queue.put_nowait((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def read_json(request: web.Request) -> Any:
    """The parsed body; invalid JSON is a 400 (a body over the size limit is a 413)."""
    raw = await request.read()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise APIError(400, f"Invalid JSON body: {exc}", code="invalid_json") from exc
