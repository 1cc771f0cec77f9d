"""/tokenize, /detokenize and /tokenizer_info (what lm-eval's remote tokenizer asks for)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from api.generation import read_json
from api.prompts import check_token_ids, render_chat
from api.protocol import APIError, bad, check_fields

if TYPE_CHECKING:
    from asyncengine.async_engine import AsyncEngine

_TOKENIZE_FIELDS = {
    "model": "str", "prompt": "str", "messages": "any", "add_special_tokens": "bool",
    "add_generation_prompt": "bool",
}
_DETOKENIZE_FIELDS = {"model": "str", "tokens": "int_list", "skip_special_tokens": "bool"}


def _tokenizer(engine: AsyncEngine) -> Any:
    if engine.tokenizer is None:
        raise APIError(422, "this model has no tokenizer", code="no_tokenizer")
    return engine.tokenizer


async def tokenize(request: web.Request, engine: AsyncEngine) -> dict[str, Any]:
    """{"prompt": str, "add_special_tokens": bool} or {"messages": [...]} -> {"tokens": [...]}."""
    body = check_fields(await read_json(request), _TOKENIZE_FIELDS)
    tok = _tokenizer(engine)
    if "messages" in body:
        text = render_chat(body["messages"], tok, body.get("add_generation_prompt", True))
        ids = tok.encode(text, add_special_tokens=body.get("add_special_tokens", False))
    elif "prompt" in body:
        ids = tok.encode(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))
    else:
        raise bad("'prompt' or 'messages' is required", "prompt", "missing_required_parameter")
    return {"tokens": list(ids), "count": len(ids), "max_model_len": engine.model_info.max_model_len}


async def detokenize(request: web.Request, engine: AsyncEngine) -> dict[str, Any]:
    """{"tokens": [...]} -> {"prompt": str}."""
    body = check_fields(await read_json(request), _DETOKENIZE_FIELDS)
    if "tokens" not in body:
        raise bad("'tokens' is required", "tokens", "missing_required_parameter")
    ids = check_token_ids(body["tokens"], engine.model_info.vocab_size, "tokens")
    text = _tokenizer(engine).decode(ids, skip_special_tokens=body.get("skip_special_tokens", False))
    return {"prompt": text}


def tokenizer_info(engine: AsyncEngine) -> dict[str, Any]:
    """Special tokens and template of the tokenizer, as vLLM's /tokenizer_info reports them."""
    tok = _tokenizer(engine)
    info: dict[str, Any] = {
        "tokenizer_class": type(tok).__name__,
        "vocab_size": engine.model_info.vocab_size,
        "max_model_len": engine.model_info.max_model_len,
        "eos_token_ids": list(engine.model_info.eos_token_ids),
        "chat_template": getattr(tok, "chat_template", None),
    }
    for name in ("eos_token", "bos_token", "pad_token", "unk_token"):
        value = getattr(tok, name, None)
        info[name] = str(value) if value is not None else None
        token_id = getattr(tok, f"{name}_id", None)
        info[f"{name}_id"] = int(token_id) if token_id is not None else None
    return info
