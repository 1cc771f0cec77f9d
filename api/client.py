"""Async Python SDK for an asyncengine server.

    async with AsyncClient("http://127.0.0.1:8000") as client:
        res = await client.complete("Hello", max_tokens=16, seed=0)
        async for delta in client.stream_chat([{"role": "user", "content": "Hi"}], max_tokens=16):
            print(delta.text, delta.token_ids, delta.logprobs, delta.weight_versions)

Every call asks for token ids, per-token logprobs and weight versions (override with
keyword arguments); one HTTP session is reused across calls.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson


class APIConnectionError(Exception):
    """The server could not be reached or the connection broke."""


class APIStatusError(Exception):
    """The server answered with an error status and an OpenAI-style error body."""

    def __init__(self, status: int, body: dict[str, Any], headers: Any = None) -> None:
        err = body.get("error") if isinstance(body.get("error"), dict) else {}
        self.status = status
        self.message: str = err.get("message") or str(body)
        self.type: str | None = err.get("type")
        self.param: str | None = err.get("param")
        self.code: str | None = err.get("code")
        self.headers = dict(headers or {})
        super().__init__(f"{status} {self.type}: {self.message}")


class BadRequestError(APIStatusError):
    """400 / 413 / 422: the request is invalid; retrying it unchanged will fail again."""


class NotFoundError(APIStatusError):
    pass


class OverloadedError(APIStatusError):
    """503: the waiting queue is full; retry after `retry_after` seconds."""

    @property
    def retry_after(self) -> float:
        return float(self.headers.get("Retry-After", 1))


class ServerError(APIStatusError):
    pass


def _error(status: int, body: dict[str, Any], headers: Any) -> APIStatusError:
    if status == 404:
        return NotFoundError(status, body, headers)
    if status == 503:
        return OverloadedError(status, body, headers)
    if status >= 500:
        return ServerError(status, body, headers)
    return BadRequestError(status, body, headers)


@dataclass(slots=True)
class Delta:
    """What one engine step added to one choice."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    weight_versions: list[int] = field(default_factory=list)
    # With return_weight_versions, on the last delta: [start, end, version] runs of KV
    # positions in the order computed (for asyncengine.rl.recompute).
    kv_epochs: list[list[int]] | None = None
    # Alternatives per token (token string -> logprob), when top-N was asked for.
    top_logprobs: list[dict[str, float]] | None = None
    raw_logprobs: list[float] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    # Echo / prompt scoring: the prompt's ids and logprobs (first entry None), once.
    prompt_token_ids: list[int] | None = None
    prompt_logprobs: list[float | None] | None = None


@dataclass(slots=True)
class Completion:
    """A full response: one accumulated Delta per choice, plus usage."""

    id: str
    model: str
    choices: list[Delta]
    usage: dict[str, Any]
    # A session turn: {"id", "turn", "drift"} (see api/sessions.py); None otherwise.
    session: dict[str, Any] | None = None

    @property
    def text(self) -> str:
        return self.choices[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.choices[0].token_ids

    @property
    def logprobs(self) -> list[float]:
        return self.choices[0].logprobs


def parse_choice(choice: dict[str, Any]) -> Delta:
    """A Delta from a completion or chat choice (streamed chunk or full response)."""
    d = Delta(index=choice.get("index", 0), finish_reason=choice.get("finish_reason"),
              stop_reason=choice.get("stop_reason"))
    content = choice.get("delta") or choice.get("message")
    d.text = (content.get("content") or "") if content is not None else choice.get("text", "")
    d.token_ids = choice.get("token_ids") or []
    d.weight_versions = choice.get("weight_versions") or []
    d.kv_epochs = choice.get("kv_epochs")
    d.raw_logprobs = choice.get("raw_logprobs")
    d.prompt_token_ids = choice.get("prompt_token_ids")
    lp = choice.get("logprobs")
    if lp is None:
        return d
    if "content" in lp:  # chat
        entries = lp["content"] or []
        d.logprobs = [e["logprob"] for e in entries]
        d.top_logprobs = [{t["token"]: t["logprob"] for t in e.get("top_logprobs", [])} for e in entries]
        return d
    values, tops = lp.get("token_logprobs") or [], lp.get("top_logprobs") or []
    if d.prompt_token_ids is not None and len(values) > len(d.token_ids):  # echo: the prompt comes first
        n = len(d.prompt_token_ids)
        d.prompt_logprobs, values, tops = values[:n], values[n:], tops[n:]
    d.logprobs = values
    d.top_logprobs = tops
    return d


class AsyncClient:
    """One server, one reused HTTP session; see the module docstring."""

    def __init__(
        self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, model: str | None = None,
        timeout: float = 600.0, max_connections: int = 256,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                headers=self._headers, timeout=self._timeout,
                connector=aiohttp.TCPConnector(limit=self._max_connections),
            )
        return self._session

    # -- generation -------------------------------------------------------------------
    async def complete(self, prompt: str | list[int] | list[Any], **params: Any) -> Completion:
        """POST /v1/completions (prompt: text, token ids, or a batch of either)."""
        body = self._body({"prompt": prompt, "logprobs": 0}, params)
        return _completion(await self._post("/v1/completions", body))

    async def chat(self, messages: list[dict[str, Any]], **params: Any) -> Completion:
        """POST /v1/chat/completions."""
        body = self._body({"messages": messages, "logprobs": True}, params)
        return _completion(await self._post("/v1/chat/completions", body))

    def stream_complete(self, prompt: str | list[int] | list[Any], **params: Any) -> AsyncIterator[Delta]:
        """Deltas of a streamed completion, one per engine step and choice."""
        body = self._body({"prompt": prompt, "logprobs": 0, "stream": True}, params)
        return self._stream("/v1/completions", body)

    def stream_chat(self, messages: list[dict[str, Any]], **params: Any) -> AsyncIterator[Delta]:
        """Deltas of a streamed chat completion (the role-only first chunk is skipped)."""
        body = self._body({"messages": messages, "logprobs": True, "stream": True}, params)
        return self._stream("/v1/chat/completions", body)

    def _body(self, fields: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
        """Request body: our defaults, then the call's fields, then the caller's params."""
        body: dict[str, Any] = {"return_token_ids": True}
        if self.model is not None:
            body["model"] = self.model
        return {**body, **fields, **params}

    async def _stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[Delta]:
        """Steps: 1. POST; 2. raise a typed error on a non-2xx status; 3. parse `data:` events;
        4. yield a Delta per choice of each chunk; 5. stop at [DONE]. Leaving early closes
        the connection, which makes the server abort the request."""
        try:
            async with self._http().post(self.base_url + path, data=orjson.dumps(body),
                                         headers={"Content-Type": "application/json"}) as resp:
                await _raise_for_status(resp)
                async for line in resp.content:
                    if not line.startswith(b"data: "):
                        continue
                    data = line[6:].strip()
                    if data == b"[DONE]":
                        return
                    chunk = orjson.loads(data)
                    if "error" in chunk:
                        raise _error(500, chunk, None)
                    for choice in chunk.get("choices", []):
                        if (choice.get("delta") or {}).get("role") and not choice["delta"].get("content"):
                            continue
                        yield parse_choice(choice)
        except aiohttp.ClientConnectionError as exc:
            raise APIConnectionError(str(exc)) from exc

    # -- exact-token sessions (pass session_id="..." to chat / stream_chat) -------------
    async def get_session(self, session_id: str) -> dict[str, Any]:
        """GET /v1/sessions/{id}: token_ids, loss_mask, logprobs, weight_versions, turns, drift."""
        return await self._get(f"/v1/sessions/{quote(session_id, safe='')}")

    async def delete_session(self, session_id: str) -> dict[str, Any]:
        """DELETE /v1/sessions/{id}: end the session."""
        return await self._request("DELETE", f"/v1/sessions/{quote(session_id, safe='')}", None)

    # -- other endpoints --------------------------------------------------------------
    async def tokenize(self, prompt: str | None = None, messages: list[dict[str, Any]] | None = None,
                       add_special_tokens: bool | None = None) -> list[int]:
        body: dict[str, Any] = {"prompt": prompt} if messages is None else {"messages": messages}
        if add_special_tokens is not None:
            body["add_special_tokens"] = add_special_tokens
        return list((await self._post("/tokenize", body))["tokens"])

    async def detokenize(self, token_ids: list[int]) -> str:
        return str((await self._post("/detokenize", {"tokens": token_ids}))["prompt"])

    async def models(self) -> list[str]:
        return [m["id"] for m in (await self._get("/v1/models"))["data"]]

    async def health(self) -> bool:
        try:
            await self._get("/health")
            return True
        except (APIStatusError, APIConnectionError):
            return False

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self._request("POST", path, orjson.dumps(body))

    async def _get(self, path: str) -> dict[str, Any]:
        return await self._request("GET", path, None)

    async def _request(self, method: str, path: str, data: bytes | None) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"} if data is not None else None
        try:
            async with self._http().request(method, self.base_url + path, data=data, headers=headers) as resp:
                await _raise_for_status(resp)
                return orjson.loads(await resp.read())
        except aiohttp.ClientConnectionError as exc:
            raise APIConnectionError(str(exc)) from exc


async def _raise_for_status(resp: aiohttp.ClientResponse) -> None:
    if resp.status < 400:
        return
    raw = await resp.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = {"error": {"message": raw.decode("utf-8", "replace")}}
    raise _error(resp.status, body if isinstance(body, dict) else {"error": {"message": str(body)}}, resp.headers)


def _completion(body: dict[str, Any]) -> Completion:
    return Completion(
        id=body["id"], model=body["model"], choices=[parse_choice(c) for c in body["choices"]],
        usage=body.get("usage") or {}, session=body.get("session"),
    )
