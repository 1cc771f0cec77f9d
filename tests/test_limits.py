"""Keys and limits: --api-key on the inference endpoints (separate from the admin key),
limits on body, headers, n x max_tokens, stop strings and top logprobs; no unpickling."""
from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from api.admin import add_admin_routes
from api.auth import add_api_key
from api.limits import LIMITS_KEY, Limits, run_options
from api.server import create_app
from asyncengine.async_engine import AsyncEngine
from tests.test_server import MODEL, engine  # noqa: F401  (its module-scoped engine fixture)

C, CHAT = "/v1/completions", "/v1/chat/completions"
API_KEY, ADMIN_KEY = "inference-key", "admin-key"
LIMITS = Limits(max_request_tokens=1000, max_stop_strings=3, max_stop_chars=8, max_logprobs=5,
                max_header_bytes=1024, max_headers=20)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
async def client(engine: AsyncEngine) -> AsyncIterator[TestClient]:
    app = create_app(engine, [MODEL], max_body_bytes=16 * 1024)
    add_admin_routes(app, engine, ADMIN_KEY, None)
    add_api_key(app, API_KEY)
    app[LIMITS_KEY] = LIMITS
    server = TestServer(app)
    await server.start_server(**LIMITS.handler_args())  # as run_options hands them to run_app
    async with TestClient(server) as c:
        yield c


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def _post(client: TestClient, path: str, body: object, key: str | None = API_KEY) -> tuple[int, dict]:
    resp = await client.post(path, data=orjson.dumps(body), headers=_auth(key) if key else {})
    return resp.status, orjson.loads(await resp.read())


async def test_api_key_guards_inference_endpoints(client: TestClient) -> None:
    body = {"prompt": "hi", "max_tokens": 2}
    for path, payload in ((C, body), (CHAT, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
                          ("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [5]})):
        for key in (None, "wrong", API_KEY[:-1], ADMIN_KEY):  # the admin key opens no inference door
            status, err = await _post(client, path, payload, key)
            assert status == 401 and err["error"]["code"] == "invalid_api_key", (path, key)
        assert (await _post(client, path, payload))[0] == 200, path
    resp = await client.get("/v1/models", headers={"Authorization": "Basic " + API_KEY})
    assert resp.status == 401
    assert (await client.get("/v1/models", headers=_auth(API_KEY))).status == 200
    for path in ("/health", "/metrics"):  # probes and scrapers need no key, as in vLLM
        assert (await client.get(path)).status == 200


async def test_keys_are_separate(client: TestClient) -> None:
    """The API key does not open the admin endpoints; the admin key does."""
    assert (await client.get("/is_paused", headers=_auth(API_KEY))).status == 403
    assert (await client.get("/is_paused")).status == 401
    resp = await client.get("/is_paused", headers=_auth(ADMIN_KEY))
    assert resp.status == 200 and orjson.loads(await resp.read()) == {"is_paused": False}


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "hi", "stop": ["a", "b", "c", "d"]}, "stop"),
    ({"prompt": "hi", "stop": "x" * 9}, "stop"),
    ({"prompt": "hi", "logprobs": 6}, "logprobs"),
    ({"prompt": "hi", "n": 11, "max_tokens": 100}, "max_tokens"),
    ({"prompt": ["hi", "ho"], "n": 2, "max_tokens": 251}, "max_tokens"),
    ({"prompt": "hi", "n": 4}, "max_tokens"),  # max_tokens unset: the rest of the context (~254) per choice
])
async def test_request_limits(client: TestClient, body: dict, param: str) -> None:
    status, err = await _post(client, C, body)
    assert status == 400 and err["error"]["param"] == param, err
    assert err["error"]["type"] == "invalid_request_error"


async def test_request_limits_chat_top_logprobs(client: TestClient) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    status, err = await _post(client, CHAT, {"messages": msgs, "logprobs": True, "top_logprobs": 6})
    assert status == 400 and err["error"]["param"] == "top_logprobs"
    status, ok = await _post(client, CHAT, {"messages": msgs, "logprobs": True, "top_logprobs": 5, "max_tokens": 2,
                                            "stop": ["a", "b", "c"]})
    assert status == 200 and len(ok["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 5


async def test_within_limits_passes(client: TestClient) -> None:
    status, ok = await _post(client, C, {"prompt": ["hi", "ho"], "n": 2, "max_tokens": 250, "stop": ["x" * 8],
                                         "logprobs": 5})
    assert status == 200 and len(ok["choices"]) == 4


async def test_body_and_header_limits(client: TestClient) -> None:
    status, err = await _post(client, C, {"prompt": "x" * 20_000})
    assert status == 413 and err["error"]["code"] == "request_too_large"
    resp = await client.post(C, json={"prompt": "hi"}, headers={**_auth(API_KEY), "X-Big": "y" * 2000})
    assert resp.status == 400  # the HTTP parser refuses the field (and closes the connection)
    many = {f"X-H{i}": "1" for i in range(30)}
    resp = await client.post(C, json={"prompt": "hi"}, headers={**_auth(API_KEY), **many})
    assert resp.status == 400
    assert (await _post(client, C, {"prompt": "hi", "max_tokens": 1}))[0] == 200


def test_limits_validated() -> None:
    with pytest.raises(ValueError):
        Limits(max_logprobs=21)
    with pytest.raises(ValueError):
        Limits(max_stop_strings=0)


def test_nothing_is_unpickled() -> None:
    """Untrusted input is never unpickled: no pickle, no torch.load, no numpy allow_pickle
    anywhere in the shipped packages (weights come in as safetensors only)."""
    pattern = re.compile(r"\bpickle\b|torch\.load\(|allow_pickle\s*=\s*True|\bjoblib\b|\bdill\b|marshal\.loads")
    offenders = []
    for pkg in ("asyncengine", "api", "kernels"):
        for path in (ROOT / pkg).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line) and not line.lstrip().startswith("#"):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == []


async def test_serve_run_options_reach_the_http_parser(engine: AsyncEngine, caplog: pytest.LogCaptureFixture) -> None:
    """What `serve` hands web.run_app (api.limits.run_options) through aiohttp's own runner:
    the header limits hold and no handler is built without them."""
    app = create_app(engine, [MODEL])
    app[LIMITS_KEY] = LIMITS
    options = run_options(LIMITS, None)
    options.pop("print")  # run_app's own; the rest go to AppRunner as run_app passes them
    runner = web.AppRunner(app, **options)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = "http://127.0.0.1:%d/v1/models" % runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(url, headers={f"X-H{i}": "1" for i in range(30)}) as resp:
                assert resp.status == 400  # 30 header fields > LIMITS.max_headers (aiohttp's own default: 128)
            async with session.get(url) as resp:
                assert resp.status == 200
    finally:
        await runner.cleanup()
    assert "Failed to create request handler" not in caplog.text
