"""--api-key: a bearer key for the inference endpoints (vLLM's flag).

Separate from the admin key (api/admin.py guards the RL admin endpoints with its own):
neither key opens the other's doors. /health and /metrics stay open, as in vLLM, for
probes and scrapers. Keys are compared in constant time (hmac.compare_digest).
"""
from __future__ import annotations

import hmac

from aiohttp import web
from aiohttp.typedefs import Handler

from api.protocol import APIError

# Path prefixes that need the key; endpoints added later (token-in/token-out, sessions)
# fall under them or get a row here.
PROTECTED_PREFIXES = ("/v1/", "/inference/", "/tokenize", "/detokenize", "/tokenizer_info")


def bearer_matches(request: web.Request, key: bytes) -> bool:
    """True when the request carries `Authorization: Bearer <key>` (constant-time compare)."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    # compare_digest: the key must not leak through response timing.
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key)


def add_api_key(app: web.Application, api_key: str | None) -> None:
    """Require the key on the inference endpoints of `app` (no-op without a key)."""
    if not api_key:
        return
    key = api_key.encode()

    @web.middleware
    async def require_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(PROTECTED_PREFIXES) and not bearer_matches(request, key):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <api key>'",
                           "authentication_error", code="invalid_api_key")
        return await handler(request)

    app.middlewares.append(require_key)
