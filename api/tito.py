"""vLLM's token-in/token-out endpoint: `POST /inference/v1/generate` (JSON or SSE).

Clients that render prompts themselves (verifiers' training path, SkyRL, TRL with features)
send token ids and read token ids back:

    {model?, token_ids: [int], sampling_params: {max_tokens, temperature, top_p, top_k, min_p,
     min_tokens, stop, stop_token_ids, include_stop_str_in_output, skip_special_tokens,
     logprobs, prompt_logprobs, seed, n, ...}, cache_salt?, request_id?, priority?, stream?}
    -> {request_id, choices: [{index, token_ids, logprobs: {content: [{token: "token_id:<id>",
        logprob, top_logprobs}]} | null, finish_reason, stop_reason, weight_versions}],
        prompt_logprobs: [...] | null, usage}

Every logprob token is "token_id:<id>" (no text is returned, none is needed); each sampled
token carries the weight version that produced it. Unknown keys at the top level and inside
sampling_params are ignored and named in a response header (400 with
--strict-request-fields). A stream sends the same choice pieces as chunks
`{request_id, choices: [piece]}`, then a usage chunk if stream_options.include_usage, then
`data: [DONE]`; concatenated they equal the full response. Errors name the offending field
without its `sampling_params.` prefix (`param: "max_tokens"`), as the OpenAI endpoints do.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from api.prompts import check_token_ids
from api.protocol import GenerationRequest, bad, check_fields, check_unsupported, common_request
from asyncengine.sampling_params import MAX_TOP_LOGPROBS

if TYPE_CHECKING:
    from api.generation import GenerationHandler

_TOP_FIELDS = {
    "model": "str", "token_ids": "any", "sampling_params": "object", "cache_salt": "str", "request_id": "str",
    "priority": "int", "stream": "bool", "stream_options": "object", "features": "any",
}
# vLLM's SamplingParams fields we honour (and our logprob extensions), with their JSON kind.
_SAMPLING_FIELDS = {
    "n": "int", "max_tokens": "int", "min_tokens": "int", "temperature": "number", "top_p": "number",
    "top_k": "int", "min_p": "number", "presence_penalty": "number", "frequency_penalty": "number",
    "repetition_penalty": "number", "seed": "int", "stop": "stop", "stop_token_ids": "int_list",
    "ignore_eos": "bool", "include_stop_str_in_output": "bool", "skip_special_tokens": "bool",
    "spaces_between_special_tokens": "bool", "logprobs": "int", "prompt_logprobs": "int",
    "logprobs_mode": "str", "return_raw_logprobs": "bool", "return_log_kept_mass": "bool", "logit_bias": "object",
    "structured_outputs": "object",  # json / regex / choice / grammar (api/structured.py)
}


def parse_generate(body: Any, vocab_size: int, strict: bool = False) -> GenerationRequest:
    """Validate a /inference/v1/generate body -> a GenerationRequest of kind "generate"."""
    ignored: list[str] | None = None if strict else []
    body = check_fields(body, _TOP_FIELDS, ignored)
    sampling = check_fields(body.get("sampling_params", {}), _SAMPLING_FIELDS, ignored)
    if "token_ids" not in body:
        raise bad("'token_ids' is required", "token_ids", "missing_required_parameter")
    ids = check_token_ids(body["token_ids"], vocab_size, "token_ids")
    if not ids:
        raise bad("'token_ids' is empty", "token_ids")
    if body.get("features") is not None:
        raise bad("multimodal features are not supported", "features", "unsupported_parameter")
    # One flat body in the OpenAI endpoints' vocabulary, validated by the same code.
    flat = {**sampling, **{k: body[k] for k in ("model", "stream", "stream_options", "request_id", "cache_salt",
                                                  "priority") if k in body}}
    check_unsupported(flat)
    req = common_request("generate", flat, [ids])
    logprobs = sampling.get("logprobs")
    if logprobs is not None:
        if not 0 <= logprobs <= MAX_TOP_LOGPROBS:
            raise bad(f"'sampling_params.logprobs' must be between 0 and {MAX_TOP_LOGPROBS}, got {logprobs}",
                      "logprobs")
        req.logprobs = logprobs
        req.sampling["logprobs"] = logprobs
    req.return_token_ids = True
    req.tokens_as_ids = True
    req.ignored_fields = [] if ignored is None else ignored
    return req


class TitoHandler:
    """The endpoint, served by the generation handler's admission, merging and SSE code."""

    def __init__(self, gen: GenerationHandler) -> None:
        self.gen = gen

    async def generate(self, request: web.Request) -> web.StreamResponse:
        from api.generation import read_json

        req = parse_generate(await read_json(request), self.gen.engine.model_info.vocab_size, self.gen.strict_fields)
        return await self.gen.respond(request, req, "", "generate")
